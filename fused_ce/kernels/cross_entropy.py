"""Softmax + cross-entropy Triton kernels (framework-neutral: no torch in this file).

Layout. The logits are seen as a 3-D strided array ``(n_outer, n_classes, n_inner)``: ``(N, C)``
is ``(N, C, 1)`` and ``(N, C, d1..dK)`` is ``(N, C, d1*..*dK)``. A "row" is one softmax, i.e. one
``(outer, inner)`` pair, ``n_rows = n_outer * n_inner``; rows are numbered outer-major, which is
the order of ``target.reshape(-1)``. Strides are taken as given, so NCHW logits are read in
place, with no transposed copy.

Math per row (``x`` the logits, ``lse = log(sum exp x)``, ``p = exp(x - lse)``):

* class-index target ``y``, class weights ``w`` (ones when absent), smoothing ``eps``::

      loss = v * [(1 - eps) * w_y * (lse - x_y) + (eps / C) * sum_c w_c * (lse - x_c)]
      dx_c = g * v * [(1 - eps) * w_y * (p_c - [c == y]) + (eps / C) * (W * p_c - w_c)]

  with ``v = [y != ignore_index]`` and ``W = sum_c w_c``.
* probability target ``t`` (``t' = (1 - eps) * t + eps / C``)::

      loss = sum_c w_c * t'_c * (lse - x_c)
      dx_c = g * (p_c * sum_k w_k t'_k - w_c t'_c),   dt_c = g * (1 - eps) * w_c * (lse - x_c)

Both share one form: ``loss = a * (lse - x_y) + b * sum_c u_c * (lse - x_c)`` where ``u`` is the
"linear weight" (``w`` for smoothing, ``w * t'`` for probabilities). The forward writes ``lse``
and saves, per row, the row max ``m``, ``log_s = log sum_c exp(x_c - m)`` and ``U = sum_c u_c``
(the ``(3, n_rows)`` "saved" array); the backward recomputes ``p = exp((x - m) - log_s)`` from
them, so a per-row upstream gradient ``g`` (``reduction='none'``) is exact. ``x - m`` is exact
where ``x`` is close to the max, so ``p`` carries only ``log_s``'s rounding, not that of a large
``lse`` (half an ulp of 1e4 is 5e-4 in fp32). ``g_lse``, an upstream gradient of ``lse`` itself
(z-loss), adds ``g_lse * p_c``.

Options (runtime float arguments, so a new value never recompiles): the logits are first
multiplied by ``logit_scale``, then, when ``HAS_SOFTCAP``, soft-capped to
``softcap * tanh(x / softcap)``; ``x`` above means those final logits and the backward applies
the chain rule ``dz/dx = logit_scale * (1 - tanh^2)``. With ``WITH_STATS`` the forward also
writes each row's softmax entropy ``H = lse - sum_c p_c x_c = log_s - S1 / s`` (with
``S1 = sum_c e^(x_c - m) (x_c - m)``, kept online like ``s``) and its argmax (the first index of
the max, as ``torch.argmax``).

Numerics: every load is upcast to ``ACC_DTYPE`` (fp32, or fp64 for fp64 inputs) and the result is
rounded once at the store. The online softmax keeps a running max ``m``; sums that multiply the
logits are kept relative to ``m`` (``sum u_c (x_c - m)``) so that logits of size 1e4 or a shift
of the whole row cost no precision.
"""

import triton
import triton.language as tl


@triton.jit
def _row_offsets(rows, n_inner, outer_stride, inner_stride):
    """Offset of element (row, class 0) for int64 row ids."""
    return (rows // n_inner) * outer_stride + (rows % n_inner) * inner_stride


@triton.jit
def _smoothing(hi, lo, ACC_DTYPE: tl.constexpr):
    """Label smoothing in the accumulation dtype. A float kernel argument arrives as fp32, so
    the launcher splits it into ``hi + lo`` (two fp32 values) to keep fp64 precision."""
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def _tanh_and_slope(a):
    """``(tanh(a), 1 - tanh(a)^2)`` from one exp (the interpreter has no libdevice):
    ``tanh|a| = -expm1(-2|a|) / (2 + expm1(-2|a|))``, with expm1 by Kahan's ``(w - 1) * u /
    log(w)`` so small ``|a|`` keeps full relative precision, and the slope as ``4w / (1 + w)^2``
    (no cancellation near ``|tanh| = 1``). ``|a|`` is clamped at 40, where both are exact to
    rounding in fp32 and fp64 and ``w`` is still a normal number; by a select, not
    ``tl.minimum``, which drops a NaN (both results must be NaN then, as torch's)."""
    magnitude = tl.abs(a)
    u = -2.0 * tl.where(magnitude > 40.0, 40.0, magnitude)
    w = tl.exp(u)
    expm1 = tl.where(w == 1.0, u, (w - 1.0) * u / tl.log(w))
    magnitude = -expm1 / (2.0 + expm1)
    return tl.where(a < 0.0, -magnitude, magnitude), 4.0 * w / ((1.0 + w) * (1.0 + w))


@triton.jit
def _final_logits(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``(z, dz/dx)``: ``z = x * logit_scale``, then ``softcap * tanh(z / softcap)``."""
    z = x * logit_scale
    if HAS_SOFTCAP:
        t, slope = _tanh_and_slope(z / softcap)
        z = softcap * t
        slope = logit_scale * slope
    else:
        slope = logit_scale
    return z, slope


@triton.jit
def _online_softmax_step(
    x, start, running_max, ref, sum_exp, exp_dot, argmax, WITH_STATS: tl.constexpr
):
    """Take one ``(rows, BLOCK)`` block of final logits (masked lanes ``-inf``) starting at
    class ``start`` into the online softmax state; return ``(new_max, new_ref, sum_exp,
    exp_dot, argmax)``. ``ref`` is the running max, or 0 while that is still ``-inf``;
    ``sum_exp = sum e^(x - ref)``; with ``WITH_STATS``, ``exp_dot = S1 = sum e^(x - ref) (x -
    ref)`` and the running argmax."""
    block_max = tl.max(x, 1)
    new_max = tl.maximum(running_max, block_max)
    new_ref = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - new_ref)
    e = tl.exp(x - new_ref[:, None])
    if WITH_STATS:
        # Rebase S1 on the new reference: e^(x - ref) (x - ref) = e^(x - new) e^(new - ref)
        # (x - new + new - ref); masked and -inf lanes (e == 0) add nothing, not 0 * inf.
        exp_dot = rescale * (exp_dot + (ref - new_ref) * sum_exp) + tl.sum(
            tl.where(e > 0.0, e * (x - new_ref[:, None]), 0.0), 1
        )
        # Strictly greater: an earlier block keeps a tie, as torch.argmax's first index.
        argmax = tl.where(block_max > running_max, start + tl.argmax(x, 1), argmax)
    sum_exp = sum_exp * rescale + tl.sum(e, 1)
    return new_max, new_ref, sum_exp, exp_dot, argmax


@triton.jit
def _store_row_results(
    loss_ptr,
    lse_ptr,
    saved_ptr,
    entropy_ptr,
    argmax_ptr,
    class_weight_ptr,
    saved_stride,
    rows,
    row_mask,
    y,
    valid,
    target_logit,
    ref,
    sum_exp,
    lin_sum,
    lin_dot,
    exp_dot,
    argmax,
    n_classes,
    label_smoothing,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WITH_STATS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Finish a forward pass: the per-row loss from the online statistics (``a (lse - x_y) +
    b (U log_s - sum_c u_c (x_c - ref))``), then every per-row output stored: loss, lse, the
    saved ``(m, log_s, U)`` and, with ``WITH_STATS``, entropy and argmax. ``y``, ``valid`` and
    ``target_logit`` are unused for probability targets."""
    log_sum_exp = tl.log(sum_exp)  # lse - ref
    if PROB_TARGET:
        loss = lin_sum * log_sum_exp - lin_dot
    else:
        nll = log_sum_exp + (ref - target_logit)
        if HAS_WEIGHT:
            nll = nll * tl.load(class_weight_ptr + y, valid, 0.0).to(ACC_DTYPE)
        if HAS_SMOOTHING:
            smooth = lin_sum * log_sum_exp - lin_dot
            loss = (1.0 - label_smoothing) * nll + (label_smoothing / n_classes) * smooth
        else:
            loss = nll
        loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + rows, loss, row_mask)
    tl.store(lse_ptr + rows, ref + log_sum_exp, row_mask)
    tl.store(saved_ptr + rows, ref, row_mask)
    tl.store(saved_ptr + saved_stride + rows, log_sum_exp, row_mask)
    # In int64: 2 * n_rows overflows i32 beyond 2^30 rows (tl.cast, not .to(): a
    # stride of 1 arrives as a constexpr).
    tl.store(saved_ptr + 2 * tl.cast(saved_stride, tl.int64) + rows, lin_sum, row_mask)
    if WITH_STATS:
        tl.store(entropy_ptr + rows, log_sum_exp - exp_dot / sum_exp, row_mask)
        tl.store(argmax_ptr + rows, argmax, row_mask)


@triton.jit
def _write_gradients(
    logits_ptr,
    target_ptr,
    class_weight_ptr,
    grad_logits_ptr,
    grad_target_ptr,
    rows,
    row_mask,
    n_inner,
    n_classes,
    col_start,
    n_cols,
    logits_row,
    target_row,
    logits_class_stride,
    target_class_stride,
    grad_outer_stride,
    grad_class_stride,
    grad_inner_stride,
    grad_target_outer_stride,
    grad_target_class_stride,
    grad_target_inner_stride,
    y,
    valid,
    row_max,
    log_sum_exp,
    lin_sum,
    g,
    coef_lse,
    label_smoothing,
    logit_scale,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    row_tile,
    LOGITS_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    ROW_ON_CHIP: tl.constexpr,
    REVERSE_SECOND_READ: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Write ``dlogits`` (and ``dtarget``) of classes ``[col_start, col_start + n_cols)`` for a
    block of rows, from their ``(m, log_s, U)``, their upstream gradient ``g`` of the loss and
    ``coef_lse``, the upstream gradient of their lse (0 when none). ``y`` and ``valid`` are the
    class-index target and its non-ignored mask (unused for probability targets). Shared by the
    backward kernel and the scalar-loss forward, so both write the very same bits.

    The scalar-loss forward's schedules (issue 22, docs/perf-notes.md): with ``ROW_ON_CHIP``
    the whole row is one class block that the forward kept on chip, ``row_tile`` (the logits
    as loaded, in their own dtype): the logits are not read again. With
    ``REVERSE_SECOND_READ`` the blocks are visited last to first, so the blocks the forward
    read last, the likeliest still in L2, are re-read first. Neither changes a bit of the
    result: each element's arithmetic is the same."""
    if PROB_TARGET:
        # dx = p * (g * U) - g * u_c
        coef_p = g * lin_sum
        coef_u = g
        coef_y = tl.zeros((BLOCK_R,), ACC_DTYPE)
        y = tl.full((BLOCK_R,), -1, tl.int64)
    else:
        y = tl.where(valid, y, -1)
        coef_y = (1.0 - label_smoothing) * g
        if HAS_WEIGHT:
            coef_y = coef_y * tl.load(class_weight_ptr + y, valid, 0.0).to(ACC_DTYPE)
        if HAS_SMOOTHING:
            coef_u = (label_smoothing / n_classes) * g
        else:
            coef_u = tl.zeros((BLOCK_R,), ACC_DTYPE)
        # where(), not a product with v: g is inf for an all-ignored 'mean' (0/0), and the
        # gradient of an ignored row must stay exactly 0.
        coef_y = tl.where(valid, coef_y, 0.0)
        coef_u = tl.where(valid, coef_u, 0.0)
        coef_p = coef_y + coef_u * lin_sum
    coef_p = coef_p + coef_lse
    grad_row = _row_offsets(rows, n_inner, grad_outer_stride, grad_inner_stride)
    grad_target_row = _row_offsets(
        rows, n_inner, grad_target_outer_stride, grad_target_inner_stride
    )
    for offset in range(0, n_cols, BLOCK_C):
        if REVERSE_SECOND_READ:
            # In int64 (n_cols is a kernel argument): the start of the last block, down.
            block_start = ((tl.cast(n_cols, tl.int64) - 1) // BLOCK_C) * BLOCK_C - offset
        else:
            block_start = offset
        cols = col_start + block_start + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < n_classes
        mask = row_mask[:, None] & col_mask[None, :]
        if ROW_ON_CHIP:
            x = row_tile.to(ACC_DTYPE)
        else:
            x = tl.load(
                logits_ptr + logits_row[:, None] + cols[None, :] * logits_class_stride, mask, 0.0
            ).to(ACC_DTYPE)
        x, slope = _final_logits(x, logit_scale, softcap, HAS_SOFTCAP)
        shifted = x - row_max[:, None]  # exact near the max: p keeps log_s's precision only
        p = tl.exp(shifted - log_sum_exp[:, None])
        grad = p * coef_p[:, None] - tl.where(cols[None, :] == y[:, None], coef_y[:, None], 0.0)
        if PROB_TARGET or HAS_SMOOTHING:
            if PROB_TARGET:
                t = tl.load(
                    target_ptr + target_row[:, None] + cols[None, :] * target_class_stride,
                    mask,
                    0.0,
                ).to(ACC_DTYPE)
                u = (1.0 - label_smoothing) * t + label_smoothing / n_classes
            else:
                u = tl.full((BLOCK_R, BLOCK_C), 1.0, ACC_DTYPE)
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + cols, col_mask, 0.0).to(ACC_DTYPE)[None, :]
                u = u * w
            grad = grad - coef_u[:, None] * u
            if TARGET_GRAD:
                grad_t = g[:, None] * (1.0 - label_smoothing) * (log_sum_exp[:, None] - shifted)
                if HAS_WEIGHT:
                    grad_t = grad_t * w
                tl.store(
                    grad_target_ptr
                    + grad_target_row[:, None]
                    + cols[None, :] * grad_target_class_stride,
                    grad_t.to(grad_target_ptr.dtype.element_ty),
                    mask,
                )
        if LOGITS_GRAD:
            tl.store(
                grad_logits_ptr + grad_row[:, None] + cols[None, :] * grad_class_stride,
                (grad * slope).to(grad_logits_ptr.dtype.element_ty),
                mask,
            )


@triton.jit
def _z_loss_coefficient(g, lse, valid, z_loss_hi, z_loss_lo, ACC_DTYPE: tl.constexpr):
    """``d(z_loss * v * lse^2) / d lse`` times ``g``; where(), so an ignored row whose lse is
    inf adds 0, not NaN."""
    z_loss = _smoothing(z_loss_hi, z_loss_lo, ACC_DTYPE)
    return tl.where(valid, 2.0 * z_loss * g * lse, 0.0)


# Runtime integers that vary from call to call or take arbitrary values: no specialization on
# their value (== 1, divisible by 16), so a new batch size or ignore_index reuses the compiled
# kernel and the launcher inspects them less.
@triton.jit(do_not_specialize=["n_rows", "ignore_index"])
def ce_forward_kernel(
    logits_ptr,
    target_ptr,
    class_weight_ptr,
    loss_ptr,
    lse_ptr,
    saved_ptr,
    entropy_ptr,
    argmax_ptr,
    grad_scale_ptr,
    grad_logits_ptr,
    grad_target_ptr,
    n_rows,
    n_classes,
    n_inner,
    saved_stride,
    logits_outer_stride,
    logits_class_stride,
    logits_inner_stride,
    target_outer_stride,
    target_class_stride,
    target_inner_stride,
    grad_outer_stride,
    grad_class_stride,
    grad_inner_stride,
    grad_target_outer_stride,
    grad_target_class_stride,
    grad_target_inner_stride,
    ignore_index,
    label_smoothing_hi,
    label_smoothing_lo,
    logit_scale_hi,
    logit_scale_lo,
    softcap_hi,
    softcap_lo,
    z_loss_hi,
    z_loss_lo,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_STATS: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    LOGITS_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    ROW_ON_CHIP: tl.constexpr,
    REVERSE_SECOND_READ: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-row loss and lse, and the saved ``(m, log_s, U)``, in one pass over the logits;
    with ``WITH_STATS`` also the entropy and argmax of each row.

    With ``LOGITS_GRAD``/``TARGET_GRAD`` (the scalar-loss path) the same program then writes the
    gradient of ``grad_scale * sum_n (loss_n + z_loss * v_n * lse_n^2)`` (``grad_scale`` read
    from its 0-d buffer; ``HAS_Z_LOSS`` adds the z-loss term) with the backward's helper: a
    row's second read hits registers (one class block) or the cache, so the logits cross memory
    once and their gradient once for a whole forward + backward.

    Bytes moved: the logits once (``n_rows * C * elem``), plus the probability target once when
    ``PROB_TARGET``; five words written per row (seven with stats); the gradient written once
    when asked for. ``BLOCK_R`` rows share a
    program when C is small, so the 11-class and 1-class shapes do not launch a program per row.

    The gradient pass's schedules (see ``_write_gradients``): ``ROW_ON_CHIP`` (the launcher
    guarantees ``C <= BLOCK_C``: one block per row) keeps the loaded block in registers and
    writes the gradient from it, so a forward + backward reads the logits exactly once;
    ``REVERSE_SECOND_READ`` re-reads a longer row from its end.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    logits_row = _row_offsets(rows, n_inner, logits_outer_stride, logits_inner_stride)
    target_row = _row_offsets(rows, n_inner, target_outer_stride, target_inner_stride)
    label_smoothing = _smoothing(label_smoothing_hi, label_smoothing_lo, ACC_DTYPE)
    logit_scale = _smoothing(logit_scale_hi, logit_scale_lo, ACC_DTYPE)
    softcap = _smoothing(softcap_hi, softcap_lo, ACC_DTYPE)
    LINEAR: tl.constexpr = PROB_TARGET or HAS_SMOOTHING

    running_max = tl.full((BLOCK_R,), float("-inf"), ACC_DTYPE)
    exp_dot = tl.zeros((BLOCK_R,), ACC_DTYPE)  # S1 = sum_c e^(x_c - ref) (x_c - ref)
    argmax = tl.zeros((BLOCK_R,), tl.int64)
    ref = tl.zeros((BLOCK_R,), ACC_DTYPE)  # running_max, or 0 while it is still -inf
    sum_exp = tl.zeros((BLOCK_R,), ACC_DTYPE)
    lin_sum = tl.zeros((BLOCK_R,), ACC_DTYPE)  # sum_c u_c
    lin_dot = tl.zeros((BLOCK_R,), ACC_DTYPE)  # sum_c u_c * (x_c - ref)
    # With ROW_ON_CHIP, the row's one block carried out of the loop (one trip) in the logits'
    # dtype; unused otherwise.
    row_tile = tl.zeros((BLOCK_R, BLOCK_C), logits_ptr.dtype.element_ty) if ROW_ON_CHIP else 0.0
    for start in range(0, n_classes, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < n_classes
        mask = row_mask[:, None] & col_mask[None, :]
        loaded = tl.load(
            logits_ptr + logits_row[:, None] + cols[None, :] * logits_class_stride, mask, 0.0
        )
        if ROW_ON_CHIP:
            row_tile = loaded
        x = loaded.to(ACC_DTYPE)
        x, _ = _final_logits(x, logit_scale, softcap, HAS_SOFTCAP)
        x = tl.where(mask, x, float("-inf"))
        new_max, new_ref, sum_exp, exp_dot, argmax = _online_softmax_step(
            x, start, running_max, ref, sum_exp, exp_dot, argmax, WITH_STATS
        )
        if LINEAR:
            if PROB_TARGET:
                t = tl.load(
                    target_ptr + target_row[:, None] + cols[None, :] * target_class_stride,
                    mask,
                    0.0,
                ).to(ACC_DTYPE)
                u = (1.0 - label_smoothing) * t + label_smoothing / n_classes
            else:
                u = tl.full((BLOCK_R, BLOCK_C), 1.0, ACC_DTYPE)
            if HAS_WEIGHT:
                u = u * tl.load(class_weight_ptr + cols, col_mask, 0.0).to(ACC_DTYPE)[None, :]
            u = tl.where(mask, u, 0.0)
            lin_dot = (
                lin_dot
                + (ref - new_ref) * lin_sum
                + tl.sum(u * tl.where(mask, x - new_ref[:, None], 0.0), 1)
            )
            lin_sum = lin_sum + tl.sum(u, 1)
        running_max = new_max
        ref = new_ref

    if PROB_TARGET:
        y = tl.zeros((BLOCK_R,), tl.int64)
        valid = row_mask
        x_y = tl.zeros((BLOCK_R,), ACC_DTYPE)
    else:
        y = tl.load(target_ptr + target_row, row_mask, 0).to(tl.int64)
        valid = row_mask & (y != ignore_index) & (y >= 0) & (y < n_classes)
        y = tl.where(valid, y, 0)  # never address memory with an unchecked target
        x_y = tl.load(logits_ptr + logits_row + y * logits_class_stride, valid, 0.0).to(ACC_DTYPE)
        x_y, _ = _final_logits(x_y, logit_scale, softcap, HAS_SOFTCAP)
    _store_row_results(
        loss_ptr,
        lse_ptr,
        saved_ptr,
        entropy_ptr,
        argmax_ptr,
        class_weight_ptr,
        saved_stride,
        rows,
        row_mask,
        y,
        valid,
        x_y,
        ref,
        sum_exp,
        lin_sum,
        lin_dot,
        exp_dot,
        argmax,
        n_classes,
        label_smoothing,
        HAS_WEIGHT,
        PROB_TARGET,
        HAS_SMOOTHING,
        WITH_STATS,
        ACC_DTYPE,
    )
    if LOGITS_GRAD or TARGET_GRAD:
        g = tl.full((BLOCK_R,), 0.0, ACC_DTYPE) + tl.load(grad_scale_ptr).to(ACC_DTYPE)
        log_sum_exp = tl.log(sum_exp)
        coef_lse = tl.zeros((BLOCK_R,), ACC_DTYPE)
        if HAS_Z_LOSS:
            coef_lse = _z_loss_coefficient(
                g, ref + log_sum_exp, valid, z_loss_hi, z_loss_lo, ACC_DTYPE
            )
        _write_gradients(
            logits_ptr,
            target_ptr,
            class_weight_ptr,
            grad_logits_ptr,
            grad_target_ptr,
            rows,
            row_mask,
            n_inner,
            n_classes,
            0,
            n_classes,
            logits_row,
            target_row,
            logits_class_stride,
            target_class_stride,
            grad_outer_stride,
            grad_class_stride,
            grad_inner_stride,
            grad_target_outer_stride,
            grad_target_class_stride,
            grad_target_inner_stride,
            y,
            valid,
            ref,
            log_sum_exp,
            lin_sum,
            g,
            coef_lse,
            label_smoothing,
            logit_scale,
            softcap,
            HAS_WEIGHT,
            PROB_TARGET,
            HAS_SMOOTHING,
            HAS_SOFTCAP,
            row_tile,
            LOGITS_GRAD,
            TARGET_GRAD,
            ROW_ON_CHIP,
            REVERSE_SECOND_READ,
            ACC_DTYPE,
            BLOCK_R,
            BLOCK_C,
        )


@triton.jit(do_not_specialize=["n_rows", "ignore_index"])
def ce_backward_kernel(
    logits_ptr,
    target_ptr,
    class_weight_ptr,
    saved_ptr,
    grad_loss_ptr,
    grad_lse_ptr,
    upstream_ptr,
    grad_logits_ptr,
    grad_target_ptr,
    n_rows,
    n_classes,
    n_inner,
    cols_per_program,
    saved_stride,
    grad_loss_stride,
    grad_lse_stride,
    logits_outer_stride,
    logits_class_stride,
    logits_inner_stride,
    target_outer_stride,
    target_class_stride,
    target_inner_stride,
    grad_outer_stride,
    grad_class_stride,
    grad_inner_stride,
    grad_target_outer_stride,
    grad_target_class_stride,
    grad_target_inner_stride,
    ignore_index,
    label_smoothing_hi,
    label_smoothing_lo,
    logit_scale_hi,
    logit_scale_lo,
    softcap_hi,
    softcap_lo,
    z_loss_hi,
    z_loss_lo,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    SKIP_UNIT_UPSTREAM: tl.constexpr,
    LOGITS_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dlogits`` (and ``dtarget``) recomputed from the saved per-row ``(m, log_s, U)``.

    ``grad_loss`` and ``grad_lse`` are strided (stride 0 when autograd expands the upstream
    gradient of a 'mean' or 'sum'). ``HAS_Z_LOSS`` adds the gradient of ``z_loss * v * lse^2``
    per unit of ``g``. With ``SKIP_UNIT_UPSTREAM`` (the scalar-loss backward: the forward
    already wrote the gradient for an upstream gradient of 1) every program reads the 0-d
    ``upstream`` and returns at once when it is 1; otherwise it rewrites the gradient for
    ``g * upstream``, exactly (one rounding), not by scaling the stored one. Grid: (row
    blocks, column splits); a column split lets few long rows fill the device.
    Bytes moved: the logits read once and the gradient written once (the same buffer may be
    both: each element is read before it is written, by the same program), plus the target read
    and its gradient written once for probability targets; per-row scalars are negligible.
    """
    # Unchecked: 0.0, never 1, so the gradient is always written (a compile-time if).
    upstream = tl.load(upstream_ptr).to(ACC_DTYPE) if SKIP_UNIT_UPSTREAM else 0.0
    if upstream != 1.0:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        row_max = tl.load(saved_ptr + rows, row_mask, 0.0)
        log_sum_exp = tl.load(saved_ptr + saved_stride + rows, row_mask, 0.0)
        # In int64: 2 * n_rows overflows i32 beyond 2^30 rows (tl.cast, not .to(): a
        # stride of 1 arrives as a constexpr).
        lin_sum = tl.load(saved_ptr + 2 * tl.cast(saved_stride, tl.int64) + rows, row_mask, 0.0)
        g = tl.load(grad_loss_ptr + rows * grad_loss_stride, row_mask, 0.0).to(ACC_DTYPE)
        if SKIP_UNIT_UPSTREAM:
            g = g * upstream
        target_row = _row_offsets(rows, n_inner, target_outer_stride, target_inner_stride)
        if PROB_TARGET:
            y = tl.zeros((BLOCK_R,), tl.int64)
            valid = row_mask
        else:
            y = tl.load(target_ptr + target_row, row_mask, 0).to(tl.int64)
            valid = row_mask & (y != ignore_index) & (y >= 0) & (y < n_classes)
        coef_lse = tl.zeros((BLOCK_R,), ACC_DTYPE)
        if HAS_GRAD_LSE:
            coef_lse = tl.load(grad_lse_ptr + rows * grad_lse_stride, row_mask, 0.0).to(ACC_DTYPE)
        if HAS_Z_LOSS:
            coef_lse = coef_lse + _z_loss_coefficient(
                g, row_max + log_sum_exp, valid, z_loss_hi, z_loss_lo, ACC_DTYPE
            )
        _write_gradients(
            logits_ptr,
            target_ptr,
            class_weight_ptr,
            grad_logits_ptr,
            grad_target_ptr,
            rows,
            row_mask,
            n_inner,
            n_classes,
            tl.program_id(1).to(tl.int64) * cols_per_program,
            cols_per_program,
            _row_offsets(rows, n_inner, logits_outer_stride, logits_inner_stride),
            target_row,
            logits_class_stride,
            target_class_stride,
            grad_outer_stride,
            grad_class_stride,
            grad_inner_stride,
            grad_target_outer_stride,
            grad_target_class_stride,
            grad_target_inner_stride,
            y,
            valid,
            row_max,
            log_sum_exp,
            lin_sum,
            g,
            coef_lse,
            _smoothing(label_smoothing_hi, label_smoothing_lo, ACC_DTYPE),
            _smoothing(logit_scale_hi, logit_scale_lo, ACC_DTYPE),
            _smoothing(softcap_hi, softcap_lo, ACC_DTYPE),
            HAS_WEIGHT,
            PROB_TARGET,
            HAS_SMOOTHING,
            HAS_SOFTCAP,
            0.0,  # row_tile: the backward reads the logits
            LOGITS_GRAD,
            TARGET_GRAD,
            False,  # ROW_ON_CHIP
            False,  # REVERSE_SECOND_READ
            ACC_DTYPE,
            BLOCK_R,
            BLOCK_C,
        )
