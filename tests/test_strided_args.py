"""Every tensor argument of every public loss, given as a strided, stride-0 or offset view,
gives PyTorch's float64 numbers on every backend (issue 23, item 1: the Triton kernels read a
non-contiguous class ``weight`` as if it were contiguous, and a stride-0 one past its buffer).

Each case names its tensor arguments; each test replaces one of them by a view of the same
shape over other memory (the rest stay contiguous) and holds the loss and the gradients
against the oracle. ``grad_output`` is the upstream gradient that reaches the loss's backward
(``reduction='none'``). Shapes are tiny: the Triton kernels run through the interpreter on
CPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from _reference import check, generator, positive, randn
from conftest import backend_cases

import fused_ce

N, C, D = 5, 7, 6  # rows, classes (outputs), features


# --- the views -------------------------------------------------------------------------------


def strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, every other element of a buffer twice as wide along the last dim."""
    wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    wide[..., 1::2] = t
    return wide[..., 1::2]


def offset(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, contiguous, 3 elements into a larger buffer (its storage offset)."""
    buffer = torch.zeros(t.numel() + 3, dtype=t.dtype, device=t.device)
    buffer[3:] = t.flatten()
    return buffer[3:].view(t.shape)


def stride0(t: torch.Tensor) -> torch.Tensor:
    """``t``'s first slice along dim 0 repeated with stride 0: one element for a 1-D weight
    (``torch.tensor([0.5]).expand(C)``), one row for a 2-D operand. Other values than ``t``'s;
    the oracle sees the same ones."""
    return t[:1].expand(t.shape)


VIEWS = {"strided": strided, "stride0": stride0, "offset": offset}


class _UpstreamView(torch.autograd.Function):
    """Identity forward; its backward hands the incoming gradient on in the view's layout (and,
    for stride 0, its values), so the loss's backward receives a non-contiguous
    ``grad_output``."""

    @staticmethod
    def forward(ctx, loss, view):
        ctx.view = view
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return ctx.view(grad), None


def with_upstream_view(fn: Callable, view: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        return _UpstreamView.apply(fn(*args, **kwargs), view)

    return wrapped


# --- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    """``ours(*args, **kwargs, backend=...)`` against ``reference(*args, **kwargs)``;
    ``make(device)`` gives the dense ``(args, kwargs)`` whose tensors are named by ``names``
    (positional ``args`` first); ``wrt``: the positions differentiated."""

    ours: Callable
    reference: Callable
    make: Callable
    names: tuple[str, ...]
    wrt: tuple[int, ...]
    reductions: tuple[str, ...] = ("none", "mean")
    triton_only: bool = False
    options: dict = field(default_factory=dict)


def _index_target(shape, device) -> torch.Tensor:
    """Class indices with the last one ignored (the first one is valid: stride-0 views repeat
    it)."""
    target = torch.randint(0, C, shape, generator=generator(11)).to(device)
    target.view(-1)[-1] = -100
    return target


def _probabilities(shape, device) -> torch.Tensor:
    return torch.softmax(randn(shape, 12, device), 1 if len(shape) > 1 else 0)


def _bce_target(shape, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator(13)).to(device)


def ce_index(device):
    return (randn((N, C), 0, device), _index_target((N,), device)), {
        "weight": positive((C,), 1, device)
    }


def ce_nchw(device):
    return (randn((2, C, 3), 0, device), _index_target((2, 3), device)), {
        "weight": positive((C,), 1, device)
    }


def ce_prob(device):
    return (randn((N, C), 0, device), _probabilities((N, C), device)), {
        "weight": positive((C,), 1, device)
    }


def bce(device):
    return (randn((N, 4), 0, device), _bce_target((N, 4), device)), {
        "weight": positive((N, 4), 1, device),
        "pos_weight": positive((4,), 2, device),
    }


def linear_ce_index(device):
    return (
        randn((N, D), 0, device),
        randn((C, D), 3, device, scale=0.5),
        _index_target((N,), device),
        randn((C,), 4, device),
    ), {"weight": positive((C,), 1, device)}


def linear_ce_prob(device):
    (x, w, _, b), kwargs = linear_ce_index(device)
    return (x, w, _probabilities((N, C), device), b), kwargs


def linear_bce(device):
    return (
        randn((N, D), 0, device),
        randn((4, D), 3, device, scale=0.5),
        _bce_target((N, 4), device),
        randn((4,), 4, device),
    ), {"weight": positive((N, 4), 1, device), "pos_weight": positive((4,), 2, device)}


def _stats_loss(**stats_kwargs):
    def ours(*args, **kwargs):
        return fused_ce.softmax_cross_entropy(*args, **kwargs, **stats_kwargs).loss

    return ours


def _linear_ce(path: str, return_stats: bool = False):
    def ours(input, linear_weight, target, linear_bias, **kwargs):
        result = fused_ce.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            return_stats=return_stats,
            chunk_size=2,  # three chunks of rows
            path=path,
            **kwargs,
        )
        return result.loss if return_stats else result

    return ours


def linear_ce_reference(input, linear_weight, target, linear_bias, **kwargs):
    return F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, **kwargs)


def linear_bce_ours(input, linear_weight, target, linear_bias, **kwargs):
    return fused_ce.linear_binary_cross_entropy_with_logits(
        input, linear_weight, target, linear_bias=linear_bias, chunk_size=2, **kwargs
    )


def linear_bce_reference(input, linear_weight, target, linear_bias, **kwargs):
    return F.binary_cross_entropy_with_logits(
        F.linear(input, linear_weight, linear_bias), target, **kwargs
    )


# The modules: the class weights (and pos_weight) become the modules' buffers as given.
def ce_module(input, target, *, backend, **kwargs):
    return fused_ce.nn.CrossEntropyLoss(**kwargs, backend=backend)(input, target)


def bce_module(input, target, *, backend, **kwargs):
    return fused_ce.nn.BCEWithLogitsLoss(**kwargs, backend=backend)(input, target)


def _head_parameters(device, dtype=torch.float32):
    return randn((C, D), 3, device, dtype, scale=0.5), randn((C,), 4, device, dtype)


def linear_ce_module(input, target, *, backend, **kwargs):
    head = fused_ce.nn.LinearCrossEntropyLoss(D, C, **kwargs, chunk_size=2, backend=backend)
    with torch.no_grad():
        for parameter, value in zip(head.parameters(), _head_parameters(input.device), strict=True):
            parameter.copy_(value)
    return head(input, target)


def linear_ce_module_reference(input, target, **kwargs):
    linear_weight, linear_bias = _head_parameters(input.device, input.dtype)
    return F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, **kwargs)


def linear_ce_module_input(device):
    return (randn((N, D), 0, device), _index_target((N,), device)), {
        "weight": positive((C,), 1, device)
    }


SMOOTHING = {"label_smoothing": 0.1}  # reads every class weight, not only the target's
CE_NAMES = ("input", "target", "weight")
LINEAR_NAMES = ("input", "linear_weight", "target", "linear_bias", "weight")
CASES = {
    "ce_index": Case(fused_ce.softmax_cross_entropy, F.cross_entropy, ce_index, CE_NAMES, (0,)),
    "ce_index_smoothed": Case(
        fused_ce.softmax_cross_entropy,
        F.cross_entropy,
        ce_index,
        CE_NAMES,
        (0,),
        options=SMOOTHING,
    ),
    "ce_nchw": Case(fused_ce.softmax_cross_entropy, F.cross_entropy, ce_nchw, CE_NAMES, (0,)),
    "ce_prob": Case(
        fused_ce.softmax_cross_entropy,
        F.cross_entropy,
        ce_prob,
        CE_NAMES,
        (0, 1),
        options=SMOOTHING,
    ),
    "ce_stats": Case(_stats_loss(return_stats=True), F.cross_entropy, ce_index, CE_NAMES, (0,)),
    "bce": Case(
        fused_ce.sigmoid_binary_cross_entropy,
        F.binary_cross_entropy_with_logits,
        bce,
        ("input", "target", "weight", "pos_weight"),
        (0, 1),
    ),
    "linear_ce_chunked": Case(
        _linear_ce("chunked"),
        linear_ce_reference,
        linear_ce_index,
        LINEAR_NAMES,
        (0, 1, 3),
        options=SMOOTHING,
    ),
    "linear_ce_chunked_prob": Case(
        _linear_ce("chunked"),
        linear_ce_reference,
        linear_ce_prob,
        LINEAR_NAMES,
        (0, 1, 2, 3),
    ),
    "linear_ce_chunked_stats": Case(
        _linear_ce("chunked", return_stats=True),
        linear_ce_reference,
        linear_ce_index,
        LINEAR_NAMES,
        (0, 1, 3),
    ),
    "linear_ce_fused": Case(
        _linear_ce("fused"),
        linear_ce_reference,
        linear_ce_index,
        LINEAR_NAMES,
        (0, 1, 3),
        triton_only=True,
        options=SMOOTHING,
    ),
    "linear_ce_fused_stats": Case(
        _linear_ce("fused", return_stats=True),
        linear_ce_reference,
        linear_ce_index,
        LINEAR_NAMES,
        (0, 1, 3),
        triton_only=True,
    ),
    "linear_ce_fused_prob": Case(
        _linear_ce("fused"),
        linear_ce_reference,
        linear_ce_prob,
        LINEAR_NAMES,
        (0, 1, 2, 3),
        triton_only=True,
    ),
    "linear_bce": Case(
        linear_bce_ours,
        linear_bce_reference,
        linear_bce,
        ("input", "linear_weight", "target", "linear_bias", "weight", "pos_weight"),
        (0, 1, 2, 3),
    ),
    "nn.CrossEntropyLoss": Case(ce_module, F.cross_entropy, ce_index, CE_NAMES, (0,)),
    "nn.BCEWithLogitsLoss": Case(
        bce_module,
        F.binary_cross_entropy_with_logits,
        bce,
        ("input", "target", "weight", "pos_weight"),
        (0, 1),
    ),
    "nn.LinearCrossEntropyLoss": Case(
        linear_ce_module,
        linear_ce_module_reference,
        linear_ce_module_input,
        CE_NAMES,
        (0,),
        options=SMOOTHING,
    ),
}


def _params():
    params = []
    for backend, device in backend_cases():
        for case_name, case in CASES.items():
            if case.triton_only and backend != "triton":
                continue
            for reduction in case.reductions:
                names = case.names + (("grad_output",) if reduction == "none" else ())
                for name in names:
                    for view in VIEWS:
                        params.append(
                            pytest.param(
                                backend,
                                device,
                                case_name,
                                reduction,
                                name,
                                view,
                                id=f"{backend}-{device}-{case_name}-{reduction}-{name}-{view}",
                            )
                        )
    return params


@pytest.mark.parametrize("backend, device, case_name, reduction, name, view", _params())
def test_argument_views(backend, device, case_name, reduction, name, view):
    case = CASES[case_name]
    args, kwargs = case.make(device)
    args = list(args)
    ours, reference = case.ours, case.reference
    if name == "grad_output":
        ours = with_upstream_view(ours, VIEWS[view])
        reference = with_upstream_view(reference, VIEWS[view])
    else:
        position = case.names.index(name)
        if position < len(args):
            args[position] = VIEWS[view](args[position])
            given = args[position]
        else:
            kwargs[name] = VIEWS[view](kwargs[name])
            given = kwargs[name]
        assert not given.is_contiguous() or given.storage_offset() > 0
    check(
        ours,
        reference,
        args,
        {**kwargs, **case.options, "reduction": reduction},
        case.wrt,
        backend,
    )
