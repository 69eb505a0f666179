"""Fused linear + softmax cross-entropy Triton kernels (framework-neutral: no torch in this file).

The logits ``z = x @ W^T + b`` (``N x V``) are never written to memory. Each program forms
``BLOCK_N x BLOCK_V`` tiles of them with ``tl.dot`` over ``BLOCK_D`` slices of the ``D``
features (fp32 accumulator, fp64 for fp64 operands) and uses each tile at once.

Per-row math is that of kernels/cross_entropy.py (read its docstring): with ``lse`` the row's
log-sum-exp, ``p = exp(z - lse)``, class weights ``w`` and smoothing ``eps``, the forward writes
``lse`` and saves the row max ``m``, ``log_s = lse - m`` (kept apart, so that ``p = exp((z - m) -
log_s)`` carries no rounding of a large ``lse``) and ``U = sum_c u_c`` per row in a ``(3, N)``
array, and the backward recomputes the tiles and forms

    G = dloss/dz = g * [p * coef_p - coef_y * onehot(y) - coef_u * u]     (per row coefficients)

then ``dX = G @ W``, ``dW = G^T @ X`` and ``db = sum_rows G``, the lecture's ``(o - t) x``.
The options (logit scale, soft-cap, the statistics, an upstream gradient of ``lse``) are those
of kernels/cross_entropy.py, applied to each logits tile by the same helpers; with them ``G``
is the gradient with respect to the raw logits ``x @ W^T + b`` (the cap's slope included).

Kernels:

* ``lce_forward_kernel``: one program per ``BLOCK_N`` rows walks the ``V`` tiles with the
  online softmax and writes loss, lse, m, log_s, U per row. HBM traffic at best: ``X`` and
  ``W`` once each (tiles are re-read through L2), five words per row written.
* ``lce_backward_input_kernel``: one program per (row block, output feature block) walks ``V``,
  recomputes the logits tile and accumulates ``G @ W`` in registers; it also writes the gradient
  of a probability target (``N x V``, once).
* ``lce_backward_weight_kernel``: one program per (class block, output feature block) walks the
  rows and accumulates ``G^T @ X`` (and ``sum_rows G`` for the bias) in registers.

Every output element belongs to one program, which sums in a fixed order and rounds once at the
store: deterministic, no atomics. The price is recomputation: each output feature block
recomputes the logits tiles over all ``D`` features, so the backward costs
``2 + 2 * ceil(D / BLOCK_DO)`` GEMM-equivalents of the ``(N, D, V)`` shape: cheap for the small
``D`` of classifier and multi-label heads, and why the chunked cuBLAS path serves LLM heads.
"""

import triton
import triton.language as tl

from .cross_entropy import (
    _final_logits,
    _online_softmax_step,
    _smoothing,
    _store_row_results,
)


@triton.jit
def _logits_tile(
    input_ptr,
    linear_weight_ptr,
    linear_bias_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    n_features,
    input_row_stride,
    input_feature_stride,
    weight_class_stride,
    weight_feature_stride,
    bias_stride,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``z[rows, cols] = x[rows] @ W[cols]^T + b[cols]`` in ``ACC_DTYPE``; masked lanes are 0."""
    z = tl.zeros((BLOCK_N, BLOCK_V), ACC_DTYPE)
    for start in range(0, n_features, BLOCK_D):
        features = start + tl.arange(0, BLOCK_D).to(tl.int64)
        feature_mask = features < n_features
        x = tl.load(
            input_ptr + rows[:, None] * input_row_stride + features[None, :] * input_feature_stride,
            row_mask[:, None] & feature_mask[None, :],
            0.0,
        )
        w = tl.load(
            linear_weight_ptr
            + cols[None, :] * weight_class_stride
            + features[:, None] * weight_feature_stride,
            feature_mask[:, None] & col_mask[None, :],
            0.0,
        )
        # out_dtype must name the accumulator's dtype: Triton 3.6 asserts it for fp64 (3.9 infers).
        z = tl.dot(
            x.to(DOT_DTYPE),
            w.to(DOT_DTYPE),
            z,
            input_precision=DOT_PRECISION,
            out_dtype=ACC_DTYPE,
        )
    if HAS_BIAS:
        z += tl.load(linear_bias_ptr + cols * bias_stride, col_mask, 0.0).to(ACC_DTYPE)[None, :]
    return z


@triton.jit
def _linear_weight_tile(
    target_ptr,
    class_weight_ptr,
    rows,
    cols,
    mask,
    col_mask,
    target_row_stride,
    target_class_stride,
    label_smoothing,
    n_classes,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(u, w): ``u = w * t'`` for probability targets, ``w`` (or ones) for smoothing; 0 where
    masked. ``w`` is the class-weight row (ones without weights)."""
    if HAS_WEIGHT:
        w = tl.load(class_weight_ptr + cols, col_mask, 0.0).to(ACC_DTYPE)[None, :]
    else:
        w = tl.full((1, BLOCK_V), 1.0, ACC_DTYPE)
    if PROB_TARGET:
        t = tl.load(
            target_ptr + rows[:, None] * target_row_stride + cols[None, :] * target_class_stride,
            mask,
            0.0,
        ).to(ACC_DTYPE)
        u = ((1.0 - label_smoothing) * t + label_smoothing / n_classes) * w
    else:
        u = tl.full((BLOCK_N, BLOCK_V), 1.0, ACC_DTYPE) * w
    return tl.where(mask, u, 0.0), w


@triton.jit
def _class_targets(
    target_ptr,
    rows,
    row_mask,
    target_row_stride,
    ignore_index,
    n_classes,
    PROB_TARGET: tl.constexpr,
):
    """(y, valid) per row: class index (-1 when ignored or out of range) and validity."""
    if PROB_TARGET:
        y = tl.zeros_like(rows) - 1
        valid = row_mask
    else:
        y = tl.load(target_ptr + rows * target_row_stride, row_mask, 0).to(tl.int64)
        valid = row_mask & (y != ignore_index) & (y >= 0) & (y < n_classes)
        y = tl.where(valid, y, -1)  # never address memory with an unchecked target
    return y, valid


@triton.jit
def lce_forward_kernel(
    input_ptr,
    linear_weight_ptr,
    linear_bias_ptr,
    target_ptr,
    class_weight_ptr,
    loss_ptr,
    lse_ptr,
    saved_ptr,
    entropy_ptr,
    argmax_ptr,
    n_rows,
    n_classes,
    n_features,
    saved_stride,
    input_row_stride,
    input_feature_stride,
    weight_class_stride,
    weight_feature_stride,
    bias_stride,
    target_row_stride,
    target_class_stride,
    ignore_index,
    label_smoothing_hi,
    label_smoothing_lo,
    logit_scale_hi,
    logit_scale_lo,
    softcap_hi,
    softcap_lo,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_STATS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per-row loss, lse and the saved ``(m, log_s, U)`` (with ``WITH_STATS`` also entropy
    and argmax) without writing logits (online softmax over the V tiles; the options of
    kernels/cross_entropy.py applied to each logits tile).

    Sums that multiply logits are kept relative to the running max (as in the core kernel), so
    a shift of the whole row or logits of size 1e4 cost no precision.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < n_rows
    label_smoothing = _smoothing(label_smoothing_hi, label_smoothing_lo, ACC_DTYPE)
    logit_scale = _smoothing(logit_scale_hi, logit_scale_lo, ACC_DTYPE)
    softcap = _smoothing(softcap_hi, softcap_lo, ACC_DTYPE)
    y, valid = _class_targets(
        target_ptr, rows, row_mask, target_row_stride, ignore_index, n_classes, PROB_TARGET
    )
    LINEAR: tl.constexpr = PROB_TARGET or HAS_SMOOTHING

    running_max = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)
    exp_dot = tl.zeros((BLOCK_N,), ACC_DTYPE)  # S1 = sum_c e^(z_c - ref) (z_c - ref)
    argmax = tl.zeros((BLOCK_N,), tl.int64)
    ref = tl.zeros((BLOCK_N,), ACC_DTYPE)  # running_max, or 0 while it is still -inf
    sum_exp = tl.zeros((BLOCK_N,), ACC_DTYPE)
    lin_sum = tl.zeros((BLOCK_N,), ACC_DTYPE)  # sum_c u_c
    lin_dot = tl.zeros((BLOCK_N,), ACC_DTYPE)  # sum_c u_c * (z_c - ref)
    z_y = tl.zeros((BLOCK_N,), ACC_DTYPE)  # the target's logit
    for start in range(0, n_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < n_classes
        mask = row_mask[:, None] & col_mask[None, :]
        z = _logits_tile(
            input_ptr,
            linear_weight_ptr,
            linear_bias_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            n_features,
            input_row_stride,
            input_feature_stride,
            weight_class_stride,
            weight_feature_stride,
            bias_stride,
            HAS_BIAS,
            DOT_DTYPE,
            DOT_PRECISION,
            ACC_DTYPE,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        z, _ = _final_logits(z, logit_scale, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max, new_ref, sum_exp, exp_dot, argmax = _online_softmax_step(
            z, start, running_max, ref, sum_exp, exp_dot, argmax, WITH_STATS
        )
        if LINEAR:
            u, w = _linear_weight_tile(
                target_ptr,
                class_weight_ptr,
                rows,
                cols,
                mask,
                col_mask,
                target_row_stride,
                target_class_stride,
                label_smoothing,
                n_classes,
                HAS_WEIGHT,
                PROB_TARGET,
                ACC_DTYPE,
                BLOCK_N,
                BLOCK_V,
            )
            lin_dot = (
                lin_dot
                + (ref - new_ref) * lin_sum
                + tl.sum(u * tl.where(mask, z - new_ref[:, None], 0.0), 1)
            )
            lin_sum = lin_sum + tl.sum(u, 1)
        if not PROB_TARGET:
            z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        running_max = new_max
        ref = new_ref

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
        z_y,
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


@triton.jit
def _row_coefficients(
    target_ptr,
    class_weight_ptr,
    saved_ptr,
    grad_loss_ptr,
    grad_lse_ptr,
    rows,
    row_mask,
    n_classes,
    saved_stride,
    grad_loss_stride,
    grad_lse_stride,
    target_row_stride,
    ignore_index,
    label_smoothing,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Per-row (m, log_s, g, y, coef_p, coef_y, coef_u) of ``G = p * coef_p - coef_y *
    onehot(y) - coef_u * u``; see kernels/cross_entropy.py. Rows out of range or ignored get all
    zeros."""
    row_max = tl.load(saved_ptr + rows, row_mask, 0.0).to(ACC_DTYPE)
    log_sum_exp = tl.load(saved_ptr + saved_stride + rows, row_mask, 0.0).to(ACC_DTYPE)
    # In int64: 2 * n_rows overflows i32 beyond 2^30 rows (tl.cast, not .to(): a
    # stride of 1 arrives as a constexpr).
    lin_sum = tl.load(saved_ptr + 2 * tl.cast(saved_stride, tl.int64) + rows, row_mask, 0.0).to(
        ACC_DTYPE
    )
    g = tl.load(grad_loss_ptr + rows * grad_loss_stride, row_mask, 0.0).to(ACC_DTYPE)
    y, valid = _class_targets(
        target_ptr, rows, row_mask, target_row_stride, ignore_index, n_classes, PROB_TARGET
    )
    if PROB_TARGET:
        coef_p = g * lin_sum
        coef_u = g
        coef_y = tl.zeros_like(g)
    else:
        coef_y = (1.0 - label_smoothing) * g
        if HAS_WEIGHT:
            coef_y = coef_y * tl.load(class_weight_ptr + y, valid, 0.0).to(ACC_DTYPE)
        coef_u = (label_smoothing / n_classes) * g if HAS_SMOOTHING else tl.zeros_like(g)
        # where(), not a product with v: g is inf for an all-ignored 'mean' (0/0), and the
        # gradient of an ignored row must stay exactly 0.
        coef_y = tl.where(valid, coef_y, 0.0)
        coef_u = tl.where(valid, coef_u, 0.0)
        coef_p = coef_y + coef_u * lin_sum
    if HAS_GRAD_LSE:  # an upstream gradient of lse (z-loss) adds g_lse * p
        coef_p += tl.load(grad_lse_ptr + rows * grad_lse_stride, row_mask, 0.0).to(ACC_DTYPE)
    return row_max, log_sum_exp, g, y, coef_p, coef_y, coef_u


@triton.jit
def _grad_tile(
    z,
    slope,
    target_ptr,
    class_weight_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    row_max,
    log_sum_exp,
    y,
    coef_p,
    coef_y,
    coef_u,
    target_row_stride,
    target_class_stride,
    label_smoothing,
    n_classes,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``G = dloss/dx`` of one tile in ``ACC_DTYPE`` from the final logits ``z`` and their
    slope ``dz/dx`` (see ``_final_logits``), exactly 0 on masked lanes."""
    mask = row_mask[:, None] & col_mask[None, :]
    p = tl.exp((z - row_max[:, None]) - log_sum_exp[:, None])
    grad = p * coef_p[:, None] - tl.where(cols[None, :] == y[:, None], coef_y[:, None], 0.0)
    if PROB_TARGET or HAS_SMOOTHING:
        u, w = _linear_weight_tile(
            target_ptr,
            class_weight_ptr,
            rows,
            cols,
            mask,
            col_mask,
            target_row_stride,
            target_class_stride,
            label_smoothing,
            n_classes,
            HAS_WEIGHT,
            PROB_TARGET,
            ACC_DTYPE,
            BLOCK_N,
            BLOCK_V,
        )
        grad = grad - coef_u[:, None] * u
    return tl.where(mask, grad * slope, 0.0)


@triton.jit
def lce_backward_input_kernel(
    input_ptr,
    linear_weight_ptr,
    linear_bias_ptr,
    target_ptr,
    class_weight_ptr,
    saved_ptr,
    grad_loss_ptr,
    grad_lse_ptr,
    grad_input_ptr,
    grad_target_ptr,
    n_rows,
    n_classes,
    n_features,
    input_row_stride,
    input_feature_stride,
    weight_class_stride,
    weight_feature_stride,
    bias_stride,
    target_row_stride,
    target_class_stride,
    saved_stride,
    grad_loss_stride,
    grad_lse_stride,
    grad_input_row_stride,
    grad_target_row_stride,
    ignore_index,
    label_smoothing_hi,
    label_smoothing_lo,
    logit_scale_hi,
    logit_scale_lo,
    softcap_hi,
    softcap_lo,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    COMPUTE_GRAD_INPUT: tl.constexpr,
    COMPUTE_GRAD_TARGET: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """``dX[rows, out_features] = sum_V G @ W[:, out_features]`` and, from the programs of the
    first feature block, the probability target's gradient ``g (1 - eps) w_c (lse - z_c)``.

    Grid: (row blocks, output feature blocks). ``grad_input`` and ``grad_target`` are row-major
    with unit inner stride. Bytes: ``dX`` (and ``dtarget``) written once; ``X`` and ``W`` read
    through L2 once per output feature block.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < n_rows
    label_smoothing = _smoothing(label_smoothing_hi, label_smoothing_lo, ACC_DTYPE)
    logit_scale = _smoothing(logit_scale_hi, logit_scale_lo, ACC_DTYPE)
    softcap = _smoothing(softcap_hi, softcap_lo, ACC_DTYPE)
    feature_block = tl.program_id(1)
    out_features = feature_block.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    out_mask = out_features < n_features
    row_max, log_sum_exp, g, y, coef_p, coef_y, coef_u = _row_coefficients(
        target_ptr,
        class_weight_ptr,
        saved_ptr,
        grad_loss_ptr,
        grad_lse_ptr,
        rows,
        row_mask,
        n_classes,
        saved_stride,
        grad_loss_stride,
        grad_lse_stride,
        target_row_stride,
        ignore_index,
        label_smoothing,
        HAS_WEIGHT,
        PROB_TARGET,
        HAS_SMOOTHING,
        HAS_GRAD_LSE,
        ACC_DTYPE,
    )
    grad_input = tl.zeros((BLOCK_N, BLOCK_DO), ACC_DTYPE)
    for start in range(0, n_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < n_classes
        z = _logits_tile(
            input_ptr,
            linear_weight_ptr,
            linear_bias_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            n_features,
            input_row_stride,
            input_feature_stride,
            weight_class_stride,
            weight_feature_stride,
            bias_stride,
            HAS_BIAS,
            DOT_DTYPE,
            DOT_PRECISION,
            ACC_DTYPE,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        z, slope = _final_logits(z, logit_scale, softcap, HAS_SOFTCAP)
        if COMPUTE_GRAD_INPUT:
            grad = _grad_tile(
                z,
                slope,
                target_ptr,
                class_weight_ptr,
                rows,
                cols,
                row_mask,
                col_mask,
                row_max,
                log_sum_exp,
                y,
                coef_p,
                coef_y,
                coef_u,
                target_row_stride,
                target_class_stride,
                label_smoothing,
                n_classes,
                HAS_WEIGHT,
                PROB_TARGET,
                HAS_SMOOTHING,
                ACC_DTYPE,
                BLOCK_N,
                BLOCK_V,
            )
            w = tl.load(
                linear_weight_ptr
                + cols[:, None] * weight_class_stride
                + out_features[None, :] * weight_feature_stride,
                col_mask[:, None] & out_mask[None, :],
                0.0,
            )
            grad_input = tl.dot(
                grad.to(DOT_DTYPE),
                w.to(DOT_DTYPE),
                grad_input,
                input_precision=DOT_PRECISION,
                out_dtype=ACC_DTYPE,
            )
        if COMPUTE_GRAD_TARGET:
            # d loss / d t_c = g (1 - eps) w_c (lse - z_c), stored by the first feature block.
            if HAS_WEIGHT:
                w_c = tl.load(class_weight_ptr + cols, col_mask, 0.0).to(ACC_DTYPE)[None, :]
            else:
                w_c = 1.0
            if feature_block == 0:
                neg_logp = log_sum_exp[:, None] - (z - row_max[:, None])
                grad_t = (g * (1.0 - label_smoothing))[:, None] * w_c * neg_logp
                tl.store(
                    grad_target_ptr + rows[:, None] * grad_target_row_stride + cols[None, :],
                    grad_t.to(grad_target_ptr.dtype.element_ty),
                    row_mask[:, None] & col_mask[None, :],
                )
    if COMPUTE_GRAD_INPUT:
        tl.store(
            grad_input_ptr + rows[:, None] * grad_input_row_stride + out_features[None, :],
            grad_input.to(grad_input_ptr.dtype.element_ty),
            row_mask[:, None] & out_mask[None, :],
        )


@triton.jit
def lce_backward_weight_kernel(
    input_ptr,
    linear_weight_ptr,
    linear_bias_ptr,
    target_ptr,
    class_weight_ptr,
    saved_ptr,
    grad_loss_ptr,
    grad_lse_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    n_rows,
    n_classes,
    n_features,
    input_row_stride,
    input_feature_stride,
    weight_class_stride,
    weight_feature_stride,
    bias_stride,
    target_row_stride,
    target_class_stride,
    saved_stride,
    grad_loss_stride,
    grad_lse_stride,
    grad_weight_row_stride,
    ignore_index,
    label_smoothing_hi,
    label_smoothing_lo,
    logit_scale_hi,
    logit_scale_lo,
    softcap_hi,
    softcap_lo,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    COMPUTE_GRAD_WEIGHT: tl.constexpr,
    COMPUTE_GRAD_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """``dW[cols, out_features] = sum_rows G^T @ X[:, out_features]`` and ``db = sum_rows G``
    (stored by the first feature block).

    Grid: (class blocks, output feature blocks). ``grad_weight`` is row-major with unit inner
    stride, ``grad_bias`` contiguous. Bytes: ``dW`` and ``db`` written once; ``X`` and ``W``
    read through L2 once per output feature block.
    """
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_mask = cols < n_classes
    label_smoothing = _smoothing(label_smoothing_hi, label_smoothing_lo, ACC_DTYPE)
    logit_scale = _smoothing(logit_scale_hi, logit_scale_lo, ACC_DTYPE)
    softcap = _smoothing(softcap_hi, softcap_lo, ACC_DTYPE)
    feature_block = tl.program_id(1)
    out_features = feature_block.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    out_mask = out_features < n_features
    grad_weight = tl.zeros((BLOCK_V, BLOCK_DO), ACC_DTYPE)
    grad_bias = tl.zeros((BLOCK_V,), ACC_DTYPE)
    for start in range(0, n_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < n_rows
        row_max, log_sum_exp, g, y, coef_p, coef_y, coef_u = _row_coefficients(
            target_ptr,
            class_weight_ptr,
            saved_ptr,
            grad_loss_ptr,
            grad_lse_ptr,
            rows,
            row_mask,
            n_classes,
            saved_stride,
            grad_loss_stride,
            grad_lse_stride,
            target_row_stride,
            ignore_index,
            label_smoothing,
            HAS_WEIGHT,
            PROB_TARGET,
            HAS_SMOOTHING,
            HAS_GRAD_LSE,
            ACC_DTYPE,
        )
        z = _logits_tile(
            input_ptr,
            linear_weight_ptr,
            linear_bias_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            n_features,
            input_row_stride,
            input_feature_stride,
            weight_class_stride,
            weight_feature_stride,
            bias_stride,
            HAS_BIAS,
            DOT_DTYPE,
            DOT_PRECISION,
            ACC_DTYPE,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        z, slope = _final_logits(z, logit_scale, softcap, HAS_SOFTCAP)
        grad = _grad_tile(
            z,
            slope,
            target_ptr,
            class_weight_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            row_max,
            log_sum_exp,
            y,
            coef_p,
            coef_y,
            coef_u,
            target_row_stride,
            target_class_stride,
            label_smoothing,
            n_classes,
            HAS_WEIGHT,
            PROB_TARGET,
            HAS_SMOOTHING,
            ACC_DTYPE,
            BLOCK_N,
            BLOCK_V,
        )
        if COMPUTE_GRAD_WEIGHT:
            x = tl.load(
                input_ptr
                + rows[:, None] * input_row_stride
                + out_features[None, :] * input_feature_stride,
                row_mask[:, None] & out_mask[None, :],
                0.0,
            )
            grad_weight = tl.dot(
                tl.trans(grad.to(DOT_DTYPE)),
                x.to(DOT_DTYPE),
                grad_weight,
                input_precision=DOT_PRECISION,
                out_dtype=ACC_DTYPE,
            )
        if COMPUTE_GRAD_BIAS:
            grad_bias += tl.sum(grad, 0)
    if COMPUTE_GRAD_WEIGHT:
        tl.store(
            grad_weight_ptr + cols[:, None] * grad_weight_row_stride + out_features[None, :],
            grad_weight.to(grad_weight_ptr.dtype.element_ty),
            col_mask[:, None] & out_mask[None, :],
        )
    if COMPUTE_GRAD_BIAS:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if feature_block == 0:
            tl.store(grad_bias_ptr + cols, grad_bias.to(grad_bias_ptr.dtype.element_ty), col_mask)
