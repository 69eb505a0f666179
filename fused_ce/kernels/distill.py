"""Distillation Triton kernels: KL divergence and generalized JSD between a student's and a
teacher's logits (framework-neutral: no torch in this file).

Layout: student and teacher logits are strided ``(n_rows, n_classes)`` arrays (any strides,
any floating dtypes); a row is one distribution. ``BLOCK_R`` rows per program, classes in
blocks of ``BLOCK_C``.

Math per row (docs/distillation.md), in ``ACC_DTYPE`` (fp32, fp64 for fp64 operands), with
``x = student / T``, ``y = teacher / T``, ``m_x`` the row max, ``log_s_x = log sum exp(x -
m_x)``, ``lq = (x - m_x) - log_s_x``, ``q = exp(lq)`` (student) and likewise ``lp``, ``p``
(teacher)::

    JSD == False:  loss = c_p = sum p (lp - lq)                        (KL(p || q))
                   dx = g/T (q - p),   dy = g/T p (lp - lq - c_p)
    JSD == True:   lm = log(beta p + (1 - beta) q), c_p = sum p (lp - lm),
                   c_q = sum q (lq - lm),   loss = beta c_p + (1 - beta) c_q
                   dx = g/T (1 - beta) q (lq - lm - c_q),   dy = g/T beta p (lp - lm - c_p)

A term whose probability is 0 counts 0 (its log-probability may be ``-inf``). The forward
reads each row twice (an online max and sum of exponentials of both logits, then the
divergence sums) and saves ``(m_x, log_s_x, m_y, log_s_y, c_q, c_p)`` per row; the backward
reads each row once more and writes the gradients, which may overwrite the logits (each
element is read before it is written). Rows whose ``valid`` is 0 get loss 0 and gradient 0.

Float options arrive as two fp32 halves (``hi + lo``): Triton passes a Python float as fp32,
which would round an fp64 temperature or beta.
"""

import triton
import triton.language as tl


@triton.jit
def _option(hi, lo, ACC_DTYPE: tl.constexpr):
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def _rows_in_use(valid_ptr, rows, row_mask, HAS_VALID: tl.constexpr):
    """The rows of this program that exist and count."""
    if HAS_VALID:
        valid = tl.load(valid_ptr + rows, row_mask, 0)
        return row_mask & (valid != 0)
    return row_mask


@triton.jit
def _load_scaled(ptr, rows, cols, row_stride, col_stride, mask, temperature, ACC_DTYPE):
    """One ``(BLOCK_R, BLOCK_C)`` block of logits divided by the temperature; masked lanes
    ``-inf`` (probability 0)."""
    offsets = rows[:, None] * row_stride + cols[None, :] * col_stride
    x = tl.load(ptr + offsets, mask, float("-inf")).to(ACC_DTYPE)
    return x / temperature


@triton.jit
def _online_step(x, running_max, sum_exp):
    """Take a block into a row's running max and ``sum exp(x - max)``."""
    new_max = tl.maximum(running_max, tl.max(x, 1))
    ref = tl.where(new_max == float("-inf"), 0.0, new_max)
    sum_exp = sum_exp * tl.exp(running_max - ref) + tl.sum(tl.exp(x - ref[:, None]), 1)
    return new_max, sum_exp


@triton.jit
def _weighted(prob, value):
    return tl.where(prob > 0.0, prob * value, 0.0)


@triton.jit
def _log_mixture(lp, lq, beta):
    """``log(beta p + (1 - beta) q)`` as a log-add-exp of ``lp + log beta`` and ``lq + log(1 -
    beta)`` (no libdevice ``log1p`` under the interpreter: ``log(1 + e)`` with ``e <= 1`` loses
    at most an ulp of the result)."""
    from_p = lp + tl.log(beta)
    from_q = lq + tl.log(1.0 - beta)
    high = tl.maximum(from_p, from_q)
    return high + tl.log(1.0 + tl.exp(-tl.abs(from_p - from_q)))


@triton.jit
def distill_forward_kernel(
    student_ptr,
    teacher_ptr,
    valid_ptr,
    loss_ptr,
    saved_ptr,
    n_rows,
    n_classes,
    saved_stride,
    student_row_stride,
    student_col_stride,
    teacher_row_stride,
    teacher_col_stride,
    temperature_hi,
    temperature_lo,
    beta_hi,
    beta_lo,
    HAS_VALID: tl.constexpr,
    JSD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-row loss and the saved ``(6, n_rows)`` statistics. Bytes moved: both logits twice
    (the second read mostly from cache for rows that fit), seven words written per row."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    saved_stride_64 = tl.cast(saved_stride, tl.int64)  # k * stride may pass 2^31
    in_use = _rows_in_use(valid_ptr, rows, row_mask, HAS_VALID)
    temperature = _option(temperature_hi, temperature_lo, ACC_DTYPE)
    beta = _option(beta_hi, beta_lo, ACC_DTYPE)
    # int64 class offsets: a transposed operand's class stride times V may pass 2^31.
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    max_x = tl.full((BLOCK_R,), float("-inf"), ACC_DTYPE)
    max_y = tl.full((BLOCK_R,), float("-inf"), ACC_DTYPE)
    sum_x = tl.zeros((BLOCK_R,), ACC_DTYPE)
    sum_y = tl.zeros((BLOCK_R,), ACC_DTYPE)
    for start in range(0, n_classes, BLOCK_C):
        c = start + cols
        mask = in_use[:, None] & (c < n_classes)[None, :]
        x = _load_scaled(
            student_ptr,
            rows,
            c,
            student_row_stride,
            student_col_stride,
            mask,
            temperature,
            ACC_DTYPE,
        )
        y = _load_scaled(
            teacher_ptr,
            rows,
            c,
            teacher_row_stride,
            teacher_col_stride,
            mask,
            temperature,
            ACC_DTYPE,
        )
        max_x, sum_x = _online_step(x, max_x, sum_x)
        max_y, sum_y = _online_step(y, max_y, sum_y)
    log_s_x = tl.log(sum_x)
    log_s_y = tl.log(sum_y)
    c_p = tl.zeros((BLOCK_R,), ACC_DTYPE)
    c_q = tl.zeros((BLOCK_R,), ACC_DTYPE)
    for start in range(0, n_classes, BLOCK_C):
        c = start + cols
        mask = in_use[:, None] & (c < n_classes)[None, :]
        x = _load_scaled(
            student_ptr,
            rows,
            c,
            student_row_stride,
            student_col_stride,
            mask,
            temperature,
            ACC_DTYPE,
        )
        y = _load_scaled(
            teacher_ptr,
            rows,
            c,
            teacher_row_stride,
            teacher_col_stride,
            mask,
            temperature,
            ACC_DTYPE,
        )
        lq = (x - max_x[:, None]) - log_s_x[:, None]
        lp = (y - max_y[:, None]) - log_s_y[:, None]
        p = tl.exp(lp)
        if JSD:
            lm = _log_mixture(lp, lq, beta)
            c_p += tl.sum(_weighted(p, lp - lm), 1)
            c_q += tl.sum(_weighted(tl.exp(lq), lq - lm), 1)
        else:
            c_p += tl.sum(_weighted(p, lp - lq), 1)
    loss = c_p
    if JSD:
        loss = beta * c_p + (1.0 - beta) * c_q
    tl.store(loss_ptr + rows, tl.where(in_use, loss, 0.0), row_mask)
    tl.store(saved_ptr + rows, max_x, row_mask)
    tl.store(saved_ptr + saved_stride_64 + rows, log_s_x, row_mask)
    tl.store(saved_ptr + 2 * saved_stride_64 + rows, max_y, row_mask)
    tl.store(saved_ptr + 3 * saved_stride_64 + rows, log_s_y, row_mask)
    tl.store(saved_ptr + 4 * saved_stride_64 + rows, c_q, row_mask)
    tl.store(saved_ptr + 5 * saved_stride_64 + rows, c_p, row_mask)


@triton.jit
def distill_backward_kernel(
    student_ptr,
    teacher_ptr,
    valid_ptr,
    saved_ptr,
    grad_loss_ptr,
    grad_student_ptr,
    grad_teacher_ptr,
    n_rows,
    n_classes,
    saved_stride,
    grad_loss_stride,
    student_row_stride,
    student_col_stride,
    teacher_row_stride,
    teacher_col_stride,
    grad_student_row_stride,
    grad_student_col_stride,
    grad_teacher_row_stride,
    grad_teacher_col_stride,
    temperature_hi,
    temperature_lo,
    beta_hi,
    beta_lo,
    HAS_VALID: tl.constexpr,
    JSD: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Gradients of ``sum_n grad_loss_n * loss_n`` from the saved statistics. Bytes moved:
    both logits once, each wanted gradient written once."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    saved_stride_64 = tl.cast(saved_stride, tl.int64)  # k * stride may pass 2^31
    in_use = _rows_in_use(valid_ptr, rows, row_mask, HAS_VALID)
    temperature = _option(temperature_hi, temperature_lo, ACC_DTYPE)
    beta = _option(beta_hi, beta_lo, ACC_DTYPE)
    max_x = tl.load(saved_ptr + rows, row_mask, 0.0).to(ACC_DTYPE)
    log_s_x = tl.load(saved_ptr + saved_stride_64 + rows, row_mask, 0.0).to(ACC_DTYPE)
    max_y = tl.load(saved_ptr + 2 * saved_stride_64 + rows, row_mask, 0.0).to(ACC_DTYPE)
    log_s_y = tl.load(saved_ptr + 3 * saved_stride_64 + rows, row_mask, 0.0).to(ACC_DTYPE)
    c_q = tl.load(saved_ptr + 4 * saved_stride_64 + rows, row_mask, 0.0).to(ACC_DTYPE)
    c_p = tl.load(saved_ptr + 5 * saved_stride_64 + rows, row_mask, 0.0).to(ACC_DTYPE)
    g = tl.load(grad_loss_ptr + rows * grad_loss_stride, row_mask, 0.0).to(ACC_DTYPE)
    g = g / temperature
    if JSD:
        coef_student = g * (1.0 - beta)
        coef_teacher = g * beta
    else:
        coef_student = g
        coef_teacher = g
    # int64 class offsets: a transposed operand's class stride times V may pass 2^31.
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    for start in range(0, n_classes, BLOCK_C):
        c = start + cols
        mask = row_mask[:, None] & (c < n_classes)[None, :]
        load_mask = in_use[:, None] & (c < n_classes)[None, :]
        x = _load_scaled(
            student_ptr,
            rows,
            c,
            student_row_stride,
            student_col_stride,
            load_mask,
            temperature,
            ACC_DTYPE,
        )
        y = _load_scaled(
            teacher_ptr,
            rows,
            c,
            teacher_row_stride,
            teacher_col_stride,
            load_mask,
            temperature,
            ACC_DTYPE,
        )
        lq = (x - max_x[:, None]) - log_s_x[:, None]
        lp = (y - max_y[:, None]) - log_s_y[:, None]
        q = tl.exp(lq)
        p = tl.exp(lp)
        if JSD:
            lm = _log_mixture(lp, lq, beta)
            d_student = _weighted(q, lq - lm - c_q[:, None])
            d_teacher = _weighted(p, lp - lm - c_p[:, None])
        else:
            d_student = q - p
            d_teacher = _weighted(p, lp - lq - c_p[:, None])
        if STUDENT_GRAD:
            d_student = tl.where(in_use[:, None], coef_student[:, None] * d_student, 0.0)
            offsets = rows[:, None] * grad_student_row_stride + c[None, :] * grad_student_col_stride
            tl.store(
                grad_student_ptr + offsets,
                d_student.to(grad_student_ptr.dtype.element_ty),
                mask,
            )
        if TEACHER_GRAD:
            d_teacher = tl.where(in_use[:, None], coef_teacher[:, None] * d_teacher, 0.0)
            offsets = rows[:, None] * grad_teacher_row_stride + c[None, :] * grad_teacher_col_stride
            tl.store(
                grad_teacher_ptr + offsets,
                d_teacher.to(grad_teacher_ptr.dtype.element_ty),
                mask,
            )
