"""The C++ launch path of Triton's cubins (csrc/cuda_launch.cpp, fused_ce/cuda_launch.py), as far
as a machine without a GPU can check it: the parameter packing against what Triton compiled,
the packer's byte layout against a C struct's, and the fallback (no driver, the interpreter,
the default mode) leaving every call as it was. Launching itself needs a GPU: docs/gpu.md."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fused_ce import cuda_launch

TESTS = Path(__file__).resolve().parent

_CTYPES = {
    "O": ctypes.c_void_p,
    "b": ctypes.c_int8,
    "B": ctypes.c_uint8,
    "h": ctypes.c_int16,
    "H": ctypes.c_uint16,
    "i": ctypes.c_int32,
    "I": ctypes.c_uint32,
    "l": ctypes.c_int64,
    "K": ctypes.c_uint64,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}


@pytest.mark.parametrize("types", ["OOiif", "OiOlbO", "bhOfdI", "iO", "BHiKlf", ""])
def test_param_layout_is_the_c_struct_layout(types):
    """Each parameter at its natural alignment, as a C struct of the same fields lays it out
    (the kernel's parameter buffer); the last entry is the end of the last parameter."""
    fields = [(f"p{i}", _CTYPES[t]) for i, t in enumerate(types)]
    struct = type("Params", (ctypes.Structure,), {"_fields_": fields})
    expected = []
    for name, kind in fields:
        expected += [getattr(struct, name).offset, ctypes.sizeof(kind)]
    end = expected[-2] + expected[-1] if fields else 0
    assert torch.ops.fused_ce_native.cuda_param_layout(types) == [*expected, end]


def test_param_layout_refuses_unknown_types():
    with pytest.raises(ValueError, match="unknown kernel parameter type 'x'"):
        torch.ops.fused_ce_native.cuda_param_layout("Ox")


def test_packing_matches_the_compiled_ptx_of_every_variant():
    """For every variant the launchers compile (sm_90, compiled here by Triton), the
    parameters derived from the compiled signature and laid out by the C++ packer are the PTX
    ``.entry`` parameters: number, size, kind and offset (tests/_cuda_launch_layout.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(TESTS.parent), str(TESTS), env.get("PYTHONPATH")])
    )
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, str(TESTS / "_cuda_launch_layout.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.stdout, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert set(report["kernels"]) == {
        "ce_forward_kernel",
        "ce_backward_kernel",
        "bce_kernel",
        "lce_forward_kernel",
        "lce_backward_input_kernel",
        "lce_backward_weight_kernel",
        "distill_forward_kernel",
        "distill_backward_kernel",
    }
    assert all(entry["variants"] >= 4 for entry in report["kernels"].values()), report
    assert not report["mismatches"], json.dumps(report["mismatches"][:3], indent=1)
    assert done.returncode == 0, done.stderr[-4000:]


def _compiled(signature: dict, constants: dict, **metadata) -> SimpleNamespace:
    """A stand-in for Triton's CompiledKernel with the fields kernel_params reads."""
    return SimpleNamespace(
        src=SimpleNamespace(name="probe", signature=signature, constants=constants),
        metadata=SimpleNamespace(name="probe", shared=0, num_warps=4, **metadata),
        asm={"cubin": b"\0"},
    )


def test_kernel_params_skip_constexprs_and_append_scratch_pointers():
    """Declared constexprs and ints Triton specialised to constants take no parameter; the
    scratch pointers the metadata names come last, as null pointers; a scratch buffer that
    needs memory is refused."""
    signature = {
        "x_ptr": "*fp32",
        "n": "i32",
        "one": "constexpr",
        "scale": "fp32",
        "big": "i64",
        "flag": "i1",
        "BLOCK": "constexpr",
    }
    compiled = _compiled(
        signature, {(2,): 1, (6,): 128}, global_scratch_size=0, profile_scratch_size=0
    )
    params = cuda_launch.kernel_params(compiled)
    assert params == ((0, "O"), (1, "i"), (3, "f"), (4, "l"), (5, "b"), (None, "O"), (None, "O"))
    launch = cuda_launch.CubinLaunch(compiled)
    x = torch.zeros(4)
    ints, floats = launch.pack((x, 7, 1, 0.5, 2**40, True, 128))
    assert ints == [x.data_ptr(), 7, 2**40, 1, 0, 0]
    assert floats == [0.5]
    assert cuda_launch.kernel_params(_compiled({"x_ptr": "*fp32"}, {})) == ((0, "O"),)
    with pytest.raises(NotImplementedError, match="global_scratch_size"):
        cuda_launch.kernel_params(_compiled({"x_ptr": "*fp32"}, {}, global_scratch_size=64))
    with pytest.raises(NotImplementedError, match="fp16"):
        cuda_launch.kernel_params(_compiled({"x": "fp16"}, {}))


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: enough for the wrapper's choice of path."""

    @property
    def is_cuda(self) -> bool:
        return True


class _RecordingKernel:
    """Stands in for a JITFunction: each ``run`` is recorded; a warmup returns one variant."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK"]

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, *args, grid, warmup, **options):
        self.calls.append((warmup, args, grid, options))
        signature = {"x_ptr": "*fp32", "n": "i32", "scale": "fp32", "BLOCK": "constexpr"}
        compiled = _compiled(signature, {(3,): args[3]}, global_scratch_size=0)
        compiled.hash = f"variant-{args[3]}"
        return compiled


def test_cpp_launched_kernel_keys_variants_and_packs_each_launch(monkeypatch):
    """CUDA calls: one Triton warmup per new key (the leading tensors' dtype and alignment,
    the rest by value, the options), one loaded variant per Triton hash, and each launch
    packed from its own arguments; CPU calls go to the wrapped kernel's own run."""
    launched: list[tuple] = []

    def record(self, grid, device, args):
        launched.append((self, grid, *self.pack(args)))

    monkeypatch.setattr(cuda_launch.CubinLaunch, "__call__", record)
    kernel = _RecordingKernel()
    wrapped = cuda_launch.CppLaunchedKernel(kernel)
    assert wrapped.arg_names == kernel.arg_names
    x = torch.zeros(8)._make_subclass(_CudaLooking, torch.zeros(8))
    wrapped.run(x, 7, 0.5, 64, grid=(2,), warmup=False, num_warps=4)
    wrapped.run(x, 7, 0.5, 64, grid=(3,), warmup=False, num_warps=4)
    assert [c[0] for c in kernel.calls] == [True]  # one warmup, then the cached variant
    first = launched[0][0]
    assert launched == [
        (first, (2,), [x.data_ptr(), 7, 0], [0.5]),
        (first, (3,), [x.data_ptr(), 7, 0], [0.5]),
    ]
    wrapped.run(x, 9, 0.25, 64, grid=(1,), warmup=False, num_warps=4)  # other values
    wrapped.run(x[1:], 9, 0.25, 64, grid=(1,), warmup=False, num_warps=4)  # misaligned
    wrapped.run(x, 9, 0.25, 64, grid=(1,), warmup=False, num_warps=8)  # other options
    wrapped.run(x, 9, 0.25, 128, grid=(1,), warmup=False, num_warps=4)  # other constexpr
    assert [c[0] for c in kernel.calls] == [True] * 5
    assert [entry[0] is first for entry in launched] == [True] * 5 + [False]
    assert launched[3][2] == [x[1:].data_ptr(), 9, 0]
    assert len(wrapped.loaded) == 2
    cpu = torch.zeros(8)
    wrapped.run(cpu, 9, 0.25, 64, grid=(1,), warmup=False, num_warps=4)
    assert kernel.calls[-1] == (False, (cpu, 9, 0.25, 64), (1,), {"num_warps": 4})
    assert len(launched) == 6


def test_without_a_driver_the_launch_ops_fail_clearly():
    """On a machine without the NVIDIA driver the ops say so (the error names libcuda);
    where the driver is present the reason is empty."""
    reason = torch.ops.fused_ce_native.cuda_driver_error()
    if torch.cuda.is_available():
        assert reason == ""
        return
    assert "libcuda.so.1" in reason
    cubin = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="CUDA driver is unavailable.*libcuda"):
        torch.ops.fused_ce_native.cuda_load_kernel(cubin, "k", 0, 0)
    with pytest.raises(IndexError, match="no loaded kernel"):
        torch.ops.fused_ce_native.cuda_launch(12345, 1, 1, 1, 4, 0, "O", [0], [])
    with pytest.raises(ValueError, match="cubin"):
        torch.ops.fused_ce_native.cuda_load_kernel(torch.zeros(4), "k", 0, 0)


_FALLBACK = """
import torch, torch.nn.functional as F
import fused_ce
from fused_ce import cuda_launch
from fused_ce.launch import bce, cross_entropy
from fused_ce.kernels.cross_entropy import ce_forward_kernel
assert cuda_launch.MODE == "cpp"
available = cuda_launch.cpp_launch_available()
assert (cross_entropy.ce_forward_kernel is ce_forward_kernel) == bool(available), available
x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
y = torch.tensor([0, 4, 2, 1, 3, 0])
loss = fused_ce.cross_entropy(x, y, backend="triton")
loss.backward()
torch.testing.assert_close(loss, F.cross_entropy(x, y), rtol=0, atol=1e-12)
grad = x.grad
x.grad = None
F.cross_entropy(x, y).backward()
torch.testing.assert_close(grad, x.grad, rtol=0, atol=1e-12)
t = torch.rand(6, 5, dtype=torch.float64)
torch.testing.assert_close(
    fused_ce.binary_cross_entropy_with_logits(x, t, backend="triton"),
    F.binary_cross_entropy_with_logits(x, t), rtol=0, atol=1e-12)
# Interpreted kernels are never wrapped.
assert cuda_launch.through_cpp(ce_forward_kernel) is ce_forward_kernel
print("ok")
"""


def test_cpp_mode_falls_back_where_it_cannot_launch():
    """``FUSED_CE_CUDA_LAUNCH=cpp`` without a GPU (or driver) leaves the launchers' kernels
    Triton's and every result torch's; an unknown mode is refused naming the variable."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FUSED_CE_CUDA_LAUNCH": "cpp"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    env["FUSED_CE_CUDA_LAUNCH"] = "fast"
    done = subprocess.run(
        [sys.executable, "-c", "import fused_ce.launch.bce"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "FUSED_CE_CUDA_LAUNCH: expected one of ('triton', 'cpp'), got 'fast'" in done.stderr


_RESULTS = """
import sys, torch
import fused_ce
from fused_ce import cuda_launch
gen = torch.Generator(device="cuda").manual_seed(0)
out = {"mode": cuda_launch.MODE, "unavailable": cuda_launch.cpp_launch_available()}
for dtype in (torch.float32, torch.bfloat16):
    for n, c in ((64, 11), (5, 3000), (300, 7)):
        x = torch.randn(n, c, device="cuda", generator=gen).to(dtype).requires_grad_()
        y = torch.randint(0, c, (n,), device="cuda", generator=gen)
        y[0] = -100
        for kwargs in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"reduction": "none"}):
            x.grad = None
            loss = fused_ce.cross_entropy(x, y, **kwargs)
            loss.sum().backward()
            out[f"ce-{dtype}-{n}x{c}-{sorted(kwargs)}"] = (loss.detach().cpu(), x.grad.cpu())
        t = torch.rand(n, c, device="cuda", generator=gen).to(dtype)
        for reduction in ("mean", "none"):
            x.grad = None
            loss = fused_ce.binary_cross_entropy_with_logits(x, t, reduction=reduction)
            loss.sum().backward()
            out[f"bce-{dtype}-{n}x{c}-{reduction}"] = (loss.detach().cpu(), x.grad.cpu())
torch.save(out, sys.argv[1])
"""


# Defined only where a GPU is: the C++ launch cannot run without one (no skipped test here).
if torch.cuda.is_available():

    def test_cpp_launch_equals_triton_launch_bitwise(tmp_path):
        """On a GPU, FUSED_CE_CUDA_LAUNCH=cpp gives the Triton launch's losses and gradients to the
        last bit (the same cubins, launched from C++: the packing proven on the device)."""
        results = {}
        for mode in ("triton", "cpp"):
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["FUSED_CE_CUDA_LAUNCH"] = mode
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(TESTS.parent), env.get("PYTHONPATH")])
            )
            path = tmp_path / f"{mode}.pt"
            done = subprocess.run(
                [sys.executable, "-c", _RESULTS, str(path)],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            results[mode] = torch.load(path)
        assert results["cpp"].pop("unavailable") == "", (
            "the C++ launcher is unavailable on this GPU"
        )
        assert results["cpp"].pop("mode") == "cpp" and results["triton"].pop("mode") == "triton"
        results["triton"].pop("unavailable")
        assert results["cpp"].keys() == results["triton"].keys()
        for name, (loss, grad) in results["triton"].items():
            cpp_loss, cpp_grad = results["cpp"][name]
            assert torch.equal(loss, cpp_loss) and torch.equal(grad, cpp_grad), name
