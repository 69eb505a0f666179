"""Distillation losses between a student's and a teacher's next-token distributions: the KL
divergence (forward or reverse) and the generalized Jensen-Shannon divergence, on logits
(:func:`kl_div_with_logits`, :func:`jsd_with_logits`) and fused with the linear heads that make
the logits (:func:`linear_kl_div`, :func:`linear_jsd`). The math, its gradients and the
conventions are in docs/distillation.md.

Each function validates its arguments (messages name the argument), views the logits as
``(N, V)`` rows (the vocabulary is the last dim), calls one fused custom op and reduces in
plain torch. Conventions, chosen once for all of them:

* no ``T^2`` factor: the loss is the divergence of the tempered distributions, exactly
  ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True)``; multiply by
  ``T ** 2`` yourself for Hinton's scaling;
* the loss is fp32 for fp16/bf16/fp32 logits (fp64 for fp64), whatever the logits' dtype;
* ``'batchmean'`` divides the sum by ``student_logits.size(0)``, as torch's ``kl_div``;
  ``'mean'`` divides it by the number of rows that are not masked or ignored (a per-token
  mean, unlike ``kl_div``'s ``'mean'``, which divides by every element).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import resolve
from ._chunked_distill import Head, rows_per_chunk
from ._common import accumulation_dtype
from ._validation import (
    check_beta,
    check_ce_weight,
    check_chunk_size,
    check_direction,
    check_distill_reduction,
    check_floating,
    check_temperature,
)
from .ops.distill import distill_forward_call
from .ops.linear_distill import linear_distill_rows, linear_distill_scalar


def _check_pair(student: Tensor, teacher: Tensor, names: tuple[str, str]) -> None:
    check_floating(names[0], student)
    check_floating(names[1], teacher)
    if student.dim() == 0:
        raise ValueError(f"{names[0]}: expected at least 1 dim (the vocabulary), got a 0-d tensor")
    if teacher.shape != student.shape:
        raise ValueError(
            f"{names[1]}: expected the shape of {names[0]} {tuple(student.shape)}, "
            f"got {tuple(teacher.shape)}"
        )
    if teacher.device != student.device:
        raise RuntimeError(
            f"{names[1]}: expected a tensor on {student.device}, got {teacher.device}"
        )
    if student.shape[-1] == 0:
        raise ValueError(f"{names[0]}: the vocabulary (last) dim is empty")


def valid_rows(
    batch_shape: torch.Size,
    device: torch.device,
    target: Tensor | None,
    ignore_index: int,
    mask: Tensor | None,
) -> Tensor | None:
    """The rows that count, flat ``(N,)`` bool, from ``target != ignore_index`` or ``mask``
    (None: every row counts). Raises naming the argument on a bad ``target`` or ``mask``."""
    if target is not None and mask is not None:
        raise ValueError("mask: pass either target (with ignore_index) or mask, not both")
    for name, tensor in (("target", target), ("mask", mask)):
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.shape != batch_shape:
            raise ValueError(
                f"{name}: expected the logits' batch shape {tuple(batch_shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.device != device:
            raise RuntimeError(f"{name}: expected a tensor on {device}, got {tensor.device}")
    if target is not None:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target: expected an integer tensor, got dtype {target.dtype}")
        return (target != ignore_index).reshape(-1)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got dtype {mask.dtype}")
        return mask.reshape(-1).contiguous()  # the Triton kernels read it with unit stride
    return None


def reduce_rows(
    loss: Tensor, reduction: str, batch_shape: torch.Size, valid: Tensor | None, size0: int
) -> Tensor:
    """The per-row ``loss`` reduced: the batch shape for ``'none'``, else 0-d."""
    if reduction == "none":
        return loss.reshape(batch_shape)
    total = loss.sum()
    if reduction == "batchmean":
        return total / size0
    if reduction == "mean":
        count = valid.sum() if valid is not None else loss.shape[0]
        return total / count
    return total


def _divergence(
    student: Tensor,
    teacher: Tensor,
    *,
    temperature: float,
    beta: float,
    swap: bool,
    target: Tensor | None,
    ignore_index: int,
    mask: Tensor | None,
    reduction: str,
    backend: str | None,
) -> Tensor:
    """The shared body: ``beta == 0`` is ``KL(teacher || student)``, ``0 < beta < 1`` the JSD;
    ``swap`` exchanges the operands' roles (the reverse KL, and the JSD at ``beta == 1`` as
    ``beta == 0`` of the swapped pair)."""
    check_distill_reduction(reduction)
    check_temperature(temperature)
    batch_shape = student.shape[:-1]
    valid = valid_rows(batch_shape, student.device, target, ignore_index, mask)
    n_classes = student.shape[-1]
    rows_s = student.reshape(-1, n_classes)
    rows_t = teacher.reshape(-1, n_classes)
    if swap:
        rows_s, rows_t = rows_t, rows_s
    resolved = resolve(backend, student)
    loss, _ = distill_forward_call(rows_s, rows_t, valid, float(temperature), float(beta), resolved)
    size0 = student.shape[0]  # at least 1-D (checked); V for a single row, as kl_div
    return reduce_rows(loss, reduction, batch_shape, valid, size0)


def kl_div_with_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    target: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
    backend: str | None = None,
) -> Tensor:
    r"""KL divergence between the teacher's and the student's softmax distributions, from
    their logits, in one fused pass per row (no ``N x V`` softmax is materialized).

    With :math:`q = \mathrm{softmax}(s / T)` (student) and :math:`p = \mathrm{softmax}(t / T)`
    (teacher) over the last dim, per row :math:`n`:

    * ``direction="forward"``: :math:`\ell_n = \mathrm{KL}(p \| q) = \sum_v p_v (\log p_v -
      \log q_v)`, which is ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
      log_target=True, reduction="none").sum(-1)``; gradient :math:`(q - p) / T` to ``s``;
    * ``direction="reverse"``: :math:`\ell_n = \mathrm{KL}(q \| p)`; gradient
      :math:`q \odot (\log q - \log p - \ell_n) / T` to ``s``.

    No :math:`T^2` factor is applied (multiply by ``temperature ** 2`` for Hinton's
    scaling). Rows whose ``target`` equals ``ignore_index``, or where ``mask`` is False,
    contribute 0 and receive a zero gradient. The teacher's logits receive a gradient too when
    they require it (usually they do not: pass them detached or under ``no_grad``).

    Args:
        student_logits: ``(*, V)`` logits of the student, any floating dtype.
        teacher_logits: ``(*, V)`` logits of the teacher, same shape (dtype may differ).
        temperature: :math:`T > 0`, divides both logits.
        direction: ``"forward"`` (:math:`\mathrm{KL}(p\|q)`, the usual distillation loss) or
            ``"reverse"`` (:math:`\mathrm{KL}(q\|p)`, mode-seeking).
        target: optional ``(*)`` integer labels; rows equal to ``ignore_index`` are masked.
        ignore_index: the label value of masked rows (with ``target``).
        mask: optional ``(*)`` bool tensor, True for rows that count (instead of ``target``).
        reduction: ``'batchmean'`` (sum / ``student_logits.size(0)``, as torch's ``kl_div``),
            ``'sum'``, ``'mean'`` (sum / number of unmasked rows; NaN when there is none) or
            ``'none'`` (per row).
        backend: ``None`` (``FUSED_CE_BACKEND``, default ``"auto"``), ``"auto"``,
            ``"triton"``, ``"native"`` or ``"torch"``.

    Returns:
        The reduced loss (0-d), or the per-row loss with ``reduction='none'``.

    Shape:
        - student_logits, teacher_logits: :math:`(*, V)`.
        - target, mask: :math:`(*)`.
        - Output: scalar, or :math:`(*)` with ``reduction='none'``; fp32 (fp64 for fp64
          logits) whatever the logits' dtype.

    Examples::

        >>> import torch, torch.nn.functional as F, fused_ce
        >>> s = torch.randn(4, 10, requires_grad=True)
        >>> t = torch.randn(4, 10)
        >>> loss = fused_ce.kl_div_with_logits(s, t, temperature=2.0)
        >>> loss.backward()
        >>> ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1),
        ...                reduction="batchmean", log_target=True)
        >>> torch.allclose(loss, ref)
        True
    """
    _check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    check_direction(direction)
    return _divergence(
        student_logits,
        teacher_logits,
        temperature=temperature,
        beta=0.0,
        swap=direction == "reverse",
        target=target,
        ignore_index=ignore_index,
        mask=mask,
        reduction=reduction,
        backend=backend,
    )


def jsd_with_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
    backend: str | None = None,
) -> Tensor:
    r"""Generalized Jensen-Shannon divergence between the teacher's and the student's softmax
    distributions, from their logits, in one fused pass per row.

    With :math:`q = \mathrm{softmax}(s / T)` (student), :math:`p = \mathrm{softmax}(t / T)`
    (teacher) and the mixture :math:`m = \beta p + (1 - \beta) q`, per row:

    .. math::
        \ell_n = \beta\,\mathrm{KL}(p \| m) + (1 - \beta)\,\mathrm{KL}(q \| m)

    (Liger-Kernel's and TRL's convention: ``beta`` weighs the teacher). ``beta=0.5`` is the
    symmetric JSD. At the ends the expression vanishes; as those libraries do, ``beta=0`` is
    defined as the forward KL :math:`\mathrm{KL}(p\|q)` and ``beta=1`` as the reverse KL
    :math:`\mathrm{KL}(q\|p)`: the limits of :math:`\ell/\beta` as :math:`\beta\to 0` and of
    :math:`\ell/(1-\beta)` as :math:`\beta\to 1`. Gradient to ``s``: :math:`(1-\beta)\,q \odot
    (\log q - \log m - \mathrm{KL}(q\|m)) / T`. No :math:`T^2` factor.

    Args:
        student_logits: ``(*, V)`` logits of the student.
        teacher_logits: ``(*, V)`` logits of the teacher, same shape.
        beta: the teacher's weight in the mixture, in ``[0, 1]``.
        temperature, target, ignore_index, mask, reduction, backend: as in
            :func:`kl_div_with_logits`.

    Returns:
        The reduced loss (0-d), or the per-row loss with ``reduction='none'``.

    Shape:
        - student_logits, teacher_logits: :math:`(*, V)`.
        - target, mask: :math:`(*)`.
        - Output: scalar, or :math:`(*)` with ``reduction='none'``; fp32 (fp64 for fp64).

    Examples::

        >>> import torch, fused_ce
        >>> s = torch.randn(4, 10, requires_grad=True)
        >>> t = torch.randn(4, 10)
        >>> loss = fused_ce.jsd_with_logits(s, t, beta=0.5)
        >>> loss.backward()
        >>> bool(0 <= loss <= torch.log(torch.tensor(2.0)))
        True
    """
    _check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    check_beta(beta)
    return _divergence(
        student_logits,
        teacher_logits,
        temperature=temperature,
        beta=0.0 if beta in (0.0, 1.0) else float(beta),
        swap=beta == 1.0,
        target=target,
        ignore_index=ignore_index,
        mask=mask,
        reduction=reduction,
        backend=backend,
    )


def _check_head(names: tuple[str, str, str], hidden: Tensor, weight: Tensor, bias: Tensor | None):
    """One head's ``(*, D)`` hidden states, ``(V, D)`` weight and optional ``(V,)`` bias, all of
    one dtype and device."""
    hidden_name, weight_name, bias_name = names
    check_floating(hidden_name, hidden)
    check_floating(weight_name, weight)
    if hidden.dim() == 0:
        raise ValueError(f"{hidden_name}: expected at least 1 dim (the hidden size), got 0-d")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{weight_name}: expected shape (V, {hidden.shape[-1]}) with V >= 1 for "
            f"{hidden_name} of shape {tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    for name, tensor in ((weight_name, weight), (bias_name, bias)):
        if tensor is None:
            continue
        check_floating(name, tensor)
        if tensor.dtype != hidden.dtype or tensor.device != hidden.device:
            raise RuntimeError(
                f"{name}: expected dtype {hidden.dtype} on {hidden.device} (those of "
                f"{hidden_name}), got {tensor.dtype} on {tensor.device}"
            )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{bias_name}: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )


def _linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    temperature: float,
    beta: float,
    swap: bool,
    target: Tensor | None,
    ignore_index: int,
    mask: Tensor | None,
    ce_weight: float,
    reduction: str,
    chunk_size: int | None,
    backend: str | None,
) -> Tensor:
    _check_head(
        ("student_hidden", "student_weight", "student_bias"),
        student_hidden,
        student_weight,
        student_bias,
    )
    _check_head(
        ("teacher_hidden", "teacher_weight", "teacher_bias"),
        teacher_hidden,
        teacher_weight,
        teacher_bias,
    )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight: expected the student's vocabulary size {student_weight.shape[0]}, "
            f"got {teacher_weight.shape[0]}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden: expected the batch shape {tuple(student_hidden.shape[:-1])} of "
            f"student_hidden, got {tuple(teacher_hidden.shape[:-1])}"
        )
    if teacher_hidden.device != student_hidden.device:
        raise RuntimeError(
            f"teacher_hidden: expected a tensor on {student_hidden.device}, "
            f"got {teacher_hidden.device}"
        )
    check_distill_reduction(reduction)
    check_temperature(temperature)
    check_ce_weight(ce_weight)
    if ce_weight > 0.0 and target is None:
        raise ValueError("target: ce_weight > 0 needs the hard labels (target)")
    chunk = check_chunk_size(chunk_size)
    batch_shape = student_hidden.shape[:-1]
    valid = valid_rows(batch_shape, student_hidden.device, target, ignore_index, mask)
    heads = (
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight,
        teacher_bias,
    )
    labels = target.reshape(-1) if target is not None and ce_weight > 0.0 else None
    if labels is not None:
        n_classes = student_weight.shape[0]
        in_range = (labels == ignore_index) | ((labels >= 0) & (labels < n_classes))
        torch._assert_async(in_range.all(), "target: a label is out of range [0, V)")
    resolved = resolve(backend, student_hidden)
    rows = rows_per_chunk(chunk, Head(*heads[:3]), Head(*heads[3:]), resolved)
    options = (
        float(temperature),
        float(beta),
        swap,
        float(ce_weight),
        ignore_index,
        rows,
        resolved,
    )
    # The logits' size(0), as kl_div's 'batchmean' (V for a single row of hidden states).
    size0 = student_hidden.shape[0] if student_hidden.dim() > 1 else student_weight.shape[0]
    if reduction == "none":
        loss = linear_distill_rows(*heads, labels, valid, *options)
        return reduce_rows(loss, reduction, batch_shape, valid, size0)
    enabled = torch.is_grad_enabled()
    flags = [enabled and t is not None and t.requires_grad for t in heads]
    n_rows = heads[0].shape[0]
    if reduction == "sum":
        divisor = torch.ones((), device=student_hidden.device)
    elif reduction == "batchmean":
        divisor = torch.full((), float(size0), device=student_hidden.device)
    else:
        divisor = (
            valid.sum()
            if valid is not None
            else torch.full((), float(n_rows), device=student_hidden.device)
        )
    dtype = accumulation_dtype(student_hidden.dtype, teacher_hidden.dtype)
    grad_scale = 1.0 / divisor.to(dtype)
    loss, *_ = linear_distill_scalar(*heads, labels, valid, grad_scale, *options, flags)
    return loss


def linear_kl_div(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "forward",
    target: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    ce_weight: float = 0.0,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    r""":func:`kl_div_with_logits` of the logits of two linear heads, ``s = student_hidden @
    student_weight^T + student_bias`` and ``t = teacher_hidden @ teacher_weight^T +
    teacher_bias``, without materializing either ``N x V`` logits tensor: the rows are worked
    in chunks (like :func:`linear_cross_entropy`), each chunk's logits made by one GEMM per
    head and turned into losses and gradients by the logits-form kernels.

    The heads share the vocabulary ``V`` and may differ in hidden size. With ``ce_weight``
    :math:`\alpha > 0` and hard labels ``target``, the per-row loss is
    :math:`\alpha\,\mathrm{CE}(s_n, y_n) + (1 - \alpha)\,\mathrm{KL}_n` (the CE at temperature
    1, rows whose label is ``ignore_index`` masked in both terms), reduced as one loss by
    ``reduction``. No :math:`T^2` factor. Gradients reach every operand that requires one,
    the teacher's included; ``dW`` and ``db`` are accumulated in fp32 across chunks. For the
    reductions other than ``'none'`` the gradients are made in the forward's sweep (two logits
    GEMMs and two gradient GEMMs per head that needs them); ``'none'`` recomputes the logits in
    the backward.

    Args:
        student_hidden: ``(*, D_s)`` hidden states of the student.
        student_weight: ``(V, D_s)`` the student's output head.
        teacher_hidden: ``(*, D_t)`` hidden states of the teacher (same batch shape).
        teacher_weight: ``(V, D_t)`` the teacher's output head.
        student_bias, teacher_bias: optional ``(V,)`` biases.
        temperature, direction, target, ignore_index, mask, reduction, backend: as in
            :func:`kl_div_with_logits`.
        ce_weight: :math:`\alpha \in [0, 1]`, the weight of the hard-label CE (needs
            ``target``).
        chunk_size: rows per chunk (``None``: a memory budget, half of linear CE's).

    Returns:
        The reduced loss (0-d), or the per-row loss with ``reduction='none'``.

    Shape:
        - student_hidden: :math:`(*, D_s)`; teacher_hidden: :math:`(*, D_t)`.
        - student_weight: :math:`(V, D_s)`; teacher_weight: :math:`(V, D_t)`.
        - target, mask: :math:`(*)`.
        - Output: scalar, or :math:`(*)` with ``reduction='none'``; fp32 (fp64 for fp64).

    Examples::

        >>> import torch, torch.nn.functional as F, fused_ce
        >>> hs, ws = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        >>> ht, wt = torch.randn(6, 16), torch.randn(11, 16)
        >>> loss = fused_ce.linear_kl_div(hs, ws, ht, wt, temperature=2.0)
        >>> loss.backward()
        >>> ref = fused_ce.kl_div_with_logits(hs @ ws.T, ht @ wt.T, temperature=2.0)
        >>> torch.allclose(loss, ref)
        True
    """
    check_direction(direction)
    return _linear_divergence(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        temperature=temperature,
        beta=0.0,
        swap=direction == "reverse",
        target=target,
        ignore_index=ignore_index,
        mask=mask,
        ce_weight=ce_weight,
        reduction=reduction,
        chunk_size=chunk_size,
        backend=backend,
    )


def linear_jsd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    ce_weight: float = 0.0,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    r""":func:`jsd_with_logits` of the logits of two linear heads, chunked as
    :func:`linear_kl_div` (same operands and options; ``beta`` as in :func:`jsd_with_logits`):
    per row :math:`\alpha\,\mathrm{CE}_n + (1 - \alpha)\,\mathrm{JSD}_{\beta,n}` with
    ``ce_weight`` :math:`\alpha`.

    Args:
        student_hidden, student_weight, teacher_hidden, teacher_weight: as in
            :func:`linear_kl_div`.
        student_bias, teacher_bias, temperature, target, ignore_index, mask: likewise.
        ce_weight, reduction, chunk_size, backend: likewise.
        beta: the teacher's weight in the mixture, in ``[0, 1]``.

    Returns:
        The reduced loss (0-d), or the per-row loss with ``reduction='none'``.

    Shape:
        As :func:`linear_kl_div`.

    Examples::

        >>> import torch, fused_ce
        >>> hs, ws = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8)
        >>> ht, wt = torch.randn(6, 16), torch.randn(11, 16)
        >>> y = torch.tensor([1, 2, -100, 4, 5, 6])
        >>> loss = fused_ce.linear_jsd(hs, ws, ht, wt, beta=0.5, target=y, ce_weight=0.3)
        >>> loss.backward()
        >>> hs.grad.shape
        torch.Size([6, 8])
    """
    check_beta(beta)
    return _linear_divergence(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        temperature=temperature,
        beta=0.0 if beta in (0.0, 1.0) else float(beta),
        swap=beta == 1.0,
        target=target,
        ignore_index=ignore_index,
        mask=mask,
        ce_weight=ce_weight,
        reduction=reduction,
        chunk_size=chunk_size,
        backend=backend,
    )
