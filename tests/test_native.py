"""The native C++ backend beyond the shared suite (which runs every loss test on it through
``conftest.backend_cases``): that it is built where it can be, that the package works without
it, that concurrent calls are safe, and the forward-with-gradient interface of its modules
(the scalar-loss fast path), against float64 PyTorch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
from _reference import TIGHT, positive, randn, upstream_for

import fused_ce
from fused_ce import native
from fused_ce._common import CEOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_is_built_where_a_compiler_is():
    """The native cases of the suite must not vanish silently: in CI (``CI=true``) the
    extension has to be there, e.g. built by `make setup`. Outside CI a checkout used without
    building it (a GPU machine running the suite from PYTHONPATH) is told so by a skip that
    says how to build it, not a failure."""
    if os.environ.get("FUSED_CE_DISABLE_NATIVE") == "1":
        assert not native.available()
        assert "FUSED_CE_DISABLE_NATIVE" in native.unavailable_reason()
        return
    compiler = shutil.which(os.environ.get("CXX", "c++").split()[0])
    if os.environ.get("CI") == "true":
        assert native.available(), (
            f"CI: the native extension must be built (make setup): {native.unavailable_reason()}"
        )
    elif compiler is not None and not native.available():
        pytest.skip(
            f"the native extension is not built although a compiler ({compiler}) is present: "
            f"{native.unavailable_reason()} (CI=true makes this a failure)"
        )
    if compiler is not None:
        assert native.capability() in ("avx512", "avx2", "default")
    else:
        assert "not built" in native.unavailable_reason()


def test_package_works_with_the_extension_disabled():
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        import fused_ce
        from fused_ce._backend import resolve
        x = torch.randn(16, 7, generator=torch.Generator().manual_seed(0))
        y = torch.arange(16) % 7
        assert resolve("auto", x) == "torch", resolve("auto", x)
        try:
            fused_ce.softmax_cross_entropy(x, y, backend="native")
        except RuntimeError as error:
            assert "FUSED_CE_DISABLE_NATIVE" in str(error), error
        else:
            raise AssertionError("backend='native' ran although disabled")
        loss = fused_ce.softmax_cross_entropy(x, y)
        torch.testing.assert_close(loss, F.cross_entropy(x, y))
        print("ok")
        """
    )
    env = {**os.environ, "FUSED_CE_DISABLE_NATIVE": "1", "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
def test_concurrent_calls_match_serial_ones():
    """Several Python threads in the kernels at once (each with its scratch buffers) give the
    results of one thread, bit for bit."""
    cases = []
    for seed in range(6):
        logits = randn((64, 300), seed, "cpu")
        target = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(seed))
        bce_input = randn((64, 40), seed + 100, "cpu")
        bce_target = torch.rand(64, 40, generator=torch.Generator().manual_seed(seed))
        cases.append((logits, target, bce_input, bce_target))

    def run(case):
        logits, target, bce_input, bce_target = (t.clone() for t in case)
        logits.requires_grad_(True)
        bce_input.requires_grad_(True)
        ce = fused_ce.softmax_cross_entropy(logits, target, label_smoothing=0.1, backend="native")
        bce = fused_ce.sigmoid_binary_cross_entropy(bce_input, bce_target, backend="native")
        (ce + bce).backward()
        return [ce.detach(), bce.detach(), logits.grad, bce_input.grad]

    serial = [run(case) for case in cases]
    results = [None] * (4 * len(cases))

    def worker(index):
        for _ in range(3):
            results[index] = run(cases[index % len(cases)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, result in enumerate(results):
        for ours, expected in zip(result, serial[index % len(cases)], strict=True):
            torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def _final_logits(x, logit_scale, softcap):
    z = x * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case",
    ["plain", "weight-smoothing-ignore", "softcap-scale", "prob", "prob-weight-smoothing", "nchw"],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_ce_forward_with_gradient(case, dtype, inplace):
    """forward(grad_scale=s) writes d/dlogits (and d/dtarget) of s * sum_n (loss_n + z_loss *
    v_n * lse_n^2), as float64 autograd through torch's cross_entropy computes it."""
    from fused_ce.native import cross_entropy as native_ce

    n, n_classes, n_inner = 6, 37, 1
    if case == "nchw":
        n_inner = 5
    logits = randn((n, n_classes, n_inner), 1, "cpu", dtype, scale=3.0)
    if case == "nchw":  # class stride != 1: the logits as an NCHW-like strided view
        logits = randn((n, n_inner, n_classes), 1, "cpu", dtype, scale=3.0).transpose(1, 2)
    weight = positive((n_classes,), 2, "cpu", dtype) if "weight" in case else None
    options = CEOptions(
        ignore_index=3 if "ignore" in case else -100,
        label_smoothing=0.2 if "smoothing" in case else 0.0,
        logit_scale=0.7 if "scale" in case else 1.0,
        softcap=4.0 if "softcap" in case else 0.0,
    )
    prob = case.startswith("prob")
    if prob:
        target = torch.softmax(randn((n, n_classes, n_inner), 3, "cpu", dtype), 1)
    else:
        target = torch.randint(
            0, n_classes, (n, n_inner), generator=torch.Generator().manual_seed(4)
        )
        target[0, 0] = 3  # an ignored row when ignore_index is 3
    z_loss, scale = 0.3, 0.25

    x64 = logits.detach().double().requires_grad_(True)
    t64 = target.detach().double().requires_grad_(True) if prob else target
    z = _final_logits(x64, options.logit_scale, options.softcap)
    losses = F.cross_entropy(
        z,
        t64,
        weight.double() if weight is not None else None,
        reduction="none",
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
    )
    lse = torch.logsumexp(z, 1)
    valid = torch.ones_like(lse) if prob else (target != options.ignore_index).double()
    total = scale * (losses.sum() + z_loss * (valid * lse.square()).sum())
    wrt = [x64, t64] if prob else [x64]
    expected = torch.autograd.grad(total, wrt)

    source = logits.clone()
    grad_logits = source if inplace else torch.empty_like(logits)
    grad_target = torch.empty_like(target) if prob else None
    loss, lse_out, *_ = native_ce.forward(
        source,
        target,
        weight,
        options,
        z_loss=z_loss,
        grad_scale=torch.tensor(scale, dtype=dtype),
        grad_logits=grad_logits,
        grad_target=grad_target,
    )
    rtol, atol = TIGHT[dtype]
    torch.testing.assert_close(loss.double(), losses.detach().reshape(-1), rtol=rtol, atol=atol)
    torch.testing.assert_close(lse_out.double(), lse.detach().reshape(-1), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_logits.double(), expected[0], rtol=rtol, atol=atol)
    if prob:
        torch.testing.assert_close(grad_target.double(), expected[1], rtol=rtol, atol=atol)


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [False, True])
def test_bce_run_with_uniform_gradient_and_loss_sum(dtype, weights):
    """One call: the loss's sum into loss_sum and both gradients of a 0-d upstream gradient,
    against float64 autograd through torch's binary_cross_entropy_with_logits."""
    from fused_ce.native import bce as native_bce

    x = randn((5, 9), 1, "cpu", dtype, scale=4.0)
    t = torch.rand(5, 9, generator=torch.Generator().manual_seed(2), dtype=dtype)
    w = positive((5, 1), 3, "cpu", dtype) if weights else None  # broadcast over columns
    pw = positive((9,), 4, "cpu", dtype) if weights else None  # the last dim
    g = torch.tensor(0.5, dtype=dtype)
    x64 = x.double().requires_grad_(True)
    t64 = t.double().requires_grad_(True)
    loss64 = F.binary_cross_entropy_with_logits(
        x64,
        t64,
        w.double() if weights else None,
        reduction="sum",
        pos_weight=pw.double() if weights else None,
    )
    expected = torch.autograd.grad(0.5 * loss64, [x64, t64])
    loss_sum = torch.empty((), dtype=dtype)
    grad_input, grad_target = torch.empty_like(x), torch.empty_like(t)
    native_bce.run(x, t, w, pw, g, None, grad_input, grad_target, loss_sum=loss_sum)
    rtol, atol = TIGHT[dtype]
    torch.testing.assert_close(loss_sum.double(), loss64.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_input.double(), expected[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_target.double(), expected[1], rtol=rtol, atol=atol)


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_each_capability_build_matches_torch(capability):
    """The narrower builds (loaded where the CPU lacks AVX-512, or AVX2) give torch's results:
    ATEN_CPU_CAPABILITY makes torch, and so the loader, report a narrower CPU."""
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        import fused_ce
        from fused_ce import native
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(37, 53, generator=gen, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 53, (37,), generator=gen)
        t = torch.rand(37, 53, generator=gen, dtype=torch.float64)
        ce = fused_ce.softmax_cross_entropy(x, y, label_smoothing=0.1, backend="native")
        bce = fused_ce.sigmoid_binary_cross_entropy(x, t, backend="native")
        grads = torch.autograd.grad(ce + bce, x)
        x2 = x.detach().requires_grad_(True)
        ref = F.cross_entropy(x2, y, label_smoothing=0.1)
        ref = ref + F.binary_cross_entropy_with_logits(x2, t)
        torch.testing.assert_close(ce + bce, ref)
        torch.testing.assert_close(grads[0], torch.autograd.grad(ref, x2)[0])
        print(native.capability())
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == capability


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_eager_ops_layouts_and_grad_modes(reduction):
    """The C++ loss ops (autograd in C++) on the public functions' own tensors: spatial dims
    that no view merges (the gradient then comes back contiguous), ignored and uint8 class
    indices, probability targets needing a gradient, broadcast BCE weights on a transposed
    input; and the same losses with no gradient (no_grad, inference_mode), against float64
    PyTorch."""
    rtol, atol = TIGHT[torch.float32]
    x = randn((2, 3, 4, 5), 1, "cpu").permute(0, 1, 3, 2)  # (2, 3, 5, 4): no merging view
    target = torch.randint(0, 3, (2, 5, 4), generator=torch.Generator().manual_seed(2))
    target[0, 0, 0] = -100
    weight = positive((3,), 3, "cpu")
    kwargs = dict(weight=weight, label_smoothing=0.1, reduction=reduction)
    for labels in (target, torch.where(target < 0, 7, target).to(torch.uint8)):
        ignore = -100 if labels.dtype == torch.int64 else 7
        leaf = x.detach().requires_grad_()
        loss = fused_ce.cross_entropy(leaf, labels, ignore_index=ignore, backend="native", **kwargs)
        op = "CrossEntropyUnreduced" if reduction == "none" else "CrossEntropyScalar"
        assert loss.grad_fn.name() == f"fused_ce_native::{op}Backward"
        (loss * 1.5).sum().backward()
        x64 = x.detach().double().requires_grad_()
        ref = F.cross_entropy(
            x64, labels.long(), ignore_index=ignore, **{**kwargs, "weight": weight.double()}
        )
        (ref * 1.5).sum().backward()
        torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(leaf.grad.double(), x64.grad, rtol=rtol, atol=atol)
        for context in (torch.no_grad(), torch.inference_mode()):
            with context:
                again = fused_ce.cross_entropy(
                    leaf, labels, ignore_index=ignore, backend="native", **kwargs
                )
            assert again.grad_fn is None
            torch.testing.assert_close(again, loss.detach(), rtol=0, atol=0)

    probs = torch.softmax(randn((5, 4), 4, "cpu"), -1).requires_grad_()
    logits = randn((5, 4), 5, "cpu").requires_grad_()
    loss = fused_ce.cross_entropy(logits, probs, reduction=reduction, backend="native")
    grads = torch.autograd.grad(loss.sum(), [logits, probs])
    l64, p64 = (t.detach().double().requires_grad_() for t in (logits, probs))
    ref = F.cross_entropy(l64, p64, reduction=reduction)
    for ours, theirs in zip(grads, torch.autograd.grad(ref.sum(), [l64, p64]), strict=True):
        torch.testing.assert_close(ours.double(), theirs, rtol=rtol, atol=atol)

    bce_input = randn((6, 5), 6, "cpu").t().requires_grad_()  # (5, 6), not contiguous
    bce_target = torch.rand(5, 6, generator=torch.Generator().manual_seed(7))
    bce_weights = dict(weight=positive((5, 1), 8, "cpu"), pos_weight=positive((6,), 9, "cpu"))
    loss = fused_ce.binary_cross_entropy_with_logits(
        bce_input, bce_target, reduction=reduction, backend="native", **bce_weights
    )
    op = "BinaryCrossEntropyUnreduced" if reduction == "none" else "BinaryCrossEntropyScalar"
    assert loss.grad_fn.name() == f"fused_ce_native::{op}Backward"
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(10))
    (grad,) = torch.autograd.grad(loss, bce_input, upstream)
    i64 = bce_input.detach().double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(
        i64,
        bce_target.double(),
        reduction=reduction,
        **{k: v.double() for k, v in bce_weights.items()},
    )
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(
        grad.double(), torch.autograd.grad(ref, i64, upstream.double())[0], rtol=rtol, atol=atol
    )


# Both row layouts of ce_forward / ce_backward: C <= 64 runs rows across vector lanes (16 or 8
# rows a block, so 37 rows end in a partial block), larger C one row at a time.
_LAYOUT_CLASSES = [11, 64, 65, 200]
_LAYOUT_CASES = [
    "plain",
    "weight-smoothing-ignore",
    "softcap-scale",
    "prob-weight-smoothing",
    "stats-special-rows",
    "uint8-ignore-bf16",
    "fp64-weight-smoothing",
    "fp16-softcap",
]


def _layout_inputs(case: str, layout: str, n_classes: int):
    # "nchw-wide": blocks of rows that lie within one outer index are one element apart.
    n, n_inner = 37, {"rows": 1, "inner": 3, "nchw": 3, "nchw-wide": 20}[layout]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    dtype = next((d for name, d in dtypes.items() if name in case), torch.float32)
    if layout.startswith("nchw"):  # NCHW: classes strided, the inner dimension contiguous
        logits = randn((n, n_classes, n_inner), 1, "cpu", dtype, scale=3.0)
    else:  # (n, C, n_inner) with the classes contiguous: a permuted (n, n_inner, C) tensor
        logits = randn((n, n_inner, n_classes), 1, "cpu", dtype, scale=3.0).transpose(1, 2)
    if case.startswith("stats"):
        logits[0, :, 0] = float("nan")  # a NaN row: NaN loss, argmax at the first NaN
        logits[1, 3, 0] = float("inf")
        logits[2, :, 0] = 0.0  # ties: the first index
        logits[3, 5, 0] = 1e4  # confident: p_y close to 1
    options = CEOptions(
        ignore_index=5 if "ignore" in case else -100,
        label_smoothing=0.2 if "smoothing" in case else 0.0,
        logit_scale=0.7 if "scale" in case else 1.0,
        softcap=4.0 if "softcap" in case else 0.0,
    )
    weight = positive((n_classes,), 2, "cpu", logits.dtype) if "weight" in case else None
    if case.startswith("prob"):
        target = torch.softmax(randn((n, n_classes, n_inner), 3, "cpu", logits.dtype), 1)
    else:
        target = torch.randint(
            0, n_classes, (n, n_inner), generator=torch.Generator().manual_seed(4)
        )
        target[3, 0] = 5
        target[0::7, -1] = 5  # ignored rows where ignore_index is 5
        if "uint8" in case:
            target = target.to(torch.uint8)
    return logits, target, weight, options


def _guarded_like(t: torch.Tensor, guard: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialised tensor like ``t`` (same strides) inside a buffer whose ``guard``
    elements on both sides hold a sentinel: a kernel writing out of bounds changes them."""
    size = sum(s * (d - 1) for s, d in zip(t.stride(), t.shape, strict=True)) + 1
    buffer = torch.full((size + 2 * guard,), 7.0, dtype=t.dtype)
    return buffer, buffer[guard:].as_strided(t.shape, t.stride())


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
@pytest.mark.parametrize("layout", ["rows", "inner", "nchw", "nchw-wide"])
@pytest.mark.parametrize("case", _LAYOUT_CASES)
@pytest.mark.parametrize("n_classes", _LAYOUT_CLASSES)
def test_ce_kernels_in_both_row_layouts(n_classes, case, layout):
    """ce_forward (per-row outputs, stats, the gradient of a scalar loss with z-loss) and
    ce_backward (per-row grad_loss and grad_lse) against float64 autograd through torch's
    cross_entropy, for every option, in both kernel layouts, with 37 rows (partial blocks),
    inner dimensions and class-strided logits; nothing is written outside the outputs, and the
    forward's gradient equals the backward's for the same uniform upstream gradient."""
    from fused_ce.native import cross_entropy as native_ce

    logits, target, weight, options = _layout_inputs(case, layout, n_classes)
    prob = target.is_floating_point()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x64 = logits.detach().double().requires_grad_(True)
    t64 = target.detach().double().requires_grad_(True) if prob else target.long()
    z = _final_logits(x64, options.logit_scale, options.softcap)
    losses = F.cross_entropy(
        z,
        t64,
        weight.double() if weight is not None else None,
        reduction="none",
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
    ).reshape(-1)
    lse = torch.logsumexp(z, 1).reshape(-1)
    rows = z.movedim(1, -1).reshape(-1, n_classes)
    valid = torch.ones_like(lse) if prob else (target.reshape(-1) != options.ignore_index).double()
    wrt = [x64, t64] if prob else [x64]
    n_rows = lse.numel()

    loss, lse_out, saved, entropy, argmax = native_ce.forward(
        logits, target, weight, options, with_stats=True
    )
    rtol, atol = TIGHT[acc]
    reduced = logits.dtype in (torch.bfloat16, torch.float16)
    if reduced:  # the inputs are rounded, the math and per-row outputs fp32
        rtol, atol = 1e-5, 1e-5
    close = dict(rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(loss.double(), losses.detach(), **close)
    # A +inf logit makes the whole row NaN (torch's cross_entropy's loss), lse included.
    nan_rows = rows.detach().isnan().any(1) | (rows.detach() == float("inf")).any(1)
    torch.testing.assert_close(
        lse_out.double(), lse.detach().masked_fill(nan_rows, float("nan")), **close
    )
    probs = torch.softmax(rows.detach(), 1)
    expected_entropy = -(probs * torch.log_softmax(rows.detach(), 1)).nan_to_num(0.0).sum(1)
    expected_entropy[nan_rows] = float("nan")
    torch.testing.assert_close(entropy.double(), expected_entropy, **close)
    torch.testing.assert_close(argmax, rows.detach().argmax(1), rtol=0, atol=0)
    finite = ~nan_rows  # the gradients below are compared where the row is finite

    # The forward's gradient of scale * sum_n (loss_n + z_loss v_n lse_n^2).
    z_loss, scale = 0.3, 0.25
    total = scale * (losses.sum() + z_loss * (valid * lse.square()).sum())
    expected = torch.autograd.grad(total, wrt, retain_graph=True)
    grad_buffer, grad_logits = _guarded_like(logits)
    target_buffer, grad_target = _guarded_like(target) if prob else (None, None)
    native_ce.forward(
        logits,
        target,
        weight,
        options,
        z_loss=z_loss,
        grad_scale=torch.tensor(scale, dtype=acc),
        grad_logits=grad_logits,
        grad_target=grad_target,
    )
    row_grad = grad_logits.movedim(1, -1).reshape(-1, n_classes)[finite]
    grad_tol = dict(rtol=rtol, atol=atol) if not reduced else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(
        row_grad.double(), expected[0].movedim(1, -1).reshape(-1, n_classes)[finite], **grad_tol
    )
    if prob:
        torch.testing.assert_close(grad_target.double(), expected[1], **grad_tol)

    # The backward from saved, with the same uniform upstream: the same bits.
    again = torch.empty_like(grad_logits)
    grad_loss = torch.full((n_rows,), scale, dtype=acc)
    grad_lse = (2 * z_loss) * grad_loss * lse_out * valid.to(acc)
    native_ce.backward(grad_loss, grad_lse, logits, target, weight, saved, options, again, None)
    torch.testing.assert_close(again, grad_logits, rtol=0, atol=0, equal_nan=True)

    # The backward from saved, per-row upstream gradients.
    g = upstream_for(losses, 5)
    g_lse = upstream_for(lse, 6)
    expected = torch.autograd.grad((g * losses).sum() + (g_lse * lse).sum(), wrt)
    grad_buffer, grad_logits = _guarded_like(logits)
    target_buffer, grad_target = _guarded_like(target) if prob else (None, None)
    native_ce.backward(
        g.to(acc), g_lse.to(acc), logits, target, weight, saved, options, grad_logits, grad_target
    )
    row_grad = grad_logits.movedim(1, -1).reshape(-1, n_classes)[finite]
    torch.testing.assert_close(
        row_grad.double(), expected[0].movedim(1, -1).reshape(-1, n_classes)[finite], **grad_tol
    )
    if prob:
        torch.testing.assert_close(grad_target.double(), expected[1], **grad_tol)
    for buffer in (grad_buffer, target_buffer):
        if buffer is not None:
            assert (buffer[:64] == 7).all() and (buffer[-64:] == 7).all()


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
@pytest.mark.parametrize("n_classes", [11, 200])
def test_ce_kernels_give_the_same_bits_on_any_thread_count(n_classes):
    """Rows split across at::parallel_for's threads (for C <= 64 in whole blocks, one partial
    block where a split falls) give the one-thread results bit for bit."""
    from fused_ce.native import cross_entropy as native_ce

    n = 7001  # several grains at C = 11 (about 3000 rows each), not a multiple of 16
    logits = randn((n, n_classes, 1), 1, "cpu", scale=3.0)
    target = torch.randint(0, n_classes, (n, 1), generator=torch.Generator().manual_seed(2))
    options = CEOptions(label_smoothing=0.1)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            grad = torch.empty_like(logits)
            outputs = native_ce.forward(
                logits,
                target,
                None,
                options,
                with_stats=True,
                grad_scale=torch.tensor(1.0 / n),
                grad_logits=grad,
            )
            results.append((*outputs, grad))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        torch.testing.assert_close(two, one, rtol=0, atol=0)


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
@pytest.mark.parametrize("pos_weighted", [False, True], ids=["plain", "pos_weighted"])
def test_bce_fp32_precision_across_the_logit_range(pos_weighted):
    """The fp32 kernel's own exp and log1p (csrc/bce.h) over logits in [-100, 100], where
    exp(-|x|) runs from 1 down past the fp32 normals (flushed to 0 below 2^-126), for targets 0,
    1 and between: every element of the loss and of both gradients is within twice torch's
    fp32 error plus 4 fp32 roundings of the terms the result is the difference of (e.g.
    (1 - t) sigmoid(x) - t sigmoid(-x)), plus 4 float64 roundings of the oracle's own terms
    (its sigmoid(x) - 1 is 0 beyond x = 37), plus the flush of exp(-|x|) below 2^-126."""
    x = torch.cat([torch.linspace(-100.0, 100.0, 20001), torch.tensor([0.0, -0.0, 1e-30])])
    t = torch.tensor([0.0, 1.0, 0.3, 0.75]).repeat(x.numel() // 4 + 1)[: x.numel()]
    pw = positive(x.shape, 5, "cpu") if pos_weighted else None
    upstream = randn(x.shape, 6, "cpu")
    args, kwargs = (x, t), dict(pos_weight=pw, reduction="none")

    def run(fn, *tensors, **options):
        leaves = [v.detach().requires_grad_(True) for v in tensors]
        loss = fn(*leaves, **options)
        grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
        return [loss.detach(), *grads]

    ours = run(fused_ce.sigmoid_binary_cross_entropy, *args, **kwargs, backend="native")
    fp32 = run(F.binary_cross_entropy_with_logits, *args, **kwargs)
    kwargs64 = dict(kwargs, pos_weight=pw.double() if pos_weighted else None)
    reference = run(F.binary_cross_entropy_with_logits, x.double(), t.double(), **kwargs64)
    x64, t64, g64 = x.double(), t.double(), upstream.double().abs()
    pw64 = pw.double() if pos_weighted else torch.ones_like(x64)
    nls, nls_neg = F.softplus(-x64), F.softplus(x64)  # -logsigmoid(x), -logsigmoid(-x)
    terms = (
        ((1 - t64) * x64).abs() + ((pw64 - 1) * t64 + 1) * nls,
        g64 * ((1 - t64) * torch.sigmoid(x64) + pw64 * t64 * torch.sigmoid(-x64)),
        g64 * (pw64 * nls + nls_neg),
    )
    # torch's float64 dx is sigmoid(x) ((pw - 1) t + 1) - pw t: its terms are of size 1.
    oracle_terms = (terms[0], g64 * (torch.sigmoid(x64) * ((pw64 - 1) * t64 + 1) + pw64 * t64))
    oracle_terms += (terms[2],)
    # exp(-|x|) below 2^-126 is flushed to 0; it enters with a factor of at most this.
    flush = 2.0**-126 * (1 + pw64) * torch.clamp(g64, min=1.0)
    eps, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    for name, value, theirs, ref, size, oracle_size in zip(
        ("loss", "dx", "dt"), ours, fp32, reference, terms, oracle_terms, strict=True
    ):
        error = (value.double() - ref).abs()
        bound = 2 * (theirs.double() - ref).abs() + 4 * eps * size + 4 * eps64 * oracle_size
        bound += flush
        worst = int((error - bound).argmax())
        assert (error <= bound).all(), (
            f"{name} at x = {float(x[worst])}, t = {float(t[worst])}: {float(value[worst])}, "
            f"float64 {float(ref[worst])}, torch fp32 {float(theirs[worst])}"
        )
