"""Fused linear + loss heads against ``F.linear`` followed by torch's loss, in float64.

Every numerical test runs on each (backend, device) pair of the ``backend_device`` fixture; the
chunked path on both, the fully fused Triton path (CE) where Triton runs (the interpreter on
CPU, with tiny D and V). Shapes are small and chunks smaller still, so every case crosses
several chunk boundaries.
"""

from __future__ import annotations

import ctypes
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from _reference import (
    REDUCTIONS,
    Result,
    assert_within_torch_error,
    check,
    evaluate,
    generator,
    oracle,
    positive,
    randn,
    upstream_for,
)
from conftest import CUDA, backend_cases

import fused_ce
from fused_ce.ops import linear as ops

N_FEATURES = 16
N_CLASSES = 37
LEAD = (2, 5)  # leading dims of the input: 10 rows
CHUNK = 4  # rows per chunk: chunks of 4, 4, 2

TRITON_CASES = [case for case in backend_cases() if case[0] == "triton"]
# (backend, device, path): the chunked path on every backend, the fused one where Triton runs.
PATH_CASES = [(b, d, "chunked") for b, d in backend_cases()] + [
    (b, d, "fused") for b, d in TRITON_CASES
]


@pytest.fixture(params=PATH_CASES, ids=lambda c: "-".join(c))
def backend_path(request):
    return request.param


def linear_ce_reference(input, linear_weight, target, linear_bias=None, **kwargs):
    """torch: the logits, then cross_entropy with the class dim where it expects it (1)."""
    logits = F.linear(input, linear_weight, linear_bias)
    if not target.is_floating_point():
        target = target.long()  # torch's CPU kernel takes uint8 targets for 2-D logits only
    if logits.dim() > 2:
        logits = logits.movedim(-1, 1)
        if target.is_floating_point():
            target = target.movedim(-1, 1)
    return F.cross_entropy(logits, target, **kwargs)


def linear_bce_reference(input, linear_weight, target, linear_bias=None, **kwargs):
    return F.binary_cross_entropy_with_logits(
        F.linear(input, linear_weight, linear_bias), target, **kwargs
    )


def ours_ce(input, linear_weight, target, linear_bias=None, **kwargs):
    return fused_ce.linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, **kwargs
    )


def ours_bce(input, linear_weight, target, linear_bias=None, **kwargs):
    return fused_ce.linear_binary_cross_entropy_with_logits(
        input, linear_weight, target, linear_bias=linear_bias, **kwargs
    )


def make_head(
    device, dtype=torch.float32, lead=LEAD, n_features=N_FEATURES, n_classes=N_CLASSES, bias=True
):
    """(input, linear_weight, linear_bias) with logits of a few units (softmax far from flat)."""
    x = randn((*lead, n_features), 11, device, dtype)
    w = randn((n_classes, n_features), 12, device, dtype, scale=0.7)
    b = randn((n_classes,), 13, device, dtype) if bias else None
    return x, w, b


def class_target(lead, device, n_classes=N_CLASSES, ignore_index=None, seed=14):
    target = torch.randint(0, n_classes, lead, generator=generator(seed))
    if ignore_index is not None:
        target.view(-1)[::3] = ignore_index
    return target.to(device)


def prob_target(lead, device, dtype=torch.float32, n_classes=N_CLASSES, seed=15):
    logits = torch.randn((*lead, n_classes), generator=generator(seed), dtype=torch.float64) * 2
    return torch.softmax(logits, -1).to(device=device, dtype=dtype)


def check_half_precision(ours_fn, torch_fn, args, kwargs, wrt, seed=0):
    """fp16/bf16, by the accuracy rule of tests/_reference.py: the loss element by element, and
    each gradient in max norm, within twice torch's own same-dtype error plus one rounding. The
    gradients are GEMM outputs (sums over classes or rows) whose rounding errors, ours and
    torch's, are independent at each element: elementwise, torch's error cancels to nothing
    somewhere by chance."""
    same_dtype = evaluate(torch_fn, args, kwargs, (), None)
    upstream = upstream_for(same_dtype.loss, seed)
    reference = oracle(torch_fn, args, kwargs, wrt, upstream)
    theirs = evaluate(torch_fn, args, kwargs, wrt, upstream)
    ours = evaluate(ours_fn, args, kwargs, wrt, upstream)
    eps = torch.finfo(args[0].dtype).eps
    assert_within_torch_error(
        Result(ours.loss, []), Result(theirs.loss, []), Result(reference.loss, []), args[0].dtype
    )
    for (name, value), (_, torch_value), (_, ref) in zip(
        ours.grads_named(), theirs.grads_named(), reference.grads_named(), strict=True
    ):
        assert value.dtype == args[0].dtype and value.shape == ref.shape, name
        error = float((value.double() - ref).abs().max())
        torch_error = float((torch_value.double() - ref).abs().max())
        bound = 2 * torch_error + eps * float(ref.abs().max())
        assert error <= bound, f"{name}: our error {error:.3g} > 2 * torch's {torch_error:.3g}"


def check_ce(backend, path, x, w, b, target, *, chunk_size=CHUNK, seed=0, **kwargs):
    """Our loss and the gradients of input, linear_weight, linear_bias (and a probability
    target) against the fp64 oracle; returns our result."""
    wrt = [0, 1] + ([3] if b is not None else []) + ([2] if target.is_floating_point() else [])
    ours = functools.partial(ours_ce, chunk_size=chunk_size, path=path)
    return check(ours, linear_ce_reference, (x, w, target, b), kwargs, sorted(wrt), backend, seed)


def check_bce(backend, x, w, b, target, *, chunk_size=CHUNK, seed=0, **kwargs):
    wrt = [0, 1, 2] + ([3] if b is not None else [])
    ours = functools.partial(ours_bce, chunk_size=chunk_size)
    return check(ours, linear_bce_reference, (x, w, target, b), kwargs, wrt, backend, seed)


# --- softmax cross-entropy -----------------------------------------------------------------------

CE_OPTIONS = {
    "plain": {},
    "weighted-smoothed": {"weight": True, "label_smoothing": 0.3},
    "smoothed-nobias": {"label_smoothing": 0.1, "bias": False},
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", list(CE_OPTIONS), ids=list(CE_OPTIONS))
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_ce_matches_oracle(backend_path, kind, options, reduction):
    backend, device, path = backend_path
    opts = dict(CE_OPTIONS[options])
    x, w, b = make_head(device, bias=opts.pop("bias", True))
    if opts.pop("weight", False):
        opts["weight"] = positive((N_CLASSES,), 5, device)
    if kind == "index":
        target = class_target(LEAD, device, ignore_index=-100)
    else:
        target = prob_target(LEAD, device)
    check_ce(backend, path, x, w, b, target, reduction=reduction, **opts)


@pytest.mark.parametrize("lead", [(), (7,), (2, 3, 2)], ids=["1d-input", "2d-input", "4d-input"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_ce_leading_dims(backend_path, lead, kind):
    backend, device, path = backend_path
    x, w, b = make_head(device, lead=lead)
    target = class_target(lead, device) if kind == "index" else prob_target(lead, device)
    ours = check_ce(backend, path, x, w, b, target, reduction="none")
    assert ours.loss.shape == lead


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_ce_float64(backend_path, kind):
    backend, device, path = backend_path
    x, w, b = make_head(device, torch.float64)
    if kind == "index":
        target = class_target(LEAD, device, ignore_index=3)
    else:
        target = prob_target(LEAD, device, torch.float64)
    weight = positive((N_CLASSES,), 5, device, torch.float64)
    for reduction in ("none", "mean"):
        check_ce(
            backend,
            path,
            x,
            w,
            b,
            target,
            reduction=reduction,
            weight=weight,
            label_smoothing=0.2,
            ignore_index=3 if kind == "index" else -100,
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ce_half_precision_within_torch_error(backend_path, dtype, reduction):
    """bf16/fp16 loss and every gradient: error at most twice torch's own (tests/_reference.py)."""
    backend, device, path = backend_path
    x, w, b = make_head(device, dtype, lead=(24,), n_features=32, n_classes=64)
    target = class_target((24,), device, n_classes=64, ignore_index=-100)
    ours = functools.partial(ours_ce, chunk_size=5, path=path, backend=backend)
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    check_half_precision(ours, linear_ce_reference, (x, w, target, b), kwargs, (0, 1, 3))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ce_chunk_size_does_not_change_results(backend_device, reduction):
    """One row per chunk, odd chunks, one chunk larger than the batch: the same loss and
    gradients (dW summed in another order: fp32 rounding only)."""
    backend, device = backend_device
    x, w, b = make_head(device)
    target = class_target(LEAD, device, ignore_index=-100)
    upstream = upstream_for(linear_ce_reference(x, w, target, b, reduction=reduction), 3)
    results = [
        evaluate(
            functools.partial(ours_ce, chunk_size=chunk, backend=backend, reduction=reduction),
            (x, w, target, b),
            {},
            (0, 1, 3),
            upstream,
        )
        for chunk in (1, 3, 7, 1000, None)
    ]
    for other in results[1:]:
        for (name, a), (_, r) in zip(other.outputs(), results[0].outputs(), strict=True):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ce_all_rows_ignored(backend_path, reduction):
    """'mean' of nothing: NaN loss (0/0), like torch; gradients exactly zero."""
    backend, device, path = backend_path
    x, w, b = make_head(device)
    target = torch.full(LEAD, -100, device=device)
    check_ce(backend, path, x, w, b, target, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ce_empty_batch(backend_path, reduction):
    backend, device, path = backend_path
    x, w, b = make_head(device, lead=(0,))
    check_ce(backend, path, x, w, b, class_target((0,), device), reduction=reduction)


def test_ce_ignore_index_may_be_a_valid_class_and_uint8_targets(backend_path):
    backend, device, path = backend_path
    x, w, b = make_head(device)
    target = class_target(LEAD, device, ignore_index=5).to(torch.uint8)
    check_ce(backend, path, x, w, b, target, ignore_index=5)


def test_ce_confident_and_extreme_rows(backend_path):
    """Logits in the hundreds (p within 1e-30 of 1 on most rows): finite, exact gradients.
    In fp64, where the GEMM's rounding stays far below what the comparison resolves."""
    backend, device, path = backend_path
    x, w, b = make_head(device, torch.float64)
    target = torch.argmax(F.linear(x, w, b), -1)
    target.view(-1)[::4] = 0
    check_ce(backend, path, x * 40, w, b, target, reduction="none")


def test_ce_non_contiguous_operands(backend_path):
    """A transposed input and a transposed weight are read through their strides."""
    backend, device, path = backend_path
    x, w, b = make_head(device)
    x_t = x.reshape(-1, N_FEATURES).t().contiguous().t()  # column-major rows
    w_t = w.t().contiguous().t()
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    target = class_target((x_t.shape[0],), device, ignore_index=-100)
    check_ce(backend, path, x_t, w_t, b, target, label_smoothing=0.2)


@pytest.mark.parametrize("wanted", ["weight-only", "input-only", "none"])
def test_ce_partial_and_no_gradients(backend_path, wanted):
    """Frozen features, a frozen head, and inference (no_grad): results equal torch's."""
    backend, device, path = backend_path
    x, w, b = make_head(device)
    target = class_target(LEAD, device, ignore_index=-100)
    if wanted == "none":
        with torch.no_grad():
            ours = ours_ce(x, w, target, b, backend=backend, path=path, chunk_size=CHUNK)
        ref = linear_ce_reference(x.double(), w.double(), target, b.double())
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
        return
    x = x.requires_grad_(wanted == "input-only")
    w = w.requires_grad_(wanted == "weight-only")
    loss = ours_ce(x, w, target, b, backend=backend, path=path, chunk_size=CHUNK)
    (grad,) = torch.autograd.grad(loss, [x if wanted == "input-only" else w])
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref_loss = linear_ce_reference(xr, wr, target, b.double())
    (ref,) = torch.autograd.grad(ref_loss, [xr if wanted == "input-only" else wr])
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-6)


def test_ce_scalar_loss_backward_twice_and_scaled(backend_device):
    """The gradients made during the forward: retain_graph gives the same gradient twice, and a
    power-of-two upstream gradient (a loss scale) scales them exactly."""
    backend, device = backend_device
    x, w, b = make_head(device)
    target = class_target(LEAD, device, ignore_index=-100)
    w.requires_grad_()
    loss = ours_ce(x, w, target, b, backend=backend, chunk_size=CHUNK)
    (first,) = torch.autograd.grad(loss, [w], retain_graph=True)
    (second,) = torch.autograd.grad(loss, [w], torch.tensor(1024.0, device=device))
    torch.testing.assert_close(second, first * 1024, rtol=0, atol=0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", [case[0] for case in backend_cases() if case[1] == "cpu"])
def test_ce_host_checked_targets_give_the_device_checked_bits(
    backend, weighted, reduction, monkeypatch
):
    """On the CPU in eager mode the chunked scalar loss checks its class indices on the host
    (no valid mask, the row count on the host) when none is ignored: loss and gradients must
    be bit for bit those of the device-side check."""
    from fused_ce import _validation

    device = "cpu"

    x, w, b = make_head(device)
    target = class_target(LEAD, device)
    weight = positive((N_CLASSES,), 4, device) if weighted else None

    def run():
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        loss = ours_ce(
            *leaves[:2], target, leaves[2], weight=weight, reduction=reduction, backend=backend
        )
        loss.backward()
        return loss.detach(), *(leaf.grad for leaf in leaves)

    assert _validation.all_in_range_on_host(target, N_CLASSES, -100)
    host = run()
    monkeypatch.setattr(_validation, "all_in_range_on_host", lambda *args: False)
    device_checked = run()
    for ours, theirs in zip(host, device_checked, strict=True):
        assert torch.equal(ours, theirs)


def test_ce_double_backward_raises(backend_path):
    backend, device, path = backend_path
    x, w, b = make_head(device)
    target = class_target(LEAD, device)
    for reduction in ("mean", "none"):
        w = w.detach().requires_grad_()
        loss = ours_ce(x, w, target, b, backend=backend, path=path, reduction=reduction).sum()
        (grad,) = torch.autograd.grad(loss, [w], create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            grad.sum().backward()


def test_ce_inputs_not_modified_and_deterministic(backend_path):
    backend, device, path = backend_path
    x, w, b = make_head(device)
    target = class_target(LEAD, device, ignore_index=-100)
    runs = [
        evaluate(
            functools.partial(ours_ce, backend=backend, path=path, chunk_size=CHUNK),
            (x, w, target, b),
            {"reduction": "none"},
            (0, 1, 3),
            upstream_for(torch.empty(LEAD), 2).to(device),
        )
        for _ in range(2)
    ]
    for (name, a), (_, c) in zip(runs[0].outputs(), runs[1].outputs(), strict=True):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


# --- sigmoid binary cross-entropy ----------------------------------------------------------------

BCE_OPTIONS = {
    "plain": {},
    "weighted": {"weight": "rows", "pos_weight": "outputs"},
    "full-weights-nobias": {"weight": "full", "bias": False},
}


def bce_weights(kind, lead, n_outputs, device, dtype=torch.float32):
    shapes = {"rows": (*lead[-1:], 1), "outputs": (n_outputs,), "full": (*lead, n_outputs)}
    return positive(shapes[kind], 6, device, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", list(BCE_OPTIONS), ids=list(BCE_OPTIONS))
@pytest.mark.parametrize("n_outputs", [1, 5])
def test_bce_matches_oracle(backend_device, n_outputs, options, reduction):
    """The sigmoid neuron (one output) and a multi-label head, with target gradients."""
    backend, device = backend_device
    opts = dict(BCE_OPTIONS[options])
    x, w, b = make_head(device, n_classes=n_outputs, bias=opts.pop("bias", True))
    for name in ("weight", "pos_weight"):
        if name in opts:
            opts[name] = bce_weights(opts[name], LEAD, n_outputs, device)
    target = torch.rand((*LEAD, n_outputs), generator=generator(16)).to(device)
    check_bce(backend, x, w, b, target, reduction=reduction, **opts)


@pytest.mark.parametrize("lead", [(), (2, 3, 2)], ids=["1d-input", "4d-input"])
def test_bce_leading_dims(backend_device, lead):
    backend, device = backend_device
    x, w, b = make_head(device, lead=lead, n_classes=3)
    target = torch.rand((*lead, 3), generator=generator(16)).to(device)
    ours = check_bce(backend, x, w, b, target, reduction="none")
    assert ours.loss.shape == (*lead, 3)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bce_half_precision_within_torch_error(backend_device, reduction):
    backend, device = backend_device
    x, w, b = make_head(device, torch.bfloat16, lead=(24,), n_features=32, n_classes=6)
    target = torch.rand((24, 6), generator=generator(16)).to(device, torch.bfloat16)
    ours = functools.partial(ours_bce, chunk_size=5, backend=backend)
    args = (x, w, target, b)
    check_half_precision(ours, linear_bce_reference, args, {"reduction": reduction}, (0, 1, 2, 3))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_empty_batch(backend_device, reduction):
    backend, device = backend_device
    x, w, b = make_head(device, lead=(0,), n_classes=3)
    check_bce(backend, x, w, b, torch.rand(0, 3, device=device), reduction=reduction)


def test_bce_extreme_logits(backend_device):
    """Logits of size 1e3 and more: finite, exact loss and gradients, as torch's."""
    backend, device = backend_device
    x, w, b = make_head(device, n_classes=4)
    target = torch.rand((*LEAD, 4), generator=generator(16)).to(device)
    check_bce(backend, x * 300, w, b, target, reduction="sum")


# --- memory --------------------------------------------------------------------------------------


def _peak_extra_bytes(run) -> int:
    """Peak memory above the starting point while ``run()`` executes: CUDA's allocator
    statistics, or on CPU the process's resident high-water mark (reset through
    /proc/self/clear_refs, Linux; glibc's freed pages trimmed first)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024

    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)  # hand freed heap pages back, so reusing them counts again
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    start = status("VmRSS")
    run()
    return status("VmHWM") - start


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peak_memory_grows_with_the_chunk_not_with_n_times_v(reduction):
    """N x V logits are 64 MiB here: with 64-row chunks the whole forward + backward stays a
    few MiB above the inputs, with one chunk of all N rows it holds several logits' worth."""
    device = "cuda" if CUDA else "cpu"
    n_rows, n_features, n_classes = 4096, 32, 4096
    x = randn((n_rows, n_features), 1, device).requires_grad_()
    w = randn((n_classes, n_features), 2, device, scale=0.2).requires_grad_()
    target = class_target((n_rows,), device, n_classes=n_classes)
    upstream = torch.ones(n_rows if reduction == "none" else (), device=device)
    logits_bytes = n_rows * n_classes * 4

    def run(chunk_size):
        loss = fused_ce.linear_cross_entropy(
            x, w, target, reduction=reduction, chunk_size=chunk_size, backend="torch"
        )
        loss.backward(upstream)
        x.grad = w.grad = None

    run(64)  # warm up: lazy initialisation is not the op's memory
    small = _peak_extra_bytes(lambda: run(64))
    large = _peak_extra_bytes(lambda: run(n_rows))
    # Gradients (0.5 MiB each) plus a 1 MiB chunk and the torch path's fp32 temporaries of it:
    # about 12 MiB measured, against 320 MiB with one chunk.
    assert small < logits_bytes / 3, f"{small / 2**20:.1f} MiB with 64-row chunks"
    assert large > logits_bytes, f"{large / 2**20:.1f} MiB with one {n_rows}-row chunk"


# --- modules -------------------------------------------------------------------------------------


def test_modules_match_the_functions_and_linear_init():
    torch.manual_seed(0)
    linear = torch.nn.Linear(N_FEATURES, N_CLASSES)
    torch.manual_seed(0)
    head = fused_ce.nn.LinearCrossEntropyLoss(
        N_FEATURES, N_CLASSES, label_smoothing=0.1, chunk_size=3
    )
    assert torch.equal(head.linear_weight, linear.weight)
    assert torch.equal(head.linear_bias, linear.bias)
    assert list(head.state_dict()) == ["linear_weight", "linear_bias"]
    x = randn((*LEAD, N_FEATURES), 1, "cpu")
    target = class_target(LEAD, "cpu")
    expected = F.cross_entropy(linear(x).movedim(-1, 1), target, label_smoothing=0.1)
    torch.testing.assert_close(head(x, target), expected)
    torch.testing.assert_close(head.logits(x), linear(x))

    shared = fused_ce.nn.LinearBCEWithLogitsLoss.from_linear(
        linear, pos_weight=positive((N_CLASSES,), 3, "cpu"), reduction="sum"
    )
    assert shared.linear_weight is linear.weight and shared.linear_bias is linear.bias
    assert "pos_weight" in shared.state_dict()
    bits = torch.rand((*LEAD, N_CLASSES), generator=generator(4))
    loss = shared(x, bits)
    expected = F.binary_cross_entropy_with_logits(
        linear(x), bits, pos_weight=shared.pos_weight, reduction="sum"
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert linear.weight.grad is not None and linear.bias.grad is not None
    assert "out_features=37" in repr(shared)


# --- PyTorch integration -------------------------------------------------------------------------


def _op_cases(device):
    x, w, b = (t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t for t in make_head(device))
    x = x.t().contiguous().t()  # a permuted layout
    y = class_target((10,), device, ignore_index=-100)
    t = prob_target((10,), device)
    scale = torch.tensor(0.1, device=device)
    weight = positive((N_CLASSES,), 5, device)
    bits = torch.rand(10, N_CLASSES, generator=generator(2)).to(device)
    options = (-100, 0.1, 0.7, 3.0)  # ignore_index, label_smoothing, logit_scale, softcap
    stats = ops.linear_ce_forward(x, w, b, y, weight, *options, True, 3, False, "torch")
    return [
        (ops.linear_ce_forward, (x, w, b, y, weight, *options, True, 3, False, "torch")),
        (
            ops.linear_ce_forward,
            (x, w, None, t, None, -100, 0.0, 1.0, 0.0, False, 4, False, "torch"),
        ),
        (
            ops.linear_ce_backward,
            (
                torch.rand(10, device=device),
                torch.rand(10, device=device),
                x,
                w,
                b,
                y,
                weight,
                stats[2],
                *options,
                3,
                False,
                "torch",
                True,
                True,
                True,
                False,
            ),
        ),
        (
            ops.linear_ce_scalar,
            (x, w, b, y, weight, scale, *options, 3, "torch", True, True, True, False),
        ),
        (ops.linear_bce_forward, (x, w, b, bits, None, weight.expand(10, -1), 3, "torch", True)),
        (
            ops.linear_bce_forward,
            (x, w, None, bits, weight.expand(10, -1), None, 3, "torch", False),
        ),
        (
            ops.linear_bce_backward,
            (
                torch.rand(10, N_CLASSES, device=device),
                x,
                w,
                b,
                bits,
                None,
                None,
                3,
                "torch",
                True,
                True,
                True,
                True,
            ),
        ),
        (
            ops.linear_bce_scalar,
            (x, w, b, bits, None, None, scale, 3, "torch", True, True, True, True),
        ),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    device = "cuda" if CUDA else "cpu"
    op, args = _op_cases(device)[case]
    args = tuple(
        a.detach().requires_grad_()
        if isinstance(a, torch.Tensor)
        and a.is_floating_point()
        and a.dim() == 2
        and op in (ops.linear_ce_forward, ops.linear_bce_forward)
        else a
        for a in args
    )
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_matches_eager(reduction):
    x, w, b = make_head("cpu")
    target = class_target(LEAD, "cpu", ignore_index=-100)

    def loss_fn(x, w, b, target):
        ce = fused_ce.linear_cross_entropy(
            x, w, target, linear_bias=b, reduction=reduction, chunk_size=CHUNK, backend="torch"
        )
        bce = fused_ce.linear_binary_cross_entropy_with_logits(
            x, w, torch.sigmoid(F.linear(x, w)).detach(), reduction=reduction, backend="torch"
        )
        return ce.sum() + bce.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        loss = fn(*leaves, target)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for a, c in zip(*results, strict=True):
        assert torch.equal(a, c)


# --- bad inputs ----------------------------------------------------------------------------------


def _bad_ce_cases():
    x, w, b = make_head("cpu")
    y = class_target(LEAD, "cpu")
    ok = {"input": x, "linear_weight": w, "target": y}
    return {
        "input-int": ({**ok, "input": x.long()}, TypeError, "input"),
        "input-0d": ({**ok, "input": x[0, 0, 0]}, ValueError, "input"),
        "weight-features": ({**ok, "linear_weight": w[:, :3]}, ValueError, "linear_weight"),
        "weight-dtype": ({**ok, "linear_weight": w.double()}, RuntimeError, "linear_weight"),
        "weight-empty": ({**ok, "linear_weight": w[:0]}, ValueError, "linear_weight"),
        "bias-shape": ({**ok, "linear_bias": b[:3]}, ValueError, "linear_bias"),
        "bias-dtype": ({**ok, "linear_bias": b.double()}, RuntimeError, "linear_bias"),
        "target-int32": ({**ok, "target": y.int()}, RuntimeError, "target"),
        "target-shape": ({**ok, "target": y[0]}, ValueError, "target"),
        "prob-target-shape": ({**ok, "target": torch.rand(*LEAD, 3)}, ValueError, "target"),
        "prob-ignore-index": (
            {**ok, "target": prob_target(LEAD, "cpu"), "ignore_index": 0},
            RuntimeError,
            "ignore_index",
        ),
        "target-out-of-range": ({**ok, "target": y + N_CLASSES}, RuntimeError, "target"),
        "class-weight-shape": ({**ok, "weight": torch.ones(3)}, RuntimeError, "weight"),
        "class-weight-grad": (
            {**ok, "weight": torch.ones(N_CLASSES, requires_grad=True)},
            RuntimeError,
            "weight",
        ),
        "reduction": ({**ok, "reduction": "avg"}, ValueError, "reduction"),
        "smoothing": ({**ok, "label_smoothing": 1.5}, RuntimeError, "label_smoothing"),
        "chunk-zero": ({**ok, "chunk_size": 0}, ValueError, "chunk_size"),
        "chunk-float": ({**ok, "chunk_size": 2.5}, ValueError, "chunk_size"),
        "path": ({**ok, "path": "fast"}, ValueError, "path"),
        "fused-on-torch": ({**ok, "path": "fused", "backend": "torch"}, RuntimeError, "path"),
    }


@pytest.mark.parametrize("case", list(_bad_ce_cases()))
def test_ce_bad_inputs_raise(case):
    kwargs, error, name = _bad_ce_cases()[case]
    with pytest.raises(error, match=name):
        fused_ce.linear_cross_entropy(**kwargs)


def _bad_bce_cases():
    x, w, b = make_head("cpu", n_classes=3)
    t = torch.rand(*LEAD, 3)
    ok = {"input": x, "linear_weight": w, "target": t}
    return {
        "target-shape": ({**ok, "target": t[..., :1]}, ValueError, "target"),
        "target-int": ({**ok, "target": t.long()}, TypeError, "target"),
        "weight-enlarges": ({**ok, "weight": torch.ones(4, *LEAD, 3)}, RuntimeError, "weight"),
        "pos-weight-shape": ({**ok, "pos_weight": torch.ones(4)}, RuntimeError, "pos_weight"),
        "bias-shape": ({**ok, "linear_bias": b[:2]}, ValueError, "linear_bias"),
        "chunk-negative": ({**ok, "chunk_size": -1}, ValueError, "chunk_size"),
    }


@pytest.mark.parametrize("case", list(_bad_bce_cases()))
def test_bce_bad_inputs_raise(case):
    kwargs, error, name = _bad_bce_cases()[case]
    with pytest.raises(error, match=name):
        fused_ce.linear_binary_cross_entropy_with_logits(**kwargs)


@pytest.mark.parametrize(
    ("module", "function"),
    [
        (fused_ce.nn.LinearCrossEntropyLoss, "linear_cross_entropy"),
        (fused_ce.nn.LinearBCEWithLogitsLoss, "linear_binary_cross_entropy_with_logits"),
    ],
)
def test_modules_pass_batch_invariant(module, function, monkeypatch):
    """The heads take the functions' batch_invariant, check it at construction and pass it on;
    with it a row's loss is the same bits alone and in a batch."""
    with pytest.raises(TypeError, match="batch_invariant"):
        module(N_FEATURES, N_CLASSES, batch_invariant="yes")
    seen = []
    original = getattr(fused_ce.nn, function)

    def spy(*args, **kwargs):
        seen.append(kwargs["batch_invariant"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_ce.nn, function, spy)
    head = module(N_FEATURES, N_CLASSES, reduction="none", batch_invariant=True)
    x = randn((9, N_FEATURES), 1, "cpu")
    if module is fused_ce.nn.LinearCrossEntropyLoss:
        target = class_target((9,), "cpu")
    else:
        target = torch.rand((9, N_CLASSES), generator=generator(4))
    batch = head(x, target)
    alone = head(x[4:5], target[4:5])
    assert seen == [True, True]
    assert torch.equal(batch[4:5], alone)
