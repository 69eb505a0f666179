"""Small helpers shared by the ops and both implementations."""

from __future__ import annotations

from typing import NamedTuple

import torch


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any operand is fp64 (so gradcheck sees fp64 math), fp32 otherwise."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class CEOptions(NamedTuple):
    """The softmax cross-entropy options, as one value from the custom ops down to the kernels
    (custom-op schemas take no tuples, so each op takes them flat and packs them here)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    softcap: float = 0.0  # 0: no cap
