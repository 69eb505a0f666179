"""Distillation losses (issue 24, part 1) beside the plain PyTorch formula, in one process.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_distill.py            # the issue's CPU shapes
    OMP_WAIT_POLICY=PASSIVE python bench/bench_distill.py --tiny     # a seconds-long check

Logits form, forward + backward of the student's logits per call (best of ``--rounds``):
``fused_ce.kl_div_with_logits`` and ``jsd_with_logits`` (``--backend``, default native on CPU,
Triton on CUDA) against ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T),
log_target=True)`` and the JSD written with torch ops, at N x V (default 4096 x 32768 fp32;
goal: at most 0.5 x the formula's time).

Linear form, forward + backward of the student's hidden states and head: ``linear_kl_div``
against the unfused formula (both heads' logits, then the formula), one
``fused_ce.linear_cross_entropy`` of the student's head, and the GEMMs the loss must do (both
heads' logits, ``dX``, ``dW``), at N x D x V (default 8192 x 512 x 32768 fp32; goals: peak
memory at most 1.2 x one linear CE's, time at most 1.15 x the GEMMs'). Peak memory is the
tensor memory a call holds above its inputs (``fused_ce._memory.peak_bytes``, one extra call
under the profiler).

Prints the conditions (torch version, threads, load average, OMP_WAIT_POLICY) with the table:
on a shared machine only ratios within one run mean anything. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import fused_ce
from fused_ce._memory import peak_bytes

TEMPERATURE = 2.0


def best_of(fn, rounds: int) -> float:
    """Best wall time of ``rounds`` calls after one warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def formula_kl(s, t):
    return F.kl_div(
        F.log_softmax(s / TEMPERATURE, -1),
        F.log_softmax(t / TEMPERATURE, -1),
        log_target=True,
        reduction="batchmean",
    )


def formula_jsd(s, t, beta=0.5):
    log_q = F.log_softmax(s / TEMPERATURE, -1)
    log_p = F.log_softmax(t / TEMPERATURE, -1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
    kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="batchmean")
    return beta * kl_p + (1 - beta) * kl_q


def logits_rows(n: int, v: int, dtype: torch.dtype, device: str, backend: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=gen).to(device=device, dtype=dtype)
    t = torch.randn(n, v, generator=gen).to(device=device, dtype=dtype)

    def call(loss_fn):
        def run():
            leaf = s.detach().requires_grad_(True)
            loss_fn(leaf, t).backward()

        return run

    return {
        f"kl_div_with_logits ({backend})": call(
            lambda a, b: fused_ce.kl_div_with_logits(a, b, temperature=TEMPERATURE, backend=backend)
        ),
        "plain formula: F.kl_div(log_softmax, log_softmax)": call(formula_kl),
        f"jsd_with_logits ({backend})": call(
            lambda a, b: fused_ce.jsd_with_logits(a, b, temperature=TEMPERATURE, backend=backend)
        ),
        "plain formula: JSD": call(formula_jsd),
    }


def linear_rows(
    n: int, d: int, v: int, dtype: torch.dtype, device: str, backend: str, formula: bool
) -> dict:
    gen = torch.Generator().manual_seed(1)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    hs, ws = randn(n, d), randn(v, d, scale=d**-0.5)
    ht, wt = randn(n, d), randn(v, d, scale=d**-0.5)
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    logits = torch.empty(n, v, device=device, dtype=dtype)

    def call(loss_fn):
        def run():
            x = hs.detach().requires_grad_(True)
            w = ws.detach().requires_grad_(True)
            loss_fn(x, w).backward()

        return run

    def gemms():
        # What any implementation must compute: both heads' logits, dX = G W, dW = G^T X.
        torch.mm(hs, ws.t(), out=logits)
        torch.mm(ht, wt.t(), out=logits)
        torch.mm(logits, ws)
        torch.mm(logits.t(), hs)

    rows = {
        f"linear_kl_div ({backend})": call(
            lambda x, w: fused_ce.linear_kl_div(
                x, w, ht, wt, temperature=TEMPERATURE, backend=backend
            )
        ),
        "plain formula: F.linear x 2 + F.kl_div": call(
            lambda x, w: formula_kl(x @ w.t(), ht @ wt.t())
        ),
        f"linear_cross_entropy ({backend}), student head": call(
            lambda x, w: fused_ce.linear_cross_entropy(x, w, target, backend=backend)
        ),
        "the 4 GEMMs (logits x 2, dX, dW)": gemms,
    }
    if not formula:
        del rows["plain formula: F.linear x 2 + F.kl_div"]
    return rows


def report(title: str, rows: dict, rounds: int, memory: bool) -> None:
    """Time (and peak memory) of each row, then each row's ratio to the one above it in the
    pairs (fused, formula) of the logits form, or the first row's ratio to every other row
    (the linear form)."""
    print(f"\n{title}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    times, peaks = {}, {}
    for name, fn in rows.items():
        times[name] = best_of(fn, rounds)
        extra = ""
        if memory:
            peaks[name] = peak_bytes(fn, device)
            extra = f"  peak {peaks[name] / 2**20:8.1f} MiB"
        print(f"  {name:52s} {times[name] * 1e3:10.1f} ms{extra}", flush=True)
    names = list(times)
    pairs = (
        [(names[0], other) for other in names[1:]]
        if memory
        else list(zip(names[0::2], names[1::2], strict=True))
    )
    for fused, other in pairs:
        line = f"  {fused} / {other}: time {times[fused] / times[other]:.2f}"
        if memory and peaks[other] > 0:
            line += f", peak memory {peaks[fused] / peaks[other]:.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes: check the script runs")
    parser.add_argument("--logits", type=int, nargs=2, metavar=("N", "V"), default=(4096, 32768))
    parser.add_argument(
        "--linear", type=int, nargs=3, metavar=("N", "D", "V"), default=(8192, 512, 32768)
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default=None, help="fused_ce backend (default: auto)")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument(
        "--skip-linear-formula",
        action="store_true",
        help="no unfused linear row (it holds several N x V tensors: GiBs at the default shape)",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.backend or ("triton" if device == "cuda" else "native")
    logits_shape, linear_shape = args.logits, args.linear
    if args.tiny:
        logits_shape, linear_shape = (64, 1000), (128, 32, 1000)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    n, v = logits_shape
    report(
        f"logits form, fp32, N x V = {n} x {v}, T = {TEMPERATURE}, forward + backward",
        logits_rows(n, v, torch.float32, device, backend),
        args.rounds,
        memory=False,
    )
    if not args.skip_linear:
        n, d, v = linear_shape
        report(
            f"linear form, fp32, N x D x V = {n} x {d} x {v}, student grads, forward + backward",
            linear_rows(n, d, v, torch.float32, device, backend, not args.skip_linear_formula),
            args.rounds,
            memory=True,
        )


if __name__ == "__main__":
    main()
