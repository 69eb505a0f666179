"""The deciding cases of issue 22 (GPU throughput at LLM shapes), old and new paths side by side
with the peers, in one run on one CUDA device. Installs nothing; bench/issue22_run.sh puts the
peers' wheels from .whl/ on the path first, as bench/gpu_run.sh does.

    python bench/issue22.py OUT.json [--budget-s 360]

* CE on logits (4096/16384 x 32768, 16384 x 131072 and 262144; bf16 and fp32): forward and
  forward + backward of ``softmax_cross_entropy(reduction='mean')`` through fused_ce's Triton
  path under each scalar-loss schedule (``fused_ce.launch.cross_entropy.scalar_schedule``:
  "loop", today's default, "row_on_chip", "l2"), torch eager and Liger-Kernel; plus the
  scalar-loss forward kernel alone (loss and gradient from one launch, no host work) per
  schedule, timed by ``triton.testing.do_bench``.
* BCE on logits (4096/16384 x 32768, bf16 and fp32): fused_ce's Triton path with 1024 (the
  default), 4096 and 8192 elements per program (``fused_ce.launch.bce._MAX_BLOCK_C``), public
  call and the kernel alone, and torch eager.
* Linear CE at 8192 and 16384 x 4096 x 128256 bf16, forward + backward: fused_ce, Liger-Kernel,
  Cut Cross-Entropy: time, peak memory above the inputs, and whether fused_ce's gradients are
  bitwise the same in two runs.

Each record carries the bytes the op must move (``benchlib.Case.bytes_min``: logits read once,
gradient written once) and the fraction of the copy rate measured in the same run that its time
achieves (for the linear heads: 6 N D V FLOPs over the measured bf16 matmul rate). A
``goals`` block restates the issue's goals against the records. Cases start while the budget
lasts, then the JSON is written. Every shape is larger than the 60 MB L2, so the inputs are read
from memory on every call without rotating input sets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (bench/ is not a package)

import fused_ce.launch.bce as launch_bce  # noqa: E402
import fused_ce.launch.cross_entropy as launch_ce  # noqa: E402
from fused_ce._common import CEOptions  # noqa: E402

CE_SHAPES = [(4096, 32768), (16384, 32768), (16384, 131072), (16384, 262144)]
BCE_SHAPES = [(4096, 32768), (16384, 32768)]
LINEAR_SHAPES = [(8192, 4096, 128256), (16384, 4096, 128256)]
DTYPES = [torch.bfloat16, torch.float32]
SCHEDULES = launch_ce.SCALAR_SCHEDULES
BCE_BLOCKS = (launch_bce._MAX_BLOCK_C, 4096, 8192)
REPEATS = 10


def _time_ms(step, repeats: int = REPEATS) -> float:
    """Median of ``repeats`` calls of ``step`` after two warm-up calls, by device events."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _call_step(fn, inputs: benchlib.InputSet, backward: bool):
    def step() -> None:
        inputs.clear_grads()
        loss = fn(*inputs.args)
        if backward:
            loss.backward()

    return step


def _record(case: benchlib.Case, provider: str, ms: float, ceilings, **extra) -> dict:
    record = {
        "family": case.family,
        "shape": list(case.shape),
        "dtype": case.dtype_name,
        "pass": case.pass_name,
        "provider": provider,
        "ms": round(ms, 4),
        "bytes_min": case.bytes_min(),
        **extra,
    }
    if case.linear:
        rate = ceilings.matmul_tflops(torch.bfloat16) * 1e12
        record["frac_bound"] = round(case.flops() / (ms / 1e3) / rate, 4)
    else:
        record["frac_bound"] = round(case.bytes_min() / (ms / 1e3) / (ceilings.copy_gbps * 1e9), 4)
    print(json.dumps(record), flush=True)
    return record


def _ce_kernel_ms(inputs: benchlib.InputSet) -> float:
    """The scalar-loss forward kernel alone: loss, saved statistics and the gradient of a mean
    from one launch (what a forward + backward costs on the device under the current
    schedule)."""
    import triton.testing

    logits, target = inputs.args
    logits3 = logits.detach().unsqueeze(-1)
    target2 = target.unsqueeze(-1)
    grad = torch.empty_like(logits3)
    scale = torch.full((), 1.0 / logits.shape[0], device=logits.device)

    def launch() -> None:
        launch_ce.forward(logits3, target2, None, CEOptions(), grad_scale=scale, grad_logits=grad)

    return triton.testing.do_bench(launch, return_mode="median")


def run_ce(records: list, ceilings, deadline: float) -> None:
    for n, c in CE_SHAPES:
        for dtype in DTYPES:
            for backward in (False, True):
                if time.monotonic() > deadline:
                    return
                case = benchlib.Case("ce", "grid", (n, c), dtype, backward)
                inputs = benchlib.make_inputs(case, "cuda", seed=0)
                for schedule in SCHEDULES if backward else ("loop",):
                    launch_ce.scalar_schedule = schedule
                    fn = benchlib.provider("fused_ce-triton").build(case)
                    ms = _time_ms(_call_step(fn, inputs, backward))
                    record = _record(case, "fused_ce-triton", ms, ceilings, schedule=schedule)
                    records.append(record)
                    if backward:
                        ms = _ce_kernel_ms(inputs)
                        records.append(
                            _record(case, "fused_ce-kernel", ms, ceilings, schedule=schedule)
                        )
                launch_ce.scalar_schedule = "loop"
                # Liger last: its forward writes the gradient over the logits.
                for peer in ("torch-eager", "liger"):
                    if peer in benchlib.providers_for("ce"):
                        fn = benchlib.provider(peer).build(case)
                        ms = _time_ms(_call_step(fn, inputs, backward))
                        records.append(_record(case, peer, ms, ceilings))
                del inputs
                torch.cuda.empty_cache()


def _bce_kernel_ms(inputs: benchlib.InputSet) -> float:
    """The scalar-loss BCE kernel alone: the loss's partial sums and the gradient of a mean
    from one launch."""
    import triton.testing

    x, t = inputs.args
    x = x.detach()
    grad = torch.empty_like(x)
    scale = torch.full((), 1.0 / x.numel(), device=x.device)
    loss_sum = torch.empty((), device=x.device)

    def launch() -> None:
        launch_bce.run(x, t, None, None, scale, None, grad, None, loss_sum=loss_sum)

    return triton.testing.do_bench(launch, return_mode="median")


def run_bce(records: list, ceilings, deadline: float) -> None:
    default_block = launch_bce._MAX_BLOCK_C
    for n, c in BCE_SHAPES:
        for dtype in DTYPES:
            for backward in (False, True):
                if time.monotonic() > deadline:
                    return
                case = benchlib.Case("bce", "grid", (n, c), dtype, backward)
                inputs = benchlib.make_inputs(case, "cuda", seed=0)
                # Elements per program: the default's 1024 against wider programs.
                for block in BCE_BLOCKS:
                    launch_bce._MAX_BLOCK_C = block
                    launch_bce._launch.cache_clear()
                    fn = benchlib.provider("fused_ce-triton").build(case)
                    ms = _time_ms(_call_step(fn, inputs, backward))
                    records.append(_record(case, "fused_ce-triton", ms, ceilings, bce_block=block))
                    if backward:
                        ms = _bce_kernel_ms(inputs)
                        records.append(
                            _record(case, "fused_ce-kernel", ms, ceilings, bce_block=block)
                        )
                launch_bce._MAX_BLOCK_C = default_block
                launch_bce._launch.cache_clear()
                fn = benchlib.provider("torch-eager").build(case)
                ms = _time_ms(_call_step(fn, inputs, backward))
                records.append(_record(case, "torch-eager", ms, ceilings))
                del inputs
                torch.cuda.empty_cache()


def _linear_grads(fn, inputs: benchlib.InputSet) -> list[torch.Tensor]:
    inputs.clear_grads()
    fn(*inputs.args).backward()
    return [leaf.grad.clone() for leaf in inputs.leaves]


def run_linear(records: list, ceilings, deadline: float) -> None:
    for shape in LINEAR_SHAPES:
        if time.monotonic() > deadline:
            return
        case = benchlib.Case("linear_ce", "llm", shape, torch.bfloat16, True)
        inputs = benchlib.make_inputs(case, "cuda", seed=0)
        for name in ("fused_ce-triton", "liger", "cce"):
            if name not in benchlib.providers_for("linear_ce"):
                continue
            fn = benchlib.provider(name).build(case)
            step = _call_step(fn, inputs, True)
            ms = _time_ms(step, repeats=5)
            inputs.clear_grads()
            torch.cuda.empty_cache()
            peak, method = benchlib.peak_extra_bytes(step)
            extra = {"peak_extra_bytes": peak, "peak_method": method}
            if name == "fused_ce-triton":
                first = _linear_grads(fn, inputs)
                second = _linear_grads(fn, inputs)
                extra["deterministic"] = all(
                    torch.equal(a, b) for a, b in zip(first, second, strict=True)
                )
                del first, second
            records.append(_record(case, name, ms, ceilings, **extra))
            inputs.clear_grads()
            torch.cuda.empty_cache()
        del inputs
        torch.cuda.empty_cache()


def _goals(records: list) -> list[dict]:
    """The issue's goals, each with the records that decide it."""

    def pick(family, shape, dtype, pass_name, provider, schedule=None):
        for r in records:
            if (r["family"], tuple(r["shape"]), r["dtype"], r["pass"], r["provider"]) == (
                family,
                shape,
                dtype,
                pass_name,
                provider,
            ) and (schedule is None or r.get("schedule") == schedule):
                return r
        return None

    goals = []
    for n, c in CE_SHAPES:
        for dtype in ("bfloat16", "float32"):
            ours = [
                r
                for s in SCHEDULES
                if (r := pick("ce", (n, c), dtype, "fwd+bwd", "fused_ce-triton", s))
            ]
            liger = pick("ce", (n, c), dtype, "fwd+bwd", "liger")
            if not ours:
                continue
            best = min(ours, key=lambda r: r["ms"])
            goals.append(
                {
                    "goal": f"CE {n}x{c} {dtype} fwd+bwd >= 85% of bound, faster than Liger",
                    "best_schedule": best["schedule"],
                    "ms": best["ms"],
                    "frac_bound": best["frac_bound"],
                    "liger_ms": liger["ms"] if liger else None,
                    "met": best["frac_bound"] >= 0.85
                    and (liger is None or best["ms"] < liger["ms"]),
                }
            )
    for n, c in BCE_SHAPES:
        for dtype in ("bfloat16", "float32"):
            ours = [
                r
                for r in records
                if (r["family"], tuple(r["shape"]), r["dtype"], r["pass"], r["provider"])
                == ("bce", (n, c), dtype, "fwd+bwd", "fused_ce-triton")
            ]
            if ours:
                best = min(ours, key=lambda r: r["ms"])
                goals.append(
                    {
                        "goal": f"BCE {n}x{c} {dtype} fwd+bwd >= 75% of bound",
                        "best_block": best["bce_block"],
                        "ms": best["ms"],
                        "frac_bound": best["frac_bound"],
                        "met": best["frac_bound"] >= 0.75,
                    }
                )
    for shape in LINEAR_SHAPES:
        ours = pick("linear_ce", shape, "bfloat16", "fwd+bwd", "fused_ce-triton")
        peers = [
            r for p in ("liger", "cce") if (r := pick("linear_ce", shape, "bfloat16", "fwd+bwd", p))
        ]
        cce = pick("linear_ce", shape, "bfloat16", "fwd+bwd", "cce")
        if ours and peers and cce:
            goals.append(
                {
                    "goal": f"linear CE {'x'.join(map(str, shape))} bf16: memory <= 1.2 x CCE, "
                    "time <= fastest peer, deterministic",
                    "ms": ours["ms"],
                    "fastest_peer_ms": min(r["ms"] for r in peers),
                    "memory_ratio_to_cce": round(
                        ours["peak_extra_bytes"] / cce["peak_extra_bytes"], 3
                    ),
                    "deterministic": ours["deterministic"],
                    "met": ours["peak_extra_bytes"] <= 1.2 * cce["peak_extra_bytes"]
                    and ours["ms"] <= min(r["ms"] for r in peers)
                    and ours["deterministic"],
                }
            )
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the JSON to write (e.g. bench/results/h200/issue22.json)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="stop starting cases")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/issue22.py needs a CUDA device")
    started = time.monotonic()
    deadline = started + args.budget_s
    commit = benchlib.git_commit()
    ceilings = benchlib.Ceilings()
    ceilings.matmul_tflops(torch.bfloat16)
    records: list[dict] = []
    try:
        for run in (run_ce, run_bce, run_linear):
            run(records, ceilings, deadline)
    finally:
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "environment": {
                k: os.environ.get(k, "") for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")
            },
            "machine": benchlib.device_info(commit),
            "ceilings": ceilings.as_dict(),
            "seconds": round(time.monotonic() - started, 1),
            "records": records,
            "goals": _goals(records),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        for goal in result["goals"]:
            print(json.dumps(goal))


if __name__ == "__main__":
    main()
