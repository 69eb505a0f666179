"""Multi-process worlds for tests/test_distributed.py: spawned ranks (gloo on CPU), each running
a list of cases and writing the failures it saw to a file the test then reads.

A world is costly (process start, ``import torch``), so one world runs many cases. Each case
compares what the vocab-parallel entry point gives on this rank with the single-process result
of ``fused_ce`` (itself held against torch by the other tests) on the concatenated tensors,
which every rank computes on its own, in float64 and tightly; bf16 cases hold both against a
float64 oracle with torch's own bf16 error as the bar.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import os
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Per-collective timeout: a case that leaves the ranks out of step fails instead of hanging.
TIMEOUT = datetime.timedelta(seconds=60)
REDUCTIONS = ("none", "mean", "sum")
F64 = {"rtol": 1e-10, "atol": 1e-12}

Case = tuple[str, Callable[[], None]]


def spawn(world: int, cases: str, workdir: str) -> list[str]:
    """Run the cases ``WORLDS[cases]`` lists on ``world`` spawned ranks; every rank's failures."""
    import torch.multiprocessing as mp

    init = os.path.join(workdir, "init")
    mp.start_processes(
        _rank_main, args=(world, cases, init, workdir), nprocs=world, start_method="spawn"
    )
    failures = []
    for rank in range(world):
        with open(os.path.join(workdir, f"rank{rank}.txt")) as file:
            failures += [text for text in file.read().split("\n\x00\n") if text]
    return failures


def _rank_main(rank: int, world: int, cases: str, init: str, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=TIMEOUT
    )
    failures = []
    try:
        for name, case in (case for listed in WORLDS[cases] for case in listed(rank, world)):
            try:
                case()
            except Exception as error:  # noqa: BLE001 - report each case's failure and go on
                failures.append(f"rank {rank}/{world}, {name}:\n{traceback.format_exc()}")
                if isinstance(error, dist.DistError) or "timed out" in str(error).lower():
                    # The ranks are out of step: each further case would wait out the timeout.
                    failures.append(f"rank {rank}/{world}: stopped after {name}")
                    break
    finally:
        # Every rank reaches destroy_process_group together (gloo aborts noisily otherwise);
        # ranks left out of step fail this barrier by its timeout, which is reported too.
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001
            failures.append(f"rank {rank}/{world}, final barrier:\n{traceback.format_exc()}")
        with open(os.path.join(workdir, f"rank{rank}.txt"), "w") as file:
            file.write("\n\x00\n".join(failures))
        dist.destroy_process_group()


# --------------------------------------------------------------------------- helpers


def _randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _class_target(shape, n_classes: int, seed: int, ignore_index: int | None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, n_classes, shape, generator=gen)
    if ignore_index is not None:
        ignored = torch.rand(shape, generator=gen) < 0.3
        target = torch.where(ignored, ignore_index, target)
    return target


def _prob_target(shape, class_dim: int, seed: int) -> torch.Tensor:
    return _randn(shape, seed).softmax(class_dim)


def _upstream(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    return torch.where(torch.rand(shape, generator=gen) < 0.3, -magnitude, magnitude)


def _layout(
    n_classes: int, world: int, rank: int, uneven: bool, empty_last: bool = False
) -> tuple[int, int, int | None]:
    """``(start, size, vocab_start_index)``: equal shards, or uneven ones passed explicitly
    (rank r gets about (r + 1) / (1 + 2 + ... + world) of the classes, the last rank the
    rest: 2, 4 and 6 of 12 for 3 ranks); ``empty_last``: the last rank holds no classes
    (starting at C), the others split them equally."""
    if empty_last:
        size = n_classes // (world - 1)
        start = min(rank * size, n_classes)
        return start, size if rank < world - 1 else 0, start
    if not uneven:
        size = n_classes // world
        return rank * size, size, None
    sizes = [max(1, (r + 1) * n_classes // (world * (world + 1) // 2)) for r in range(world)]
    sizes[-1] = n_classes - sum(sizes[:-1])
    start = sum(sizes[:rank])
    return start, sizes[rank], start


def _close(name: str, ours: torch.Tensor, reference: torch.Tensor, **tolerance) -> None:
    torch.testing.assert_close(
        ours.double(),
        reference.double(),
        equal_nan=True,
        **(tolerance or F64),
        msg=lambda message: f"{name}: {message}",
    )


def _objective(result, upstream_seed: int, own=None) -> torch.Tensor:
    """A random linear functional of the loss (and of the lse, when stats are returned), so
    the backward sees non-unit, per-row upstream gradients. ``own`` (the full batch shape and
    a function taking this rank's block) draws per-token upstream values for the whole batch
    and keeps this rank's (sequence parallelism)."""

    def upstream(value: torch.Tensor, seed: int) -> torch.Tensor:
        if own is None or value.dim() == 0:
            return _upstream(value.shape, seed)
        return own[1](_upstream(own[0], seed))

    loss = result if isinstance(result, torch.Tensor) else result.loss
    total = (loss.double() * upstream(loss, upstream_seed)).sum()
    if not isinstance(result, torch.Tensor):
        total = total + (result.lse.double() * upstream(result.lse, upstream_seed + 1)).sum()
    return total


def _compare_results(ours, reference, own=None, **tolerance) -> None:
    """Loss (and stats) of this rank against the single-process ones."""
    pick = own if own is not None else (lambda t: t)
    if isinstance(reference, torch.Tensor):
        _close("loss", ours, reference if reference.dim() == 0 else pick(reference), **tolerance)
        return
    for field in ("loss", "z_loss"):
        ref = getattr(reference, field)
        _close(field, getattr(ours, field), ref if ref.dim() == 0 else pick(ref), **tolerance)
    for field in ("lse", "entropy"):
        _close(field, getattr(ours, field), pick(getattr(reference, field)), **tolerance)
    _close("accuracy", ours.accuracy, reference.accuracy)


# --------------------------------------------------------------------------- cross-entropy


def _ce_case(
    rank: int,
    world: int,
    *,
    shape: tuple[int, ...] = (6, 12),
    uneven: bool = False,
    empty_last: bool = False,
    options: dict | None = None,
    prob: bool = False,
    ignored: bool = True,
    all_ignored: bool = False,
    seed: int = 0,
    logits: torch.Tensor | None = None,
) -> None:
    from fused_ce import cross_entropy
    from fused_ce.distributed import vocab_parallel_cross_entropy

    options = dict(options or {})
    if logits is not None:
        shape = tuple(logits.shape)
    class_dim = 0 if len(shape) == 1 else 1
    n_classes = shape[class_dim]
    batch = shape[:class_dim] + shape[class_dim + 1 :]
    start, size, vocab_start_index = _layout(n_classes, world, rank, uneven, empty_last)
    full = logits if logits is not None else _randn(shape, seed, scale=3.0)
    ignore_index = options.get("ignore_index", -100)
    if prob:
        target = _prob_target(shape, class_dim, seed + 1)
    else:
        target = _class_target(batch, n_classes, seed + 1, ignore_index if ignored else None)
        if all_ignored:
            target = torch.full_like(target, ignore_index)
    if options.pop("weighted", False):
        options["weight"] = _randn(n_classes, seed + 2).abs() + 0.25

    local = full.narrow(class_dim, start, size).clone().requires_grad_()
    local_target = target.narrow(class_dim, start, size).clone() if prob else target
    if prob:
        local_target.requires_grad_()
    ours = vocab_parallel_cross_entropy(
        local, local_target, vocab_start_index=vocab_start_index, **options
    )
    leaf = full.clone().requires_grad_()
    ref_target = target.clone().requires_grad_() if prob else target
    reference = cross_entropy(leaf, ref_target, backend="torch", **options)
    _compare_results(ours, reference)
    wrt = [local, local_target] if prob else [local]
    ref_wrt = [leaf, ref_target] if prob else [leaf]
    grads = torch.autograd.grad(_objective(ours, seed + 3), wrt)
    ref_grads = torch.autograd.grad(_objective(reference, seed + 3), ref_wrt)
    for name, grad, ref in zip(("input", "target"), grads, ref_grads, strict=False):
        _close(f"grad {name}", grad, ref.narrow(class_dim, start, size))


def _ce_bf16_case(rank: int, world: int, uneven: bool) -> None:
    """bf16 logits: the error against the fp64 oracle is within 2x torch's own bf16 error."""
    from fused_ce.distributed import vocab_parallel_cross_entropy

    n_classes = 24
    start, size, vocab_start_index = _layout(n_classes, world, rank, uneven)
    full = _randn((16, n_classes), 7, scale=4.0).bfloat16()
    target = _class_target((16,), n_classes, 8, -100)
    upstream = _upstream((16,), 9)

    def run(logits, fn):
        leaf = logits.clone().requires_grad_()
        loss = fn(leaf)
        (grad,) = torch.autograd.grad(loss, leaf, upstream.to(loss.dtype))
        return loss.detach().double(), grad.double()

    def torch_loss(x):
        return F.cross_entropy(x, target, reduction="none", label_smoothing=0.1)

    oracle = run(full.double(), torch_loss)
    torch_bf16 = run(full, torch_loss)
    ours = run(
        full[:, start : start + size],
        lambda x: vocab_parallel_cross_entropy(
            x, target, reduction="none", label_smoothing=0.1, vocab_start_index=vocab_start_index
        ),
    )
    for name, value, theirs, ref in (
        ("loss", ours[0], torch_bf16[0], oracle[0]),
        (
            "grad",
            ours[1],
            torch_bf16[1][:, start : start + size],
            oracle[1][:, start : start + size],
        ),
    ):
        tiny = torch.finfo(torch.bfloat16).eps * max(float(ref.abs().max()), 1.0)
        error = float((value - ref).abs().max())
        bar = 2 * float((theirs - ref).abs().max()) + tiny
        assert error <= bar, f"bf16 {name}: error {error} > 2 x torch's + tiny = {bar}"


def _ce_cases(rank: int, world: int) -> Iterator[Case]:
    uneven = world == 3
    option_sets = {
        "plain": {},
        "weight": {"weighted": True},
        "ignore_index=2": {"ignore_index": 2},
        "smoothing": {"label_smoothing": 0.2},
        "smoothing+weight": {"label_smoothing": 0.2, "weighted": True},
        "scale+softcap": {"logit_scale": 1.7, "softcap": 2.5},
        "z_loss+stats": {"z_loss": 0.01, "return_stats": True},
        "everything": {
            "weighted": True,
            "label_smoothing": 0.1,
            "logit_scale": 0.8,
            "softcap": 4.0,
            "z_loss": 0.02,
            "return_stats": True,
        },
    }
    for reduction in REDUCTIONS:
        for label, options in option_sets.items():
            options = {**options, "reduction": reduction}
            yield (
                f"ce {label} {reduction}",
                lambda o=options: _ce_case(rank, world, uneven=uneven, options=o),
            )
            yield (
                f"ce prob {label} {reduction}",
                lambda o=options: _ce_case(
                    rank, world, uneven=uneven, options={**o, "ignore_index": -100}, prob=True
                ),
            )
    yield "ce all ignored mean", lambda: _ce_case(rank, world, uneven=uneven, all_ignored=True)
    yield (
        "ce all ignored stats",
        lambda: _ce_case(
            rank, world, uneven=uneven, all_ignored=True, options={"return_stats": True}
        ),
    )
    yield (
        "ce N-D",
        lambda: _ce_case(
            rank,
            world,
            shape=(3, 12, 2),
            uneven=uneven,
            options={"return_stats": True, "label_smoothing": 0.1, "reduction": "none"},
        ),
    )
    yield (
        "ce N-D prob",
        lambda: _ce_case(
            rank, world, shape=(3, 12, 2), uneven=uneven, prob=True, options={"z_loss": 0.01}
        ),
    )
    yield (
        "ce 1-D",
        lambda: _ce_case(rank, world, shape=(12,), uneven=uneven, options={"return_stats": True}),
    )
    # Ties: the max sits in several ranks' slices; torch's argmax takes the first index.
    tied = torch.zeros(4, 12, dtype=torch.float64)
    tied[:, ::5] = 2.0
    yield (
        "ce argmax ties",
        lambda: _ce_case(rank, world, uneven=uneven, logits=tied, options={"return_stats": True}),
    )
    yield (
        "ce prob target ties",
        lambda: _ce_case(
            rank, world, uneven=uneven, logits=tied, prob=True, options={"return_stats": True}
        ),
    )
    yield (
        "ce extreme logits",
        lambda: _ce_case(rank, world, uneven=uneven, logits=_randn((5, 12), 3, scale=1e4)),
    )
    # A slice of -inf on rank 0 (finite loss, exactly as one process); +inf gives NaN, as torch.
    non_finite = _randn((3, 12), 4)
    non_finite[0, :6] = -torch.inf
    non_finite[1, 7] = torch.inf
    yield (
        "ce -inf slice, +inf logit",
        lambda: _ce_case(
            rank,
            world,
            uneven=uneven,
            logits=non_finite,
            ignored=False,
            options={"return_stats": True, "reduction": "none"},
        ),
    )
    yield "ce bf16", lambda: _ce_bf16_case(rank, world, uneven)
    for kind in ("fp32 transposed", "uint8", "empty"):
        yield f"ce {kind}", lambda k=kind: _ce_layout_case(rank, world, uneven, k)


def _ce_layout_case(rank: int, world: int, uneven: bool, kind: str) -> None:
    """Layouts and dtypes beside the fp64 grid: fp32 logits read through a transposed view,
    uint8 targets, an empty batch."""
    from fused_ce import cross_entropy
    from fused_ce.distributed import vocab_parallel_cross_entropy

    n_rows = 0 if kind == "empty" else 5
    start, size, vocab_start_index = _layout(12, world, rank, uneven)
    full = _randn((n_rows, 12), 100, scale=2.0)
    target = _class_target((n_rows,), 12, 101, -100)
    tolerance = {}
    if kind == "fp32 transposed":
        full = full.float()
        tolerance = {"rtol": 1e-5, "atol": 1e-6}
        local = full[:, start : start + size].t().contiguous().t().requires_grad_()
        assert not local.is_contiguous()
    else:
        local = full[:, start : start + size].clone().requires_grad_()
    if kind == "uint8":
        target = torch.where(target < 0, 255, target).to(torch.uint8)
    for reduction in REDUCTIONS:
        options = {"reduction": reduction, "label_smoothing": 0.1}
        if kind == "uint8":
            options["ignore_index"] = 255
        local.grad = None
        loss = vocab_parallel_cross_entropy(
            local, target, vocab_start_index=vocab_start_index, **options
        )
        leaf = full.clone().requires_grad_()
        reference = cross_entropy(leaf, target, backend="torch", **options)
        _close(f"loss {reduction}", loss, reference, **tolerance)
        upstream = _upstream(loss.shape, 102).to(loss.dtype)
        (grad,) = torch.autograd.grad(loss, local, upstream)
        (ref_grad,) = torch.autograd.grad(reference, leaf, upstream)
        _close(f"grad {reduction}", grad, ref_grad[:, start : start + size], **tolerance)


# --------------------------------------------------------------------------- linear head


def _linear_case(
    rank: int,
    world: int,
    *,
    n_rows: int = 6,
    n_features: int = 5,
    n_classes: int = 12,
    uneven: bool = False,
    empty_last: bool = False,
    sequence_parallel: bool = False,
    bias: bool = True,
    prob: bool = False,
    options: dict | None = None,
    chunk_size: int | None = None,
    seed: int = 10,
) -> None:
    from fused_ce import linear_cross_entropy
    from fused_ce.distributed import vocab_parallel_linear_cross_entropy

    options = dict(options or {})
    start, size, vocab_start_index = _layout(n_classes, world, rank, uneven, empty_last)
    x = _randn((n_rows, n_features), seed)
    w = _randn((n_classes, n_features), seed + 1)
    b = _randn(n_classes, seed + 2) if bias else None
    if prob:
        target = _prob_target((n_rows, n_classes), 1, seed + 3)
    else:
        target = _class_target((n_rows,), n_classes, seed + 3, options.get("ignore_index", -100))
    if options.pop("weighted", False):
        options["weight"] = _randn(n_classes, seed + 4).abs() + 0.25

    block = n_rows // world
    tokens = slice(rank * block, (rank + 1) * block) if sequence_parallel else slice(None)
    local_x = x[tokens].clone().requires_grad_()
    local_w = w[start : start + size].clone().requires_grad_()
    local_b = b[start : start + size].clone().requires_grad_() if bias else None
    if prob:  # this rank's classes, of every token (also with sequence parallelism)
        local_target = target[:, start : start + size].clone().requires_grad_()
    else:
        local_target = target[tokens]
    ours = vocab_parallel_linear_cross_entropy(
        local_x,
        local_w,
        local_target,
        linear_bias=local_b,
        vocab_start_index=vocab_start_index,
        sequence_parallel=sequence_parallel,
        chunk_size=chunk_size,
        **options,
    )
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    if bias:
        leaves.append(b.clone().requires_grad_())
    ref_target = target.clone().requires_grad_() if prob else target
    reference = linear_cross_entropy(
        leaves[0],
        leaves[1],
        ref_target,
        linear_bias=leaves[2] if bias else None,
        backend="torch",
        **options,
    )
    own = None
    if sequence_parallel:
        own = ((n_rows,), lambda t: t[tokens])
    _compare_results(ours, reference, own=own[1] if own else None)
    wrt = [local_x, local_w] + ([local_b] if bias else []) + ([local_target] if prob else [])
    ref_wrt = leaves + ([ref_target] if prob else [])
    grads = torch.autograd.grad(_objective(ours, seed + 5, own), wrt)
    ref_grads = torch.autograd.grad(_objective(reference, seed + 5), ref_wrt)
    _close("grad input", grads[0], ref_grads[0][tokens])
    _close("grad linear_weight", grads[1], ref_grads[1][start : start + size])
    if bias:
        _close("grad linear_bias", grads[2], ref_grads[2][start : start + size])
    if prob:
        _close("grad target", grads[-1], ref_grads[-1][:, start : start + size])


def _linear_nd_case(rank: int, world: int, uneven: bool, sequence_parallel: bool) -> None:
    """``(B, T, D)`` features; with sequence parallelism each rank holds 2 of the B blocks."""
    from fused_ce import linear_cross_entropy
    from fused_ce.distributed import vocab_parallel_linear_cross_entropy

    start, size, vocab_start_index = _layout(12, world, rank, uneven)
    x = _randn((2 * world, 3, 4), 110)
    w = _randn((12, 4), 111)
    target = _class_target((2 * world, 3), 12, 112, -100)
    block = slice(2 * rank, 2 * rank + 2) if sequence_parallel else slice(None)
    local_x = x[block].clone().requires_grad_()
    local_w = w[start : start + size].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(
        local_x,
        local_w,
        target[block],
        vocab_start_index=vocab_start_index,
        sequence_parallel=sequence_parallel,
        reduction="none",
        chunk_size=4,
    )
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    reference = linear_cross_entropy(*leaves, target, reduction="none", backend="torch")
    _close("loss", loss, reference[block])
    upstream = _upstream(reference.shape, 113)
    grads = torch.autograd.grad(loss, [local_x, local_w], upstream[block])
    ref_grads = torch.autograd.grad(reference, leaves, upstream)
    _close("grad input", grads[0], ref_grads[0][block])
    _close("grad linear_weight", grads[1], ref_grads[1][start : start + size])


def _linear_bf16_case(rank: int, world: int, uneven: bool) -> None:
    """bf16 head: loss and every gradient within 2x torch's own bf16 error (fp64 oracle)."""
    from fused_ce.distributed import vocab_parallel_linear_cross_entropy

    start, size, vocab_start_index = _layout(24, world, rank, uneven)
    x = _randn((8, 16), 120).bfloat16()
    w = _randn((24, 16), 121, scale=0.5).bfloat16()
    target = _class_target((8,), 24, 122, -100)

    def run(inputs, fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        return [loss.detach().double()] + [g.double() for g in torch.autograd.grad(loss, leaves)]

    def torch_loss(x, w):
        return F.cross_entropy(F.linear(x, w), target, label_smoothing=0.1)

    oracle = run([x.double(), w.double()], torch_loss)
    torch_bf16 = run([x, w], torch_loss)
    ours = run(
        [x, w[start : start + size]],
        lambda x, w: vocab_parallel_linear_cross_entropy(
            x, w, target, label_smoothing=0.1, vocab_start_index=vocab_start_index
        ),
    )
    mine = slice(start, start + size)
    # The loss in fp32, as the single-process heads give it: never rounded to bf16.
    loss_dtype = vocab_parallel_linear_cross_entropy(
        x, w[mine], target, label_smoothing=0.1, vocab_start_index=vocab_start_index
    ).dtype
    assert loss_dtype == torch.float32, f"bf16 head: loss dtype {loss_dtype}, expected fp32"
    for name, value, theirs, ref in (
        ("loss", ours[0], torch_bf16[0], oracle[0]),
        ("grad input", ours[1], torch_bf16[1], oracle[1]),
        ("grad linear_weight", ours[2], torch_bf16[2][mine], oracle[2][mine]),
    ):
        tiny = torch.finfo(torch.bfloat16).eps * max(float(ref.abs().max()), 1.0)
        error = float((value - ref).abs().max())
        bar = 2 * float((theirs - ref).abs().max()) + tiny
        assert error <= bar, f"bf16 {name}: error {error} > 2 x torch's + tiny = {bar}"


def _linear_cases(rank: int, world: int) -> Iterator[Case]:
    uneven = world == 3
    option_sets = {
        "plain": {},
        "weight+smoothing": {"weighted": True, "label_smoothing": 0.1},
        "options+stats": {
            "logit_scale": 1.3,
            "softcap": 3.0,
            "z_loss": 0.01,
            "return_stats": True,
            "ignore_index": 1,
        },
    }
    for sequence_parallel in (False, True):
        for reduction in REDUCTIONS:
            for label, options in option_sets.items():
                options = {**options, "reduction": reduction}
                yield (
                    f"linear {label} {reduction} sp={sequence_parallel}",
                    lambda o=options, sp=sequence_parallel: _linear_case(
                        rank, world, uneven=uneven, sequence_parallel=sp, options=o, chunk_size=2
                    ),
                )
        yield (
            f"linear prob sp={sequence_parallel}",
            lambda sp=sequence_parallel: _linear_case(
                rank,
                world,
                uneven=uneven,
                sequence_parallel=sp,
                prob=True,
                options={"label_smoothing": 0.1, "return_stats": True, "reduction": "none"},
            ),
        )
    for sequence_parallel in (False, True):
        yield (
            f"linear (B, T, D) sp={sequence_parallel}",
            lambda sp=sequence_parallel: _linear_nd_case(rank, world, uneven, sp),
        )
    yield "linear bf16", lambda: _linear_bf16_case(rank, world, uneven)
    yield (
        "linear no bias, one chunk",
        lambda: _linear_case(rank, world, uneven=uneven, bias=False),
    )


# --------------------------------------------------------------------------- DTensor, errors


def _dtensor_cases(rank: int, world: int) -> Iterator[Case]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    from fused_ce import cross_entropy, linear_cross_entropy
    from fused_ce.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    mesh = init_device_mesh("cpu", (world,))

    def logits_case(n_classes: int, shape_tail: tuple[int, ...] = ()):
        full = _randn((4, n_classes, *shape_tail), 20, scale=2.0)
        target = _class_target((4, *shape_tail), n_classes, 21, -100)
        sharded = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
        loss = vocab_parallel_cross_entropy(sharded, target, label_smoothing=0.1)
        leaf = full.clone().requires_grad_()
        reference = cross_entropy(leaf, target, label_smoothing=0.1, backend="torch")
        _close("loss", loss, reference)
        loss.backward()
        reference.backward()
        _close("grad", sharded.grad.full_tensor(), leaf.grad)

    def head_case():
        x = _randn((5, 4), 22)
        w = _randn((7, 4), 23)
        target = _class_target((5,), 7, 24, -100)
        sharded = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        replicated_x = distribute_tensor(x, mesh, [Replicate()]).requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(replicated_x, sharded, target, z_loss=0.01)
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        reference = linear_cross_entropy(*leaves, target, z_loss=0.01, backend="torch")
        _close("loss", loss, reference)
        loss.backward()
        reference.backward()
        _close("grad linear_weight", sharded.grad.full_tensor(), leaves[1].grad)
        _close("grad input", replicated_x.grad.full_tensor(), leaves[0].grad)

    yield "dtensor logits, even", lambda: logits_case(4 * world)
    # torch.chunk's split: 7 classes over 2 ranks is 4 + 3, over 3 ranks 3 + 3 + 1.
    yield "dtensor logits, uneven, N-D", lambda: logits_case(7, (2,))
    # torch.chunk's split of fewer classes: 1 over 2 ranks is 1 + 0, 4 over 3 is 2 + 2 + 0.
    yield "dtensor logits, the last rank holds none", lambda: logits_case(3 * world - 5)
    yield "dtensor linear head (uneven rows)", head_case


def _expect_error(fn: Callable[[], object], fragment: str) -> None:
    try:
        fn()
    except (RuntimeError, ValueError, TypeError) as error:
        assert fragment in str(error), f"expected {fragment!r} in the error, got {error!r}"
        return
    raise AssertionError(f"no error; expected one containing {fragment!r}")


def _error_cases(rank: int, world: int) -> Iterator[Case]:
    from fused_ce import cross_entropy
    from fused_ce.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    logits = _randn((4, 3), 30)
    target = torch.tensor([0, 1, 2, 3])
    # Raised on every rank before any collective (so no rank is left waiting).
    yield (
        "error: int32 target",
        lambda: _expect_error(lambda: vocab_parallel_cross_entropy(logits, target.int()), "target"),
    )
    yield (
        "error: bad reduction",
        lambda: _expect_error(
            lambda: vocab_parallel_cross_entropy(logits, target, reduction="avg"), "reduction"
        ),
    )
    yield (
        "error: vocab_start_index type",
        lambda: _expect_error(
            lambda: vocab_parallel_cross_entropy(logits, target, vocab_start_index=1.5),
            "vocab_start_index",
        ),
    )
    yield (
        "error: linear_weight shape",
        lambda: _expect_error(
            lambda: vocab_parallel_linear_cross_entropy(logits, logits[:, :2], target),
            "linear_weight",
        ),
    )
    # Raised on every rank after the exchange, from the same gathered header.
    yield (
        "error: slices that overlap (every rank starts at 0)",
        lambda: _expect_error(
            lambda: vocab_parallel_cross_entropy(logits, target, vocab_start_index=0),
            "do not tile",
        ),
    )
    uneven = _randn((4, 2 + rank), 31)
    yield (
        "error: unequal shards without vocab_start_index",
        lambda: _expect_error(lambda: vocab_parallel_cross_entropy(uneven, target), "do not tile"),
    )
    last = rank == world - 1
    yield (
        "error: a rank holding no classes starts past C",
        lambda: _expect_error(
            lambda: vocab_parallel_cross_entropy(
                logits[:, :0] if last else logits,
                target % 3,
                weight=torch.ones(3 * world - 3, dtype=torch.float64),
                vocab_start_index=100 if last else None,
            ),
            "do not tile",
        ),
    )
    yield (
        "error: targets differ across ranks",
        lambda: _expect_error(
            lambda: vocab_parallel_cross_entropy(logits, (target + rank) % 3), "differs across"
        ),
    )
    yield (
        "error: target out of bounds",
        lambda: _expect_error(
            lambda: vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 2, 3 * world])),
            "out of bounds",
        ),
    )
    yield (
        "error: weight shorter than the classes",
        lambda: _expect_error(
            lambda: vocab_parallel_cross_entropy(
                logits, target % 3, weight=torch.ones(3 * world - 1, dtype=torch.float64)
            ),
            f"weight: should be defined for all {3 * world} classes",
        ),
    )

    def double_backward():
        local = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target % 3, reduction="none")
        upstream = torch.ones_like(loss, requires_grad=True)
        (grad,) = torch.autograd.grad(loss, local, upstream, create_graph=True)
        grad.sum().backward()

    yield (
        "error: double backward",
        lambda: _expect_error(double_backward, "differentiate twice"),
    )

    def group_of_one():
        groups = [dist.new_group([r]) for r in range(world)]
        full = _randn((5, 6), 32)
        tgt = _class_target((5,), 6, 33, -100)
        ours = vocab_parallel_cross_entropy(full, tgt, group=groups[rank], z_loss=0.1)
        _close("loss", ours, cross_entropy(full, tgt, z_loss=0.1, backend="torch"))

    yield "group of one rank", group_of_one


# --------------------------------------------------------------------------- edges


def _odd_rows_case(
    rank: int, world: int, *, linear: bool, n_rows: int, dtype, stats: bool, smoothing: float
) -> None:
    """A row count whose per-row statistics take a number of bytes that is not a multiple of 8
    (an odd number of rows and of fp32 columns: 3 without smoothing and stats, 5 with both),
    in every dtype, with and without the int64 argmax columns: the loss within 2x torch's own
    error at that dtype (fp64 oracle), the stats as one process's."""
    from fused_ce import cross_entropy, linear_cross_entropy
    from fused_ce.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    n_classes = 4 * world
    start, size, vocab_start_index = _layout(n_classes, world, rank, uneven=world == 3)
    target = _class_target((n_rows,), n_classes, 131, -100)
    options = {"reduction": "none", "label_smoothing": smoothing}
    if linear:
        x = _randn((n_rows, 3), 132).to(dtype)
        w = _randn((n_classes, 3), 133).to(dtype)
        ours = vocab_parallel_linear_cross_entropy(
            x,
            w[start : start + size],
            target,
            vocab_start_index=vocab_start_index,
            return_stats=stats,
            **options,
        )
        single = linear_cross_entropy(x, w, target, return_stats=True, backend="torch", **options)
        logits = F.linear(x, w)
        oracle_logits = F.linear(x.double(), w.double())
    else:
        logits = _randn((n_rows, n_classes), 130, scale=2.0).to(dtype)
        ours = vocab_parallel_cross_entropy(
            logits[:, start : start + size],
            target,
            vocab_start_index=vocab_start_index,
            return_stats=stats,
            **options,
        )
        single = cross_entropy(logits, target, return_stats=True, backend="torch", **options)
        oracle_logits = logits.double()
    loss = ours.loss if stats else ours
    # The CE keeps the logits' dtype (torch's rule); the linear head, as the single-process one,
    # gives its loss in the accumulation dtype.
    assert loss.dtype == (single.loss.dtype if linear else dtype), loss.dtype
    oracle = F.cross_entropy(oracle_logits, target, **options)
    theirs = F.cross_entropy(logits, target, **options).double()
    tiny = torch.finfo(dtype).eps * max(float(oracle.abs().max()), 1.0)
    error = float((loss.double() - oracle).abs().max())
    bar = 2 * float((theirs - oracle).abs().max()) + tiny
    assert error <= bar, f"loss: error {error} > 2 x torch's + tiny = {bar}"
    if stats:
        tolerance = F64 if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
        for field in ("lse", "entropy"):
            _close(field, getattr(ours, field), getattr(single, field), **tolerance)
        _close("accuracy", ours.accuracy, single.accuracy)


def _odd_rows_cases(rank: int, world: int) -> Iterator[Case]:
    """Row counts whose packed statistics are not 8-byte multiples, in every dtype (#23: 5 rows
    of fp32 raised "storage_offset() must be divisible by 8")."""
    from fused_ce import cross_entropy
    from fused_ce.distributed import vocab_parallel_cross_entropy

    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    for linear, n_rows, dtype, stats, smoothing in itertools.product(
        (False, True), (1, 5), dtypes, (False, True), (0.0, 0.1)
    ):
        yield (
            f"{'linear' if linear else 'ce'} {n_rows} rows {dtype} stats={stats} "
            f"smoothing={smoothing}",
            lambda li=linear, n=n_rows, d=dtype, st=stats, sm=smoothing: _odd_rows_case(
                rank, world, linear=li, n_rows=n, dtype=d, stats=st, smoothing=sm
            ),
        )

    def odd_rows_group_of_one():
        # One rank: the gathered buffer is the rank's own, read back in place.
        groups = [dist.new_group([r]) for r in range(world)]
        logits = _randn((5, 6), 134).float()
        target = _class_target((5,), 6, 135, -100)
        for stats in (False, True):
            ours = vocab_parallel_cross_entropy(
                logits, target, group=groups[rank], return_stats=stats
            )
            reference = cross_entropy(logits, target, return_stats=stats, backend="torch")
            _compare_results(ours, reference, rtol=1e-5, atol=1e-6)

    yield "5 rows fp32, a group of one rank", odd_rows_group_of_one


def _empty_shard_cases(rank: int, world: int) -> Iterator[Case]:
    """A rank that holds no classes (#23: "cannot reshape tensor of 0 elements"; shard_range
    gives such ranks when C < world): one process's result."""
    everything = {
        "weighted": True,
        "label_smoothing": 0.1,
        "logit_scale": 0.8,
        "softcap": 4.0,
        "z_loss": 0.02,
        "return_stats": True,
    }
    for reduction in REDUCTIONS:
        options = {**everything, "reduction": reduction}
        yield (
            f"ce, the last rank holds no classes, {reduction}",
            lambda o=options: _ce_case(rank, world, empty_last=True, options=o),
        )
        yield (
            f"ce prob, the last rank holds no classes, {reduction}",
            lambda o=options: _ce_case(rank, world, empty_last=True, prob=True, options=o),
        )
        for sequence_parallel in (False, True):
            yield (
                f"linear, the last rank holds no classes, {reduction} sp={sequence_parallel}",
                lambda o=options, sp=sequence_parallel: _linear_case(
                    rank, world, empty_last=True, sequence_parallel=sp, options=o, chunk_size=2
                ),
            )
    yield (
        "ce N-D, the last rank holds no classes",
        lambda: _ce_case(
            rank, world, shape=(3, 12, 2), empty_last=True, options={"return_stats": True}
        ),
    )
    yield (
        "linear prob, the last rank holds no classes",
        lambda: _linear_case(
            rank, world, empty_last=True, prob=True, options={"label_smoothing": 0.1}
        ),
    )


# --------------------------------------------------------------------------- disagreement


def _expect_same_error(fn: Callable[[], object], *fragments: str) -> None:
    """``fn`` raises on every rank, the same error (type and message), containing
    ``fragments``; the ranks are still in step afterwards (the comparison is a collective)."""
    try:
        fn()
    except (RuntimeError, ValueError, TypeError) as error:
        raised = f"{type(error).__name__}: {error}"
    else:
        raised = "no error"
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, raised)
    assert all(text == raised for text in every), f"the ranks raised differently: {every}"
    for fragment in fragments:
        assert fragment in raised, f"expected {fragment!r} in the error, got {raised}"


def _disagreement_cases(rank: int, world: int) -> Iterator[Case]:
    """Ranks whose arguments disagree, or of which one rejects its arguments: the same error on
    every rank, naming the argument (and the rank), where gloo aborted the process (a size it
    did not expect) or the others waited out the timeout (#23 item 3)."""
    from fused_ce import cross_entropy
    from fused_ce.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    n_classes = 4 * world
    logits = _randn((6, 4), 140)
    target = _class_target((6,), n_classes, 141, -100)
    x = _randn((6, 3), 142)
    w = _randn((4, 3), 143)

    def ce(logits=logits, target=target, **options):
        return lambda: vocab_parallel_cross_entropy(logits, target, **options)

    def linear(x=x, target=target, **options):
        return lambda: vocab_parallel_linear_cross_entropy(x, w, target, **options)

    first = rank == 0
    last = rank == world - 1
    rows = (2, 3) if first else (3, 2)
    kept = target.clamp(min=0)
    cases = {
        "rows": (
            ce(logits=logits[: 5 + rank], target=target[: 5 + rank]),
            "input: the number of rows differs",
        ),
        "dtype": (ce(logits=logits if first else logits.float()), "input: the dtype differs"),
        "label_smoothing": (
            ce(label_smoothing=0.1 if first else 0.0),
            "label_smoothing: the value differs",
        ),
        "return_stats": (ce(return_stats=first), "return_stats: the value differs"),
        "reduction": (ce(reduction="sum" if first else "mean"), "reduction: the value differs"),
        "ignore_index": (ce(target=kept, ignore_index=2 + rank), "ignore_index: the value differs"),
        "softcap": (ce(softcap=None if first else 5.0), "softcap: the value differs"),
        "N-D shape": (
            ce(
                logits=logits.view(*rows, 4).movedim(2, 1),
                target=target.view(rows),
            ),
            "input: the shape outside the class dim differs",
        ),
        "class weights": (
            ce(weight=torch.ones(n_classes, dtype=torch.float64) + rank),
            "weight: the digest of the values differs",
        ),
        "class weights on one rank only": (
            ce(weight=torch.ones(n_classes, dtype=torch.float64) if first else None),
            "weight: the dtype differs",
        ),
        "targets": (ce(target=(target + rank) % n_classes), "target: the digest"),
        "target dtype": (
            ce(target=kept if first else kept.to(torch.uint8)),
            "target: the dtype differs",
        ),
        "a bad vocab_start_index on one rank": (
            ce(vocab_start_index=-1 if last else None),
            "vocab_start_index: expected >= 0, got -1",
            f"raised on rank {world - 1} of the group of {world}",
        ),
        "a bad target dtype on rank 0, a bad reduction on rank 1": (
            ce(target=target.int()) if first else ce(reduction="avg"),
            "target:",
            f"raised on ranks {', '.join(map(str, range(world)))}, first rank 0",
        ),
        "different functions": (
            ce() if first else linear(),
            "group: the ranks of the group called different functions",
        ),
        "sequence_parallel, different token counts": (
            linear(x=x[: 2 + rank], target=target[: 2 + rank], sequence_parallel=True),
            "input: the number of rows differs",
        ),
        "sequence_parallel on one rank only": (
            linear(sequence_parallel=first),
            "sequence_parallel: the value differs",
        ),
        "linear, label_smoothing": (
            linear(label_smoothing=0.1 if first else 0.0),
            "label_smoothing: the value differs",
        ),
        "linear, input gradient wanted on one rank only": (
            linear(x=x.clone().requires_grad_(first)),
            "input: whether its gradient is wanted differs",
        ),
    }
    for name, (fn, *fragments) in cases.items():
        yield f"disagree: {name}", lambda f=fn, fr=fragments: _expect_same_error(f, *fr)

    def agreeing_call():
        # Still in step, and a call that agrees gives one process's loss (every rank holds the
        # same 4 classes' logits, so the full logits repeat them).
        full = torch.cat([logits] * world, 1)
        _close("loss", ce()(), cross_entropy(full, target, backend="torch"))

    yield "agree after the disagreements", agreeing_call


# --------------------------------------------------------------------------- DDP, FSDP2


class _Net(torch.nn.Module):
    def __init__(self, n_features: int, n_hidden: int, n_classes: int) -> None:
        import fused_ce.nn

        super().__init__()
        self.body = torch.nn.Linear(n_features, n_hidden, dtype=torch.float64)
        self.head = fused_ce.nn.LinearCrossEntropyLoss(
            n_hidden, n_classes, dtype=torch.float64, backend="torch"
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)), target)


def _train(model, batches, sgd_lr: float = 0.5) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=sgd_lr)
    for x, target in batches:
        optimizer.zero_grad()
        model(x, target).backward()
        optimizer.step()


def _data_parallel_cases(rank: int, world: int) -> Iterator[Case]:
    torch.manual_seed(0)
    reference = _Net(6, 8, 10)
    batches = [
        (_randn((4 * world, 6), 40 + step), _class_target((4 * world,), 10, 50 + step, None))
        for step in range(3)
    ]
    single = copy.deepcopy(reference)
    _train(single, batches)
    mine = [(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]) for x, y in batches]

    def ddp():
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(copy.deepcopy(reference))
        _train(model, mine)
        for (name, p), q in zip(model.module.named_parameters(), single.parameters(), strict=True):
            _close(f"DDP {name}", p, q)

    def fsdp():
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import init_device_mesh

        model = copy.deepcopy(reference)
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.body, mesh=mesh)
        fully_shard(model, mesh=mesh)
        _train(model, mine)
        for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
            _close(f"FSDP2 {name}", p.full_tensor(), q)

    yield "DDP training", ddp
    yield "FSDP2 training", fsdp


# --------------------------------------------------------------------------- nn modules


def _module_cases(rank: int, world: int) -> Iterator[Case]:
    import fused_ce.nn
    from fused_ce.distributed import shard_range

    def ce_module():
        n_classes = 7  # torch.chunk's split: uneven for 2 and 3 ranks
        start, size = shard_range(n_classes)
        full = _randn((5, n_classes), 60)
        target = _class_target((5,), n_classes, 61, -100)
        weight = _randn(n_classes, 62).abs() + 0.5
        options = {"weight": weight, "label_smoothing": 0.1, "z_loss": 0.01}
        local = full[:, start : start + size].clone().requires_grad_()
        loss = fused_ce.nn.VocabParallelCrossEntropyLoss(vocab_start_index=start, **options)(
            local, target
        )
        leaf = full.clone().requires_grad_()
        reference = fused_ce.nn.CrossEntropyLoss(backend="torch", **options)(leaf, target)
        _close("loss", loss, reference)
        loss.backward()
        reference.backward()
        _close("grad", local.grad, leaf.grad[:, start : start + size])

    def head_from_linear_and_training():
        """Megatron-style tensor parallelism: a replicated body, a vocab-parallel head made by
        from_linear; 3 SGD steps on the same batches as one rank with the full head."""
        torch.manual_seed(1)
        body = torch.nn.Linear(6, 8, dtype=torch.float64)
        linear = torch.nn.Linear(8, 11, dtype=torch.float64)
        single_body = copy.deepcopy(body)
        single_head = fused_ce.nn.LinearCrossEntropyLoss.from_linear(
            copy.deepcopy(linear), backend="torch", label_smoothing=0.1
        )
        head = fused_ce.nn.VocabParallelLinearCrossEntropyLoss.from_linear(
            linear, label_smoothing=0.1
        )
        start, size = shard_range(11)
        assert head.linear_weight.shape == (size, 8), head.linear_weight.shape
        assert head.vocab_start_index == start and head.out_features == 11
        assert f"rows=[{start}, {start + size})" in repr(head), repr(head)
        for step in range(3):
            x = _randn((5, 6), 70 + step)
            target = _class_target((5,), 11, 80 + step, -100)
            for model_body, model_head in ((body, head), (single_body, single_head)):
                model_body.zero_grad()
                model_head.zero_grad()
                model_head(torch.tanh(model_body(x)), target).backward()
                with torch.no_grad():
                    for p in (*model_body.parameters(), *model_head.parameters()):
                        p -= 0.5 * p.grad
        for (name, p), q in zip(body.named_parameters(), single_body.parameters(), strict=True):
            _close(f"body {name}", p, q)
        _close("head weight", head.linear_weight, single_head.linear_weight[start : start + size])
        _close("head bias", head.linear_bias, single_head.linear_bias[start : start + size])

    def constructed_head():
        head = fused_ce.nn.VocabParallelLinearCrossEntropyLoss(4, 9, dtype=torch.float64)
        start, size = shard_range(9)
        assert head.linear_weight.shape == (size, 4) and head.linear_bias.shape == (size,)
        assert set(head.state_dict()) == {"linear_weight", "linear_bias"}, head.state_dict()
        x = _randn((3, 4), 90)
        target = _class_target((3,), 9, 91, None)
        loss = head(x, target)
        logits = torch.cat(
            [t for t in _all_gather_rows(head.logits(x).detach().t().contiguous())], 0
        ).t()
        _close("loss", loss, F.cross_entropy(logits, target))

    yield "nn.VocabParallelCrossEntropyLoss", ce_module
    yield (
        "nn.VocabParallelLinearCrossEntropyLoss.from_linear, TP training",
        (head_from_linear_and_training),
    )
    yield "nn.VocabParallelLinearCrossEntropyLoss constructed", constructed_head


def _all_gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``rows`` (of possibly different lengths along dim 0), in rank order."""
    world = dist.get_world_size()
    lengths = [None] * world
    dist.all_gather_object(lengths, rows.shape[0])
    padded = torch.zeros(max(lengths), *rows.shape[1:], dtype=rows.dtype)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[:n] for g, n in zip(gathered, lengths, strict=True)]


WORLDS: dict[str, tuple[Callable[[int, int], Iterator[Case]], ...]] = {
    # World start-up (spawn, import torch) costs seconds on 2 cores; the cases, milliseconds.
    "all": (
        _ce_cases,
        _linear_cases,
        _odd_rows_cases,
        _empty_shard_cases,
        _dtensor_cases,
        _error_cases,
        _module_cases,
        _data_parallel_cases,
    ),
    "vocab_parallel": (
        _ce_cases,
        _linear_cases,
        _odd_rows_cases,
        _empty_shard_cases,
        _dtensor_cases,
        _error_cases,
        _module_cases,
    ),
    # Apart: before the agreement, a case here could abort a rank (and the whole world).
    "disagreement": (_disagreement_cases,),
}
