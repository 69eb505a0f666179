"""Shared test helpers: seeded inputs, forward + backward with a random upstream gradient, and
comparison against the independent oracle, PyTorch's own loss computed in float64.

The accuracy rule is the one ``fused-ce check`` applies (:func:`fused_ce.app.check.error_limit`):

* fp32 and fp64 results are compared tightly with the fp64 oracle (:data:`TIGHT`).
* fp16/bf16 results must satisfy ``err(ours) <= 2 * err(torch, same dtype) + tiny`` on the loss
  and on every gradient, where ``err`` is the largest absolute deviation from the oracle and
  ``tiny`` is one unit of the dtype's epsilon at the scale of the oracle's values (the rounding
  of a single store): :func:`fused_ce.app.check.within_torch_error`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fused_ce.app.check import TIGHT, within_torch_error

LOW_PRECISION = (torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int, device, dtype=torch.float32, scale: float = 1.0) -> Tensor:
    """Seeded normal values, drawn on the CPU (device-independent) and moved to ``device``."""
    values = torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale
    return values.to(device=device, dtype=dtype)


def positive(shape, seed: int, device, dtype=torch.float32) -> Tensor:
    """Seeded values in [0.25, 2): weights that are far from 1 and from each other."""
    values = torch.rand(shape, generator=generator(seed), dtype=torch.float64) * 1.75 + 0.25
    return values.to(device=device, dtype=dtype)


def upstream_for(loss: Tensor, seed: int) -> Tensor:
    """A random, non-unit upstream gradient of ``loss``'s shape (per element for 'none'),
    with both signs, already rounded to ``loss``'s dtype and returned in fp64."""
    gen = generator(seed)
    magnitude = torch.rand(loss.shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    sign = torch.where(torch.rand(loss.shape, generator=gen) < 0.3, -1.0, 1.0).double()
    return (magnitude * sign).to(loss.dtype).to(device=loss.device, dtype=torch.float64)


@dataclass
class Result:
    """A loss and the gradients of the tensors it was differentiated against."""

    loss: Tensor
    grads: list[Tensor]

    def grads_named(self) -> list[tuple[str, Tensor]]:
        return [(f"grad[{i}]", g) for i, g in enumerate(self.grads)]

    def outputs(self) -> list[tuple[str, Tensor]]:
        return [("loss", self.loss), *self.grads_named()]


def evaluate(
    fn: Callable[..., Tensor],
    args: Sequence,
    kwargs: dict,
    wrt: Sequence[int],
    upstream: Tensor | None,
) -> Result:
    """``fn(*args, **kwargs)`` and the gradients of ``args[i]`` for ``i in wrt``, backpropagating
    ``upstream`` (cast to the loss's dtype). Arguments keep their strides: leaves are made with
    ``detach()``, not copies, so non-contiguous layouts reach ``fn`` as given."""
    leaves = [a.detach().requires_grad_(True) if i in wrt else a for i, a in enumerate(args)]
    loss = fn(*leaves, **kwargs)
    if not wrt:
        return Result(loss.detach(), [])
    grads = torch.autograd.grad(loss, [leaves[i] for i in wrt], upstream.to(loss.dtype))
    return Result(loss.detach(), list(grads))


def _floating(value) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def _to_fp64(value):
    if _floating(value):
        return value.detach().double()
    return value


def oracle(
    torch_fn: Callable[..., Tensor], args: Sequence, kwargs: dict, wrt: Sequence[int], upstream
) -> Result:
    """PyTorch's loss on the same (already rounded) inputs, upcast to float64."""
    return evaluate(
        torch_fn,
        [_to_fp64(a) for a in args],
        {k: _to_fp64(v) for k, v in kwargs.items()},
        wrt,
        upstream,
    )


def _scale(reference: Tensor) -> float:
    finite = reference[torch.isfinite(reference)]
    return max(float(finite.abs().max()), 1.0) if finite.numel() else 1.0


def _max_error(value: Tensor, reference: Tensor) -> float:
    both = ~reference.isnan()
    if not both.any():
        return 0.0
    return float((value.double()[both] - reference[both]).abs().max())


def assert_close_to_oracle(
    ours: Result,
    reference: Result,
    dtype: torch.dtype,
    grad_tolerance: tuple[float, float] | None = None,
) -> None:
    """fp32/fp64: tight elementwise comparison (NaN where the oracle has NaN). ``grad_tolerance``
    (rtol, atol relative to the largest oracle value) replaces the tight one for gradients."""
    for (name, value), (_, ref) in zip(ours.outputs(), reference.outputs(), strict=True):
        rtol, atol = TIGHT[dtype] if grad_tolerance is None or name == "loss" else grad_tolerance
        assert value.shape == ref.shape, f"{name}: shape {value.shape} != {ref.shape}"
        torch.testing.assert_close(
            value.double(),
            ref,
            rtol=rtol,
            atol=atol * _scale(ref),
            equal_nan=True,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def assert_within_torch_error(
    ours: Result,
    same_dtype: Result,
    reference: Result,
    dtype: torch.dtype,
    elementwise: bool = False,
) -> None:
    """fp16/bf16: our error against the oracle is at most twice torch's own same-dtype error
    plus one rounding.

    By default the errors are the largest over each output and the rounding is one ``eps`` at
    the oracle's largest value (:func:`within_torch_error`; right for outputs that accumulate,
    like a matmul's, whose per-element errors are noise). ``elementwise`` holds the rule at every
    element, with that element's rounding (``eps * |oracle|``, and one subnormal step), so a
    small entry (p - 1 at p = 0.999) cannot hide behind the largest: right for outputs that
    are elementwise functions of the inputs, like a loss's gradient."""
    info = torch.finfo(dtype)
    for (name, value), (_, theirs), (_, ref) in zip(
        ours.outputs(), same_dtype.outputs(), reference.outputs(), strict=True
    ):
        assert value.shape == ref.shape, f"{name}: shape {value.shape} != {ref.shape}"
        assert torch.equal(value.isnan(), ref.isnan()), f"{name}: NaN where the oracle has none"
        infinite = ref.isinf()
        assert torch.equal(value.double()[infinite], ref[infinite]), (
            f"{name}: an infinity that differs from the oracle's"
        )
        known = ~ref.isnan() & ~infinite
        ref = ref[known]
        if not ref.numel():
            continue
        error = (value.double()[known] - ref).abs()
        torch_error = (theirs.double()[known] - ref).abs().nan_to_num(float("inf"))
        if elementwise:
            bound = 2 * torch_error + info.eps * ref.abs() + info.eps * info.smallest_normal
        else:
            torch_error = torch_error.max().expand_as(ref)
            bound = torch.full_like(
                ref, within_torch_error(dtype, float(torch_error[0]), _scale(ref))
            )
        if not (error <= bound).all():
            worst = int((error - bound).argmax())
            raise AssertionError(
                f"{name} ({dtype}): element {worst} (oracle {float(ref[worst]):.6g}): our error "
                f"{float(error[worst]):.3g} > 2 * torch's {float(torch_error[worst]):.3g} "
                f"+ one rounding"
            )


def coarsest(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The least precise floating dtype among ``dtypes``: it decides the accuracy rule."""
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


def check(
    ours_fn: Callable[..., Tensor],
    torch_fn: Callable[..., Tensor],
    args: Sequence,
    kwargs: dict,
    wrt: Sequence[int],
    backend: str,
    seed: int = 0,
    grad_tolerance: tuple[float, float] | None = None,
    *,
    elementwise: bool = False,
    torch_rule: bool = False,
) -> Result:
    """Run ``ours_fn`` (with ``backend``) and hold its loss and gradients against the fp64
    oracle by the rule for the coarsest dtype among the arguments and the loss
    (``grad_tolerance``: see :func:`assert_close_to_oracle`; ``elementwise``: see
    :func:`assert_within_torch_error`; ``torch_rule`` holds fp32/fp64 to the fp16/bf16 rule too,
    at most twice torch's own same-dtype error plus one rounding, for inputs where that error is
    far above the tight tolerance, like logits of 1e4). Also checks that the loss dtype
    equals torch's for the same inputs, that gradients keep their inputs' dtypes, and that no
    argument was written to. Returns our result for further checks."""
    snapshots = [a.clone() if isinstance(a, Tensor) else a for a in args]
    same_dtype = evaluate(torch_fn, args, kwargs, (), None)
    upstream = upstream_for(same_dtype.loss, seed)
    reference = oracle(torch_fn, args, kwargs, wrt, upstream)
    ours = evaluate(ours_fn, args, {**kwargs, "backend": backend}, wrt, upstream)

    assert ours.loss.dtype == same_dtype.loss.dtype, (
        f"loss dtype {ours.loss.dtype} != torch's {same_dtype.loss.dtype}"
    )
    for i, grad in zip(wrt, ours.grads, strict=True):
        assert grad.dtype == args[i].dtype, f"grad[{i}] dtype {grad.dtype} != {args[i].dtype}"
    dtype = coarsest([a.dtype for a in args if _floating(a)] + [ours.loss.dtype])
    if dtype in LOW_PRECISION or torch_rule:
        same_dtype = evaluate(torch_fn, args, kwargs, wrt, upstream)
        assert_within_torch_error(ours, same_dtype, reference, dtype, elementwise)
    else:
        assert_close_to_oracle(ours, reference, dtype, grad_tolerance)
    for before, after in zip(snapshots, args, strict=True):
        if isinstance(before, Tensor):
            torch.testing.assert_close(
                after, before, rtol=0, atol=0, equal_nan=True, msg="an input was modified"
            )
    return ours


def assert_identical(first: Result, second: Result, ulps: int = 0) -> None:
    """Equality of two results (NaN equal to NaN): bitwise, or to ``ulps`` units of the dtype's
    epsilon at the scale of the largest value."""
    for (name, a), (_, b) in zip(first.outputs(), second.outputs(), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        rtol = ulps * torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
        atol = rtol * _scale(b.double()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=name)
