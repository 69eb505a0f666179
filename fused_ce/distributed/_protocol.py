"""The call's header: what each rank sends beside its statistics (its slice's start and size,
a digest of the class-index targets), and the checks every rank makes on the gathered headers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._statistics import _Spec


def _check_layout(header: Tensor, spec: _Spec, n_weight: int | None, check_target: bool) -> Tensor:
    """Device-side checks of the gathered ``(world, 3)`` header (start, size, target checksum),
    identical on every rank (so all raise together, none hangs); returns the global C (0-d)."""
    starts, sizes, checksums = header.unbind(1)
    order = torch.argsort(starts, stable=True)
    starts, sizes = starts[order], sizes[order]
    ends = starts + sizes
    tiled = (starts[0] == 0) & (starts[1:] == ends[:-1]).all()
    n_classes = ends[-1]
    if n_weight is not None:
        tiled = tiled & (n_classes == n_weight)
    torch._assert_async(
        tiled,
        "vocab_start_index: the ranks' class slices [start, start + C_local) do not tile "
        "[0, C) without gaps or overlaps (shards of different sizes need vocab_start_index; "
        "with weight, C must be weight's length)",
    )
    if check_target:
        torch._assert_async(
            (checksums == checksums[0]).all(),
            "target: the class-index targets differ across the ranks of the group; every rank "
            "must pass the same (replicated) target",
        )
    return n_classes


def _target_checksum(target: Tensor) -> Tensor:
    """An int64 digest of class-index targets that differs when values or their order do."""
    flat = target.reshape(-1).long()
    position = torch.arange(flat.numel(), device=flat.device) % 8191 + 1
    return (flat * position).sum().view(1)
