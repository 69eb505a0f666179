"""sigmoid_binary_cross_entropy against torch.nn.functional.binary_cross_entropy_with_logits
computed in float64, on each (backend, device) pair of the ``backend_device`` fixture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import (
    REDUCTIONS,
    assert_identical,
    check,
    evaluate,
    generator,
    oracle,
    positive,
    randn,
    upstream_for,
)
from conftest import fresh_launch_caches

import fused_ce

SHAPES = {"0d": (), "1d": (7,), "2d": (4, 6), "3d": (2, 3, 5)}

# How a weight or pos_weight is shaped relative to the input: right-aligned broadcasting.
BROADCASTS = {
    "last": lambda shape: shape[-1:],  # (C,): pos_weight's usual per-class form
    "col": lambda shape: shape[:-1] + (1,),  # (N, 1)
    "full": lambda shape: shape,
    "scalar": lambda shape: (),
}
WEIGHTINGS = [
    (None, None),
    ("last", None),
    (None, "last"),
    ("last", "last"),
    ("col", "full"),
    ("full", "col"),
    ("scalar", "scalar"),
]
WEIGHTINGS_0D = [(None, None), ("scalar", None), (None, "scalar"), ("full", "full")]


def shaped(kind: str | None, shape, seed: int, device, dtype=torch.float32):
    """A weight broadcast as ``kind`` (see BROADCASTS), values in [0.25, 2), or None."""
    if kind is None:
        return None
    return positive(BROADCASTS[kind](shape), seed, device, dtype)


def make_target(shape, device, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    """Soft targets in [0, 1], with some exact 0s and 1s."""
    target = torch.rand(shape, generator=generator(seed), dtype=torch.float64)
    target = torch.where(target < 0.2, 0.0, torch.where(target > 0.8, 1.0, target))
    return target.to(device=device, dtype=dtype)


def check_bce(backend_device, input, target, *, seed: int = 0, wrt=(0, 1), **kwargs):
    """Our loss and gradients (input and target) vs the oracle."""
    backend, _ = backend_device
    return check(
        fused_ce.sigmoid_binary_cross_entropy,
        F.binary_cross_entropy_with_logits,
        (input, target),
        kwargs,
        wrt,
        backend,
        seed,
        elementwise=True,
    )


def _weighted_cases():
    for name, shape in SHAPES.items():
        for weight, pos_weight in WEIGHTINGS_0D if shape == () else WEIGHTINGS:
            yield pytest.param(shape, weight, pos_weight, id=f"{name}-w_{weight}-pw_{pos_weight}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("shape", "weight", "pos_weight"), list(_weighted_cases()))
def test_fp32_matches_oracle(backend_device, shape, weight, pos_weight, reduction):
    _, device = backend_device
    input = randn(shape, 0, device, scale=3.0)
    check_bce(
        backend_device,
        input,
        make_target(shape, device),
        weight=shaped(weight, shape, 2, device),
        pos_weight=shaped(pos_weight, shape, 3, device),
        reduction=reduction,
    )


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_extreme_logits(backend_device, reduction):
    """|x| up to 1e4 (and sigmoid within 1e-30 of its target) is finite and exact."""
    _, device = backend_device
    input = (torch.rand((4, 8), generator=generator(0), dtype=torch.float64) * 2e4 - 1e4).to(device)
    input = input.float()
    input[0] = torch.tensor([1e4, -1e4, 80.0, -80.0, 30.0, -30.0, 1e-3, 0.0], device=device)
    target = make_target(input.shape, device)
    target[0] = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.3], device=device)
    ours = check_bce(
        backend_device,
        input,
        target,
        weight=shaped("col", input.shape, 2, device),
        pos_weight=shaped("last", input.shape, 3, device),
        reduction=reduction,
    )
    assert all(torch.isfinite(value).all() for _, value in ours.outputs())


@pytest.mark.parametrize("pos_weighted", [False, True], ids=["plain", "pos_weighted"])
def test_confident_elements_keep_relative_precision(backend_device, pos_weighted):
    """Confident predictions have losses and gradients near exp(-|x|) (down to 1e-35): each
    element must be as precise, relative to its own size, as torch's fp32 result (log1p and
    sigmoid), not merely small: |ours - oracle| <= 2 |torch32 - oracle| + 1e-6 |oracle|, plus
    the oracle's own fp64 rounding at its largest value (its sigmoid(x) - 1 cancels at x > 30,
    where our gradient, computed as -sigmoid(-x), is the more exact one)."""
    backend, device = backend_device
    magnitudes = torch.tensor([1e-3, 0.5, 5.0, 17.0, 20.0, 30.0, 50.0, 80.0])
    input = torch.cat([magnitudes, -magnitudes]).to(device)
    target = torch.cat([torch.ones(8), torch.zeros(8)]).to(device)
    kwargs = dict(pos_weight=positive((16,), 3, device) if pos_weighted else None)
    kwargs["reduction"] = "none"
    upstream = upstream_for(input, 4)
    args = (input, target)
    ours = evaluate(
        fused_ce.sigmoid_binary_cross_entropy,
        args,
        {**kwargs, "backend": backend},
        (0, 1),
        upstream,
    )
    fp32 = evaluate(F.binary_cross_entropy_with_logits, args, kwargs, (0, 1), upstream)
    reference = oracle(F.binary_cross_entropy_with_logits, args, kwargs, (0, 1), upstream)
    for (name, value), (_, theirs), (_, ref) in zip(
        ours.outputs(), fp32.outputs(), reference.outputs(), strict=True
    ):
        error = (value.double() - ref).abs()
        fp64_rounding = 4 * torch.finfo(torch.float64).eps * float(ref.abs().max())
        bound = 2 * (theirs.double() - ref).abs() + 1e-6 * ref.abs() + fp64_rounding
        assert (error <= bound).all(), f"{name}: relative error {error / ref.abs()}"


@pytest.mark.parametrize("weights", [(None, None), ("col", "last")], ids=["plain", "weighted"])
@pytest.mark.parametrize("shape", [(5, 9), (3, 2, 9)], ids=str)
def test_small_tiles(backend_device, shape, weights, monkeypatch):
    """Tiles of 2 x 4 elements, so tiny shapes run many programs in both grid directions (for
    the torch path, which has no tiles, the same check runs once more)."""
    backend, device = backend_device
    if backend == "triton":
        import fused_ce.launch.bce as launch_bce

        monkeypatch.setattr(launch_bce, "_MAX_BLOCK_C", 4)
        monkeypatch.setattr(launch_bce, "MAX_TILE", 32)
        fresh_launch_caches(monkeypatch, launch_bce)
    check_bce(
        backend_device,
        randn(shape, 0, device, scale=3.0),
        make_target(shape, device),
        weight=shaped(weights[0], shape, 2, device),
        pos_weight=shaped(weights[1], shape, 3, device),
        reduction="none",
    )


LOW_PRECISION_CASES = {"plain": (None, None), "weighted": ("col", "last")}


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("weights", LOW_PRECISION_CASES.values(), ids=LOW_PRECISION_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend_device, dtype, weights, reduction):
    """fp16/bf16 within twice torch's own same-dtype error, fp64 tight; the loss dtype equals
    torch's (it follows the target's dtype) and gradients keep their inputs' dtypes."""
    _, device = backend_device
    shape = (6, 10)
    input = randn(shape, 0, device, dtype, scale=4.0)
    weight, pos_weight = weights
    check_bce(
        backend_device,
        input,
        make_target(shape, device, dtype),
        weight=shaped(weight, shape, 2, device, dtype),
        pos_weight=shaped(pos_weight, shape, 3, device, dtype),
        reduction=reduction,
    )


@pytest.mark.parametrize(
    ("input_dtype", "target_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float64),
    ],
    ids=str,
)
def test_mixed_dtypes(backend_device, input_dtype, target_dtype):
    """The loss takes the target's dtype, as torch's does; each gradient keeps its tensor's
    dtype; values by the rule of the coarser dtype."""
    _, device = backend_device
    shape = (3, 7)
    check_bce(
        backend_device,
        randn(shape, 0, device, input_dtype, scale=3.0),
        make_target(shape, device, target_dtype),
        pos_weight=shaped("last", shape, 3, device, input_dtype),
        reduction="none",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 3)], ids=str)
def test_empty_input(backend_device, shape, reduction):
    """No elements: NaN for 'mean', 0 for 'sum', empty 'none' and gradients."""
    _, device = backend_device
    weight = positive(shape[-1:], 2, device)
    ours = check_bce(
        backend_device,
        randn(shape, 0, device),
        make_target(shape, device),
        weight=weight,
        pos_weight=weight,
        reduction=reduction,
    )
    if reduction == "mean":
        assert ours.loss.isnan()
    elif reduction == "sum":
        assert ours.loss.item() == 0.0
    assert ours.grads[0].shape == shape and ours.grads[1].shape == shape


def _layouts(device) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """name -> (input, target, weight) views that are not contiguous."""
    wide = randn((5, 12), 0, device, scale=3.0)
    target_wide = make_target((5, 12), device)
    column_major = randn((6, 5), 1, device, scale=3.0)
    weight_wide = positive((12,), 2, device)
    return {
        "transposed": (column_major.t(), make_target((6, 5), device).t(), weight_wide[:6]),
        "strided": (wide[:, ::2], target_wide[::1, 1::2], weight_wide[::2]),
        "row_slice": (wide[1:4, 2:9], target_wide[::2, :7], weight_wide[3:10]),
        "permuted_3d": (
            randn((3, 4, 2), 3, device).permute(2, 0, 1),
            make_target((4, 2, 3), device).permute(1, 2, 0),
            positive((4, 3), 4, device).t(),
        ),
    }


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("layout", ["transposed", "strided", "row_slice", "permuted_3d"])
def test_non_contiguous_inputs(backend_device, layout, reduction):
    """Strided and permuted operands give the oracle's numbers, identical to contiguous ones."""
    _, device = backend_device
    input, target, weight = _layouts(device)[layout]
    assert not input.is_contiguous() and not target.is_contiguous()
    kwargs = dict(weight=weight, pos_weight=weight.flip(-1), reduction=reduction)
    strided = check_bce(backend_device, input, target, **kwargs)
    dense = check_bce(backend_device, input.contiguous(), target.contiguous(), **kwargs)
    assert_identical(strided, dense)


@pytest.mark.parametrize("wrt", [(), (1,), (0,)], ids=["no_grad", "target_only", "input_only"])
def test_partial_requires_grad(backend_device, wrt):
    """Inputs that do not require grad work, and only the requested gradient is computed."""
    backend, device = backend_device
    input = randn((3, 5), 0, device)
    target = make_target((3, 5), device)
    kwargs = dict(weight=positive((5,), 2, device), pos_weight=positive((3, 1), 3, device))
    check_bce(backend_device, input, target, wrt=wrt, **kwargs)
    loss = fused_ce.sigmoid_binary_cross_entropy(input, target, backend=backend, **kwargs)
    assert not loss.requires_grad


# --- bad inputs -------------------------------------------------------------------------------


def _bad_cases(device):
    x = randn((4, 6), 0, device)
    t = make_target((4, 6), device)

    def weight(shape, requires_grad=False):
        return torch.ones(shape, device=device, requires_grad=requires_grad)

    cases = {
        "target size": ((x, t[:, :5]), {}, ValueError, r"\btarget\b"),
        "target scalar": ((x, t[0, 0]), {}, ValueError, r"\btarget\b"),
        "integer target": ((x, t.long()), {}, TypeError, r"\btarget\b"),
        "integer input": ((x.long(), t), {}, TypeError, r"\binput\b"),
        "reduction": ((x, t), {"reduction": "elementwise"}, ValueError, r"\breduction\b"),
    }
    for name in ("weight", "pos_weight"):
        cases |= {
            f"{name} enlarges": ((x, t), {name: weight((2, 4, 6))}, RuntimeError, rf"\b{name}\b"),
            f"{name} enlarges a dim": (
                (x, t),
                {name: weight((4, 1, 6))},
                RuntimeError,
                rf"\b{name}\b",
            ),
            f"{name} does not broadcast": (
                (x, t),
                {name: weight((5,))},
                RuntimeError,
                rf"\b{name}\b",
            ),
            f"{name} requires grad": (
                (x, t),
                {name: weight((6,), requires_grad=True)},
                RuntimeError,
                rf"\b{name}\b",
            ),
            f"{name} integer": (
                (x, t),
                {name: torch.ones(6, dtype=torch.long, device=device)},
                TypeError,
                rf"\b{name}\b",
            ),
        }
    return cases


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_inputs_raise(backend_device, case):
    backend, device = backend_device
    args, kwargs, error, match = _bad_cases(device)[case]
    with pytest.raises(error, match=match):
        fused_ce.sigmoid_binary_cross_entropy(*args, backend=backend, **kwargs)
