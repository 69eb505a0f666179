"""Determinism and batch invariance (issue 24, part 3; docs/determinism.md states what holds).

* Run to run: every loss and gradient has the same bits on a second run, on every backend,
  with 1 and 2 CPU threads, and under ``torch.use_deterministic_algorithms(True)``.
* Batch invariance of the losses on logits: a row's loss and gradient have the same bits
  whatever the other rows are and wherever the row sits (batch of 1, 7, 300; first, last;
  ignored padding rows added).
* The linear heads (CE and BCE) with ``batch_invariant=True`` (and the fused Triton path by
  default): the same for a row's loss and input gradient.
"""

from __future__ import annotations

import pytest
import torch
from _reference import generator, randn

import fused_ce

THREADS = (1, 2)


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def deterministic_algorithms(monkeypatch):
    # torch refuses cuBLAS GEMMs in deterministic mode without this (its rule for any matmul;
    # read at each call). No effect on a CPU.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _loss_and_grads(fn, leaves, seed: int) -> list[torch.Tensor]:
    """``fn(*leaves)``'s output(s) and the gradients of the leaves under a seeded upstream
    gradient (per element for unreduced outputs)."""
    leaves = [_leaf(t) for t in leaves]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    main = outs[0]
    upstream = torch.rand(main.shape, generator=generator(seed)).to(main.device, main.dtype) + 0.5
    (main * upstream).sum().backward()
    return [o.detach() for o in outs if isinstance(o, torch.Tensor)] + [t.grad for t in leaves]


def _ops(backend: str, device: str, small: bool):
    """Every public op, as (name, function of the differentiable leaves, leaves). Shapes large
    enough that the native kernels and torch's ops split the work over two threads (the
    Triton interpreter gets small ones)."""
    n, c, d, v = (24, 37, 16, 53) if small else (512, 1000, 64, 3000)
    logits = randn((n, c), 1, device, scale=3.0)
    target = torch.randint(0, c, (n,), generator=generator(2)).to(device)
    target[::5] = -100
    weight = torch.rand(c, generator=generator(3)).to(device) + 0.5
    bits = torch.rand((n, c), generator=generator(4)).to(device)
    pos_weight = torch.rand(c, generator=generator(5)).to(device) + 0.5
    x = randn((n, d), 6, device)
    head = randn((v, d), 7, device, scale=0.3)
    bias = randn((v,), 8, device)
    tokens = torch.randint(0, v, (n,), generator=generator(9)).to(device)
    tokens[1::7] = -100
    labels = torch.rand((n, v), generator=generator(10)).to(device)
    kw = {"backend": backend}
    lin = {"backend": backend, "chunk_size": 7 if small else 100}
    ops = [
        (
            "ce_none",
            lambda z: fused_ce.cross_entropy(
                z, target, weight, reduction="none", label_smoothing=0.1, **kw
            ),
            [logits],
        ),
        ("ce_mean", lambda z: fused_ce.cross_entropy(z, target, weight, **kw), [logits]),
        (
            "ce_stats",
            lambda z: tuple(
                fused_ce.cross_entropy(z, target, z_loss=1e-3, return_stats=True, **kw)
            ),
            [logits],
        ),
        (
            "bce_none",
            lambda z: fused_ce.binary_cross_entropy_with_logits(
                z, bits, reduction="none", pos_weight=pos_weight, **kw
            ),
            [logits],
        ),
        (
            "bce_mean",
            lambda z: fused_ce.binary_cross_entropy_with_logits(z, bits, **kw),
            [logits],
        ),
        (
            "linear_ce_mean",
            lambda a, w, b: fused_ce.linear_cross_entropy(a, w, tokens, linear_bias=b, **lin),
            [x, head, bias],
        ),
        (
            "linear_ce_none_invariant",
            lambda a, w, b: fused_ce.linear_cross_entropy(
                a, w, tokens, linear_bias=b, reduction="none", batch_invariant=True, **lin
            ),
            [x, head, bias],
        ),
        (
            "linear_bce_mean",
            lambda a, w: fused_ce.linear_binary_cross_entropy_with_logits(a, w, labels, **lin),
            [x, head],
        ),
        (
            "linear_log_probs",
            lambda a, w: fused_ce.linear_log_probs(a, w, tokens, **lin),
            [x, head],
        ),
    ]
    if backend == "triton":
        ops.append(
            (
                "linear_ce_fused",
                lambda a, w, b: fused_ce.linear_cross_entropy(
                    a, w, tokens, linear_bias=b, reduction="none", path="fused", backend=backend
                ),
                [x, head, bias],
            )
        )
    return ops


def _assert_same_bits(first: list[torch.Tensor], second: list[torch.Tensor], name: str):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
        # Bitwise (NaN == NaN): compare the raw bits of floating tensors.
        if a.is_floating_point():
            a, b = (
                a.view(torch.int32 if a.element_size() == 4 else torch.int64),
                b.view(torch.int32 if b.element_size() == 4 else torch.int64),
            )
        assert torch.equal(a, b), f"{name}: output {i} differs between runs"


@pytest.mark.parametrize("threads", THREADS, indirect=True)
def test_run_to_run_bitwise(backend_device, threads):
    backend, device = backend_device
    for name, fn, leaves in _ops(backend, device, small=backend == "triton"):
        first = _loss_and_grads(fn, leaves, 11)
        second = _loss_and_grads(fn, leaves, 11)
        _assert_same_bits(first, second, name)


def test_deterministic_algorithms_mode(backend_device, deterministic_algorithms):
    """No op raises under torch.use_deterministic_algorithms(True), and the bits are those of
    the default mode (no op takes another path there)."""
    backend, device = backend_device
    for name, fn, leaves in _ops(backend, device, small=backend == "triton"):
        strict = _loss_and_grads(fn, leaves, 12)
        torch.use_deterministic_algorithms(False)
        try:
            default = _loss_and_grads(fn, leaves, 12)
        finally:
            torch.use_deterministic_algorithms(True)
        _assert_same_bits(strict, default, name)


def _placements(n_big: int):
    """(batch size, row position, padding rows appended) for one row."""
    return [
        (1, 0, 0),
        (1, 0, 3),
        (7, 0, 0),
        (7, 6, 0),
        (7, 3, 2),
        (n_big, 0, 0),
        (n_big, n_big - 1, 4),
    ]


def _batch_with_row(row, row_target, n, pos, pad, seed, make_row, make_target, pad_target):
    """A batch of ``n`` random rows with ``row`` at ``pos``, then ``pad`` padding rows."""
    rows = make_row(n + pad, seed)
    targets = make_target(n + pad, seed)
    rows[pos] = row
    targets[pos] = row_target
    if pad:
        targets[n:] = pad_target
    return rows, targets


def _row_results(fn, batch, targets, pos, reduction):
    leaf = _leaf(batch)
    loss = fn(leaf, targets, reduction)
    upstream = torch.ones_like(loss) if reduction == "none" else torch.ones_like(loss)
    (loss * upstream).sum().backward()
    row_loss = loss.detach()[pos] if reduction == "none" else None
    return row_loss, leaf.grad[pos]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between ``a`` and ``b`` in fp32 units in the last place."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max().item()


def _check_invariance(
    fn, make_row, make_target, pad_target, n_big, reductions=("none", "sum"), ulps=0
):
    row = make_row(1, 100)[0]
    row_target = make_target(1, 101)[0]
    for reduction in reductions:
        reference = None
        for i, (n, pos, pad) in enumerate(_placements(n_big)):
            batch, targets = _batch_with_row(
                row, row_target, n, pos, pad, 200 + i, make_row, make_target, pad_target
            )
            got = _row_results(fn, batch, targets, pos, reduction)
            if reference is None:
                reference = got
                continue
            where = f"reduction={reduction}, batch {n}, position {pos}, {pad} padding rows"
            if reduction == "none":
                assert _ulps(got[0], reference[0]) <= ulps, f"loss differs: {where}"
            assert _ulps(got[1], reference[1]) <= ulps, f"gradient differs: {where}"


# The torch backend's BCE is torch's elementwise CPU ops on the flattened batch, whose
# vectorized loops compute the tail of each range (the last numel % vector width elements,
# and the ends of the ranges split between threads) with the scalar functions, a few ulps
# from the vector ones: a row's gradient bits then depend on where it sits. Measured: up to 2
# ulps (1 and 2 threads). Its CE works row by row and is bitwise invariant in these tests.
TORCH_BACKEND_BCE_ULPS = 4


@pytest.mark.parametrize("threads", THREADS, indirect=True)
def test_batch_invariance_cross_entropy(backend_device, threads):
    backend, device = backend_device
    c = 37 if backend == "triton" else 1000
    weight = torch.rand(c, generator=generator(30)).to(device) + 0.5

    def fn(z, y, reduction):
        return fused_ce.cross_entropy(
            z, y, weight, reduction=reduction, label_smoothing=0.1, backend=backend
        )

    _check_invariance(
        fn,
        lambda n, seed: randn((n, c), seed, device, scale=3.0),
        lambda n, seed: torch.randint(0, c, (n,), generator=generator(seed)).to(device),
        -100,
        40 if backend == "triton" else 300,
    )


@pytest.mark.parametrize("threads", THREADS, indirect=True)
def test_batch_invariance_bce(backend_device, threads):
    backend, device = backend_device
    c = 37 if backend == "triton" else 1000
    pos_weight = torch.rand(c, generator=generator(31)).to(device) + 0.5

    def fn(z, t, reduction):
        return fused_ce.binary_cross_entropy_with_logits(
            z, t, reduction=reduction, pos_weight=pos_weight, backend=backend
        )

    # Padding rows of a BCE batch are rows with target 0 (BCE has no ignore_index).
    _check_invariance(
        fn,
        lambda n, seed: randn((n, c), seed, device, scale=3.0),
        lambda n, seed: torch.rand((n, c), generator=generator(seed)).to(device),
        0.0,
        40 if backend == "triton" else 300,
        ulps=TORCH_BACKEND_BCE_ULPS if backend == "torch" else 0,
    )


def _linear_cases(backend):
    cases = [{"batch_invariant": True}, {"batch_invariant": True, "chunk_size": 16}]
    if backend == "triton":
        cases.append({"path": "fused"})  # invariant by default: tiles of fixed shape
    return cases


@pytest.mark.parametrize("threads", THREADS, indirect=True)
def test_batch_invariance_linear_heads(backend_device, threads):
    backend, device = backend_device
    d, v = (16, 53) if backend == "triton" else (64, 1000)
    head = randn((v, d), 32, device, scale=0.3)
    bias = randn((v,), 33, device)
    make_row = lambda n, seed: randn((n, d), seed, device)  # noqa: E731
    make_target = lambda n, seed: torch.randint(0, v, (n,), generator=generator(seed)).to(device)  # noqa: E731
    for options in _linear_cases(backend):

        def ce(x, y, reduction, options=options):
            return fused_ce.linear_cross_entropy(
                x, head, y, linear_bias=bias, reduction=reduction, backend=backend, **options
            )

        def log_probs(x, y, reduction, options=options):
            return fused_ce.linear_log_probs(
                x, head, y, linear_bias=bias, backend=backend, **options
            )

        n_big = 40 if backend == "triton" else 300
        _check_invariance(ce, make_row, make_target, -100, n_big)
        _check_invariance(log_probs, make_row, make_target, -100, n_big, reductions=("none",))
        if "path" in options:
            continue  # the BCE head has no fused path

        def bce(x, t, reduction, options=options):
            return fused_ce.linear_binary_cross_entropy_with_logits(
                x, head, t, linear_bias=bias, reduction=reduction, backend=backend, **options
            )

        _check_invariance(
            bce,
            make_row,
            lambda n, seed: torch.rand((n, v), generator=generator(seed)).to(device),
            0.0,
            n_big,
            ulps=TORCH_BACKEND_BCE_ULPS if backend == "torch" else 0,
        )


def test_batch_invariance_top_k():
    head = randn((1000, 64), 34, "cpu", scale=0.3)
    row = randn((1, 64), 35, "cpu")
    alone = fused_ce.linear_top_k(row, head, 5, batch_invariant=True)
    for n, pos in ((7, 6), (300, 0), (300, 299)):
        batch = randn((n, 64), 36 + n, "cpu")
        batch[pos] = row[0]
        top = fused_ce.linear_top_k(batch, head, 5, batch_invariant=True)
        assert torch.equal(top.values[pos], alone.values[0])
        assert torch.equal(top.indices[pos], alone.indices[0])


def test_batch_invariant_bad_value():
    x, head, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="batch_invariant"):
        fused_ce.linear_cross_entropy(x, head, y, batch_invariant="yes")


def test_fixed_rows_opcheck():
    """The ops' batch-invariant flag (a trailing bool with a default) passes torch's custom-op
    checks: fake kernels, schema, autograd registration."""
    from fused_ce.ops import linear as ops

    x = randn((10, 8), 50, "cpu").requires_grad_()
    w = randn((13, 8), 51, "cpu").requires_grad_()
    b = randn((13,), 52, "cpu").requires_grad_()
    y = torch.randint(0, 13, (10,), generator=generator(53))
    bits = torch.rand(10, 13, generator=generator(54))
    scale = torch.tensor(0.1)
    options = (-100, 0.1, 1.0, 0.0)
    cases = [
        (ops.linear_ce_forward, (x, w, b, y, None, *options, True, 4, False, "torch", True)),
        (
            ops.linear_ce_scalar,
            (x.detach(), w.detach(), b.detach(), y, None, scale, *options, 4, "torch")
            + (True, True, True, False, True),
        ),
        (ops.linear_bce_forward, (x, w, b, bits, None, None, 4, "torch", True, True)),
        (
            ops.linear_bce_scalar,
            (x.detach(), w.detach(), b.detach(), bits, None, None, scale, 4, "torch")
            + (True, True, True, False, True),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_batch_invariant_matches_eager():
    x = randn((10, 8), 55, "cpu")
    w = randn((13, 8), 56, "cpu")
    y = torch.randint(0, 13, (10,), generator=generator(57))

    def loss_fn(x, w):
        ce = fused_ce.linear_cross_entropy(
            x, w, y, reduction="none", chunk_size=4, batch_invariant=True, backend="torch"
        )
        logp = fused_ce.linear_log_probs(x, w, y, chunk_size=4, batch_invariant=True)
        stats = fused_ce.linear_cross_entropy(x, w, y, return_stats=True, backend="torch")
        return ce.sum() - logp.sum() + stats.loss + stats.target_log_prob.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.detach().requires_grad_() for t in (x, w)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for eager, traced in zip(*results, strict=True):
        assert torch.equal(eager, traced)
