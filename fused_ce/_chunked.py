"""The chunked GEMM driver of the fused linear + loss heads (the ``"chunked"`` path), shared by
every backend: the per-chunk loss comes from the module passed in as ``ce``/``bce`` (the Triton
launchers of ``fused_ce.launch``, the native kernels of ``fused_ce.native``, or the
plain-PyTorch reference ``fused_ce.torch_impl``); this driver only makes the logits and
gathers the gradients, with torch's GEMMs.

For each chunk of rows the logits ``z = x_r @ W^T + b`` (``rows x V``, input dtype) come from one
GEMM (``torch.mm``/``addmm``: cuBLAS on CUDA, MKL/oneDNN on CPU) into one reused buffer. The loss
implementation turns the buffer into per-row statistics and, when gradients are wanted, into
``G = dL/dz`` in place. Two more GEMMs finish the chunk:

* ``dX_r = G @ W``: complete for these rows, so it is written once, rounded once;
* ``dW += G^T @ x_r`` and ``db += sum_r G``: accumulated across chunks in fp32 (fp64 for fp64)
  and rounded once at the end (bf16 accumulation across chunks made peers diverge).

No ``N x V`` tensor exists: peak extra memory is one chunk buffer (plus, on the torch path,
two fp32 temporaries of its size in the forward, none in an fp32 backward) and, for fp16/bf16
weights, one fp32 ``V x D`` accumulator.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from types import ModuleType

import torch

from ._common import CEOptions, accumulation_dtype, forward_outputs

# Default chunk budget, in bytes of the logits buffer (the ``chunk_size=None`` rule). CUDA: large
# enough that each chunk's three GEMMs stay efficient and the fp32 dW accumulator, read and
# written once per chunk, costs little next to them. CPU: small enough that the torch path's
# fp32 temporaries (two chunk-sized buffers in its forward; none in its backward, which works
# in place in the fp32 chunk buffer) stay far below the logits' size. (8 MiB and 4 MiB were
# no faster at N 8192, D 512, V 32768 on a 2-core box.)
CUDA_CHUNK_BYTES = 512 << 20
CPU_CHUNK_BYTES = 16 << 20
# The native kernels make no temporaries (the loss and dL/dz are computed in place in the chunk
# buffer), so on their path a chunk can be larger: that gives the dW GEMM (K = rows per chunk)
# a deeper K. Measured at N 1024, D 512, V 32768 fp32 on a loaded 2-core box: 128-row chunks
# (16 MiB) took 1.3x the time of the three GEMMs, 512-row chunks (64 MiB) 1.05x. A chunk holds
# at most a quarter of the N x V logits, though (not less than CPU_CHUNK_BYTES): 64 MiB is all
# of a small batch's logits (512 x 32000 fp32 is 62.5 MiB), and the op would then save nothing.
NATIVE_CPU_CHUNK_BYTES = 64 << 20
NATIVE_CPU_CHUNK_FRACTION = 4


# Batch-invariant heads (``fixed_rows``): every GEMM has this many rows (the last chunk padded
# with zero rows), so a row's logits and input gradient come from a GEMM of one shape whatever
# the batch. Measured (MKL, fp32, 1 and 2 threads): a row's bits at any position of a
# fixed-shape product are the same, while a GEMM of another row count changes them by up to
# 2.7e-5 (128 x 512 x 1000). Capped so a short batch pads few rows; at most this many rows of
# wasted GEMM work per call.
BATCH_INVARIANT_ROWS = 256


def fixed_chunk_rows(
    chunk_size: int, n_classes: int, input: torch.Tensor, *, backend: str = "torch"
) -> int:
    """Rows per chunk of a batch-invariant head: ``chunk_size`` when positive, else the budget
    rule of :func:`chunk_rows` capped at ``BATCH_INVARIANT_ROWS``; never the row count, so the
    GEMM shapes do not depend on the batch."""
    if chunk_size > 0:
        return chunk_size
    budget = chunk_rows(0, 1 << 62, n_classes, input, backend=backend)
    return min(BATCH_INVARIANT_ROWS, budget)


def chunk_rows(
    chunk_size: int, n_rows: int, n_classes: int, input: torch.Tensor, *, backend: str = "torch"
) -> int:
    """Rows per chunk: ``chunk_size`` when positive, else the budget rule above for the
    resolved ``backend`` (at least one row; a multiple of 64 on CUDA once the budget allows,
    for GEMM-friendly shapes)."""
    if chunk_size > 0:
        return max(1, min(chunk_size, n_rows))
    if input.device.type == "cuda":
        rows = CUDA_CHUNK_BYTES // (input.element_size() * max(n_classes, 1))
        rows = rows - rows % 64 if rows >= 64 else rows
    else:
        # The torch path computes in fp32 (fp64 for fp64) whatever the input dtype.
        row_bytes = max(input.element_size(), 4) * max(n_classes, 1)
        budget = CPU_CHUNK_BYTES
        if backend == "native":
            share = n_rows * row_bytes // NATIVE_CPU_CHUNK_FRACTION
            budget = min(NATIVE_CPU_CHUNK_BYTES, max(CPU_CHUNK_BYTES, share))
        rows = budget // row_bytes
    return max(1, min(rows, n_rows))


@functools.cache
def _mixed_addmm_works(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc32, a16, b16, out_dtype=float32, out=acc32)`` runs here (cuBLAS
    with an fp32 C; torch >= 2.8 on CUDA). Probed once per device on a 16 x 16 product."""
    if device.type != "cuda":
        return False
    acc = torch.ones(16, 16, device=device)
    half = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(acc, half, half, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32/fp64 and ``a``, ``b`` in the input dtype: one cuBLAS
    call with an fp32 C where torch offers it, else an fp32 product of upcast operands (exact,
    slower: CPU, and CUDA before torch 2.8)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _mixed_addmm_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class LinearGrads:
    """Gradients of ``x @ W^T + b`` gathered chunk by chunk from ``G = dL/dz``.

    ``grad_input`` rows are final when their chunk is added; ``W`` and ``b`` gradients sum in
    the accumulation dtype (the output itself when that is the weight's dtype, so fp32 heads
    need no second ``V x D`` buffer) and are rounded once by :meth:`results`.
    """

    def __init__(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        linear_bias: torch.Tensor | None,
        input_grad: bool,
        weight_grad: bool,
        bias_grad: bool,
    ) -> None:
        acc = accumulation_dtype(input.dtype)
        n_classes = linear_weight.shape[0]
        self.input = input
        self.linear_weight = linear_weight
        self.linear_bias = linear_bias
        self.input_grad, self.weight_grad, self.bias_grad = input_grad, weight_grad, bias_grad
        self.grad_input = (
            torch.empty(input.shape, dtype=input.dtype, device=input.device)
            if input_grad
            else input.new_empty(0)
        )
        self.grad_weight = (
            linear_weight.new_zeros(linear_weight.shape, dtype=acc)
            if weight_grad
            else linear_weight.new_empty(0)
        )
        self.grad_bias = linear_weight.new_zeros(n_classes if bias_grad else 0, dtype=acc)

    def add(self, rows: slice, grad_logits: torch.Tensor) -> None:
        """Take one chunk's ``G`` (``rows x V``, the input dtype). A padded chunk's ``G`` has
        more rows than ``rows`` (see :func:`cross_entropy`'s ``fixed_rows``): its ``dX`` GEMM
        keeps the padded shape, its ``dW`` and ``db`` take the real rows only."""
        n = rows.stop - rows.start
        if self.input_grad:
            if grad_logits.shape[0] == n:
                torch.mm(grad_logits, self.linear_weight, out=self.grad_input[rows])
            else:
                self.grad_input[rows] = torch.mm(grad_logits, self.linear_weight)[:n]
        grad_logits = grad_logits[:n]
        if self.weight_grad:
            accumulate_product(self.grad_weight, grad_logits.t(), self.input[rows])
        if self.bias_grad:
            self.grad_bias += grad_logits.sum(0, dtype=self.grad_bias.dtype)

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dX, dW, db)`` in the operands' dtypes; empty where not requested."""
        grad_weight = self.grad_weight.to(self.linear_weight.dtype)
        grad_bias = self.grad_bias
        if self.bias_grad:
            grad_bias = grad_bias.to(self.linear_bias.dtype)
        return self.grad_input, grad_weight, grad_bias


def chunk_logits(
    buffer: torch.Tensor,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    rows: slice,
) -> torch.Tensor:
    """``x[rows] @ W^T + b`` into the head of ``buffer`` (addmm: the bias joins before the one
    rounding, as in ``F.linear``)."""
    out = buffer[: rows.stop - rows.start]
    if linear_bias is None:
        return torch.mm(input[rows], linear_weight.t(), out=out)
    return torch.addmm(linear_bias, input[rows], linear_weight.t(), out=out)


def row_chunks(n_rows: int, rows_per_chunk: int) -> Iterator[slice]:
    """Consecutive slices of ``rows_per_chunk`` rows (the last one shorter) covering
    ``n_rows``."""
    for start in range(0, n_rows, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, n_rows))


def cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
    rows_per_chunk: int,
    ce: ModuleType,
    *,
    with_stats: bool = False,
    saved: torch.Tensor | None = None,
    grad_loss: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    grads: LinearGrads | None = None,
    grad_target: torch.Tensor | None = None,
    fixed_rows: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-row ``(loss, lse, saved, entropy, argmax)`` of ``cross_entropy(x @ W^T + b,
    target)`` (as the core ``ce.forward`` returns them), and gradients.

    ``input`` ``(N, D)``; ``target`` ``(N,)`` class indices or ``(N, V)`` probabilities; ``ce``
    is a backend's ``cross_entropy`` module (``fused_ce.launch``, ``fused_ce.native`` or
    ``fused_ce.torch_impl``), which gets ``options``. Three uses:

    * ``saved=None, grad_loss=None``: the forward's statistics only;
    * ``saved=None`` with ``grad_scale`` (0-d): statistics and the gradients of ``grad_scale *
      sum_n loss_n`` in one sweep (the scalar-loss path: each chunk's logits are made once, and
      one ``ce.forward`` call turns them into their gradient in place);
    * ``saved`` (the forward's ``(3, N)``) with ``grad_loss`` (and optionally ``grad_lse``):
      the backward, recomputing each chunk's logits; nothing is returned.

    Gradients go to ``grads`` and, for probability targets, into ``grad_target`` (``(N, V)``).

    ``fixed_rows``: every chunk has exactly ``rows_per_chunk`` rows, a short one padded with
    zero rows whose targets are ``ignore_index`` (zero probabilities) and whose upstream
    gradients are 0, so each GEMM and kernel call has one shape whatever ``N`` is: a row's
    loss and ``dX`` are then the same bits in any batch (padded rows reach no output).
    """
    n_rows = input.shape[0]
    n_classes = linear_weight.shape[0]
    compute_stats = saved is None
    outputs = ()
    if compute_stats:
        dtype = accumulation_dtype(input.dtype, target.dtype)
        outputs = forward_outputs(n_rows, dtype, input.device, with_stats)
        saved = outputs[2]
    buffer = input.new_empty(
        rows_per_chunk if fixed_rows else min(rows_per_chunk, n_rows), n_classes
    )
    for rows in row_chunks(n_rows, rows_per_chunk):
        n = rows.stop - rows.start
        pad = buffer.shape[0] - n if fixed_rows else 0
        if pad:
            logits = chunk_logits(
                buffer, pad_rows(input[rows], pad), linear_weight, linear_bias, slice(0, n + pad)
            ).unsqueeze(-1)
        else:
            logits = chunk_logits(buffer, input, linear_weight, linear_bias, rows).unsqueeze(-1)
        # (rows, 1) class indices or (rows, V, 1) probabilities: the core's 3-D layout.
        chunk_target = _padded_target(target[rows], pad, options.ignore_index).unsqueeze(-1)
        chunk_grad_target = None
        if grad_target is not None:
            chunk_grad_target = pad_rows(grad_target[rows], pad) if pad else grad_target[rows]
            chunk_grad_target = chunk_grad_target.unsqueeze(-1)
        if compute_stats:
            chunk_outputs = ce.forward(
                logits,
                chunk_target,
                weight,
                options,
                with_stats=with_stats,
                grad_scale=grad_scale,
                grad_logits=logits if grad_scale is not None else None,  # in place
                grad_target=chunk_grad_target if grad_scale is not None else None,
            )
            for out, value in zip(outputs, chunk_outputs, strict=True):
                if out.dim() == 2:
                    out[:, rows] = value[:, :n]
                elif out.numel():
                    out[rows] = value[:n]
        if grad_loss is not None:
            ce.backward(
                pad_rows(grad_loss[rows], pad),
                pad_rows(grad_lse[rows], pad) if grad_lse is not None else None,
                logits,
                chunk_target,
                weight,
                pad_rows(saved[:, rows], pad, dim=1),
                options,
                logits,  # in place: the chunk buffer becomes dL/dz
                chunk_grad_target,
            )
        if (
            pad
            and chunk_grad_target is not None
            and (grad_loss is not None or grad_scale is not None)
        ):
            grad_target[rows] = chunk_grad_target.squeeze(-1)[:n]
        if grad_loss is not None or grad_scale is not None:
            grads.add(rows, logits.squeeze(-1))
    return outputs


def pad_rows(rows: torch.Tensor, pad: int, dim: int = 0) -> torch.Tensor:
    """``rows`` followed by ``pad`` zeros along ``dim`` (``rows`` itself when ``pad`` is 0);
    contiguous."""
    if not pad:
        return rows
    shape = list(rows.shape)
    shape[dim] += pad
    out = rows.new_zeros(shape)
    out.narrow(dim, 0, rows.shape[dim]).copy_(rows)
    return out


def _padded_target(target: torch.Tensor, pad: int, ignore_index: int) -> torch.Tensor:
    """A chunk's target padded with rows that contribute nothing: ``ignore_index`` class
    indices (as int64, which holds any ignore_index) or all-zero probabilities."""
    if not pad:
        return target
    if target.is_floating_point():
        return pad_rows(target, pad)
    out = torch.full(
        (target.shape[0] + pad,), ignore_index, dtype=torch.int64, device=target.device
    )
    out[: target.shape[0]] = target
    return out


def binary_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    rows_per_chunk: int,
    bce: ModuleType,
    *,
    loss: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    grads: LinearGrads | None = None,
    grad_target: torch.Tensor | None = None,
    fixed_rows: bool = False,
) -> None:
    """Elementwise loss and gradients of ``binary_cross_entropy_with_logits(x @ W^T + b)``.

    ``input`` ``(N, D)``; ``target``, ``weight``, ``pos_weight`` and ``grad`` are ``(N, C)``
    (broadcast ones with stride 0); ``bce`` is a backend's ``bce`` module (``fused_ce.launch``,
    ``fused_ce.native`` or ``fused_ce.torch_impl``). ``loss`` receives the ``(N, C)``
    elementwise loss or, when it is 1-D, the per-row sums in the accumulation dtype (so a mean
    or sum never holds ``N x C``). ``grad`` (the upstream gradient of the elementwise loss),
    when given, sends gradients to ``grads`` and ``grad_target``. ``fixed_rows``: chunks of
    exactly ``rows_per_chunk`` rows, as in :func:`cross_entropy` (padded rows: zero inputs,
    targets, weights and upstream gradients; they reach no output).
    """
    n_rows = input.shape[0]
    n_classes = linear_weight.shape[0]
    buffer = input.new_empty(
        rows_per_chunk if fixed_rows else min(rows_per_chunk, n_rows), n_classes
    )
    row_sums = loss is not None and loss.dim() == 1
    for rows in row_chunks(n_rows, rows_per_chunk):
        n = rows.stop - rows.start
        pad = buffer.shape[0] - n if fixed_rows else 0
        if pad:
            logits = chunk_logits(
                buffer, pad_rows(input[rows], pad), linear_weight, linear_bias, slice(0, n + pad)
            )
        else:
            logits = chunk_logits(buffer, input, linear_weight, linear_bias, rows)
        operands = [
            pad_rows(t[rows], pad) if t is not None else None for t in (target, weight, pos_weight)
        ]
        chunk_loss = None
        if loss is not None:
            chunk_loss = (
                torch.empty_like(logits, dtype=loss.dtype) if row_sums or pad else loss[rows]
            )
        chunk_grad = pad_rows(grad[rows], pad) if grad is not None else None
        chunk_grad_target = None
        if grad_target is not None:
            chunk_grad_target = (
                torch.empty_like(logits, dtype=grad_target.dtype) if pad else grad_target[rows]
            )
            # Before the in-place pass below overwrites the logits it needs.
            bce.run(logits, *operands, chunk_grad, None, None, chunk_grad_target)
            if pad:
                grad_target[rows] = chunk_grad_target[:n]
        # One pass: the loss, then dL/dz in place of the logits (each element is read first).
        bce.run(
            logits,
            *operands,
            chunk_grad,
            chunk_loss,
            logits if chunk_grad is not None else None,
            None,
        )
        if row_sums:
            loss[rows] = chunk_loss.sum(1)[:n]
        elif pad and loss is not None:
            loss[rows] = chunk_loss[:n]
        if chunk_grad is not None:
            grads.add(rows, logits)


def gathered_logits(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    classes: torch.Tensor,
    rows_per_chunk: int,
) -> torch.Tensor:
    """One logit per row, ``z[n, classes[n]] = x_n . W[classes[n]] + b[classes[n]]``, in
    ``input``'s dtype as the chunk GEMM rounds it (the product summed in the accumulation
    dtype), without the ``N x V`` logits: ``rows_per_chunk`` gathered weight rows at a time.
    ``classes`` ``(N,)`` must be in ``[0, V)``."""
    acc = accumulation_dtype(input.dtype)
    out = input.new_empty(input.shape[0])
    for rows in row_chunks(input.shape[0], rows_per_chunk):
        index = classes[rows]
        z = torch.linalg.vecdot(input[rows].to(acc), linear_weight[index].to(acc))
        if linear_bias is not None:
            z = z + linear_bias[index].to(acc)
        out[rows] = z
    return out
