"""Small helpers shared by the ops and both implementations."""

from __future__ import annotations

import torch


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any operand is fp64 (so gradcheck sees fp64 math), fp32 otherwise."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
