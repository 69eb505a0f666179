"""Issue 21's goals on a CUDA machine, side by side, in one command; writes one JSON.

    python bench/gpu_goals.py OUT.json [--rounds 3 --calls 200]

Run from the repository root (``PYTHONPATH=.``), ``TRITON_INTERPRET`` unset, with the native
extension built (``python setup.py build_ext --inplace``: its ``_C_autograd`` holds the C++
launcher). It runs itself twice in subprocesses, once per launch mode
(``FUSED_CE_CUDA_LAUNCH=triton``, the default, and ``=cpp``, which is read at import), and
writes, per case, microseconds per call (best of rounds; one ``torch.cuda.synchronize()``
after each round's loop, as a training loop runs):

* ``fwd_bwd``: forward + backward, ``x.grad = None`` then ``.backward()`` per call, for
  fused_ce (default backend) in each launch mode, torch eager and Liger-Kernel (when
  importable); the goal is at most 1.0 x eager everywhere, 0.7 x at 64 x 11, 1024 x 11,
  64 x 1 and 1024 x 1;
* ``forward``: the forward alone under ``torch.no_grad()``; goal at most 1.0 x eager;
* ``compiled_default`` / ``compiled_reduce_overhead``: ``torch.compile`` of fused_ce's call
  against ``torch.compile`` of torch's (forward + backward); goal at most 1.0 x;
* ``launch_us``: one CE forward kernel launch through Triton's ``JITFunction.run`` and
  through the C++ launcher (the host cost the C++ path is for);
* ``cpp_equals_triton``: whether the C++-launched loss and the sums of its gradient equal the
  Triton-launched ones to the last bit (the packing, proven on the device), per case;
* ``capture``: whether a CUDA graph captures the eager C++-launched forward + backward and
  replays it to the eager result.

Nothing is asserted: it is a measurement. docs/perf-notes.md gives the predictions to hold
the figures against, docs/gpu.md what the run must show before the C++ path can become the
default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CASES = [
    # (loss, rows, cols, dtype name)
    ("ce", 64, 11, "float32"),
    ("ce", 1024, 11, "float32"),
    ("ce", 4096, 1000, "bfloat16"),
    ("ce", 4096, 32768, "bfloat16"),
    ("ce", 4096, 32768, "float32"),
    ("bce", 64, 1, "float32"),
    ("bce", 1024, 1, "float32"),
    ("bce", 4096, 1024, "bfloat16"),
]
SEED_SHAPES = {(64, 11), (1024, 11), (64, 1), (1024, 1)}


def _timed(fn, rounds: int, calls: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return round(best * 1e6, 1)


def _operands(loss: str, rows: int, cols: int, dtype_name: str):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = getattr(torch, dtype_name)
    x = torch.randn(rows, cols, device="cuda", generator=gen).to(dtype)
    if loss == "ce":
        target = torch.randint(0, cols, (rows,), device="cuda", generator=gen)
    else:
        target = torch.randint(0, 2, (rows, cols), device="cuda", generator=gen).to(dtype)
    return x, target


def _losses(loss: str):
    import torch.nn.functional as F

    import fused_ce

    if loss == "ce":
        return fused_ce.cross_entropy, F.cross_entropy
    return fused_ce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits


def _liger(loss: str):
    try:
        if loss == "ce":
            from liger_kernel.transformers.functional import liger_cross_entropy

            return liger_cross_entropy
    except ImportError:
        return None
    return None


def measure_mode(rounds: int, calls: int) -> dict:
    """This process's launch mode (FUSED_CE_CUDA_LAUNCH): every case's timings and results."""
    import torch

    from fused_ce import cuda_launch

    out = {"mode": cuda_launch.MODE, "cpp_unavailable": cuda_launch.cpp_launch_available()}
    for loss, rows, cols, dtype_name in CASES:
        name = f"{loss.upper()} {rows} x {cols} {dtype_name}"
        ours, torch_loss = _losses(loss)
        x, target = _operands(loss, rows, cols, dtype_name)
        leaf = x.clone().requires_grad_(True)

        def train(fn, leaf=leaf, target=target):
            def call():
                leaf.grad = None
                fn(leaf, target).backward()

            return call

        def evaluate(fn, x=x, target=target):
            def call():
                with torch.no_grad():
                    fn(x, target)

            return call

        case = {"fwd_bwd": {}, "forward": {}}
        case["fwd_bwd"]["fused_ce"] = _timed(train(ours), rounds, calls)
        case["forward"]["fused_ce"] = _timed(evaluate(ours), rounds, calls)
        if cuda_launch.MODE == "triton":
            case["fwd_bwd"]["eager"] = _timed(train(torch_loss), rounds, calls)
            case["forward"]["eager"] = _timed(evaluate(torch_loss), rounds, calls)
            liger = _liger(loss)
            if liger is not None:
                try:
                    case["fwd_bwd"]["liger"] = _timed(train(liger), rounds, calls)
                except Exception as error:
                    case["fwd_bwd"]["liger"] = f"{type(error).__name__}: {error}"[:300]
            for mode in ("default", "reduce-overhead"):
                key = "compiled_" + mode.replace("-", "_")
                try:
                    case[key] = {
                        "fused_ce": _timed(train(torch.compile(ours, mode=mode)), rounds, calls),
                        "torch": _timed(train(torch.compile(torch_loss, mode=mode)), rounds, calls),
                    }
                except Exception as error:  # a failed compile is a finding, not a crash
                    case[key] = {"error": f"{type(error).__name__}: {error}"[:300]}
        # The result of this mode, for the bitwise comparison across modes.
        leaf.grad = None
        value = ours(leaf, target)
        value.backward()
        case["result"] = {
            "loss": value.double().item(),
            "grad_sum": leaf.grad.double().sum().item(),
            "grad_abs_sum": leaf.grad.double().abs().sum().item(),
        }
        out[name] = case
    if cuda_launch.MODE == "cpp" and not out["cpp_unavailable"]:
        out["launch_us"] = _launch_cost(rounds, calls)
        out["capture"] = _capture()
    return out


def _launch_cost(rounds: int, calls: int) -> dict:
    """One CE forward launch at 64 x 11 through Triton's run and through the C++ launcher."""
    import torch

    from fused_ce._common import CEOptions
    from fused_ce.launch import cross_entropy as ce

    x = torch.randn(64, 11, 1, device="cuda")
    y = torch.randint(0, 11, (64, 1), device="cuda")
    wrapped = ce.ce_forward_kernel
    triton_run = wrapped.kernel.run if hasattr(wrapped, "kernel") else wrapped.run

    def forward():
        ce.forward(x, y, None, CEOptions())

    cpp = _timed(forward, rounds, calls)
    through_triton = cpp
    if hasattr(wrapped, "kernel"):
        wrapped.run = triton_run  # an instance attribute shadows the C++ launching method
        try:
            through_triton = _timed(forward, rounds, calls)
        finally:
            del wrapped.run
    return {
        "ce.forward 64 x 11, C++ launch": cpp,
        "ce.forward 64 x 11, Triton launch": through_triton,
    }


def _capture() -> dict:
    """A CUDA graph of the eager forward + backward at CE 64 x 11, replayed."""
    import torch

    import fused_ce

    x = torch.randn(64, 11, device="cuda", requires_grad=True)
    y = torch.randint(0, 11, (64,), device="cuda")
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                x.grad = None
                fused_ce.cross_entropy(x, y).backward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        x.grad = None
        with torch.cuda.graph(graph):
            loss = fused_ce.cross_entropy(x, y)
            loss.backward()
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.nn.functional.cross_entropy(x.detach(), y)
        return {"captured": True, "loss_close": bool(torch.allclose(loss, expected))}
    except Exception as error:
        return {"captured": False, "error": f"{type(error).__name__}: {error}"[:300]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", help="the JSON to write")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--one-mode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_mode:
        print(json.dumps(measure_mode(args.rounds, args.calls)))
        return 0
    if not args.out:
        parser.error("OUT.json is required")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "modes": {}}
    for mode in ("triton", "cpp"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["FUSED_CE_CUDA_LAUNCH"] = mode
        # This checkout's fused_ce, whatever else is installed.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one-mode",
                "--rounds",
                str(args.rounds),
                "--calls",
                str(args.calls),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        try:
            report["modes"][mode] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            report["modes"][mode] = {"error": done.stderr[-3000:]}
    import torch

    report["environment"] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "host": platform.processor() or platform.machine(),
        "commit": os.environ.get("FUSED_CE_COMMIT"),
    }
    report["goals"] = _goals(report["modes"])
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report["goals"], indent=1))
    return 0


def _goals(modes: dict) -> dict:
    """Each goal's ratio per case: the C++ launch mode's fused_ce against torch."""
    triton, cpp = modes.get("triton", {}), modes.get("cpp", {})
    goals = {}
    for loss, rows, cols, dtype_name in CASES:
        name = f"{loss.upper()} {rows} x {cols} {dtype_name}"
        base, ours = triton.get(name), cpp.get(name)
        if not base or not ours:
            continue
        limit = 0.7 if (rows, cols) in SEED_SHAPES else 1.0
        entry = {"limit": limit}
        for kind in ("fwd_bwd", "forward"):
            eager = base[kind].get("eager")
            if eager:
                entry[f"{kind} cpp/eager"] = round(ours[kind]["fused_ce"] / eager, 2)
                entry[f"{kind} triton/eager"] = round(base[kind]["fused_ce"] / eager, 2)
        for kind in ("compiled_default", "compiled_reduce_overhead"):
            pair = base.get(kind, {})
            if "torch" in pair:
                entry[f"{kind} fused/torch"] = round(pair["fused_ce"] / pair["torch"], 2)
        # Loss and gradient sums equal to the last bit across the two launch modes.
        entry["cpp_equals_triton"] = ours.get("result") == base.get("result")
        goals[name] = entry
    return goals


if __name__ == "__main__":
    sys.exit(main())
