"""``torch.autocast`` for the losses, by torch's own policy.

torch's autocast runs ``cross_entropy`` and ``binary_cross_entropy_with_logits`` in float32
(CUDA and CPU alike: both are on its "float32" lists): every floating operand that is not fp64
is cast to fp32 first, so the loss comes back in fp32 and the class weights may have any
floating dtype. ``F.linear`` is on its lower-precision list: its operands are cast to the
autocast dtype (fp64 excepted). The public functions apply the same casts when autocast is on
for their input's device, so under autocast fused_ce returns what torch returns: the losses
(operands cast to fp32 by :func:`autocast_cast`), and the fused linear heads with their GEMMs
in the autocast dtype and their loss in fp32.
"""

from __future__ import annotations

import torch

# Whether some autocast region is open (any device): one call with no argument (about 0.2 us)
# on the path of every loss; the per-device query follows only when it says yes.
any_autocast_enabled = torch._C._is_any_autocast_enabled


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The lower-precision dtype of the autocast region ``tensor``'s device is in, or None
    outside one. Callers ask :data:`any_autocast_enabled` first (cheaper, inlined)."""
    device_type = tensor.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """autocast's cast: a floating tensor other than fp64 in ``dtype`` (differentiably), any
    other value as it is."""
    if (
        not isinstance(tensor, torch.Tensor)
        or not tensor.is_floating_point()
        or tensor.dtype == dtype
        or tensor.dtype == torch.float64
    ):
        return tensor
    return tensor.to(dtype)
