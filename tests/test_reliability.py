"""Regression tests for the wrong results an audit found (issue 12): each case is held against
PyTorch (float64 oracle) on every (backend, device) pair, or must be refused with a clear error
where torch has no equivalent. Shapes are tiny: the Triton kernels run through the interpreter
on CPU."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _child import expect_child_failure
from _reference import REDUCTIONS, check, positive, randn

import fused_ce

INF = float("inf")
NAN = float("nan")


def linear_ce_reference(input, linear_weight, target, **kwargs):
    return F.cross_entropy(F.linear(input, linear_weight), target, **kwargs)


def linear_ce(input, linear_weight, target, **kwargs):
    return fused_ce.linear_cross_entropy(input, linear_weight, target, **kwargs)


# --- 1. a +inf logit: NaN loss and NaN gradient for its row, as torch ------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_class", [0, 2], ids=["other-class", "inf-class"])
def test_positive_inf_logit(backend_device, reduction, target_class):
    backend, device = backend_device
    logits = randn((4, 5), 0, device)
    logits[1, 2] = INF
    target = torch.tensor([3, target_class, 0, -100], device=device)
    ours = check(
        fused_ce.softmax_cross_entropy,
        F.cross_entropy,
        (logits, target),
        dict(reduction=reduction),
        (0,),
        backend,
    )
    assert ours.grads[0][1].isnan().all()


def test_positive_inf_logit_linear(backend_device):
    """What fp16 logits that overflow look like on the chunked linear path: a feature of +inf
    makes a row of +inf and -inf logits, and the target is a -inf class (torch: NaN, not
    inf)."""
    backend, device = backend_device
    features = randn((4, 3), 0, device)
    features[2, 1] = INF
    head = positive((5, 3), 1, device)
    head[1::2, 1] *= -1.0
    target = torch.tensor([1, 4, 1, 2], device=device)
    ours = check(
        linear_ce,
        linear_ce_reference,
        (features, head, target),
        dict(reduction="none"),
        (0, 1),
        backend,
    )
    assert ours.loss[2].isnan() and ours.loss[[0, 1, 3]].isfinite().all()


# --- 2-4. inplace_backward only where the overwrite is sound ------------------------------------


def test_inplace_backward_refuses_a_view_of_a_leaf(backend_device):
    """``p.t()`` is not a leaf, but its memory is the parameter's: the gradient written over it
    would replace the parameter's values."""
    backend, device = backend_device
    parameter = randn((7, 6), 0, device).requires_grad_()
    target = torch.arange(6, device=device) % 7
    with pytest.raises(RuntimeError, match="inplace_backward: input is a view of a leaf"):
        fused_ce.softmax_cross_entropy(
            parameter.t(), target, inplace_backward=True, backend=backend
        )


def test_inplace_backward_keeps_logits_that_need_no_gradient(backend_device):
    """Only the probability target wants a gradient: the logits are not the in-place output."""
    backend, device = backend_device
    logits = randn((4, 5), 0, device)
    target = torch.softmax(randn((4, 5), 1, device), 1).requires_grad_()
    before = logits.clone()
    loss = fused_ce.softmax_cross_entropy(
        logits, target, reduction="sum", inplace_backward=True, backend=backend
    )
    (grad_target,) = torch.autograd.grad(loss, target)
    assert torch.equal(logits, before)
    expected_target = target.detach().double().requires_grad_()
    expected = F.cross_entropy(logits.double(), expected_target, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, expected_target)
    torch.testing.assert_close(grad_target.double(), expected_grad, rtol=1e-5, atol=1e-6)


def test_inplace_backward_refuses_self_overlapping_logits(backend_device):
    """unfold() windows share memory: a gradient written over them would race (it was off by
    up to 635); a stride-0 broadcast likewise."""
    backend, device = backend_device
    base = randn((10, 3), 0, device).requires_grad_()
    windows = (base * 1).unfold(0, 5, 1)  # (6, 3, 5): C = 3, five positions per window
    target = torch.zeros(6, 5, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="inplace_backward: input has overlapping memory"):
        fused_ce.softmax_cross_entropy(windows, target, inplace_backward=True, backend=backend)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_inplace_backward_on_strided_logits(backend_device, kind):
    """A strided slice does not overlap itself (the overlap test must not refuse it), and a
    probability target that shares the logits' memory is read before it is overwritten."""
    backend, device = backend_device
    hidden = randn((4, 3), 0, device)
    head = randn((10, 3), 1, device).requires_grad_()
    logits = (hidden @ head.t())[:, ::2]  # (4, 5), strides (10, 2)
    # A probability target in the logits' own memory (an entropy-like loss).
    index = torch.tensor([0, 4, 2, 1], device=device)
    target = index if kind == "index" else logits.detach()
    expected_target = target.clone()
    loss = fused_ce.softmax_cross_entropy(
        logits, target, reduction="sum", inplace_backward=True, backend=backend
    )
    (grad_head,) = torch.autograd.grad(loss, head)
    expected_head = head.detach().double().requires_grad_()
    expected_logits = (hidden.double() @ expected_head.t())[:, ::2]
    if kind == "prob":
        expected_target = expected_target.double()
    expected = F.cross_entropy(expected_logits, expected_target, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, expected_head)
    torch.testing.assert_close(grad_head.double(), expected_grad, rtol=1e-5, atol=1e-5)


# --- 5. uint8 targets: ignore_index compared as int64, never wrapped to 156 ---------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_uint8_target_with_default_ignore_index(backend_device, reduction):
    """-100 as uint8 is 156: class 156 must count as a class ('mean' divides by 3, not 2), for
    the z-loss mask and the accuracy too."""
    backend, device = backend_device
    logits = randn((3, 200), 0, device)
    target = torch.tensor([156, 3, 4], dtype=torch.uint8, device=device)
    check(
        fused_ce.softmax_cross_entropy,
        lambda x, y, **kw: F.cross_entropy(x, y.long(), **kw),
        (logits, target),
        dict(reduction=reduction),
        (0,),
        backend,
    )
    stats = fused_ce.softmax_cross_entropy(
        logits, target, z_loss=0.5, reduction=reduction, return_stats=True, backend=backend
    )
    lse = torch.logsumexp(logits.double(), 1)
    expected_z = 0.5 * lse.square()
    expected_z = {"none": expected_z, "sum": expected_z.sum(), "mean": expected_z.mean()}
    torch.testing.assert_close(stats.z_loss.double(), expected_z[reduction], rtol=1e-5, atol=0)
    expected_accuracy = (logits.argmax(1) == target.long()).double().mean()
    torch.testing.assert_close(stats.accuracy.double(), expected_accuracy)


def uint8_target_out_of_range(backend: str, device: str, entry: str) -> None:
    """A loss whose uint8 class index 156 is out of range for C = 100 (it is not ignore_index
    -100). Also run in a child process (tests/_child.py)."""
    target = torch.tensor([156, 3, 4], dtype=torch.uint8, device=device)
    if entry == "softmax":
        fused_ce.softmax_cross_entropy(randn((3, 100), 0, device), target, backend=backend)
    else:
        features, head = randn((3, 4), 0, device), randn((100, 4), 1, device)
        fused_ce.linear_cross_entropy(features, head, target, backend=backend)


@pytest.mark.parametrize("entry", ["softmax", "linear"])
def test_uint8_target_out_of_range_is_refused(backend_device, entry):
    """A clear error on every backend, never a silently ignored row or a bare gather error. On
    CUDA the check is a device-side assert, which would leave this process unable to run any
    later CUDA test: that case runs in a child process, which must fail with the assert."""
    backend, device = backend_device
    if device == "cuda":
        expect_child_failure(
            "test_reliability",
            "uint8_target_out_of_range",
            backend,
            device,
            entry,
            message="device-side assert",
        )
        return
    with pytest.raises(RuntimeError, match="target: a class index is out of bounds"):
        uint8_target_out_of_range(backend, device, entry)


def test_child_process_helper_reports_the_error():
    """The helper the CUDA cases above use, on the CPU: the child fails with the check's
    message, and a child that succeeds is reported."""
    expect_child_failure(
        "test_reliability",
        "uint8_target_out_of_range",
        "torch",
        "cpu",
        "softmax",
        message="target: a class index is out of bounds",
    )
    with pytest.raises(AssertionError, match="expected a failure, the call succeeded"):
        expect_child_failure("_reference", "randn", (2,), 0, "cpu", message="")


def test_uint8_target_linear(backend_device):
    backend, device = backend_device
    features, head = randn((3, 4), 0, device), randn((200, 4), 1, device)
    target = torch.tensor([156, 3, 4], dtype=torch.uint8, device=device)
    check(
        linear_ce,
        lambda x, w, y, **kw: linear_ce_reference(x, w, y.long(), **kw),
        (features, head, target),
        dict(reduction="mean"),
        (0, 1),
        backend,
    )


# --- 6. NaN logits (and NaN features of the linear heads) propagate through softcap ------------


def capped_ce_reference(input, target, *, softcap, **kwargs):
    return F.cross_entropy(softcap * torch.tanh(input / softcap), target, **kwargs)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_softcap_propagates_nan(backend_device, kind):
    backend, device = backend_device
    logits = randn((3, 5), 0, device, scale=3.0)
    logits[1, 2] = NAN
    if kind == "index":
        target = torch.tensor([0, 1, 4], device=device)
    else:
        target = torch.softmax(randn((3, 5), 1, device), 1)
    ours = check(
        fused_ce.softmax_cross_entropy,
        capped_ce_reference,
        (logits, target),
        dict(softcap=2.0, reduction="none"),
        (0, 1) if kind == "prob" else (0,),
        backend,
    )
    assert ours.loss[1].isnan() and ours.grads[0][1].isnan().all()


def linear_paths(backend: str) -> list[str]:
    """The fused path runs the Triton kernels only."""
    return ["chunked", "fused"] if backend == "triton" else ["chunked"]


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_linear_heads_propagate_nan_features(backend_device, softcap):
    backend, device = backend_device
    features, head = randn((3, 4), 0, device), randn((6, 4), 1, device)
    features[1, 2] = NAN
    target = torch.tensor([0, 1, 5], device=device)

    def reference(x, w, y, **kwargs):
        logits = F.linear(x, w)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, y, **kwargs)

    for path in linear_paths(backend):
        ours = check(
            functools.partial(linear_ce, softcap=softcap, path=path),
            reference,
            (features, head, target),
            dict(reduction="none"),
            (0, 1),
            backend,
        )
        assert ours.loss[1].isnan() and ours.loss[[0, 2]].isfinite().all(), path
    bce_target = torch.rand((3, 6), generator=torch.Generator().manual_seed(2)).to(device)
    check(
        fused_ce.linear_binary_cross_entropy_with_logits,
        lambda x, w, t, **kw: F.binary_cross_entropy_with_logits(F.linear(x, w), t, **kw),
        (features, head, bce_target),
        dict(reduction="none"),
        (0, 1, 2),
        backend,
    )


# --- 7. BCE d loss / d target at x = -inf: +inf as torch, with and without pos_weight ----------

SPECIAL_LOGITS = [-INF, -1e4, -3.0, -0.0, 0.0, 2.0, 1e4, INF, NAN]


@pytest.mark.parametrize("pos_weight", [None, 0.5, 2.0, "per-class"])
@pytest.mark.parametrize("with_weight", [False, True], ids=["unweighted", "weighted"])
def test_bce_special_logits(backend_device, pos_weight, with_weight):
    """Every output at infinite, huge, signed-zero and NaN logits, for targets 0, 0.3 and 1."""
    backend, device = backend_device
    logits = torch.tensor(SPECIAL_LOGITS, device=device).repeat(3, 1)
    target = torch.tensor([0.0, 0.3, 1.0], device=device)[:, None].expand_as(logits).clone()
    n_classes = logits.shape[1]
    if pos_weight == "per-class":
        pos_weight = positive((n_classes,), 3, device)
    elif pos_weight is not None:
        pos_weight = torch.full((n_classes,), pos_weight, device=device)
    weight = positive((3, 1), 4, device) if with_weight else None
    check(
        fused_ce.sigmoid_binary_cross_entropy,
        F.binary_cross_entropy_with_logits,
        (logits, target),
        dict(weight=weight, pos_weight=pos_weight, reduction="none"),
        (0, 1),
        backend,
    )


# --- 8. logit_scale and softcap beyond fp32's range: refused alike on every backend -------------

OUT_OF_FP32_RANGE = [
    ("logit_scale", 1e39),
    ("logit_scale", -1e39),
    ("logit_scale", 1e-39),
    ("softcap", 1e39),
    ("softcap", 1e-39),
]


@pytest.mark.parametrize("entry", ["softmax", "linear"])
@pytest.mark.parametrize(
    "name, value", OUT_OF_FP32_RANGE, ids=[f"{n}={v}" for n, v in OUT_OF_FP32_RANGE]
)
def test_options_beyond_fp32_range_are_refused(backend_device, entry, name, value):
    """fp64 logits with softcap 1e39 were NaN on Triton (the fp32 high half overflowed)."""
    backend, device = backend_device
    x = randn((4, 5), 0, device, dtype=torch.float64)
    head = randn((3, 5), 1, device, dtype=torch.float64)
    target = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=rf"^{name}: expected a magnitude within fp32's normal"):
        if entry == "softmax":
            fused_ce.softmax_cross_entropy(x, target, backend=backend, **{name: value})
        else:
            fused_ce.linear_cross_entropy(x, head, target, backend=backend, **{name: value})


@pytest.mark.parametrize("name, value", [("logit_scale", 3e38), ("softcap", 2e-38)])
def test_options_at_the_edge_of_fp32_range(backend_device, name, value):
    """The largest and smallest magnitudes still taken are carried exactly (fp64 logits)."""
    backend, device = backend_device
    x = randn((4, 5), 0, device, dtype=torch.float64, scale=1e-38 if name == "logit_scale" else 1.0)
    target = torch.tensor([0, 1, 4, 2], device=device)
    check(
        fused_ce.softmax_cross_entropy,
        capped_or_scaled_reference,
        (x, target),
        dict(reduction="none", **{name: value}),
        (0,),
        backend,
    )


def capped_or_scaled_reference(input, target, *, logit_scale=1.0, softcap=None, **kwargs):
    z = input * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, target, **kwargs)


# --- the torch path's chunks bound (1, C, H, W) inputs too -------------------------------------


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(1, 5, 3, 4), (2, 5, 12)], ids=["1CHW", "NCL"])
def test_torch_path_chunks_the_inner_dim(shape, kind, monkeypatch):
    """With room for 16 logits a chunk, no chunk copy may hold C * H * W = 60 of them, and the
    result is torch's (forward and both gradients, rows split mid-image)."""
    import fused_ce.torch_impl.cross_entropy as torch_ce

    monkeypatch.setattr(torch_ce, "CHUNK_ELEMENTS", 16)
    copied = []
    copy_rows = torch_ce._copy_rows

    def recording_copy(t, dtype):
        out = copy_rows(t, dtype)
        copied.append(out.numel())
        return out

    monkeypatch.setattr(torch_ce, "_copy_rows", recording_copy)
    logits = randn(shape, 0, "cpu", scale=2.0)
    if kind == "index":
        target = torch.randint(
            0, 5, shape[:1] + shape[2:], generator=torch.Generator().manual_seed(1)
        )
        target.view(-1)[::4] = -100
    else:
        target = torch.softmax(randn(shape, 1, "cpu"), 1)
    check(
        fused_ce.softmax_cross_entropy,
        F.cross_entropy,
        (logits, target),
        dict(reduction="none", label_smoothing=0.1),
        (0, 1) if kind == "prob" else (0,),
        "torch",
    )
    assert copied and max(copied) <= 16


# --- issue 23, item 7: no class, a zero divisor with label smoothing, ignore_index's type -------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_weight", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_no_class(backend_device, kind, with_weight, label_smoothing, reduction):
    """C = 0: every class index must be ignored; torch gives 0 per row (NaN with label
    smoothing over class indices, whose eps / C is inf), 'mean' NaN, and an empty gradient.
    The torch backend used to fail ("cannot reshape tensor of 0 elements"), and probability
    targets gave NaN rows on the kernels (0 * log 0)."""
    backend, device = backend_device
    logits = randn((3, 0), 0, device)
    if kind == "index":
        target = torch.full((3,), -100, device=device)
    else:
        target = torch.empty((3, 0), device=device)
    weight = torch.ones(0, device=device) if with_weight else None
    check(
        fused_ce.softmax_cross_entropy,
        F.cross_entropy,
        (logits, target),
        dict(weight=weight, label_smoothing=label_smoothing, reduction=reduction),
        (0,),
        backend,
    )


@pytest.mark.parametrize("return_stats", [False, True], ids=["loss", "stats"])
@pytest.mark.parametrize("entry", ["softmax", "linear"])
def test_smoothing_with_zero_weight_total_is_nan(backend_device, entry, return_stats):
    """Label smoothing, 'mean', and every target's class weight 0: torch's (1 - eps) * 0 / 0
    makes the loss NaN (not +inf, which one sum over the zero divisor gives); the gradient is
    NaN on the rows that count and 0 on the ignored one, as torch's."""
    backend, device = backend_device
    weight = torch.tensor([0.0, 0.0, 1.5], device=device)
    target = torch.tensor([0, 1, 0, -100], device=device)
    kwargs = dict(weight=weight, label_smoothing=0.1, reduction="mean")
    if entry == "softmax":

        def ours(input, target, **kw):
            result = fused_ce.softmax_cross_entropy(input, target, return_stats=return_stats, **kw)
            return result.loss if return_stats else result

        result = check(
            ours, F.cross_entropy, (randn((4, 3), 0, device), target), kwargs, (0,), backend
        )
        assert result.loss.isnan()
        return
    for path in linear_paths(backend):

        def ours(input, linear_weight, target, path=path, **kw):
            result = fused_ce.linear_cross_entropy(
                input, linear_weight, target, path=path, return_stats=return_stats, **kw
            )
            return result.loss if return_stats else result

        args = (randn((4, 5), 0, device), randn((3, 5), 1, device), target)
        result = check(ours, linear_ce_reference, args, kwargs, (0, 1), backend)
        assert result.loss.isnan(), path


BAD_IGNORE_INDEX = {
    "float": 1.0,
    "bool": True,
    "numpy-bool": np.True_,
    "bool-tensor": torch.tensor(True),
    "float-tensor": torch.tensor(1.0),
    "two-element-tensor": torch.tensor([1, 2]),
    "numpy-float": np.float64(1.0),
    "str": "1",
    "2**63": 2**63,
    "-2**63-1": -(2**63) - 1,
    "numpy-uint64-2**63": np.uint64(2**63),
}


@pytest.mark.parametrize("entry", ["softmax", "linear"])
@pytest.mark.parametrize("value", BAD_IGNORE_INDEX.values(), ids=BAD_IGNORE_INDEX.keys())
def test_ignore_index_torch_refuses_is_refused(backend_device, entry, value):
    """What torch's cross_entropy refuses as ignore_index is refused with an error naming it
    (the torch and Triton backends used to compute with a float, a bool or 2**63)."""
    backend, device = backend_device
    target = torch.tensor([0, 1, 2, 1], device=device)
    with pytest.raises((TypeError, ValueError), match="ignore_index"):
        if entry == "softmax":
            fused_ce.softmax_cross_entropy(
                randn((4, 3), 0, device), target, ignore_index=value, backend=backend
            )
        else:
            fused_ce.linear_cross_entropy(
                randn((4, 5), 0, device),
                randn((3, 5), 1, device),
                target,
                ignore_index=value,
                backend=backend,
            )


GOOD_IGNORE_INDEX = {
    "numpy-int64": np.int64(1),
    "numpy-int32": np.int32(1),
    "numpy-0d-array": np.array(1),
    "int64-tensor": torch.tensor(1),
    "uint8-tensor": torch.tensor(1, dtype=torch.uint8),
    "one-element-2d-tensor": torch.tensor([[1]]),
    "int64-max": 2**63 - 1,
    "int64-min": -(2**63),
}


@pytest.mark.parametrize("entry", ["softmax", "linear"])
@pytest.mark.parametrize("value", GOOD_IGNORE_INDEX.values(), ids=GOOD_IGNORE_INDEX.keys())
def test_ignore_index_torch_accepts_is_accepted(backend_device, entry, value):
    """What torch accepts as ignore_index (a NumPy integer, a one-element integer tensor, the
    int64 extremes) gives torch's numbers on every backend (the Triton interpreter used to fail
    on a 0-d tensor with an unclear error)."""
    backend, device = backend_device
    target = torch.tensor([0, 1, 2, 1], device=device)
    kwargs = dict(ignore_index=value, reduction="mean")
    if entry == "softmax":
        check(
            fused_ce.softmax_cross_entropy,
            F.cross_entropy,
            (randn((4, 3), 0, device), target),
            kwargs,
            (0,),
            backend,
        )
    else:
        args = (randn((4, 5), 0, device), randn((3, 5), 1, device), target)
        check(linear_ce, linear_ce_reference, args, kwargs, (0, 1), backend)
