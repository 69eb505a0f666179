"""Determinism and batch invariance, checked and costed on the machine at hand (issue 24 part
3; docs/determinism.md states the guarantees). Not a test: tests/test_determinism.py asserts
the same statements on small shapes on every backend; this script runs them at larger shapes
on CUDA (the GPU session's check) or the CPU, and times what ``batch_invariant=True`` costs.

    python bench/determinism.py [--device cuda] [--out determinism.json]

:func:`check` returns, per op and backend, whether two runs gave the same bits, whether the
bits under ``torch.use_deterministic_algorithms(True)`` are the same, and the largest ulp
distance of a row's loss / gradient between placements in batches of 1, 7 and 4096 (first,
last, padding rows). :func:`batch_invariant_cost` times the linear CE head with and without
``batch_invariant=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

import fused_ce

Op = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    bits = torch.int64 if a.dtype == torch.float64 else torch.int32
    return int((a.view(bits).long() - b.view(bits).long()).abs().max().item())


def _grads(fn: Op, x: torch.Tensor, y: torch.Tensor, reduction: str) -> list[torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf, y, reduction)
    # Unit upstream gradients: a row's gradient must not depend on the batch through them.
    loss.sum().backward()
    return [loss.detach(), leaf.grad]


def _ops(device: str, backend: str, n_classes: int, n_features: int) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(0)
    head = (torch.randn(n_classes, n_features, generator=gen) * 0.3).to(device)
    weight = (torch.rand(n_classes, generator=gen) + 0.5).to(device)

    def indices(n, seed):
        return torch.randint(0, n_classes, (n,), generator=torch.Generator().manual_seed(seed))

    def rows(n, width, seed):
        return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 3

    def probs(n, seed):
        return torch.rand(n, n_classes, generator=torch.Generator().manual_seed(seed))

    ops = {
        "cross_entropy": (
            lambda z, y, r: fused_ce.cross_entropy(
                z, y, weight, reduction=r, label_smoothing=0.1, backend=backend
            ),
            lambda n, s: rows(n, n_classes, s),
            indices,
            -100,
        ),
        "bce": (
            lambda z, t, r: fused_ce.binary_cross_entropy_with_logits(
                z, t, reduction=r, backend=backend
            ),
            lambda n, s: rows(n, n_classes, s),
            probs,
            0.0,
        ),
        "linear_ce_batch_invariant": (
            lambda x, y, r: fused_ce.linear_cross_entropy(
                x, head, y, reduction=r, backend=backend, batch_invariant=True
            ),
            lambda n, s: rows(n, n_features, s) / 3,
            indices,
            -100,
        ),
    }
    if backend == "triton":
        ops["linear_ce_fused"] = (
            lambda x, y, r: fused_ce.linear_cross_entropy(
                x, head, y, reduction=r, backend=backend, path="fused"
            ),
            lambda n, s: rows(n, n_features, s) / 3,
            indices,
            -100,
        )
    return ops


def check(
    device: str = "cuda", n_classes: int = 32768, n_features: int = 512, big: int = 4096
) -> dict:
    """The statements of docs/determinism.md at larger shapes on ``device``: returns
    ``{backend: {op: {"run_to_run": bool, "deterministic_mode": bool, "invariance_ulps":
    {"loss": int, "grad": int}}}}`` (0 ulps: bitwise batch invariant)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS under det. mode
    backends = ["triton", "torch"] if device == "cuda" else ["native", "torch"]
    report: dict = {}
    for backend in backends:
        for name, (fn, make_row, make_target, pad) in _ops(
            device, backend, n_classes, n_features
        ).items():
            x = make_row(64, 1).to(device)
            y = make_target(64, 2).to(device)
            first, second = _grads(fn, x, y, "mean"), _grads(fn, x, y, "mean")
            torch.use_deterministic_algorithms(True)
            try:
                strict = _grads(fn, x, y, "mean")
            finally:
                torch.use_deterministic_algorithms(False)
            row, row_target = make_row(1, 3).to(device), make_target(1, 4).to(device)
            alone = _grads(fn, row, row_target, "none")
            worst = {"loss": 0, "grad": 0}
            for n, pos, n_pad in ((7, 0, 0), (7, 6, 0), (big, 0, 0), (big, big - 1, 5)):
                batch = make_row(n + n_pad, 10 + n).to(device)
                targets = make_target(n + n_pad, 20 + n).to(device)
                batch[pos], targets[pos] = row[0], row_target[0]
                targets[n:] = pad
                loss, grad = _grads(fn, batch, targets, "none")
                worst["loss"] = max(worst["loss"], _ulps(loss[pos], alone[0][0]))
                worst["grad"] = max(worst["grad"], _ulps(grad[pos], alone[1][0]))
            report.setdefault(backend, {})[name] = {
                "run_to_run": all(torch.equal(a, b) for a, b in zip(first, second, strict=True)),
                "deterministic_mode": all(
                    torch.equal(a, b) for a, b in zip(first, strict, strict=True)
                ),
                "invariance_ulps": worst,
            }
    return report


def batch_invariant_cost(
    device: str = "cpu",
    shapes: tuple = ((1, 512, 32768), (100, 512, 32768), (2048, 512, 32768)),
    backend: str | None = None,
    repeats: int = 3,
) -> list[dict]:
    """Best-of-``repeats`` seconds of a linear CE forward + backward ('mean', fp32) with and
    without ``batch_invariant=True``, per ``(N, D, V)``."""
    results = []
    for n, d, v in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=gen).to(device).requires_grad_()
        head = (torch.randn(v, d, generator=gen) * 0.05).to(device).requires_grad_()
        y = torch.randint(0, v, (n,), generator=gen).to(device)
        row = {"N": n, "D": d, "V": v}
        for invariant in (False, True):
            best = float("inf")
            for _ in range(repeats):
                x.grad = head.grad = None
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fused_ce.linear_cross_entropy(
                    x, head, y, backend=backend, batch_invariant=invariant
                ).backward()
                if device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            row["invariant_s" if invariant else "default_s"] = best
        row["ratio"] = row["invariant_s"] / row["default_s"]
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # The CPU gets smaller shapes (the 4096 x 32768 logits alone are 512 MiB in fp32).
        "check": check(args.device)
        if args.device == "cuda"
        else check(args.device, n_classes=4096, n_features=256, big=1024),
    }
    if not args.skip_cost:
        result["batch_invariant_cost"] = batch_invariant_cost(args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
