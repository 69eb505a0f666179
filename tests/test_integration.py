"""PyTorch integration: gradcheck, opcheck of the custom ops, torch.compile, double backward,
the nn modules, and backend selection. Runs on each (backend, device) pair of the fixture."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys

import pytest
import torch
from _reference import evaluate, generator, positive, randn, upstream_for
from conftest import backend_cases

import fused_ce
import fused_ce._backend as backend_module
import fused_ce.ops.bce as bce_ops
import fused_ce.ops.cross_entropy as ce_ops

CPU_CASES = [case for case in backend_cases() if case[1] == "cpu"]


def index_target(n_rows: int, n_classes: int, device, ignore_index: int = -100):
    target = torch.randint(0, n_classes, (n_rows,), generator=generator(1))
    target[::3] = ignore_index
    return target.to(device)


def prob_target(shape, device, dtype=torch.float64, dim: int = 1):
    return torch.softmax(randn(shape, 1, device, dtype), dim)


def ce_call(backend, **kwargs):
    return lambda input, target: fused_ce.softmax_cross_entropy(
        input, target, backend=backend, **kwargs
    )


def bce_call(backend, **kwargs):
    return lambda input, target: fused_ce.sigmoid_binary_cross_entropy(
        input, target, backend=backend, **kwargs
    )


# --- gradcheck --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["index", "prob", "index_nchw", "prob_nchw"])
def test_gradcheck_cross_entropy(backend_device, kind, reduction):
    """fp64 Jacobians of the input (and of a probability target) against finite differences,
    with weights, smoothing and ignored rows."""
    backend, device = backend_device
    nchw = kind.endswith("nchw")
    shape = (2, 4, 3) if nchw else (5, 4)
    logits = randn(shape, 0, device, torch.float64).requires_grad_()
    if kind.startswith("prob"):
        target = prob_target(shape, device).requires_grad_()
    else:
        batch = shape[:1] + shape[2:]
        target = index_target(math.prod(batch), 4, device).view(batch)
    weight = positive((4,), 5, device, torch.float64)
    fn = ce_call(backend, weight=weight, reduction=reduction, label_smoothing=0.15)
    assert torch.autograd.gradcheck(fn, (logits, target))


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_gradcheck_bce(backend_device, reduction):
    """fp64 Jacobians of input and target, with broadcast weight and pos_weight."""
    backend, device = backend_device
    input = randn((3, 4), 0, device, torch.float64, scale=2.0).requires_grad_()
    target = torch.rand((3, 4), generator=generator(1), dtype=torch.float64).to(device)
    weight = positive((3, 1), 2, device, torch.float64)
    pos_weight = positive((4,), 3, device, torch.float64)
    fn = bce_call(backend, weight=weight, pos_weight=pos_weight, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (input, target.requires_grad_()))


# --- opcheck ----------------------------------------------------------------------------------


def _ce_forward_args(backend, device, kind: str):
    """ce_forward's arguments for (n_outer, C, n_inner) = (2, 5, 6) logits viewed from NHWC
    memory (class stride 1), as the public function passes NCHW input."""
    nhwc = randn((2, 2, 3, 5), 0, device)
    logits = nhwc.permute(0, 3, 1, 2).flatten(2).requires_grad_()
    if kind == "prob":
        target = torch.softmax(randn((2, 6, 5), 1, device), -1).transpose(1, 2).requires_grad_()
        return (logits, target, None, -100, 0.1, 1.0, 0.0, False, False, backend)
    target = index_target(12, 5, device).view(2, 6)
    weight = positive((5,), 5, device)
    # Every option on for index targets: scale, cap and stats.
    return (logits, target, weight, -100, 0.1, 0.7, 3.0, True, False, backend)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_opcheck_ce_forward(backend_device, kind):
    backend, device = backend_device
    torch.library.opcheck(ce_ops.ce_forward, _ce_forward_args(backend, device, kind))


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_opcheck_ce_backward(backend_device, kind):
    backend, device = backend_device
    args = _ce_forward_args(backend, device, kind)
    logits, target, weight, ignore_index, eps, scale, cap, _, _, backend = args
    logits, target = logits.detach(), target.detach()
    saved = ce_ops.ce_forward(logits, target, *args[2:])[2]
    grad_loss = randn((12,), 2, device)
    grad_lse = randn((12,), 3, device)
    args = (grad_loss, grad_lse, logits, target, weight, saved, ignore_index, eps, scale, cap)
    torch.library.opcheck(ce_ops.ce_backward, (*args, backend, kind == "prob"))


def _bce_args(backend, device):
    """A permuted (2, 3, 4) input with broadcast weights."""
    input = randn((4, 2, 3), 0, device).permute(1, 2, 0)
    target = torch.rand((2, 3, 4), generator=generator(1)).to(device)
    return (
        input,
        target,
        positive((3, 1), 2, device),
        positive((4,), 3, device),
        backend,
    )


def test_opcheck_bce_forward(backend_device):
    backend, device = backend_device
    input, target, weight, pos_weight, backend = _bce_args(backend, device)
    args = (input.requires_grad_(), target.requires_grad_(), weight, pos_weight, backend)
    torch.library.opcheck(bce_ops.bce_forward, args)


@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)], ids=str)
def test_opcheck_bce_backward(backend_device, grads):
    backend, device = backend_device
    input, target, weight, pos_weight, backend = _bce_args(backend, device)
    grad = randn(input.shape, 4, device)
    args = (grad, input, target, weight, pos_weight, backend, *grads)
    torch.library.opcheck(bce_ops.bce_backward, args)


# --- torch.compile ----------------------------------------------------------------------------


def _compile_cases(device):
    logits = randn((6, 5), 0, device)
    weight = positive((5,), 5, device)
    input = randn((4, 5), 0, device)
    return {
        "ce_index": (
            fused_ce.softmax_cross_entropy,
            (logits, index_target(6, 5, device, ignore_index=2)),
            dict(weight=weight, ignore_index=2, label_smoothing=0.1),
            (0,),
        ),
        "ce_prob": (
            fused_ce.softmax_cross_entropy,
            (logits, prob_target((6, 5), device, torch.float32)),
            dict(weight=weight, label_smoothing=0.1),
            (0, 1),
        ),
        "bce": (
            fused_ce.sigmoid_binary_cross_entropy,
            (input, torch.rand((4, 5), generator=generator(2)).to(device)),
            dict(weight=positive((4, 1), 3, device), pos_weight=weight),
            (0, 1),
        ),
    }


@pytest.mark.parametrize("case", ["ce_index", "ce_prob", "bce"])
def test_compile_matches_eager(backend_device, case):
    """torch.compile(fullgraph=True) traces the custom ops (no graph break) and gives exactly
    the eager loss and gradients."""
    backend, device = backend_device
    fn, args, kwargs, wrt = _compile_cases(device)[case]
    kwargs = {**kwargs, "backend": backend}
    torch._dynamo.reset()  # a fresh cache: other tests' compilations count toward its limit
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    upstream = upstream_for(fn(*args, **kwargs), 3)
    eager = evaluate(fn, args, kwargs, wrt, upstream)
    ours = evaluate(compiled, args, kwargs, wrt, upstream)
    for (name, a), (_, b) in zip(ours.outputs(), eager.outputs(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_compiled_out_of_range_class_raises(case):
    """The sync-free bounds check survives compilation (on CPU, where it raises; a CUDA
    device-side assert would poison the test process)."""
    backend, device = case
    torch._dynamo.reset()
    compiled = torch.compile(fused_ce.softmax_cross_entropy, fullgraph=True, backend="aot_eager")
    target = torch.tensor([0, 4, 1], device=device)
    with pytest.raises(RuntimeError, match="out of bounds"):
        compiled(randn((3, 4), 0, device), target, backend=backend)


# --- double backward --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["ce_index", "ce_prob", "bce"])
def test_double_backward_raises(backend_device, case):
    backend, device = backend_device
    fn, args, kwargs, _ = _compile_cases(device)[case]
    input = args[0].detach().requires_grad_()
    loss = fn(input, args[1], backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss, input, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*not supported"):
        torch.autograd.grad(grad.square().sum(), input)


# --- nn modules -------------------------------------------------------------------------------

MODULES = [
    (fused_ce.nn.CrossEntropyLoss, torch.nn.CrossEntropyLoss),
    (fused_ce.nn.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss),
]


@pytest.mark.parametrize(("ours", "theirs"), MODULES, ids=lambda c: c.__name__)
def test_module_is_a_drop_in_subclass(ours, theirs):
    """Subclass of torch's, same constructor (plus keyword-only ``backend`` and, for CE, the
    keyword-only options of docs/options.md), same repr, buffers and state_dict,
    interchangeable with torch's module's state."""
    assert issubclass(ours, theirs)
    params = dict(inspect.signature(ours).parameters)
    extras = {"backend"}
    if ours is fused_ce.nn.CrossEntropyLoss:
        extras |= {"logit_scale", "softcap", "z_loss", "return_stats", "inplace_backward"}
    for name in extras:
        assert params.pop(name).kind is inspect.Parameter.KEYWORD_ONLY, name
    assert list(params) == list(inspect.signature(theirs).parameters)
    for name, param in params.items():
        assert param.default == inspect.signature(theirs).parameters[name].default, name

    weights = {"weight": positive((3,), 0, "cpu")}
    if ours is fused_ce.nn.BCEWithLogitsLoss:
        weights["pos_weight"] = positive((3,), 1, "cpu")
    mine, reference = ours(**weights, reduction="sum"), theirs(**weights, reduction="sum")
    assert repr(mine) == repr(reference)
    assert dict(mine.named_buffers()).keys() == weights.keys()
    assert mine.state_dict().keys() == reference.state_dict().keys() == weights.keys()
    fresh = ours(**{k: torch.zeros(3) for k in weights})
    fresh.load_state_dict(reference.state_dict())
    for name, value in weights.items():
        assert torch.equal(getattr(fresh, name), value)
    assert mine.double().weight.dtype == torch.float64  # buffers follow .to()


CE_MODULE_KWARGS = [
    {},
    dict(reduction="none", ignore_index=1),
    dict(weighted=True, label_smoothing=0.2, reduction="sum"),
]
BCE_MODULE_KWARGS = [{}, dict(weighted=True, reduction="none"), dict(reduction="sum")]


def _module_kwargs(options, device, n_classes):
    kwargs = {k: v for k, v in options.items() if k != "weighted"}
    if options.get("weighted"):
        kwargs["weight"] = positive((n_classes,), 5, device)
    return kwargs


@pytest.mark.parametrize("options", CE_MODULE_KWARGS, ids=str)
def test_cross_entropy_module_matches_torch(backend_device, options):
    backend, device = backend_device
    kwargs = _module_kwargs(options, device, 5)
    logits = randn((6, 5), 0, device)
    target = index_target(6, 5, device, ignore_index=kwargs.get("ignore_index", -100))
    _assert_modules_agree(
        fused_ce.nn.CrossEntropyLoss(**kwargs, backend=backend).to(device),
        torch.nn.CrossEntropyLoss(**kwargs).to(device),
        logits,
        target,
    )


@pytest.mark.parametrize("options", BCE_MODULE_KWARGS, ids=str)
def test_bce_module_matches_torch(backend_device, options):
    backend, device = backend_device
    kwargs = _module_kwargs(options, device, 5)
    if "weight" in kwargs:
        kwargs["pos_weight"] = positive((5,), 6, device)
    input = randn((4, 5), 0, device)
    target = torch.rand((4, 5), generator=generator(1)).to(device)
    _assert_modules_agree(
        fused_ce.nn.BCEWithLogitsLoss(**kwargs, backend=backend).to(device),
        torch.nn.BCEWithLogitsLoss(**kwargs).to(device),
        input,
        target,
    )


def _assert_modules_agree(mine, reference, input, target):
    """Same loss and input gradient as torch's module (fp32 rounding apart)."""
    upstream = upstream_for(reference(input, target), 7)
    ours = evaluate(mine, (input, target), {}, (0,), upstream)
    theirs = evaluate(reference, (input, target), {}, (0,), upstream)
    for (name, a), (_, b) in zip(ours.outputs(), theirs.outputs(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


# --- backend selection ------------------------------------------------------------------------


def _spy_on_implementations(monkeypatch) -> list[str]:
    """Record the resolved backend each custom op receives (the eager native calls, which go
    straight to their C++ op, as "native")."""
    calls: list[str] = []
    for module in (ce_ops, bce_ops):

        def spy(family, backend, original=module.implementation):
            calls.append(backend)
            return original(family, backend)

        def native_spy(name, original=module.native_op):
            calls.append("native")
            return original(name)

        monkeypatch.setattr(module, "implementation", spy)
        monkeypatch.setattr(module, "native_op", native_spy)
    return calls


def test_env_var_selects_the_backend(backend_device, monkeypatch):
    """FUSED_CE_BACKEND picks the implementation when no backend is passed; an explicit
    argument overrides it."""
    backend, device = backend_device
    calls = _spy_on_implementations(monkeypatch)
    monkeypatch.setenv("FUSED_CE_BACKEND", backend)
    logits = randn((3, 4), 0, device)
    fused_ce.softmax_cross_entropy(logits, index_target(3, 4, device))
    fused_ce.sigmoid_binary_cross_entropy(logits, torch.rand_like(logits))
    fused_ce.softmax_cross_entropy(logits, index_target(3, 4, device), backend="torch")
    assert calls == [backend, backend, "torch"]


def test_backend_env_var_is_read_on_every_call(monkeypatch):
    """resolve() keeps the decoded FUSED_CE_BACKEND for the raw value it last saw: a change of
    the variable, or its removal, takes effect on the next call."""
    cpu = torch.zeros(1)
    monkeypatch.setenv("FUSED_CE_BACKEND", "torch")
    assert backend_module.resolve(None, cpu) == "torch"
    monkeypatch.setenv("FUSED_CE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        backend_module.resolve(None, cpu)
    monkeypatch.setenv("FUSED_CE_BACKEND", "torch")
    assert backend_module.resolve(None, cpu) == "torch"
    monkeypatch.delenv("FUSED_CE_BACKEND")
    assert backend_module.backend_from_environment() == "auto"
    monkeypatch.setattr(backend_module, "native_available", lambda: True)
    monkeypatch.setattr(backend_module, "INTERPRET", False)
    assert backend_module.resolve(None, cpu) == "native"


def test_auto_backend(monkeypatch):
    """'auto' (and the default) picks Triton for CUDA tensors and for CPU tensors under the
    interpreter, else the native kernels for CPU tensors when built, else the torch path."""
    cpu = torch.zeros(1)
    monkeypatch.delenv("FUSED_CE_BACKEND", raising=False)
    monkeypatch.setattr(backend_module, "HAS_TRITON", True)
    monkeypatch.setattr(backend_module, "INTERPRET", True)
    assert backend_module.resolve("auto", cpu) == "triton"
    assert backend_module.resolve(None, cpu) == "triton"
    assert backend_module.resolve("torch", cpu) == "torch"
    assert backend_module.resolve("auto", torch.zeros(1, device="meta")) == "torch"
    monkeypatch.setattr(backend_module, "INTERPRET", False)
    monkeypatch.setattr(backend_module, "native_available", lambda: False)
    assert backend_module.resolve("auto", cpu) == "torch"
    monkeypatch.setattr(backend_module, "native_available", lambda: True)
    assert backend_module.resolve("auto", cpu) == "native"
    assert backend_module.resolve("native", cpu) == "native"
    monkeypatch.setattr(backend_module, "INTERPRET", True)
    monkeypatch.setattr(backend_module, "HAS_TRITON", False)
    assert backend_module.resolve("auto", cpu) == "native"
    monkeypatch.setattr(backend_module, "native_available", lambda: False)
    assert backend_module.resolve("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="backend='native' is unavailable"):
        backend_module.resolve("native", cpu)


def test_without_triton_installed_auto_runs_the_cpu_paths():
    """Triton is an extra: without it (``None`` in sys.modules hides an installed one, as on
    a plain ``pip install .``) ``import fused_ce`` works, ``auto`` picks the native kernels
    (where built) or the torch path even under the interpreter, the loss is torch's, and
    ``backend='triton'`` says how to install it. A fresh interpreter: this one has imported
    fused_ce with Triton."""
    script = """
import sys
sys.modules["triton"] = None
import torch, torch.nn.functional as F
import fused_ce
from fused_ce import _backend
x = torch.randn(4, 5, dtype=torch.float64)
y = torch.tensor([0, 4, 2, 1])
cpu_path = "native" if _backend.native_available() else "torch"
assert not _backend.HAS_TRITON and _backend.resolve("auto", x) == cpu_path
torch.testing.assert_close(fused_ce.cross_entropy(x, y), F.cross_entropy(x, y))
try:
    fused_ce.cross_entropy(x, y, backend="triton")
except RuntimeError as error:
    print(error)
loaded = [name for name, module in sys.modules.items() if module and name.startswith("triton")]
assert not loaded, loaded
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'fused_ce[triton]'" in done.stdout


def test_auto_uses_triton_on_cpu_under_the_interpreter(monkeypatch):
    """On this machine's configuration (the interpreter set by conftest without CUDA), the
    default backend really runs the Triton path for CPU tensors."""
    calls = _spy_on_implementations(monkeypatch)
    monkeypatch.delenv("FUSED_CE_BACKEND", raising=False)
    fused_ce.softmax_cross_entropy(randn((2, 3), 0, "cpu"), torch.tensor([0, 2]))
    expected = backend_module.HAS_TRITON and backend_module.INTERPRET
    assert calls == ["triton" if expected else "torch"]


def test_triton_backend_unavailable_raises(monkeypatch):
    """backend='triton' for a CPU tensor without the interpreter, or without Triton, raises an
    error naming the backend (through the public functions too)."""
    cpu = randn((2, 3), 0, "cpu")
    monkeypatch.setattr(backend_module, "INTERPRET", False)
    with pytest.raises(RuntimeError, match=r"backend='triton'.*cpu"):
        backend_module.resolve("triton", cpu)
    with pytest.raises(RuntimeError, match=r"backend='triton'"):
        fused_ce.softmax_cross_entropy(cpu, torch.tensor([0, 1]), backend="triton")
    monkeypatch.setenv("FUSED_CE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"backend='triton'"):
        fused_ce.sigmoid_binary_cross_entropy(cpu, torch.rand_like(cpu))
    monkeypatch.setattr(backend_module, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match=r"backend='triton'.*triton package"):
        backend_module.resolve("triton", cpu)


@pytest.mark.parametrize("via", ["argument", "env"])
def test_unknown_backend_raises(backend_device, monkeypatch, via):
    _, device = backend_device
    logits = randn((2, 3), 0, device)
    kwargs = {}
    if via == "env":
        monkeypatch.setenv("FUSED_CE_BACKEND", "bogus")
    else:
        kwargs["backend"] = "bogus"
    with pytest.raises(ValueError, match=r"\bbackend\b.*'bogus'"):
        fused_ce.softmax_cross_entropy(logits, torch.tensor([0, 1], device=device), **kwargs)
    with pytest.raises(ValueError, match=r"\bbackend\b.*'bogus'"):
        fused_ce.sigmoid_binary_cross_entropy(logits, torch.rand_like(logits), **kwargs)
