"""The process group: this rank's place in it, the split of the classes over it
(:func:`shard_range`), and the collectives the vocab-parallel losses make."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.12 names the tensor collectives *_single; older releases only have the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _group_layout(group) -> tuple[object, int, int]:
    """``(group, rank, world size)``; ``None`` is the default group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "group: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (a group of one rank works)"
        )
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("group: this process is not a member of the given process group")
    return group, rank, dist.get_world_size(group)


def _gather_packed(parts: list[Tensor], group, world: int) -> list[Tensor]:
    """All-gather several tensors in ONE collective: their bytes travel concatenated, each part
    padded to a multiple of 8 bytes, so every part starts 8-byte aligned and views back as its
    own dtype in place (an int64 column rides bit-exact beside fp32 or bf16 ones, for any
    number of rows). Returns each part as ``(world, *shape)`` (views of the gathered buffer).
    Every rank must pass parts of the same shapes and dtypes (the call's header has checked
    what each rank sends)."""
    pieces = []
    for part in parts:
        raw = part.contiguous().view(-1).view(torch.uint8)
        pieces.append(raw)
        if raw.numel() % 8:
            pieces.append(raw.new_zeros(8 - raw.numel() % 8))
    flat = torch.cat(pieces)
    if world == 1:
        gathered = flat.unsqueeze(0)
    else:
        gathered = flat.new_empty(world * flat.numel())
        _all_gather(gathered, flat, group=group)
        gathered = gathered.view(world, -1)
    out, offset = [], 0
    for part in parts:
        n_bytes = part.numel() * part.element_size()
        if not n_bytes:  # (an empty slice's strides need not be aligned)
            out.append(part.new_empty(world, *part.shape))
            continue
        chunk = gathered[:, offset : offset + n_bytes]
        out.append(chunk.view(part.dtype).view(world, *part.shape))
        offset += -(-n_bytes // 8) * 8
    return out


class _OwnRows(torch.autograd.Function):
    """Sequence parallelism: this rank's block ``full[rank]`` of a ``(world, ...)`` tensor that
    every rank computed identically. Backward: the full tensor's gradient is every rank's
    gradient of its own block, i.e. an ``all_gather`` (torch.distributed.nn's would sum a
    replicated result ``world`` times over; this one is written for this use)."""

    @staticmethod
    def forward(ctx, full: Tensor, rank: int, world: int, group) -> Tensor:
        ctx.world, ctx.group = world, group
        return full[rank].clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        gathered = grad.new_empty(ctx.world * grad.numel())
        _all_gather(gathered, grad.contiguous().view(-1), group=ctx.group)
        return gathered.view(ctx.world, *grad.shape), None, None, None


def _chunk_range(n_classes: int, rank: int, world: int) -> tuple[int, int]:
    """``torch.chunk``'s split: ``ceil(C / world)`` classes per rank, the last ones shorter
    (or empty)."""
    per_rank = -(-n_classes // world)
    start = min(rank * per_rank, n_classes)
    return start, min(per_rank, n_classes - start)


def shard_range(n_classes: int, group=None) -> tuple[int, int]:
    """``(vocab_start_index, C_r)`` of this rank's classes when ``n_classes`` are split over
    ``group`` as ``torch.chunk`` and DTensor's ``Shard`` split them (equal shards when
    ``world`` divides ``C``; otherwise the last ranks hold fewer, possibly none).

    Examples::

        >>> start, size = shard_range(50257)  # doctest: +SKIP
        >>> local_logits = logits[:, start : start + size]  # doctest: +SKIP
    """
    _, rank, world = _group_layout(group)
    return _chunk_range(n_classes, rank, world)


def _shard_start(vocab_start_index: int | None, rank: int, n_local: int) -> int:
    if vocab_start_index is None:
        return rank * n_local
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int):
        raise TypeError(f"vocab_start_index: expected an int or None, got {vocab_start_index!r}")
    if vocab_start_index < 0:
        raise ValueError(f"vocab_start_index: expected >= 0, got {vocab_start_index}")
    return vocab_start_index
