"""Sigmoid + binary cross-entropy Triton kernel (framework-neutral: no torch in this file).

One elementwise kernel serves forward and backward; constexpr flags pick the outputs. Every
operand is a strided 2-D array ``(n_rows, n_cols)``: broadcast ``weight``/``pos_weight`` arrive
with stride 0 and a scalar upstream gradient arrives with both strides 0, so nothing is expanded
in memory.

Math per element (``x`` logit, ``t`` target, ``w`` weight, ``pw`` pos_weight, ``g`` upstream
gradient; ``e = exp(-|x|)`` never overflows)::

    c        = (pw - 1) * t + 1
    loss     = w * [(1 - t) * x + c * (log1p(e) + max(-x, 0))]        # -logsigmoid(x) = ...
    dloss/dx = w * [(1 - t) * sigmoid(x) - pw * t * sigmoid(-x)]      # = w * (c*o - pw*t)
    dloss/dt = w * [(pw - 1) * log1p(e) - (x if x >= 0 else pw * x)]

The target gradient is torch's ``log_sigmoid(-x) - pw * log_sigmoid(x)`` with the infinite
parts split off: ``(pw - 1) * log1p(e)`` is finite, so at ``x = -inf`` no ``0 * inf`` or
``inf - inf`` arises (torch gives ``+inf`` there, with or without ``pos_weight``).

With ``w = pw = 1`` the input gradient is the lecture's ``o - t``. Writing it as
``(1 - t) * o - t * (1 - o)`` keeps full relative precision when ``o`` is within 1e-8 of ``t``.
"""

import triton
import triton.language as tl


@triton.jit
def _log1p(z, u, inv_u):
    """log(1 + z) for z in [0, 1] from ``u = fl(1 + z)`` and ``inv_u = 1 / u`` (which the
    sigmoid needs too), exact to rounding for tiny z (no libdevice: the interpreter lacks it).
    ``u - 1`` is exact, so ``d = z - (u - 1)`` is the rounding error of ``1 + z`` and
    ``log(1 + z) = log(u + d) = log(u) + d / u`` to second order in ``d`` (below 2^-48
    relative): one division for the sigmoid and the loss together instead of one each
    (issue 22: the kernel is bound by instructions per element, not bytes)."""
    return tl.log(u) + (z - (u - 1.0)) * inv_u


# n_rows varies from call to call (the batch): no specialization on its value.
@triton.jit(do_not_specialize=["n_rows"])
def bce_kernel(
    input_ptr,
    target_ptr,
    weight_ptr,
    pos_weight_ptr,
    grad_ptr,
    upstream_ptr,
    loss_ptr,
    grad_input_ptr,
    grad_target_ptr,
    loss_partials_ptr,
    n_rows,
    n_cols,
    n_col_blocks,
    input_row_stride,
    input_col_stride,
    target_row_stride,
    target_col_stride,
    weight_row_stride,
    weight_col_stride,
    pos_weight_row_stride,
    pos_weight_col_stride,
    grad_row_stride,
    grad_col_stride,
    HAS_WEIGHT: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    SUM_LOSS: tl.constexpr,
    COMPUTE_GRAD_INPUT: tl.constexpr,
    COMPUTE_GRAD_TARGET: tl.constexpr,
    SKIP_UNIT_UPSTREAM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Loss (forward) or gradients (backward) of one ``BLOCK_R x BLOCK_C`` tile.

    Outputs (loss, grad_input, grad_target) are contiguous ``(n_rows, n_cols)``. With
    ``SUM_LOSS`` the loss is not stored: each program writes the sum of its tile's loss to
    ``loss_partials[program]`` instead (a ``'mean'``/``'sum'`` then never writes and re-reads
    the elementwise loss). Bytes moved: x and t read once, each requested output written once;
    g read once unless it is one scalar (both strides 0); weights are read once per element too,
    but broadcast ones hit the cache. One launch can write the loss and both gradients.

    ``SKIP_UNIT_UPSTREAM`` (the scalar-loss backward: the forward already wrote the gradients
    for an upstream gradient of 1): every program reads the 0-d ``upstream`` and, when it is 1,
    masks off every load and store; otherwise it rewrites the gradients for ``g * upstream``.
    """
    # A 1-D grid: the tile index splits into (row block, column block), so neither count is
    # limited by CUDA's 65535 cap on the second grid dimension.
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // n_col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    if SKIP_UNIT_UPSTREAM:
        upstream = tl.load(upstream_ptr).to(ACC_DTYPE)
        # An upstream gradient of 1: every load and store is masked off, nothing moves.
        mask = mask & (tl.full((BLOCK_R, BLOCK_C), 1.0, ACC_DTYPE) * upstream != 1.0)
    r = rows[:, None]
    c = cols[None, :]

    x = tl.load(input_ptr + r * input_row_stride + c * input_col_stride, mask, 0.0).to(ACC_DTYPE)
    t = tl.load(target_ptr + r * target_row_stride + c * target_col_stride, mask, 0.0).to(ACC_DTYPE)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + r * weight_row_stride + c * weight_col_stride, mask, 0.0).to(
            ACC_DTYPE
        )
    else:
        w = tl.full((BLOCK_R, BLOCK_C), 1.0, ACC_DTYPE)
    if HAS_POS_WEIGHT:
        pw = tl.load(
            pos_weight_ptr + r * pos_weight_row_stride + c * pos_weight_col_stride, mask, 0.0
        ).to(ACC_DTYPE)
    else:
        pw = tl.full((BLOCK_R, BLOCK_C), 1.0, ACC_DTYPE)

    e = tl.exp(-tl.abs(x))
    one_plus_e = 1.0 + e
    inv = 1.0 / one_plus_e
    log1p_e = _log1p(e, one_plus_e, inv)
    neg_log_sigmoid = log1p_e + tl.maximum(-x, 0.0)
    out = r * n_cols + c
    if COMPUTE_LOSS or SUM_LOSS:
        loss = w * ((1.0 - t) * x + ((pw - 1.0) * t + 1.0) * neg_log_sigmoid)
    if COMPUTE_LOSS:
        tl.store(loss_ptr + out, loss.to(loss_ptr.dtype.element_ty), mask)
    if SUM_LOSS:
        tl.store(loss_partials_ptr + pid, tl.sum(tl.sum(tl.where(mask, loss, 0.0), 1), 0))
    if COMPUTE_GRAD_INPUT or COMPUTE_GRAD_TARGET:
        g = tl.load(grad_ptr + r * grad_row_stride + c * grad_col_stride, mask, 0.0).to(ACC_DTYPE)
        if SKIP_UNIT_UPSTREAM:
            g = g * upstream
        g = g * w
    if COMPUTE_GRAD_INPUT:
        sig_pos = tl.where(x >= 0, inv, e * inv)  # sigmoid(x)
        sig_neg = tl.where(x >= 0, e * inv, inv)  # sigmoid(-x) = 1 - sigmoid(x)
        grad_x = g * ((1.0 - t) * sig_pos - pw * t * sig_neg)
        tl.store(grad_input_ptr + out, grad_x.to(grad_input_ptr.dtype.element_ty), mask)
    if COMPUTE_GRAD_TARGET:
        grad_t = g * ((pw - 1.0) * log1p_e - tl.where(x >= 0, x, pw * x))
        tl.store(grad_target_ptr + out, grad_t.to(grad_target_ptr.dtype.element_ty), mask)
