"""Output buffers of the elementwise ops, shared by every backend and by the fake kernels, so
all of them return the same shapes, dtypes and layouts. (The cross-entropy forward's per-row
outputs, which the kernels' wrappers allocate, are ``_common.forward_outputs``, below them.)

Large CPU outputs are mapped in 2 MiB pages by the native library when it is loaded
(``fused_ce_native::empty_output``, csrc/memory.h): on the 2-core VM of docs/native.md the
first touch of a fresh 16 MiB buffer cost 10 ms in 4 KiB page faults and 1.4 ms in huge pages,
more than the BCE kernel that fills it.
"""

from __future__ import annotations

import torch

from . import native

# Smaller outputs come from torch's allocator: few faults, and its heap often holds touched
# memory for them. The native side applies the same threshold (kHugeBytes in csrc/memory.h).
_HUGE_PAGE_BYTES = 4 << 20


def empty_output(like: torch.Tensor) -> torch.Tensor:
    """A new, uninitialised, contiguous tensor of ``like``'s shape, dtype and device.

    Shape:
        The shape of ``like``.

    Examples::

        >>> empty_output(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if (
        like.device.type == "cpu"
        and like.numel() * like.element_size() >= _HUGE_PAGE_BYTES
        and native.available()
    ):
        return native.ops().empty_output(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def gradient_buffers(
    input: torch.Tensor, target: torch.Tensor, input_grad: bool, target_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dinput, dtarget)`` buffers of an elementwise loss: each like its operand when wanted,
    else empty (0 elements) with the operand's dtype and device."""

    def buffer(like: torch.Tensor, wanted: bool) -> torch.Tensor:
        if wanted:
            return empty_output(like)
        return torch.empty((0,), dtype=like.dtype, device=like.device)

    return buffer(input, input_grad), buffer(target, target_grad)
