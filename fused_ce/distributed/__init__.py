"""Vocab-parallel cross-entropy over ``torch.distributed``: the classes (the vocabulary) are
split across the ranks of a group, each rank holding a contiguous slice of the logits (or of
the output layer's rows), and every rank gets the loss of the concatenated logits.

The softmax needs three global per-row numbers, and each is a combination of per-rank ones
(``m_r`` the row max of rank ``r``'s slice, ``s_r = sum_c exp(z_c - m_r)`` over it)::

    M = max_r m_r        S = sum_r exp(m_r - M) s_r        lse = M + log S

and every other term of the loss is a sum over classes, so it splits the same way: the target
logit is held by one rank, ``sum_c w_c (z_c - M) = sum_r [d_r + W_r (m_r - M)]`` (label
smoothing, with ``d_r = sum_c w_c (z_c - m_r)`` over the slice), the entropy's
``sum_c e^(z_c - M) (z_c - M)`` likewise, and the argmax is the first rank's whose max is ``M``.
So each rank computes its columns of per-row statistics, one ``all_gather`` exchanges them, and
every rank combines them in the same order, so all ranks hold the same bits. Before any of
that, every call exchanges a fixed-size header (``_protocol``: each rank's slice, its argument
error if any, and what the ranks must agree on), so that ranks that disagree raise the same
error together instead of hanging or receiving sizes they did not expect. The backward needs no
communication for the logits: ``dz = p * coef_p - coef_y * onehot - coef_u * u`` with
``p = exp(z - lse)`` and per-row coefficients known on every rank. The linear head adds the
input gradient's sum over the group (``all_reduce``, or ``reduce_scatter`` with sequence
parallelism). See docs/distributed.md for what is sent, in bytes per row.

The local per-chunk math runs as plain torch operations on the rank's slice (on any device);
the linear head makes its logits chunk by chunk with the package's chunked driver
(``fused_ce._chunked``), so no more than a chunk of them exists.

Modules: ``_group`` (this rank's place in the group, :func:`shard_range`, the collectives),
``_protocol`` (the header each call exchanges and the checks made on it), ``_statistics``
(the per-row statistics, their combination and the local gradient), ``_cross_entropy`` and
``_linear`` (the two entry points and their autograd Functions), ``_dtensor`` (DTensor
arguments). The nn modules over them are in :mod:`fused_ce.nn`.
"""

from ._cross_entropy import vocab_parallel_cross_entropy
from ._group import shard_range
from ._linear import vocab_parallel_linear_cross_entropy

__all__ = ["shard_range", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
