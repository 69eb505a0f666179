"""Logits-free scoring with a linear head: log-probabilities of given tokens (with gradient, for
RL-style training and evaluation) and the top-k of the logits, chunked so the ``N x V`` logits
never exist.

``linear_log_probs`` is the per-token negative of ``linear_cross_entropy`` with
``reduction='none'``: the same custom op, the same chunked driver and kernels, the same saved
log-sum-exp and recomputing backward. ``linear_top_k`` runs the chunked driver's GEMM into one
reused ``rows x V`` buffer and ``torch.topk`` on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _chunked as chunked
from ._backend import resolve
from ._validation import (
    PATHS,
    check_batch_invariant,
    check_ce_target,
    check_chunk_size,
    check_ignore_index,
    check_linear,
    check_options,
    check_target,
)
from .ops.linear import linear_ce_forward_call


def linear_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    tokens: Tensor,
    *,
    linear_bias: Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    path: str = "auto",
    backend: str | None = None,
    batch_invariant: bool | None = None,
) -> Tensor:
    r"""Log-probabilities of ``tokens`` under the head ``z = F.linear(input, linear_weight,
    linear_bias)``, with gradient, without the ``N x V`` logits.

    Per row :math:`n`, with the final logits :math:`z` (``logit_scale`` then ``softcap``, as in
    :func:`fused_ce.softmax_cross_entropy`; a sampling temperature :math:`T` is
    ``logit_scale=1/T``):

    .. math:: \log p_n = z_{n, y_n} - \log\sum_v e^{z_{n,v}}

    and 0 where ``tokens`` is ``ignore_index``. Gradients: :math:`\partial \log p_n / \partial
    z_n = e_{y_n} - \mathrm{softmax}(z_n)` times the upstream gradient of row :math:`n`, sent to
    ``input``, ``linear_weight`` and ``linear_bias`` as by ``linear_cross_entropy`` (it is
    ``-linear_cross_entropy(..., reduction='none')``, computed in fp32).

    Args:
        input (Tensor): hidden states ``(*, D)``; fp16, bf16, fp32 or fp64.
        linear_weight (Tensor): the head ``(V, D)``, ``input``'s dtype and device.
        tokens (Tensor): class indices ``(*)`` (int64 or uint8), each in ``[0, V)`` or
            ``ignore_index``.
        linear_bias (Tensor, optional): ``(V,)``. Default: ``None``.
        ignore_index (int, optional): token value whose log-probability is 0 (no gradient).
            Default: ``-100``.
        logit_scale (float, optional): multiplier of the logits (``1/T``). Default: ``1.0``.
        softcap (float, optional): a positive cap. Default: ``None``.
        chunk_size (int, optional), path (str, optional), backend (str, optional),
            batch_invariant (bool, optional): as in :func:`fused_ce.linear_cross_entropy`.
            Defaults: ``None``, ``'auto'``, ``None``, ``None``.

    Returns:
        Tensor: the log-probabilities in the accumulation dtype (fp32; fp64 for fp64 input),
        whatever ``input``'s dtype: a bf16 head gives fp32 log-probs, as RL ratios need.

    Shape:
        - Input: :math:`(*, D)`; linear weight :math:`(V, D)`; tokens :math:`(*)`.
        - Output: :math:`(*)`.

    Examples::

        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> head = torch.randn(100, 16)
        >>> tokens = torch.randint(0, 100, (2, 5))
        >>> logp = fused_ce.linear_log_probs(hidden, head, tokens)
        >>> ref = torch.log_softmax(hidden @ head.T, -1).gather(-1, tokens[..., None])[..., 0]
        >>> torch.allclose(logp, ref, atol=1e-5)
        True
        >>> logp.sum().backward()
    """
    ignore_index = check_ignore_index(ignore_index)
    scale, cap = check_options(logit_scale, softcap, 0.0, False)
    n_classes = check_linear(input, linear_weight, linear_bias)
    rows_per_chunk = check_chunk_size(chunk_size)
    check_target(tokens, input)
    if tokens.is_floating_point():
        raise TypeError(f"tokens: expected class indices (int64 or uint8), got {tokens.dtype}")
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    fixed_rows = check_batch_invariant(batch_invariant) and path != "fused"
    batch_shape = input.shape[:-1]
    check_ce_target(
        tokens,
        input,
        None,
        ignore_index,
        0.0,
        batch_shape,
        (*batch_shape, n_classes),
        n_classes,
        all_valid_as_none=False,
    )
    backend = resolve(backend, input)
    fused = path == "fused"
    if fused and backend != "triton":
        raise RuntimeError(
            f"path: 'fused' runs the Triton kernels, but the backend resolved to {backend!r} "
            f"(input on {input.device}); use path='chunked'"
        )
    loss, *_ = linear_ce_forward_call(
        input.reshape(-1, input.shape[-1]),
        linear_weight,
        linear_bias,
        tokens.reshape(-1),
        None,
        ignore_index,
        0.0,
        scale,
        cap,
        False,
        rows_per_chunk,
        fused,
        backend,
        fixed_rows,
    )
    return -loss.view(batch_shape)


def linear_top_k(
    input: Tensor,
    linear_weight: Tensor,
    k: int,
    *,
    linear_bias: Tensor | None = None,
    chunk_size: int | None = None,
    batch_invariant: bool | None = None,
) -> torch.return_types.topk:
    r"""The ``k`` largest logits of ``F.linear(input, linear_weight, linear_bias)`` per row and
    their classes, without the ``N x V`` logits: ``torch.topk(logits, k, dim=-1)`` (values
    sorted in descending order, ties in ``torch.topk``'s order) computed one chunk of rows at
    a time, each chunk's logits made by one GEMM into a reused buffer (see
    ``fused_ce._chunked``), so the values are the logits' exact bits as that GEMM rounds them.

    For evaluation: no gradient flows (the values are detached).

    Args:
        input (Tensor): hidden states ``(*, D)``; fp16, bf16, fp32 or fp64.
        linear_weight (Tensor): ``(V, D)``, ``input``'s dtype and device.
        k (int): how many classes per row, ``0 <= k <= V``.
        linear_bias (Tensor, optional): ``(V,)``. Default: ``None``.
        chunk_size (int, optional): rows per chunk (see :func:`fused_ce.linear_cross_entropy`).
            Default: ``None``.
        batch_invariant (bool, optional): each row's result independent of the other rows:
            every GEMM of one shape, the last chunk padded (see
            :func:`fused_ce.linear_cross_entropy`). Default: ``None`` (off).

    Returns:
        torch.return_types.topk: ``(values, indices)``, values in ``input``'s dtype, indices
        int64.

    Shape:
        - Input: :math:`(*, D)`; linear weight :math:`(V, D)`.
        - Output: values and indices :math:`(*, k)`.

    Examples::

        >>> hidden = torch.randn(4, 16)
        >>> head = torch.randn(100, 16)
        >>> top = fused_ce.linear_top_k(hidden, head, 3)
        >>> torch.equal(top.indices, torch.topk(hidden @ head.T, 3).indices)
        True
    """
    n_classes = check_linear(input, linear_weight, linear_bias)
    rows_per_chunk = check_chunk_size(chunk_size)
    fixed_rows = check_batch_invariant(batch_invariant)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n_classes:
        raise ValueError(f"k: expected an int in [0, {n_classes}] (the classes), got {k!r}")
    x = input.detach().reshape(-1, input.shape[-1])
    n_rows = x.shape[0]
    values = x.new_empty(n_rows, k)
    indices = torch.empty(n_rows, k, dtype=torch.int64, device=x.device)
    if fixed_rows:
        rows_per_chunk = chunked.fixed_chunk_rows(rows_per_chunk, n_classes, x)
        buffer = x.new_empty(rows_per_chunk, n_classes)
    else:
        rows_per_chunk = chunked.chunk_rows(rows_per_chunk, n_rows, n_classes, x)
        buffer = x.new_empty(min(rows_per_chunk, n_rows), n_classes)
    weight = linear_weight.detach()
    bias = linear_bias.detach() if linear_bias is not None else None
    with torch.no_grad():
        for rows in chunked.row_chunks(n_rows, rows_per_chunk):
            n = rows.stop - rows.start
            pad = buffer.shape[0] - n if fixed_rows else 0
            if pad:
                padded = chunked.pad_rows(x[rows], pad)
                logits = chunked.chunk_logits(buffer, padded, weight, bias, slice(0, n + pad))[:n]
            else:
                logits = chunked.chunk_logits(buffer, x, weight, bias, rows)
            torch.topk(logits, k, dim=1, out=(values[rows], indices[rows]))
    shape = (*input.shape[:-1], k)
    return torch.return_types.topk((values.view(shape), indices.view(shape)))
