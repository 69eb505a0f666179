"""torch's signatures, exactly: every public loss takes torch's positional arguments in torch's
order with torch's defaults (the deprecated ``size_average``/``reduce`` pair included, mapped
to ``reduction`` as torch maps it), fused_ce's own options keyword-only; and what torch
accepts is accepted."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from _reference import check, randn

import fused_ce
import fused_ce.functional as FF
from fused_ce._backend import resolve

Parameter = inspect.Parameter
POSITIONAL = (Parameter.POSITIONAL_ONLY, Parameter.POSITIONAL_OR_KEYWORD)

# (ours, torch's): every public name of each loss, and the modules' constructors.
PAIRS = [
    (fused_ce.softmax_cross_entropy, F.cross_entropy),
    (fused_ce.cross_entropy, F.cross_entropy),
    (FF.cross_entropy, F.cross_entropy),
    (fused_ce.sigmoid_binary_cross_entropy, F.binary_cross_entropy_with_logits),
    (fused_ce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    (FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    (fused_ce.linear_cross_entropy, F.linear_cross_entropy),
    (fused_ce.nn.CrossEntropyLoss, torch.nn.CrossEntropyLoss),
    (fused_ce.nn.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss),
]


def _positional(fn) -> list[tuple[str, object]]:
    return [
        (p.name, p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind in POSITIONAL and p.name != "self"
    ]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda f: getattr(f, "__qualname__", ""))
def test_positional_parameters_are_torchs(ours, theirs):
    assert _positional(ours) == _positional(theirs)
    # Every keyword-only parameter of torch's is ours too (linear_cross_entropy's `options`
    # excepted: fused_ce's chunk_size and path play its part); ours beyond it stay keyword-only.
    ours_keywords = {
        p.name: p.default
        for p in inspect.signature(ours).parameters.values()
        if p.kind is Parameter.KEYWORD_ONLY
    }
    for p in inspect.signature(theirs).parameters.values():
        if p.kind is Parameter.KEYWORD_ONLY and p.name != "options":
            assert p.name in ours_keywords, p.name


def test_linear_bce_follows_linear_ce():
    """No torch counterpart: the same three positional tensors, the rest keyword-only."""
    assert [name for name, _ in _positional(fused_ce.linear_binary_cross_entropy_with_logits)] == [
        "input",
        "linear_weight",
        "target",
    ]


def _ce_inputs(seed: int = 0):
    logits = randn((6, 5), seed, "cpu", torch.float32, scale=2.0)
    target = torch.tensor([1, 0, 4, 2, 3, 2])
    weight = torch.rand(5, generator=torch.Generator().manual_seed(seed)) + 0.5
    return logits, target, weight


def test_positional_call_cross_entropy(backend_device):
    backend, _ = backend_device
    logits, target, weight = _ce_inputs()
    # weight, size_average, ignore_index, reduce, reduction, label_smoothing
    args = [logits, target, weight, None, 2, None, "sum", 0.1]
    check(FF.cross_entropy, F.cross_entropy, args, {}, [0], backend)


@pytest.mark.parametrize(
    "size_average, reduce, reduction",
    [(True, None, "mean"), (False, None, "sum"), (None, False, "none"), (True, True, "mean")],
)
def test_deprecated_pair_cross_entropy(backend_device, size_average, reduce, reduction):
    backend, _ = backend_device
    logits, target, weight = _ce_inputs(1)
    args = [logits, target, weight, size_average, -100, reduce]
    with pytest.warns(UserWarning, match=f"please use reduction='{reduction}' instead"):
        ours = check(FF.cross_entropy, F.cross_entropy, args, {}, [0], backend)
    # The pair overrides an explicit reduction, as in torch.
    assert ours.loss.shape == F.cross_entropy(logits, target, reduction=reduction).shape
    with pytest.warns(UserWarning):
        check(FF.cross_entropy, F.cross_entropy, [*args, "sum"], {}, [0], backend)


def test_positional_size_average_is_not_ignore_index():
    """The issue's call: torch's positional size_average=True was taken as ignore_index=1."""
    logits, target, _ = _ce_inputs(2)
    with pytest.warns(UserWarning):
        expected = F.cross_entropy(logits, target, None, True)
    with pytest.warns(UserWarning):
        got = FF.cross_entropy(logits, target, None, True, backend="torch")
    torch.testing.assert_close(got, expected)


def _bce_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = randn((4, 3), seed, "cpu", torch.float32, scale=2.0)
    target = torch.rand(4, 3, generator=gen)
    weight = torch.rand(3, generator=gen)
    pos_weight = torch.rand(3, generator=gen) * 2
    return logits, target, weight, pos_weight


def test_positional_call_bce(backend_device):
    backend, _ = backend_device
    logits, target, weight, pos_weight = _bce_inputs()
    # weight, size_average, reduce, reduction, pos_weight
    args = [logits, target, weight, None, None, "sum", pos_weight]
    check(
        FF.binary_cross_entropy_with_logits,
        F.binary_cross_entropy_with_logits,
        args,
        {},
        [0, 1],
        backend,
    )


@pytest.mark.parametrize(
    "size_average, reduce, reduction", [(False, None, "sum"), (None, False, "none")]
)
def test_deprecated_pair_bce(backend_device, size_average, reduce, reduction):
    backend, _ = backend_device
    logits, target, weight, pos_weight = _bce_inputs(1)
    args = [logits, target, weight, size_average, reduce, "mean", pos_weight]
    with pytest.warns(UserWarning, match=f"please use reduction='{reduction}' instead"):
        ours = check(
            FF.binary_cross_entropy_with_logits,
            F.binary_cross_entropy_with_logits,
            args,
            {},
            [0, 1],
            backend,
        )
    assert ours.loss.shape == (() if reduction != "none" else logits.shape)


def test_modules_take_torchs_positional_arguments():
    weight = torch.rand(5) + 0.5
    ours = fused_ce.nn.CrossEntropyLoss(weight, None, 2, None, "sum", 0.1, backend="torch")
    theirs = torch.nn.CrossEntropyLoss(weight, None, 2, None, "sum", 0.1)
    assert (ours.ignore_index, ours.reduction, ours.label_smoothing) == (2, "sum", 0.1)
    logits, target, _ = _ce_inputs(3)
    torch.testing.assert_close(ours(logits, target), theirs(logits, target))
    with pytest.warns(UserWarning):
        assert fused_ce.nn.CrossEntropyLoss(None, False).reduction == "sum"
    with pytest.warns(UserWarning):
        assert fused_ce.nn.BCEWithLogitsLoss(None, None, False).reduction == "none"


@pytest.mark.parametrize(
    "module, kwargs",
    [
        (fused_ce.nn.CrossEntropyLoss, {}),
        (fused_ce.nn.BCEWithLogitsLoss, {}),
        (fused_ce.nn.LinearCrossEntropyLoss, {"in_features": 4, "out_features": 3}),
        (fused_ce.nn.LinearBCEWithLogitsLoss, {"in_features": 4, "out_features": 3}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_modules_check_backend_at_construction(module, kwargs):
    with pytest.raises(ValueError, match=r"backend: expected one of .* got 'trition'"):
        module(**kwargs, backend="trition")


def test_invalid_environment_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("FUSED_CE_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"FUSED_CE_BACKEND.*'gpu'"):
        resolve(None, torch.empty(0))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_one_dim_input_with_one_element_target(backend_device, reduction):
    """torch reads a (1,) class-index target of a (C,) input as the 0-d one in the forward
    (its backward then fails with a size mismatch; ours gives the 0-d target's gradient)."""
    backend, _ = backend_device
    logits = randn((5,), 4, "cpu", torch.float32, scale=2.0)
    target = torch.tensor([3])
    ours = FF.cross_entropy(logits, target, reduction=reduction, backend=backend)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, reduction=reduction))
    assert ours.shape == ()

    def torch_with_0d_target(input, target, **kwargs):
        return F.cross_entropy(input, target.view(()), **kwargs)

    check(
        FF.cross_entropy,
        torch_with_0d_target,
        [logits, target],
        {"reduction": reduction},
        [0],
        backend,
    )


def test_one_dim_input_with_longer_target_is_refused():
    with pytest.raises(ValueError, match="target"):
        FF.cross_entropy(torch.randn(5), torch.tensor([1, 2]), backend="torch")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "bad, dtype", [(5, torch.int64), (-3, torch.int64), (156, torch.uint8)], ids=str
)
def test_out_of_range_message_names_the_value(backend_device, reduction, bad, dtype):
    """As torch's "Target 5 is out of bounds.": the offending index, on every CPU path (the
    native ops' C++ check and the Python one)."""
    backend, _ = backend_device
    target = torch.tensor([0, 1, 2, 3], dtype=dtype)
    target[2] = bad
    with pytest.raises(RuntimeError, match=rf"target: .*Target {bad} is out of bounds\."):
        FF.cross_entropy(torch.randn(4, 5), target, reduction=reduction, backend=backend)
    with pytest.raises(RuntimeError, match=rf"target: .*Target {bad} is out of bounds\."):
        fused_ce.linear_cross_entropy(
            torch.randn(4, 3), torch.randn(5, 3), target, reduction=reduction, backend=backend
        )
