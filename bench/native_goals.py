"""The native backend's goals (issue 11), side by side in one process on this CPU.

    OMP_WAIT_POLICY=PASSIVE python bench/native_goals.py [--quick | --small | --ce | --only CASE]
    OMP_WAIT_POLICY=PASSIVE python bench/native_goals.py --only host [--rounds 9 --calls 400]
    THP_MEM_ALLOC_ENABLE=1 OMP_WAIT_POLICY=PASSIVE python bench/native_goals.py

Each row times forward + backward per call (best of rounds) for: fused_ce through its public
API with ``backend="native"``, the native modules' one-pass call that the scalar-loss fast path
makes (forward with ``grad_scale``: loss and gradient in one pass, into a reused gradient
buffer), torch eager and ``torch.compile`` of torch's loss. The large shapes use all threads
and wall time; the small shapes run at 1 thread and are timed in the calling thread's CPU time.
The conditions (threads, load average, allocator and OpenMP settings) are printed with the
table: on a shared machine only ratios within one run mean anything. Wall-time rows also give
the process's CPU time per call (all threads), which shows whether the threads ran in
parallel (CPU time near threads x wall) and how much of the wall time was spent waiting for a
core on a loaded machine. The linear CE case also gives each provider's peak tensor memory
above its inputs (``fused_ce._memory.peak_bytes``, one extra call under the profiler).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import fused_ce
from fused_ce._common import CEOptions
from fused_ce._memory import peak_bytes
from fused_ce._outputs import empty_output
from fused_ce.native import bce as native_bce
from fused_ce.native import cross_entropy as native_ce


def best_of(fn, rounds: int, calls: int, clock=time.perf_counter) -> tuple[float, float]:
    """Best per-call time in seconds over ``rounds`` rounds of ``calls`` calls, and the
    process CPU time per call in that round."""
    fn()
    best, cpu = float("inf"), float("nan")
    for _ in range(rounds):
        start, start_cpu = clock(), time.process_time()
        for _ in range(calls):
            fn()
        elapsed = (clock() - start) / calls
        if elapsed < best:
            best, cpu = elapsed, (time.process_time() - start_cpu) / calls
    return best, cpu


def ce_case(n: int, c: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=gen).to(dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    grad = torch.empty_like(x)
    scale = torch.tensor(1.0 / n)
    compiled = torch.compile(F.cross_entropy)

    def run(loss_fn):
        def call():
            leaf = x.detach().requires_grad_(True)
            loss_fn(leaf, y).backward()

        return call

    def one_pass():
        native_ce.forward(
            x.unsqueeze(-1),
            y.unsqueeze(-1),
            None,
            CEOptions(),
            grad_scale=scale,
            grad_logits=grad.unsqueeze(-1),
        )

    return {
        "fused_ce native (API)": run(
            lambda a, b: fused_ce.softmax_cross_entropy(a, b, backend="native")
        ),
        "native one-pass": one_pass,
        "torch eager": run(F.cross_entropy),
        "torch.compile": run(compiled),
    }


def bce_case(n: int, c: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=gen)
    t = torch.randint(0, 2, (n, c), generator=gen).float()
    grad_input = torch.empty_like(x)
    loss_sum = torch.empty(())
    scale = torch.tensor(1.0 / x.numel())
    compiled = torch.compile(F.binary_cross_entropy_with_logits)

    def run(loss_fn):
        def call():
            leaf = x.detach().requires_grad_(True)
            loss_fn(leaf, t).backward()

        return call

    def one_pass():
        native_bce.run(x, t, None, None, scale, None, grad_input, None, loss_sum=loss_sum)

    def one_pass_new_buffer():
        # The API's allocation (fused_ce._outputs.empty_output) with the kernel, no autograd.
        out = empty_output(x)
        native_bce.run(x, t, None, None, scale, None, out, None, loss_sum=loss_sum)

    return {
        "fused_ce native (API)": run(
            lambda a, b: fused_ce.sigmoid_binary_cross_entropy(a, b, backend="native")
        ),
        "native one-pass": one_pass,
        "one-pass, new gradient": one_pass_new_buffer,
        "torch eager": run(F.binary_cross_entropy_with_logits),
        "torch.compile": run(compiled),
    }


def linear_case(n: int, d: int, v: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen) / d**0.5
    w = torch.randn(v, d, generator=gen)
    y = torch.randint(0, v, (n,), generator=gen)
    logits, grad_x, grad_w = torch.empty(n, v), torch.empty(n, d), torch.empty(v, d)

    def gemms():
        torch.mm(x, w.t(), out=logits)
        torch.mm(logits, w, out=grad_x)
        torch.mm(logits.t(), x, out=grad_w)

    def run(loss_fn):
        def call():
            a, b = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
            loss_fn(a, b, y).backward()

        return call

    def reference(a, b, t):
        return F.cross_entropy(F.linear(a, b), t)

    cases = {
        "three GEMMs": gemms,
        "fused_ce native": run(
            lambda a, b, t: fused_ce.linear_cross_entropy(a, b, t, backend="native")
        ),
        "torch eager": run(reference),
        "torch.compile": run(torch.compile(reference)),
    }
    if hasattr(F, "linear_cross_entropy"):
        options = torch.nn.LinearCrossEntropyOptions()
        cases["torch chunked"] = run(
            lambda a, b, t: F.linear_cross_entropy(a, b, t, options=options)
        )
    return cases


def host_cases() -> dict:
    """The per-call host cost at the lecture's shapes (issue 21), as a training loop and an
    evaluation loop call the loss: name -> (fused_ce native through the public API, torch
    eager). Forward + backward reuses one leaf (``x.grad = None``, then ``.backward()``);
    the forward alone runs under ``torch.no_grad()``."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 11, generator=gen)
    classes = torch.randint(0, 11, (64,), generator=gen)
    bits = torch.randn(64, 1, generator=gen)
    labels = torch.randint(0, 2, (64, 1), generator=gen).float()

    def ours_ce(a, b):
        return fused_ce.softmax_cross_entropy(a, b, backend="native")

    def ours_bce(a, b):
        return fused_ce.sigmoid_binary_cross_entropy(a, b, backend="native")

    def train(loss_fn, x, t):
        leaf = x.clone().requires_grad_(True)

        def call():
            leaf.grad = None
            loss_fn(leaf, t).backward()

        return call

    def evaluate(loss_fn, x, t):
        def call():
            with torch.no_grad():
                loss_fn(x, t)

        return call

    return {
        "CE 64 x 11 fwd+bwd": (
            train(ours_ce, logits, classes),
            train(F.cross_entropy, logits, classes),
        ),
        "BCE 64 x 1 fwd+bwd": (
            train(ours_bce, bits, labels),
            train(F.binary_cross_entropy_with_logits, bits, labels),
        ),
        "CE 64 x 11 forward, no_grad": (
            evaluate(ours_ce, logits, classes),
            evaluate(F.cross_entropy, logits, classes),
        ),
        "BCE 64 x 1 forward, no_grad": (
            evaluate(ours_bce, bits, labels),
            evaluate(F.binary_cross_entropy_with_logits, bits, labels),
        ),
    }


def report_host(rounds: int, calls: int) -> None:
    """Each case's fused_ce and torch eager calls alternated round by round (both see the same
    load), 1 thread, wall time (the goal's clock) and the calling thread's CPU time (which a
    loaded machine's preemptions do not inflate); best of ``rounds`` x ``calls``."""
    torch.set_num_threads(1)
    print(f"\nhost cost per call, 1 thread, best of {rounds} x {calls}, microseconds")
    print(
        f"  {'case':30s} {'fused wall':>10s} {'eager wall':>10s} {'ratio':>6s}"
        f" {'fused cpu':>10s} {'eager cpu':>10s} {'ratio':>6s}"
    )
    for name, pair in host_cases().items():
        best = [[float("inf")] * 2 for _ in pair]
        for fn in pair:
            for _ in range(max(20, calls // 10)):
                fn()
        for _ in range(rounds):
            for i, fn in enumerate(pair):
                wall, cpu = time.perf_counter(), time.thread_time()
                for _ in range(calls):
                    fn()
                best[i][0] = min(best[i][0], (time.perf_counter() - wall) / calls * 1e6)
                best[i][1] = min(best[i][1], (time.thread_time() - cpu) / calls * 1e6)
        (ours_wall, ours_cpu), (eager_wall, eager_cpu) = best
        print(
            f"  {name:30s} {ours_wall:10.1f} {eager_wall:10.1f} {ours_wall / eager_wall:6.2f}"
            f" {ours_cpu:10.1f} {eager_cpu:10.1f} {ours_cpu / eager_cpu:6.2f}"
        )


def report(
    title: str, cases: dict, rounds: int, calls: int, threads: int, memory: bool = False
) -> None:
    torch.set_num_threads(threads)
    # One thread: the calling thread's CPU time, which a loaded machine's preemptions do not
    # inflate (all the work of a 1-thread call runs on it); several: wall time.
    clock = time.thread_time if threads == 1 else time.perf_counter
    kind = "CPU time of the calling thread" if threads == 1 else "wall time"
    print(f"\n{title} ({threads} thread{'s' if threads > 1 else ''}, {kind})")
    times = {}
    for name, fn in cases.items():
        times[name] = best_of(fn, rounds, calls, clock)
    base = times.get("torch eager", (None,))[0]
    compiled = times.get("torch.compile", (None,))[0]
    for name, (seconds, cpu) in times.items():
        ratio = f"{seconds / base:5.2f} x eager" if base else ""
        ratio += f"  {seconds / compiled:5.2f} x compile" if compiled else ""
        line = f"  {name:24s} {seconds * 1e3:10.3f} ms  {ratio}"
        if threads > 1:
            line += f"  (process CPU {cpu * 1e3:.1f} ms)"
        if memory:
            line += f"  peak {peak_bytes(cases[name]) / 2**20:7.1f} MiB"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the linear CE case")
    parser.add_argument(
        "--small", action="store_true", help="only the small 1-thread shapes (the host cost)"
    )
    parser.add_argument(
        "--ce", action="store_true", help="only the softmax + CE rows (large and small shapes)"
    )
    parser.add_argument(
        "--only",
        choices=("ce", "bce", "small", "linear", "host"),
        help="run only this group of cases ('host': the per-call cost at 64 x 11 and 64 x 1, "
        "forward + backward and forward under no_grad, against torch eager)",
    )
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the 'host' group")
    parser.add_argument("--calls", type=int, default=400, help="calls per round, 'host' group")
    args = parser.parse_args()
    run_group = {
        "ce": not args.small and args.only in (None, "ce"),
        "bce": not (args.small or args.ce) and args.only in (None, "bce"),
        "small": args.only in (None, "small"),
        "linear": not (args.quick or args.small or args.ce) and args.only in (None, "linear"),
        "host": args.only in (None, "host"),
    }
    cores = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {cores} threads, capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native build {fused_ce.native.capability()}"
    )
    print(
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load average at start {os.getloadavg()}"
    )
    if run_group["ce"]:
        for dtype in (torch.float32, torch.bfloat16):
            report(f"CE fwd+bwd 4096 x 32768 {dtype}", ce_case(4096, 32768, dtype), 3, 1, cores)
    if run_group["bce"]:
        report("BCE fwd+bwd 4096 x 1024 fp32", bce_case(4096, 1024), 7, 5, cores)
        report("BCE fwd+bwd 4096 x 1024 fp32", bce_case(4096, 1024), 5, 3, 1)
    if run_group["small"]:
        for n in (1024, 64):
            report(f"CE fwd+bwd {n} x 11 fp32", ce_case(n, 11, torch.float32), 5, 200, 1)
            if not args.ce:
                report(f"BCE fwd+bwd {n} x 1 fp32", bce_case(n, 1), 5, 200, 1)
    if run_group["host"]:
        report_host(args.rounds, args.calls)
    if run_group["linear"]:
        linear = linear_case(8192, 512, 32768)
        report("linear CE fwd+bwd 8192 x 512 x 32768 fp32", linear, 2, 1, cores, memory=True)
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
