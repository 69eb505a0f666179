"""DTensor arguments: a class-sharded DTensor as this rank's local slice, its mesh's group and
its shard's start; a replicated one as its local tensor."""

from __future__ import annotations

from ._group import _chunk_range


def _dtensor_types():
    """``(DTensor, Shard, Replicate)``, or None where torch has no DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:
        return None
    return DTensor, Shard, Replicate


def _is_dtensor(value) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(value, types[0])


def _from_dtensor(name: str, value, shard_dim: int | None, group):
    """A DTensor argument as ``(local tensor, group, start of this rank's shard)``.

    ``shard_dim``: the dim it must be sharded on (``Shard``) over a 1-D mesh; None: it must be
    replicated. The start follows ``torch.chunk``'s split, which DTensor's ``Shard`` uses."""
    DTensor, Shard, Replicate = _dtensor_types()
    mesh = value.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{name}: expected a DTensor on a 1-D device mesh, got {mesh.ndim}-D")
    placement = value.placements[0]
    mesh_group = mesh.get_group()
    if group is not None and group is not mesh_group:
        raise ValueError(f"{name}: group must be None (or the mesh's group) for a DTensor")
    if shard_dim is None:
        if not isinstance(placement, Replicate):
            raise ValueError(f"{name}: expected a Replicate() DTensor, got {placement}")
        return value.to_local(), mesh_group, None
    if not isinstance(placement, Shard) or placement.dim % value.dim() != shard_dim:
        raise ValueError(
            f"{name}: expected a DTensor sharded on the class dim (Shard({shard_dim})), "
            f"got {placement}"
        )
    start, _ = _chunk_range(value.shape[shard_dim], mesh.get_local_rank(), mesh.size())
    return value.to_local(), mesh_group, start


def _mesh_group(value, group):
    """The group a call over ``value`` runs in: ``group``, or a DTensor's 1-D mesh's when
    ``group`` is None. (:func:`_from_dtensor` checks the DTensor later, inside the call's
    agreement, so a rejected DTensor raises on every rank.)"""
    if group is None and _is_dtensor(value) and value.device_mesh.ndim == 1:
        return value.device_mesh.get_group()
    return group


def _plain(name: str, value, group):
    """A replicated DTensor (target, weight) as its local tensor; anything else unchanged."""
    if _is_dtensor(value):
        return _from_dtensor(name, value, None, group)[0]
    return value
