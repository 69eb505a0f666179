"""Property tests: random shapes, dtypes, layouts, options and special values (inf, -inf,
NaN, 1e4, rows of -inf, every target ignored), each backend held against float64 PyTorch by
the rules of tests/_reference.py (half precision within twice torch's own error).

CI runs a bounded, derandomised number of examples per test and backend
(``FUSED_CE_PROPERTY_EXAMPLES``, default 10); a long run sets it higher, e.g.
``FUSED_CE_PROPERTY_EXAMPLES=2000 pytest tests/test_properties.py`` (docs/reliability.md says
what such a run tried and found).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _reference import check
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_options import ce_reference

import fused_ce

EXAMPLES = int(os.environ.get("FUSED_CE_PROPERTY_EXAMPLES", "10"))
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 100,  # CI: the same examples every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPECIALS = [float("inf"), float("-inf"), float("nan"), 1e4, -1e4]


def _values(draw, shape, dtype, *, specials: bool) -> tuple[torch.Tensor, bool]:
    """Seeded normal values of ``shape`` with, optionally, special values at a few places;
    returns them and whether a large magnitude (1e4) was placed."""
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1.0, 4.0]))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values = values * scale
    large = False
    if specials and values.numel() and draw(st.booleans()):
        flat = values.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            value = draw(st.sampled_from(SPECIALS))
            flat[draw(st.integers(0, flat.numel() - 1))] = value
            large |= abs(value) == 1e4
    return values.to(dtype), large


def _layout(draw, tensor: torch.Tensor, class_dim: int) -> torch.Tensor:
    """The same values as given, or in a class-last (channels-last like) memory layout, or as a
    strided view into a larger buffer."""
    kind = draw(st.sampled_from(["contiguous", "class-last", "strided"]))
    if kind == "class-last" and tensor.dim() >= 2:
        return tensor.movedim(class_dim, -1).contiguous().movedim(-1, class_dim)
    if kind == "strided":
        wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    return tensor


@st.composite
def ce_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n_classes = draw(st.integers(1, 9))
    batch = draw(st.sampled_from([(), (0,), (1,), (3,), (5,), (2, 3), (1, 2, 2)]))
    shape = (n_classes,) if batch == () else (batch[0], n_classes, *batch[1:])
    class_dim = 0 if batch == () else 1
    batch_shape = shape[:class_dim] + shape[class_dim + 1 :]
    logits, large = _values(draw, shape, dtype, specials=True)
    if logits.numel() and draw(st.integers(0, 5)) == 0:
        logits.select(class_dim, 0).fill_(float("-inf"))  # some rows partly -inf
        if draw(st.booleans()):
            logits.fill_(float("-inf"))  # every row -inf
    kind = draw(st.sampled_from(["int64", "uint8", "prob"]))
    kwargs = dict(
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        logit_scale=draw(st.sampled_from([1.0, 1.0, 0.5, -2.0])),
        softcap=draw(st.sampled_from([None, None, 2.0])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 0.1])),
    )
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if kind == "prob":
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), class_dim)
        target = target.to(dtype)
    else:
        ignore_index = draw(st.sampled_from([-100, 0, 3]))
        target = torch.randint(0, n_classes, batch_shape, generator=gen)
        ignored = draw(st.sampled_from(["none", "some", "all"]))
        if ignored != "none" and ignore_index >= 0:
            if ignored == "all":
                target.fill_(ignore_index)
            else:
                target.view(-1)[::2] = ignore_index
        target = target.to(getattr(torch, kind))
        kwargs["ignore_index"] = ignore_index
    if draw(st.booleans()):
        kwargs["weight"] = (torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.25).to(
            dtype
        )
        if kind == "prob":
            kwargs["weight"] = kwargs["weight"].to(dtype)
    logits = _layout(draw, logits, class_dim)
    return logits, target, kwargs, large


@PROPERTY_SETTINGS
@given(case=ce_cases())
def test_cross_entropy_property(backend_device, case):
    backend, device = backend_device
    logits, target, kwargs, large = case
    logits, target = logits.to(device), target.to(device)
    if "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].to(device)
    prob = target.is_floating_point()

    def reference(x, y, **kw):
        return ce_reference(x, y.long() if y.dtype == torch.uint8 else y, **kw)

    check(
        fused_ce.softmax_cross_entropy,
        reference,
        (logits, target),
        kwargs,
        (0, 1) if prob else (0,),
        backend,
        # fp32 at 1e4: torch's own error sets the bar (fp64's is tight anyway).
        torch_rule=large and logits.dtype == torch.float32,
    )


@st.composite
def bce_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(), (0,), (1,), (7,), (3, 4), (2, 3, 2)]))
    logits, large = _values(draw, shape, dtype, specials=True)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        target = target.round()  # hard labels
    target = target.to(dtype)
    kwargs = dict(reduction=draw(st.sampled_from(["none", "mean", "sum"])))
    last = shape[-1:] if shape else ()
    for name in ("weight", "pos_weight"):
        choice = draw(st.sampled_from(["none", "last-dim", "full"]))
        if choice != "none":
            size = last if choice == "last-dim" else shape
            values = torch.rand(size, generator=gen, dtype=torch.float64) * 1.75 + 0.25
            kwargs[name] = values.to(dtype)
    if len(shape) >= 1 and shape[-1] > 0:
        logits = _layout(draw, logits, len(shape) - 1)
    return logits, target, kwargs, large


@PROPERTY_SETTINGS
@given(case=bce_cases())
def test_bce_property(backend_device, case):
    backend, device = backend_device
    logits, target, kwargs, large = case
    logits, target = logits.to(device), target.to(device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    check(
        fused_ce.sigmoid_binary_cross_entropy,
        F.binary_cross_entropy_with_logits,
        (logits, target),
        kwargs,
        (0, 1),
        backend,
        # fp32 at 1e4: torch's own error sets the bar (fp64's is tight anyway).
        torch_rule=large and logits.dtype == torch.float32,
    )


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_property_strategies_reach_special_values(kind):
    """The strategies do produce the cases they are for (a strategy that never draws a NaN
    would make the property tests pass vacuously)."""
    seen = {"nan": False, "inf": False, "-inf": False, "large": False}

    @settings(max_examples=200, derandomize=True, database=None, deadline=None)
    @given(case=ce_cases() if kind == "ce" else bce_cases())
    def collect(case):
        values = case[0].double()
        seen["nan"] |= bool(values.isnan().any())
        seen["inf"] |= bool((values == float("inf")).any())
        seen["-inf"] |= bool((values == float("-inf")).any())
        seen["large"] |= case[3]

    collect()
    assert all(seen.values()), seen
