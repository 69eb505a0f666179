"""Per-token outputs without logits (issue 24, part 2): the per-token fields of
``CrossEntropyStats`` (target log-probability, argmax, correctness, with lse and entropy), the
scorer ``linear_log_probs`` (with gradient) and ``linear_top_k``, each against PyTorch's own
computation on the full logits in float64, on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import generator, randn

import fused_ce
from fused_ce._memory import peak_bytes
from fused_ce.app.check import TIGHT

CASES = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "scale_softcap": {"logit_scale": 0.7, "softcap": 3.0},
}


def _final(z: torch.Tensor, kwargs: dict) -> torch.Tensor:
    z = z * kwargs.get("logit_scale", 1.0)
    cap = kwargs.get("softcap")
    return cap * torch.tanh(z / cap) if cap else z


def _check_stats(stats, logits64, target, kwargs, class_dim, dtype):
    """Every per-token field against the fp64 oracle computed from the full logits."""
    z = _final(logits64, kwargs)
    logp = torch.log_softmax(z, class_dim)
    valid = target != -100
    index = torch.where(valid, target, 0).long()
    ref_logp = torch.where(
        valid, logp.gather(class_dim, index.unsqueeze(class_dim)).squeeze(class_dim), 0.0
    )
    ref_argmax = z.argmax(class_dim)
    ref_entropy = -(logp.exp() * logp).sum(class_dim)
    rtol, atol = TIGHT[dtype]
    torch.testing.assert_close(stats.target_log_prob.double(), ref_logp, rtol=rtol, atol=atol)
    torch.testing.assert_close(
        stats.lse.detach().double(), torch.logsumexp(z, class_dim), rtol=rtol, atol=atol
    )
    torch.testing.assert_close(stats.entropy.double(), ref_entropy, rtol=rtol, atol=atol)
    assert stats.argmax.dtype == torch.int64 and torch.equal(stats.argmax, ref_argmax)
    assert stats.correct.dtype == torch.bool
    assert torch.equal(stats.correct, (ref_argmax == target) & valid)
    assert stats.target_log_prob.dtype == stats.lse.dtype
    assert not stats.target_log_prob.requires_grad
    # accuracy is the mean of correct over the non-ignored tokens.
    assert stats.accuracy.item() == pytest.approx(stats.correct.sum().item() / valid.sum().item())


def _class_weight(kwargs, n_classes, device, dtype):
    kwargs = dict(kwargs)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(n_classes, generator=generator(5)).to(device, dtype) + 0.5
    return kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_stats_per_token_on_logits(backend_device, case):
    backend, device = backend_device
    dtype = torch.float32
    n, c, d = 4, 11, 3
    logits = randn((n, c, d), 1, device, dtype, scale=2.0)
    # A tie at the max: torch.argmax's first index must win.
    logits[0, 7, 1] = logits[0, 2, 1] = logits[0, :, 1].max() + 1.0
    target = torch.randint(0, c, (n, d), generator=generator(2)).to(device)
    target[1, 0] = -100
    target[0, 1] = 7  # tied with class 2, which comes first: not correct
    kwargs = _class_weight(CASES[case], c, device, dtype)
    stats = fused_ce.softmax_cross_entropy(
        logits, target, reduction="none", return_stats=True, backend=backend, **kwargs
    )
    _check_stats(stats, logits.double(), target, CASES[case], 1, dtype)
    assert stats.argmax[0, 1] == 2 and not stats.correct[0, 1]
    # The first five fields are what they were: positional unpacking still works.
    loss, lse, z_loss, entropy, accuracy, *_ = stats
    assert torch.equal(loss, stats.loss) and torch.equal(accuracy, stats.accuracy)


def test_stats_per_token_probability_targets(backend_device):
    backend, device = backend_device
    logits = randn((5, 9), 3, device)
    target = torch.softmax(randn((5, 9), 4, device, scale=3.0), 1)
    stats = fused_ce.softmax_cross_entropy(logits, target, return_stats=True, backend=backend)
    # The class compared is the target's argmax; no token is ignored.
    _check_stats(stats, logits.double(), target.argmax(1), {}, 1, torch.float32)


def test_stats_per_token_linear_head_probability_targets(backend_device):
    backend, device = backend_device
    x = randn((7, 8), 63, device, torch.float64)
    head = randn((13, 8), 64, device, torch.float64)
    target = torch.softmax(randn((7, 13), 65, device, torch.float64, scale=3.0), 1)
    stats = fused_ce.linear_cross_entropy(
        x, head, target, return_stats=True, chunk_size=3, backend=backend
    )
    _check_stats(stats, x @ head.T, target.argmax(1), {}, -1, torch.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_stats_per_token_linear_head(backend_device, case):
    """fp64 operands: the chunked GEMMs then agree with the full product to fp64 rounding, so
    the fields compare tightly with the oracle and argmax exactly."""
    backend, device = backend_device
    dtype = torch.float64
    x = randn((2, 5, 8), 6, device, dtype)
    head = randn((13, 8), 7, device, dtype)
    bias = randn((13,), 8, device, dtype)
    target = torch.randint(0, 13, (2, 5), generator=generator(9)).to(device)
    target[1, 3] = -100
    kwargs = _class_weight(CASES[case], 13, device, dtype)
    paths = ["chunked", "fused"] if backend == "triton" else ["chunked"]
    for path in paths:
        stats = fused_ce.linear_cross_entropy(
            x,
            head,
            target,
            linear_bias=bias,
            reduction="none",
            return_stats=True,
            chunk_size=3,
            path=path,
            backend=backend,
            **kwargs,
        )
        _check_stats(stats, F.linear(x, head, bias), target, CASES[case], -1, dtype)


def _log_probs_oracle(x, head, bias, tokens, scale=1.0):
    logits = F.linear(x.double(), head.double(), bias.double() if bias is not None else None)
    logp = torch.log_softmax(logits * scale, -1)
    valid = tokens != -100
    picked = logp.gather(-1, torch.where(valid, tokens, 0)[..., None])[..., 0]
    return torch.where(valid, picked, 0.0)


def test_linear_log_probs_values_and_gradients(backend_device):
    backend, device = backend_device
    x = randn((3, 4, 8), 10, device, torch.float64).requires_grad_()
    head = randn((17, 8), 11, device, torch.float64).requires_grad_()
    bias = randn((17,), 12, device, torch.float64).requires_grad_()
    tokens = torch.randint(0, 17, (3, 4), generator=generator(13)).to(device)
    tokens[2, 1] = -100
    upstream = randn((3, 4), 14, device, torch.float64)
    logp = fused_ce.linear_log_probs(
        x, head, tokens, linear_bias=bias, logit_scale=0.5, chunk_size=5, backend=backend
    )
    assert logp.shape == (3, 4) and logp.dtype == torch.float64
    (logp * upstream).sum().backward()
    ours = [t.grad.clone() for t in (x, head, bias)]
    for t in (x, head, bias):
        t.grad = None
    ref = _log_probs_oracle(x, head, bias, tokens, 0.5)
    (ref * upstream).sum().backward()
    rtol, atol = TIGHT[torch.float64]
    torch.testing.assert_close(logp.detach(), ref.detach(), rtol=rtol, atol=atol)
    for got, t in zip(ours, (x, head, bias), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=rtol, atol=atol)
    assert torch.all(ours[0][2, 1] == 0)  # an ignored token sends nothing


def test_linear_log_probs_low_precision_in_fp32(backend_device):
    """A bf16 head gives fp32 log-probabilities, within twice torch's own bf16 error."""
    backend, device = backend_device
    x = randn((6, 16), 15, device, torch.bfloat16)
    head = randn((33, 16), 16, device, torch.bfloat16)
    tokens = torch.randint(0, 33, (6,), generator=generator(17)).to(device)
    logp = fused_ce.linear_log_probs(x, head, tokens, backend=backend)
    assert logp.dtype == torch.float32
    oracle = _log_probs_oracle(x, head, None, tokens)
    torch_bf16 = torch.log_softmax(x @ head.T, -1).gather(-1, tokens[:, None])[:, 0]
    ours_error = (logp.double() - oracle).abs().max().item()
    torch_error = (torch_bf16.double() - oracle).abs().max().item()
    assert ours_error <= 2 * torch_error + 1e-6


def test_linear_log_probs_bad_tokens():
    x, head = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match="tokens"):
        fused_ce.linear_log_probs(x, head, torch.zeros(3))
    # Checked as linear_cross_entropy's target, without a host sync.
    with pytest.raises(RuntimeError, match="out of bounds"):
        fused_ce.linear_log_probs(x, head, torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("k", [0, 1, 4, 13])
def test_linear_top_k_matches_torch_topk(k):
    x = randn((2, 7, 8), 20, "cpu", torch.float64)
    head = randn((13, 8), 21, "cpu", torch.float64)
    bias = randn((13,), 22, "cpu", torch.float64)
    top = fused_ce.linear_top_k(x, head, k, linear_bias=bias, chunk_size=3)
    ref = torch.topk(F.linear(x, head, bias), k)
    assert top.values.shape == top.indices.shape == (2, 7, k)
    torch.testing.assert_close(top.values, ref.values, rtol=1e-12, atol=1e-12)
    assert torch.equal(top.indices, ref.indices)


def test_linear_top_k_ties_as_torch():
    """Integer-valued operands make exact logits; duplicated head rows make exact ties, which
    must come out in torch.topk's order."""
    x = torch.randint(-3, 4, (9, 6), generator=generator(23)).float()
    head = torch.randint(-2, 3, (10, 6), generator=generator(24)).float()
    head[7] = head[1]
    head[4] = head[1]
    for k in (3, 10):
        top = fused_ce.linear_top_k(x, head, k, chunk_size=4)
        ref = torch.topk(x @ head.T, k)
        assert torch.equal(top.values, ref.values) and torch.equal(top.indices, ref.indices)


def test_linear_top_k_bad_k():
    x, head = torch.randn(3, 4), torch.randn(5, 4)
    for k in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="k:"):
            fused_ce.linear_top_k(x, head, k)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_scorers_and_stats_memory(backend):
    """At one linear head's memory: the peak of each (forward + backward where there is one)
    is within 1.25 x that of linear_cross_entropy's own ('none', the same chunked path) and
    below 0.75 x the N x V fp32 logits (131 MB here) that the plain way holds."""
    n, d, v = 1024, 32, 32000
    x = randn((n, d), 40, "cpu").requires_grad_()
    head = randn((v, d), 41, "cpu", scale=0.2).requires_grad_()
    tokens = torch.randint(0, v, (n,), generator=generator(42))
    weight = torch.rand(v, generator=generator(43)) + 0.5
    logits_bytes = n * v * 4

    def head_alone():
        loss = fused_ce.linear_cross_entropy(x, head, tokens, reduction="none", backend=backend)
        loss.sum().backward()

    def log_probs():
        fused_ce.linear_log_probs(x, head, tokens, backend=backend).sum().backward()

    def stats():
        out = fused_ce.linear_cross_entropy(
            x, head, tokens, weight=weight, return_stats=True, backend=backend
        )
        out.loss.backward()

    def top_k():
        fused_ce.linear_top_k(x, head, 5)

    plain = peak_bytes(lambda: torch.log_softmax(x @ head.T, -1).sum().backward())
    assert plain >= logits_bytes  # the measurement sees the logits
    one_head = peak_bytes(head_alone)
    for step in (log_probs, stats, top_k):
        peak = peak_bytes(step)
        assert peak <= 1.25 * one_head and peak < 0.75 * logits_bytes, (step.__name__, peak)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stats_per_token_low_precision(backend_device, dtype):
    """Half-precision logits: the per-token fields (computed in fp32) within twice the error of
    torch's own same-dtype log_softmax, and argmax exactly torch's on the same logits."""
    backend, device = backend_device
    logits = randn((6, 29), 60, device, dtype, scale=4.0)
    target = torch.randint(0, 29, (6,), generator=generator(61)).to(device)
    target[3] = -100
    stats = fused_ce.softmax_cross_entropy(
        logits,
        target,
        weight=torch.rand(29, generator=generator(62)).to(device, dtype) + 0.5,
        return_stats=True,
        backend=backend,
    )
    valid = target != -100
    index = torch.where(valid, target, 0)[:, None]
    oracle = torch.where(valid, torch.log_softmax(logits.double(), 1).gather(1, index)[:, 0], 0.0)
    same_dtype = torch.log_softmax(logits, 1).gather(1, index)[:, 0].double()
    torch_error = (torch.where(valid, same_dtype, 0.0) - oracle).abs().max().item()
    ours_error = (stats.target_log_prob.double() - oracle).abs().max().item()
    assert ours_error <= 2 * torch_error + torch.finfo(dtype).eps * oracle.abs().max().item()
    assert torch.equal(stats.argmax, logits.argmax(1))
    assert torch.equal(stats.correct, (logits.argmax(1) == target) & valid)
