"""Options beyond torch (issue 6): logit scale, soft-capping, z-loss, per-token statistics,
in-place backward; torch.compile, determinism and CUDA-graph capture.

Every option is held against its float64 PyTorch formula (``ce_reference``), alone and combined
with class weights, ignore_index, label smoothing, every reduction and per-token upstream
gradients, on each (backend, device) pair. Shapes are tiny: the Triton kernels run through the
interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import REDUCTIONS, check, evaluate, generator, positive, randn, upstream_for
from conftest import CUDA, backend_cases
from test_cross_entropy import make_target, use_small_tiles

import fused_ce
from fused_ce.ops import cross_entropy as ce_ops

OPTIONS = {
    "scale": dict(logit_scale=0.6),
    "negative-scale": dict(logit_scale=-1.3),
    "softcap": dict(softcap=2.5),
    "z_loss": dict(z_loss=0.1),
    "all": dict(logit_scale=1.7, softcap=3.0, z_loss=0.05),
}
ALL = OPTIONS["all"]


def final_logits(x, logit_scale=1.0, softcap=None):
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def ce_reference(
    input,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    *,
    logit_scale=1.0,
    softcap=None,
    z_loss=0.0,
):
    """The options by their definition: scale, cap, torch's cross-entropy, plus
    ``z_loss * lse^2`` over non-ignored rows reduced with the cross-entropy's divisor."""
    z = final_logits(input, logit_scale, softcap)
    ce = F.cross_entropy(
        z,
        target,
        weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if not z_loss:
        return ce
    lse = torch.logsumexp(z, 0 if z.dim() == 1 else 1)
    if target.is_floating_point():
        valid = torch.ones_like(lse, dtype=torch.bool)
        divisor = lse.numel()
    else:
        valid = target != ignore_index
        w = weight[torch.where(valid, target, 0)] if weight is not None else torch.ones_like(lse)
        divisor = (w * valid).sum()
    term = torch.where(valid, z_loss * lse.square(), 0.0)
    if reduction == "none":
        return ce + term
    return ce + (term.sum() if reduction == "sum" else term.sum() / divisor)


def check_options(backend_device, logits, target, **kwargs):
    backend, _ = backend_device
    wrt = (0, 1) if target.is_floating_point() else (0,)
    return check(
        fused_ce.softmax_cross_entropy, ce_reference, (logits, target), kwargs, wrt, backend
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_alone(backend_device, option, kind, reduction):
    _, device = backend_device
    logits = randn((6, 7), 0, device, scale=3.0)
    target = make_target(logits.shape, kind, device, ignore_index=-100 if kind == "index" else None)
    check_options(backend_device, logits, target, reduction=reduction, **OPTIONS[option])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(6, 7), (3, 5, 2, 3)], ids=["NC", "NCHW"])
def test_options_combined(backend_device, shape, kind, reduction):
    """Every option with class weights, ignore_index, smoothing, each reduction and a random
    per-token upstream gradient (for 'none')."""
    _, device = backend_device
    logits = randn(shape, 1, device, scale=3.0)
    target = make_target(shape, kind, device, ignore_index=-100 if kind == "index" else None)
    weight = positive((shape[1],), 5, device)
    check_options(
        backend_device,
        logits,
        target,
        weight=weight,
        reduction=reduction,
        label_smoothing=0.2,
        **ALL,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_options_other_dtypes(backend_device, dtype):
    """fp16/bf16 within twice torch's own same-dtype error; fp64 tight (the scale and the cap
    reach the kernels as two fp32 halves, so fp64 keeps their precision)."""
    _, device = backend_device
    logits = randn((6, 7), 3, device, dtype, scale=3.0)
    target = make_target(logits.shape, "index", device, ignore_index=-100)
    options = dict(logit_scale=0.1 + 2.0**-30, softcap=3.0 + 2.0**-40, z_loss=0.05)
    check_options(backend_device, logits, target, reduction="none", label_smoothing=0.1, **options)


def test_options_small_tiles(backend_device, monkeypatch):
    """Several class blocks and row programs (chunks for the torch path): the online max,
    entropy and argmax rebase across blocks."""
    backend, device = backend_device
    use_small_tiles(backend, monkeypatch)
    logits = randn((7, 11), 2, device, scale=3.0)
    logits[0, 9] = 20.0  # the row max in the last class block
    target = make_target(logits.shape, "index", device, ignore_index=-100)
    check_options(backend_device, logits, target, reduction="none", label_smoothing=0.1, **ALL)


# --- statistics -------------------------------------------------------------------------------


def stats_reference(x, target, ignore_index, *, logit_scale=1.0, softcap=None, z_loss=0.0):
    """Per-token lse and entropy, the z term per token, and accuracy, in float64; the
    argmax from the logits rounded as ours are (exact ties stay ties)."""
    z = final_logits(x.double(), logit_scale, softcap)
    lse = torch.logsumexp(z, 1)
    logp = torch.log_softmax(z, 1)
    entropy = -(logp.exp() * logp).sum(1)
    predicted = final_logits(x, logit_scale, softcap).argmax(1)
    if target.is_floating_point():
        valid = torch.ones_like(lse, dtype=torch.bool)
        classes = target.argmax(1)
    else:
        valid = target != ignore_index
        classes = target
    accuracy = ((predicted == classes) & valid).sum().double() / valid.sum()
    return lse, entropy, torch.where(valid, z_loss * lse.square(), 0.0), valid, accuracy


@pytest.mark.parametrize("small_tiles", [False, True], ids=["tiles", "small-tiles"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_stats(backend_device, kind, small_tiles, monkeypatch):
    backend, device = backend_device
    if small_tiles:
        use_small_tiles(backend, monkeypatch)
    # Multiples of 1/2: exact ties of the max (first index wins, as torch.argmax) across blocks.
    x = (torch.randint(-8, 8, (7, 11), generator=generator(3)) / 2.0).to(device)
    x[0, 2] = x[0, 9] = 6.0
    x[1, 5] = x[1, 6] = 6.0
    target = make_target(x.shape, kind, device, ignore_index=-100 if kind == "index" else None)
    # A right answer at the first tie, a wrong one at the second.
    if kind == "index":
        target[0], target[1] = 2, 6
    else:
        target[0] = torch.softmax(x[0] * 2.0, 0)  # its argmax is the first tie too
        target[1] = F.one_hot(torch.tensor(6), 11).to(device)
    kwargs = dict(label_smoothing=0.1, backend=backend, **ALL)
    leaf = x.clone().requires_grad_()
    stats = fused_ce.softmax_cross_entropy(
        leaf, target, reduction="none", return_stats=True, **kwargs
    )
    assert isinstance(stats, fused_ce.CrossEntropyStats)
    plain = fused_ce.softmax_cross_entropy(x, target, reduction="none", **kwargs)
    assert torch.equal(stats.loss.detach(), plain)
    lse, entropy, z_term, valid, accuracy = stats_reference(x, target, -100, **ALL)
    torch.testing.assert_close(stats.lse.double(), lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.entropy.double(), entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.z_loss.double(), z_term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.accuracy.double(), accuracy, rtol=1e-7, atol=0)
    assert stats.accuracy.dim() == 0 and 0 < float(stats.accuracy) < 1
    assert not stats.entropy.requires_grad and not stats.accuracy.requires_grad
    # lse is differentiable: its gradient is the softmax through the scale and the cap.
    upstream = upstream_for(stats.lse, 4)
    (grad,) = torch.autograd.grad(stats.lse, leaf, upstream.to(stats.lse.dtype))
    ref_leaf = x.double().requires_grad_()
    ref_lse = torch.logsumexp(final_logits(ref_leaf, ALL["logit_scale"], ALL["softcap"]), 1)
    (ref_grad,) = torch.autograd.grad(ref_lse, ref_leaf, upstream)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    # Reduced: z_loss and loss reduced alike ('mean' divides by the non-ignored count here).
    mean = fused_ce.softmax_cross_entropy(x, target, return_stats=True, **kwargs)
    divisor = valid.sum()
    torch.testing.assert_close(mean.z_loss.double(), z_term.sum() / divisor, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.loss, plain.sum() / divisor, rtol=1e-6, atol=0)


def test_stats_all_ignored_accuracy_is_nan(backend_device):
    backend, device = backend_device
    target = torch.full((3,), -100, device=device)
    stats = fused_ce.softmax_cross_entropy(
        randn((3, 4), 0, device), target, return_stats=True, backend=backend
    )
    assert stats.accuracy.isnan() and stats.loss.isnan()
    assert torch.isfinite(stats.lse).all() and torch.isfinite(stats.entropy).all()


def test_module_options(backend_device):
    backend, device = backend_device
    logits = randn((6, 7), 0, device, scale=3.0)
    target = make_target(logits.shape, "index", device, ignore_index=-100)
    module = fused_ce.nn.CrossEntropyLoss(label_smoothing=0.1, backend=backend, **ALL)
    expected = fused_ce.softmax_cross_entropy(
        logits, target, label_smoothing=0.1, backend=backend, **ALL
    )
    assert torch.equal(module(logits, target), expected)
    stats = fused_ce.nn.CrossEntropyLoss(return_stats=True, backend=backend)(logits, target)
    assert isinstance(stats, fused_ce.CrossEntropyStats)


# --- linear heads -----------------------------------------------------------------------------


def linear_reference(input, linear_weight, target, path=None, **kwargs):
    return ce_reference(F.linear(input, linear_weight), target, **kwargs)


def linear_ours(input, linear_weight, target, **kwargs):
    return fused_ce.linear_cross_entropy(input, linear_weight, target, chunk_size=4, **kwargs)


PATH_CASES = [(b, d, "chunked") for b, d in backend_cases()] + [
    (b, d, "fused") for b, d in backend_cases() if b == "triton"
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["scale", "softcap", "all"])
@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: "-".join(c))
def test_linear_options(case, option, reduction):
    """Both paths; on the chunked one (chunks of 4 rows) 'mean'/'sum' without z-loss take the
    one-sweep scalar op, the others the saved-statistics backward."""
    backend, device, path = case
    x = randn((10, 16), 11, device)
    w = randn((37, 16), 12, device, scale=0.7)
    target = make_target((10, 37), "index", device, ignore_index=-100)
    kwargs = dict(weight=positive((37,), 5, device), reduction=reduction, label_smoothing=0.1)
    kwargs = {**kwargs, **OPTIONS[option], "path": path}
    check(linear_ours, linear_reference, (x, w, target), kwargs, (0, 1), backend)


@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: "-".join(c))
def test_linear_prob_target_options(case):
    """Probability targets receive their gradient through the options too."""
    backend, device, path = case
    x = randn((10, 16), 11, device)
    w = randn((37, 16), 12, device, scale=0.7)
    target = make_target((10, 37), "prob", device)
    kwargs = dict(reduction="none", label_smoothing=0.1, path=path, **ALL)
    check(linear_ours, linear_reference, (x, w, target), kwargs, (0, 1, 2), backend)


@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: "-".join(c))
def test_linear_stats_match_softmax_stats(case):
    backend, device, path = case
    x = randn((10, 16), 11, device)
    w = randn((37, 16), 12, device, scale=0.7)
    target = make_target((10, 37), "index", device, ignore_index=-100)
    kwargs = dict(return_stats=True, backend=backend, **ALL)
    ours = linear_ours(x, w, target, path=path, **kwargs)
    theirs = fused_ce.softmax_cross_entropy(F.linear(x, w), target, **kwargs)
    for name, a, b in zip(ours._fields, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    module = fused_ce.nn.LinearCrossEntropyLoss(
        16, 37, bias=False, chunk_size=4, path=path, **kwargs
    )
    module.linear_weight.data.copy_(w)
    torch.testing.assert_close(module.to(device)(x, target).loss, ours.loss, rtol=0, atol=0)


# --- bad values -------------------------------------------------------------------------------

BAD = [
    ("softcap", 0.0),
    ("softcap", -1.0),
    ("softcap", float("inf")),
    ("softcap", float("nan")),
    ("z_loss", -0.1),
    ("z_loss", float("nan")),
    ("z_loss", float("inf")),
    ("logit_scale", float("nan")),
    ("logit_scale", float("inf")),
    ("logit_scale", float("-inf")),
]


@pytest.mark.parametrize("entry", ["softmax", "linear", "module", "linear-module"])
@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_values_raise(entry, name, value):
    x, w, target = randn((4, 5), 0, "cpu"), randn((3, 5), 1, "cpu"), torch.zeros(4).long()
    calls = {
        "softmax": lambda: fused_ce.softmax_cross_entropy(x, target, **{name: value}),
        "linear": lambda: fused_ce.linear_cross_entropy(x, w, target, **{name: value}),
        "module": lambda: fused_ce.nn.CrossEntropyLoss(**{name: value}),
        "linear-module": lambda: fused_ce.nn.LinearCrossEntropyLoss(5, 3, **{name: value}),
    }
    with pytest.raises(ValueError, match=rf"^{name}: "):
        calls[entry]()


# --- in-place backward ------------------------------------------------------------------------


def _head(device):
    hidden = randn((6, 5), 0, device)
    head = randn((7, 5), 1, device).requires_grad_()
    target = make_target((6, 7), "index", device, ignore_index=-100)
    return hidden, head, target


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_inplace_backward_gradient(backend_device, reduction):
    """The gradient is the out-of-place one, bit for bit, and it now lives in the logits."""
    backend, device = backend_device
    hidden, head, target = _head(device)
    kwargs = dict(reduction=reduction, label_smoothing=0.1, backend=backend, **ALL)
    logits = hidden @ head.t()
    loss = fused_ce.softmax_cross_entropy(logits, target, inplace_backward=True, **kwargs)
    upstream = upstream_for(loss, 5).to(loss.dtype)
    version = logits._version
    (grad_head,) = torch.autograd.grad(loss, head, upstream)
    assert logits._version > version  # declared to torch as a mutation

    leaf = (hidden @ head.t()).detach().requires_grad_()
    expected_loss = fused_ce.softmax_cross_entropy(leaf, target, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected_loss, leaf, upstream)
    assert torch.equal(loss.detach(), expected_loss.detach())
    assert torch.equal(logits.detach(), expected_grad)
    torch.testing.assert_close(grad_head, expected_grad.t() @ hidden, rtol=1e-6, atol=1e-6)


def test_inplace_backward_refuses_a_saved_use(backend_device):
    """logits.pow(2) saved the logits for its own backward: the overwrite makes that backward
    fail with torch's version-counter error instead of reading gradients as logits."""
    backend, device = backend_device
    hidden, head, target = _head(device)
    logits = hidden @ head.t()
    other = logits.pow(2).sum()
    loss = fused_ce.softmax_cross_entropy(logits, target, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_backward_refuses_logits_changed_before_backward(backend_device):
    backend, device = backend_device
    hidden, head, target = _head(device)
    logits = hidden @ head.t()
    loss = fused_ce.softmax_cross_entropy(logits, target, inplace_backward=True, backend=backend)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_refuses_leaves_and_double_backward(backend_device):
    backend, device = backend_device
    hidden, head, target = _head(device)
    leaf = randn((6, 7), 0, device).requires_grad_()
    with pytest.raises(RuntimeError, match="inplace_backward: input is a leaf"):
        fused_ce.softmax_cross_entropy(leaf, target, inplace_backward=True, backend=backend)
    expanded = (hidden[:1] @ head.t()).expand(6, 7)
    with pytest.raises(RuntimeError, match="inplace_backward: input has overlapping memory"):
        fused_ce.softmax_cross_entropy(expanded, target, inplace_backward=True, backend=backend)
    logits = hidden @ head.t()
    loss = fused_ce.softmax_cross_entropy(logits, target, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, head, create_graph=True)


def test_opcheck_inplace_backward_op(backend_device):
    """The mutating backward op is declared as such (opcheck's schema and fake-tensor tests)."""
    backend, device = backend_device
    logits = randn((4, 5), 0, device).unsqueeze(-1)
    target = make_target((4, 5), "index", device, ignore_index=-100).view(4, 1)
    options = (-100, 0.1, 0.7, 3.0)  # ignore_index, label_smoothing, logit_scale, softcap
    saved = ce_ops.ce_forward(logits, target, None, *options, False, True, backend)[2]
    grads = (randn((4,), 1, device), randn((4,), 2, device))
    args = (*grads, logits, target, None, saved, *options, backend, False)
    torch.library.opcheck(ce_ops.ce_backward_inplace, args)


# --- torch.compile and determinism --------------------------------------------------------------


def _public_cases(device, backend):
    """(fn, args, wrt) running every public CE entry point with every option."""
    x = randn((6, 7), 0, device, scale=3.0)
    target = make_target(x.shape, "index", device, ignore_index=-100)
    hidden, head = randn((10, 16), 11, device), randn((37, 16), 12, device, scale=0.7)
    head_target = make_target((10, 37), "index", device, ignore_index=-100)
    options = dict(label_smoothing=0.1, backend=backend, **ALL)

    def softmax(x, target):
        stats = fused_ce.softmax_cross_entropy(x, target, return_stats=True, **options)
        return stats.loss + stats.lse.sum() + stats.entropy.sum() + stats.accuracy

    def softmax_inplace(x, target):
        logits = x * 1.0  # a non-leaf buffer the backward may overwrite
        return fused_ce.softmax_cross_entropy(
            logits, target, reduction="none", inplace_backward=True, **options
        )

    # The Triton backend takes the fused path here; the chunked one is linear-scalar's.
    path = "fused" if backend == "triton" else "chunked"

    def linear(hidden, head, target):
        stats = linear_ours(hidden, head, target, return_stats=True, path=path, **options)
        return stats.loss + stats.lse.sum() + stats.entropy.sum() + stats.accuracy

    def linear_scalar(hidden, head, target):
        return linear_ours(hidden, head, target, logit_scale=0.5, softcap=2.0, backend=backend)

    return {
        "softmax": (softmax, (x, target), (0,)),
        "softmax-inplace": (softmax_inplace, (x, target), (0,)),
        "linear": (linear, (hidden, head, head_target), (0, 1)),
        "linear-scalar": (linear_scalar, (hidden, head, head_target), (0, 1)),
    }


CASES = ["softmax", "softmax-inplace", "linear", "linear-scalar"]


@pytest.mark.parametrize("case", CASES)
def test_compile_fullgraph_matches_eager(backend_device, case):
    """One graph, no breaks (fullgraph=True), and exactly the eager loss and gradients."""
    backend, device = backend_device
    fn, args, wrt = _public_cases(device, backend)[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    upstream = upstream_for(fn(*args), 6)
    eager = evaluate(fn, args, {}, wrt, upstream)
    ours = evaluate(compiled, args, {}, wrt, upstream)
    for (name, a), (_, b) in zip(ours.outputs(), eager.outputs(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", CASES)
def test_deterministic(backend_device, case):
    """Two runs give bitwise-equal losses and gradients."""
    backend, device = backend_device
    fn, args, wrt = _public_cases(device, backend)[case]
    upstream = upstream_for(fn(*args), 7)
    first = evaluate(fn, args, {}, wrt, upstream)
    second = evaluate(fn, args, {}, wrt, upstream)
    for (name, a), (_, b) in zip(first.outputs(), second.outputs(), strict=True):
        assert torch.equal(a, b), name


# --- CUDA graphs (only where CUDA exists: no test id otherwise) ---------------------------------

CUDA_CASES = [case for case in backend_cases() if case[1] == "cuda"] if CUDA else []

if CUDA_CASES:

    def _bce_cases(device, backend):
        x = randn((6, 7), 0, device)
        bits = torch.rand((6, 7), generator=generator(1)).to(device)
        hidden, head = randn((10, 16), 11, device), randn((7, 16), 12, device)
        head_bits = torch.rand((10, 7), generator=generator(2)).to(device)
        return {
            "bce": (
                lambda x, t: fused_ce.sigmoid_binary_cross_entropy(x, t, backend=backend),
                (x, bits),
                (0,),
            ),
            "linear-bce": (
                lambda h, w, t: fused_ce.linear_binary_cross_entropy_with_logits(
                    h, w, t, chunk_size=4, backend=backend
                ),
                (hidden, head, head_bits),
                (0, 1),
            ),
        }

    @pytest.mark.parametrize("op", [*CASES, "bce", "linear-bce"])
    @pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
    def test_cuda_graph_capture(case, op):
        """Forward + backward of every public op captured in one CUDA graph (any host sync
        would fail the capture), replayed on new inputs, equals eager on those inputs."""
        backend, device = case
        cases = {**_public_cases(device, backend), **_bce_cases(device, backend)}
        fn, args, wrt = cases[op]
        static = [a.clone() for a in args]
        leaves = [a.requires_grad_() if i in wrt else a for i, a in enumerate(static)]

        def step():
            loss = fn(*leaves)
            return loss, torch.autograd.grad(loss.sum(), [leaves[i] for i in wrt])

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile kernels, fill caches, outside the capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, grads = step()
        for a in static:
            if a.is_floating_point():
                with torch.no_grad():
                    a.mul_(0.5).add_(0.25)
        graph.replay()
        torch.cuda.synchronize()
        fresh = [a.detach().clone().requires_grad_(i in wrt) for i, a in enumerate(static)]
        expected_loss = fn(*fresh)
        expected = torch.autograd.grad(expected_loss.sum(), [fresh[i] for i in wrt])
        # Close, not bitwise: cuBLAS may pick other GEMM kernels under capture.
        torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
