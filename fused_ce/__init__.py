"""fused_ce: fused sigmoid + BCE and softmax + CE losses for PyTorch.

Drop-in replacements for ``torch.nn.functional.cross_entropy`` and
``torch.nn.functional.binary_cross_entropy_with_logits``, backed by Triton kernels on CUDA, by
native C++ kernels on the CPU where they are built, and by a chunked plain-PyTorch path
elsewhere.
"""

from . import nn
from .distill import jsd_with_logits, kl_div_with_logits, linear_jsd, linear_kl_div
from .functional import (
    CrossEntropyStats,
    binary_cross_entropy_with_logits,
    cross_entropy,
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
)
from .linear import linear_binary_cross_entropy_with_logits, linear_cross_entropy
from .scoring import linear_log_probs, linear_top_k

__all__ = [
    "CrossEntropyStats",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "jsd_with_logits",
    "kl_div_with_logits",
    "linear_binary_cross_entropy_with_logits",
    "linear_cross_entropy",
    "linear_jsd",
    "linear_kl_div",
    "linear_log_probs",
    "linear_top_k",
    "nn",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
]
__version__ = "0.1.0"
