"""``import fused_ce.functional as F`` is a complete stand-in for ``torch.nn.functional``: the
losses are fused_ce's, every other name is torch's own object, so a whole training script runs
after changing only its import."""

import pytest
import torch
import torch.nn.functional as torch_F

import fused_ce
import fused_ce.functional as F

REPLACED = {
    "cross_entropy": fused_ce.cross_entropy,
    "binary_cross_entropy_with_logits": fused_ce.binary_cross_entropy_with_logits,
    "linear_cross_entropy": fused_ce.linear_cross_entropy,
}


def test_every_public_name_of_torch_functional_is_there():
    names = [name for name in dir(torch_F) if not name.startswith("_")]
    assert len(names) > 100 and set(REPLACED) <= set(names)
    for name in names:
        expected = REPLACED.get(name, getattr(torch_F, name))
        assert getattr(F, name) is expected, name
    assert set(names) <= set(dir(F))
    assert F.linear_binary_cross_entropy_with_logits is (
        fused_ce.linear_binary_cross_entropy_with_logits
    )


def test_from_import_and_unknown_names():
    from fused_ce.functional import cross_entropy, relu, softmax

    assert relu is torch_F.relu and softmax is torch_F.softmax
    assert cross_entropy is fused_ce.cross_entropy
    with pytest.raises(AttributeError, match="'fused_ce.functional' has no attribute 'relu2'"):
        F.relu2  # noqa: B018


def _train_step(functional, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small MLP step written against ``functional`` as a script writes against ``F``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=gen)
    w1 = torch.randn(16, 8, generator=gen, dtype=torch.float64).requires_grad_()
    w2 = torch.randn(5, 16, generator=gen, dtype=torch.float64).requires_grad_()
    hidden = functional.layer_norm(functional.relu(functional.linear(x, w1)), (16,))
    logits = functional.linear(functional.dropout(hidden, p=0.0), w2)
    loss = functional.cross_entropy(logits, y, label_smoothing=0.1)
    loss = loss + functional.binary_cross_entropy_with_logits(
        logits[:, 0], functional.one_hot(y, 5)[:, 0].double()
    )
    loss.backward()
    return loss.detach(), w1.grad


def test_a_script_gives_torchs_numbers_with_either_import():
    ours, ours_grad = _train_step(F, seed=0)
    theirs, theirs_grad = _train_step(torch_F, seed=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-10, atol=1e-12)
