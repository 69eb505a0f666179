"""Host work per public call with the Triton launches stubbed out, beside torch eager's whole
call (issue 16; docs/perf-notes.md has the method and the figures).

Run on a CPU machine::

    TRITON_INTERPRET=1 PYTHONPATH=. python bench/host_cost.py [--rounds 7] [--calls 300]

Each Triton launch is replaced by a function that only counts it (``fused_ce.launch.counting``),
so what is timed is everything fused_ce does on the host around its kernels: validation,
allocation, the autograd node, the launchers' argument preparation and the call itself with
its keyword arguments. Left out, and to be added for a GPU: Triton's own ``JITFunction.run``
per launch (specialization key over every argument, cache lookup, the C launcher) and the
device launch of each small torch op. The "GPU check" row has one ignored class index, which
sends a CPU target through the device-side bounds check a CUDA target always takes. Torch
eager runs its whole call (its kernels on these tiny tensors take a few microseconds); the
compiled row puts ``torch.compile`` of fused_ce beside ``torch.compile(F.cross_entropy)``,
each graph reused.
One thread; the best of ``--rounds`` rounds of ``--calls`` calls, as wall time and as this
thread's CPU time (the latter moves less when other processes share the cores). Not a test:
it prints a table.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fused_ce  # noqa: E402
from fused_ce.launch.counting import count_launches  # noqa: E402


def _cases() -> dict:
    """name -> (fused_ce call, torch's call): forward + backward at the issue's sizes (64 x
    11 logits; a 64 x 32 input to an 11-class head)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 11, generator=gen).requires_grad_()
    classes = torch.randint(0, 11, (64,), generator=gen)
    # One ignored row: the class-index check then runs on the device (its torch ops), as it
    # always does for CUDA tensors; without one, a CPU target is checked on the host.
    classes_ignored = classes.clone()
    classes_ignored[0] = -100
    probs = torch.rand(64, 11, generator=gen)
    hidden = torch.randn(64, 32, generator=gen).requires_grad_()
    head = torch.randn(11, 32, generator=gen).requires_grad_()

    def ce(f, target=classes):
        return lambda: f(logits, target).backward()

    def bce(f):
        return lambda: f(logits, probs).backward()

    return {
        "CE fwd+bwd (mean)": (
            ce(lambda x, t: fused_ce.cross_entropy(x, t, backend="triton")),
            ce(F.cross_entropy),
        ),
        "CE fwd+bwd (mean), GPU check": (
            ce(lambda x, t: fused_ce.cross_entropy(x, t, backend="triton"), classes_ignored),
            ce(F.cross_entropy, classes_ignored),
        ),
        "CE fwd+bwd (none, .sum())": (
            ce(lambda x, t: fused_ce.cross_entropy(x, t, reduction="none", backend="triton").sum()),
            ce(lambda x, t: F.cross_entropy(x, t, reduction="none").sum()),
        ),
        "BCE fwd+bwd (mean)": (
            bce(lambda x, t: fused_ce.binary_cross_entropy_with_logits(x, t, backend="triton")),
            bce(F.binary_cross_entropy_with_logits),
        ),
        "linear CE fwd+bwd (mean)": (
            lambda: fused_ce.linear_cross_entropy(
                hidden, head, classes, backend="triton"
            ).backward(),
            lambda: F.cross_entropy(F.linear(hidden, head), classes).backward(),
        ),
        # The graph is compiled once (the warm-up) and reused; the custom ops run inside it.
        "CE fwd+bwd (mean), compiled": (
            ce(torch.compile(lambda x, t: fused_ce.cross_entropy(x, t, backend="triton"))),
            ce(torch.compile(F.cross_entropy)),
        ),
        "CE forward only (no grad)": (
            lambda: fused_ce.cross_entropy(logits.detach(), classes, backend="triton"),
            lambda: F.cross_entropy(logits.detach(), classes),
        ),
    }


def _best(fn, rounds: int, calls: int) -> tuple[float, float]:
    """Best-of-rounds microseconds per call: (wall, this thread's CPU)."""
    for _ in range(max(10, calls // 10)):
        fn()
    wall = cpu = float("inf")
    for _ in range(rounds):
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        wall = min(wall, (time.perf_counter() - start_wall) / calls)
        cpu = min(cpu, (time.thread_time() - start_cpu) / calls)
    return wall * 1e6, cpu * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; us per call, best of {args.rounds} x {args.calls}")
    print(f"{'call':28s} {'fused_ce host':>20s} {'torch (whole call)':>20s} {'launches':>10s}")
    print(f"{'':28s} {'wall':>9s} {'cpu':>10s} {'wall':>9s} {'cpu':>10s}")
    for name, (ours, eager) in _cases().items():
        with count_launches(execute=False) as launches:
            ours()
            n_launches = sum(launches.values())
            ours_wall, ours_cpu = _best(ours, args.rounds, args.calls)
        eager_wall, eager_cpu = _best(eager, args.rounds, args.calls)
        print(
            f"{name:28s} {ours_wall:9.1f} {ours_cpu:10.1f} {eager_wall:9.1f} {eager_cpu:10.1f}"
            f" {n_launches:10d}"
        )


if __name__ == "__main__":
    main()
