"""``linear_cross_entropy(..., shift=True)``: the causal-LM label shift inside the op, against
torch's slice-then-cross-entropy in float64 on every backend and path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import check, generator, randn
from conftest import backend_cases

import fused_ce

N_FEATURES, N_CLASSES = 6, 11
PATH_CASES = [(b, d, "chunked") for b, d in backend_cases()] + [
    (b, d, "fused") for b, d in backend_cases() if b == "triton"
]


def sliced_reference(
    input, linear_weight, target, linear_bias=None, *, reduction, path=None, **kwargs
):
    """What users write without ``shift``: drop the last position of each sequence from the
    hidden states and the first from the labels, then torch's cross-entropy of the logits;
    for ``'none'`` a 0 appended at each last position (ours keeps the target's shape).
    ``path`` steers only ours."""
    hidden, labels = input[..., :-1, :], target[..., 1:]
    logits = F.linear(hidden, linear_weight, linear_bias)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction, **kwargs
    )
    if reduction != "none":
        return loss
    loss = loss.view(labels.shape)
    return torch.cat([loss, loss.new_zeros((*labels.shape[:-1], 1))], dim=-1)


def ours(input, linear_weight, target, linear_bias=None, **kwargs):
    return fused_ce.linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, shift=True, chunk_size=3, **kwargs
    )


def _head(lead, seed=0):
    x = randn((*lead, N_FEATURES), seed, "cpu", torch.float64)
    w = randn((N_CLASSES, N_FEATURES), seed + 1, "cpu", torch.float64, scale=0.7)
    b = randn((N_CLASSES,), seed + 2, "cpu", torch.float64)
    target = torch.randint(0, N_CLASSES, lead, generator=generator(seed + 3))
    return x, w, b, target


@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead", [(2, 5), (7,)], ids=["BxT", "one-sequence"])
def test_shift_matches_slice_then_cross_entropy(case, reduction, lead):
    backend, device, path = case
    x, w, b, target = _head(lead)
    target.view(-1)[::4] = -100  # padding inside the sequences too
    weight = torch.rand(N_CLASSES, generator=generator(9), dtype=torch.float64) + 0.5
    kwargs = {"reduction": reduction, "weight": weight, "label_smoothing": 0.1}
    check(ours, sliced_reference, [x, w, target, b], {**kwargs, "path": path}, [0, 1, 3], backend)


def test_shift_with_stats_and_uint8_labels(backend_device):
    """uint8 labels and ignore_index=-100 (not a uint8 value) still ignore the last position;
    the stats' accuracy counts the shifted, non-ignored labels."""
    backend, _ = backend_device
    x, w, b, target = _head((3, 4), seed=5)
    stats = ours(x, w, target.to(torch.uint8), b, return_stats=True, backend=backend)
    expected = sliced_reference(x, w, target, b, reduction="mean")
    torch.testing.assert_close(stats.loss, expected, rtol=1e-12, atol=0)
    logits = F.linear(x[:, :-1], w, b)
    accuracy = (logits.argmax(-1) == target[:, 1:]).double().mean()
    torch.testing.assert_close(stats.accuracy, accuracy)


def test_shift_module():
    head = fused_ce.nn.LinearCrossEntropyLoss(
        N_FEATURES, N_CLASSES, shift=True, dtype=torch.float64
    )
    x, _, _, target = _head((2, 5), seed=7)
    expected = sliced_reference(x, head.linear_weight, target, head.linear_bias, reduction="mean")
    torch.testing.assert_close(head(x, target), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "target, message",
    [
        (torch.rand(2, 5, N_CLASSES, dtype=torch.float64), "shift: needs class-index targets"),
        (torch.zeros(2, 5, dtype=torch.int32), "shift: needs class-index targets"),
    ],
)
def test_shift_refuses_what_it_cannot_shift(target, message):
    x, w, b, _ = _head((2, 5))
    with pytest.raises(ValueError, match=message):
        fused_ce.linear_cross_entropy(x, w, target, shift=True)
    with pytest.raises(ValueError, match="shift: needs a target with a sequence dim"):
        fused_ce.linear_cross_entropy(x[0, 0], w, torch.tensor(1), shift=True)
