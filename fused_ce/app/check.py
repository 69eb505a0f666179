"""``fused-ce check``: every fused op against PyTorch's own function on random inputs.

Each case builds random inputs, runs the fused op in the checked dtype on one backend and
torch's function in float64 (the reference), then backpropagates the same random upstream
gradient through both. A result passes when its error against the reference is at most twice
the error of torch's own computation in the same dtype, plus a small floor: :func:`error_limit`,
the rule the test suite holds every op to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, functional, linear, native
from .._backend import native_available, triton_runs_on

Inputs = tuple[dict[str, Tensor], dict[str, Any]]

# (rtol, atol) for the dtypes held to a fixed tolerance, both relative to the reference's
# largest magnitude (at least 1): fp32 and fp64 results are compared tightly.
TIGHT = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12)}


def within_torch_error(dtype: torch.dtype, torch_error: float, scale: float) -> float:
    """At most twice torch's own error in ``dtype`` plus one rounding at the reference's scale:
    ``2 * torch_error + eps * max(scale, 1)``. The rule where torch's own error dominates
    (fp16/bf16, or fp32 logits of 1e4)."""
    return 2 * torch_error + torch.finfo(dtype).eps * max(scale, 1.0)


def error_limit(dtype: torch.dtype, torch_error: float, scale: float) -> float:
    """The accuracy rule: the largest absolute error against the float64 reference that a
    result in ``dtype`` may have, where ``torch_error`` is the largest absolute error of
    torch's own function in ``dtype`` and ``scale`` the reference's largest magnitude.

    fp32/fp64: ``(rtol + atol) * max(scale, 1)`` with :data:`TIGHT`'s tolerances; fp16/bf16:
    :func:`within_torch_error`.
    """
    if dtype in TIGHT:
        rtol, atol = TIGHT[dtype]
        return (rtol + atol) * max(scale, 1.0)
    return within_torch_error(dtype, torch_error, scale)


@dataclass(frozen=True)
class Case:
    """One op on one kind of input.

    ``make(gen)`` returns the differentiable tensors (float64, cast to the checked dtype for the
    fused op) and the other arguments (class indices, weights, flags; floating ones are cast the
    same way). ``fused`` and ``reference`` take them as keyword arguments.
    """

    op: str
    name: str
    make: Callable[[torch.Generator], Inputs]
    fused: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    backends: tuple[str, ...] = ("torch", "triton", "native")


def _ce_class(
    reduction: str, ignored: bool, weighted: bool = False, label_smoothing: float = 0.0
) -> Callable[[torch.Generator], Inputs]:
    def make(gen: torch.Generator) -> Inputs:
        n, c = 48, 37
        logits = 3 * torch.randn(n, c, generator=gen, dtype=torch.float64)
        target = torch.randint(0, c, (n,), generator=gen)
        if ignored:
            target[::5] = -100
        constants = {"target": target, "reduction": reduction, "label_smoothing": label_smoothing}
        if weighted:
            constants["weight"] = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
        return {"input": logits}, constants

    return make


def _ce_spatial(gen: torch.Generator) -> Inputs:
    logits = torch.randn(4, 7, 5, 3, generator=gen, dtype=torch.float64)
    return {"input": logits}, {"target": torch.randint(0, 7, (4, 5, 3), generator=gen)}


def _ce_probabilities(gen: torch.Generator) -> Inputs:
    logits = 2 * torch.randn(32, 19, generator=gen, dtype=torch.float64)
    target = torch.softmax(torch.randn(32, 19, generator=gen, dtype=torch.float64), dim=1)
    return {"input": logits, "target": target}, {"label_smoothing": 0.05}


def _bce(scale: float, weighted: bool, reduction: str) -> Callable[[torch.Generator], Inputs]:
    def make(gen: torch.Generator) -> Inputs:
        shape = (40, 12)
        logits = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        target = torch.rand(shape, generator=gen, dtype=torch.float64)
        constants: dict[str, Any] = {"reduction": reduction}
        if weighted:
            constants["weight"] = torch.rand(shape[1], generator=gen, dtype=torch.float64)
            constants["pos_weight"] = 2 * torch.rand(shape[1], generator=gen, dtype=torch.float64)
        return {"input": logits, "target": target}, constants

    return make


def _linear_ce(
    weighted: bool, reduction: str, chunk_size: int | None
) -> Callable[[torch.Generator], Inputs]:
    def make(gen: torch.Generator) -> Inputs:
        n, d, v = 40, 16, 37
        grads_of = {
            "input": torch.randn(n, d, generator=gen, dtype=torch.float64),
            "linear_weight": torch.randn(v, d, generator=gen, dtype=torch.float64) / 2,
            "linear_bias": torch.randn(v, generator=gen, dtype=torch.float64),
        }
        target = torch.randint(0, v, (n,), generator=gen)
        constants: dict[str, Any] = {"target": target, "reduction": reduction}
        if weighted:
            target[::7] = -100
            constants["weight"] = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
            constants["label_smoothing"] = 0.1
        if chunk_size is not None:
            constants["chunk_size"] = chunk_size
        return grads_of, constants

    return make


def _linear_bce(gen: torch.Generator) -> Inputs:
    n, d, c = 40, 16, 3
    grads_of = {
        "input": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "linear_weight": torch.randn(c, d, generator=gen, dtype=torch.float64) / 2,
        "linear_bias": torch.randn(c, generator=gen, dtype=torch.float64),
        "target": torch.rand(n, c, generator=gen, dtype=torch.float64),
    }
    constants = {
        "weight": torch.rand(c, generator=gen, dtype=torch.float64),
        "pos_weight": 2 * torch.rand(c, generator=gen, dtype=torch.float64),
        "chunk_size": 16,
    }
    return grads_of, constants


def _unfused_head(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """torch's loss of ``F.linear``: the reference of a fused linear op (chunk_size and path
    only steer the fused op)."""

    def reference(
        input: Tensor, linear_weight: Tensor, linear_bias: Tensor, target: Tensor, **kwargs: Any
    ) -> Tensor:
        kwargs.pop("chunk_size", None)
        kwargs.pop("path", None)
        return loss(F.linear(input, linear_weight, linear_bias), target, **kwargs)

    return reference


def cases() -> list[Case]:
    """The checked cases: every public fused op, each optional argument at least once."""
    ce, bce = functional.softmax_cross_entropy, functional.sigmoid_binary_cross_entropy
    return [
        Case(
            "softmax_cross_entropy", "class targets", _ce_class("mean", False), ce, F.cross_entropy
        ),
        Case(
            "softmax_cross_entropy",
            "ignore_index, reduction=none",
            _ce_class("none", True),
            ce,
            F.cross_entropy,
        ),
        Case(
            "softmax_cross_entropy",
            "weight, label_smoothing, ignore_index",
            _ce_class("mean", True, weighted=True, label_smoothing=0.1),
            ce,
            F.cross_entropy,
        ),
        Case("softmax_cross_entropy", "(N, C, d1, d2) input", _ce_spatial, ce, F.cross_entropy),
        Case(
            "softmax_cross_entropy",
            "probability targets, smoothing",
            _ce_probabilities,
            ce,
            F.cross_entropy,
        ),
        Case(
            "sigmoid_binary_cross_entropy",
            "plain",
            _bce(3.0, False, "mean"),
            bce,
            F.binary_cross_entropy_with_logits,
        ),
        Case(
            "sigmoid_binary_cross_entropy",
            "weight, pos_weight, reduction=none",
            _bce(3.0, True, "none"),
            bce,
            F.binary_cross_entropy_with_logits,
        ),
        Case(
            "sigmoid_binary_cross_entropy",
            "logits up to 1e4",
            _bce(3e3, False, "sum"),
            bce,
            F.binary_cross_entropy_with_logits,
        ),
        Case(
            "linear_cross_entropy",
            "bias",
            _linear_ce(False, "mean", None),
            linear.linear_cross_entropy,
            _unfused_head(F.cross_entropy),
        ),
        Case(
            "linear_cross_entropy",
            "weight, smoothing, ignore_index, 3 chunks, none",
            _linear_ce(True, "none", 16),
            linear.linear_cross_entropy,
            _unfused_head(F.cross_entropy),
        ),
        Case(
            "linear_cross_entropy",
            "path=fused",
            _linear_ce(True, "mean", None),
            lambda **kwargs: linear.linear_cross_entropy(**kwargs, path="fused"),
            _unfused_head(F.cross_entropy),
            backends=("triton",),
        ),
        Case(
            "linear_binary_cross_entropy_with_logits",
            "C=3, weight, pos_weight, 3 chunks",
            _linear_bce,
            linear.linear_binary_cross_entropy_with_logits,
            _unfused_head(F.binary_cross_entropy_with_logits),
        ),
    ]


def available_backends(device: torch.device) -> list[str]:
    """``torch`` always; ``triton`` where :func:`~fused_ce._backend.triton_runs_on` says so;
    ``native`` on CPU when the C++ extension is built."""
    backends = ["torch", "triton"] if triton_runs_on(device) else ["torch"]
    if device.type == "cpu" and native_available():
        backends.append("native")
    return backends


def native_note() -> str:
    """Which native kernels run here and where they come from (built at install, compiled on
    first use into a cache), or why none do."""
    if native_available():
        return f"native kernels: {native.capability()}, {native.origin()}"
    return f"native kernels: unavailable: {native.unavailable_reason()}"


def triton_note(checked: bool) -> str | None:
    """Why the Triton kernels were not checked (``checked``: they were, on some device): what
    is really missing, the package or a device to run it on; None when they were checked."""
    if checked:
        return None
    if not _backend.HAS_TRITON:
        return (
            "triton backend not checked: the triton package is not installed "
            "(pip install 'fused_ce[triton]'; it runs on CUDA GPUs, or on the CPU under "
            "TRITON_INTERPRET=1)"
        )
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    return (
        f"triton backend not checked: Triton is installed, but there is no CUDA GPU here "
        f"(torch {torch.__version__}, a {build} build, sees none; TRITON_INTERPRET=1 runs the "
        f"kernels on the CPU, slowly)"
    )


@dataclass(frozen=True)
class CheckResult:
    """Max abs errors of one case against the float64 reference, and the limits they met."""

    op: str
    case: str
    device: str
    dtype: str
    backend: str
    loss_error: float
    grad_error: float
    loss_limit: float
    grad_limit: float

    @property
    def ok(self) -> bool:
        return self.loss_error <= self.loss_limit and self.grad_error <= self.grad_limit


def _cast(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


def _loss_and_grads(
    fn: Callable[..., Tensor],
    grads_of: dict[str, Tensor],
    constants: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    upstream_seed: int,
    **extra: Any,
) -> tuple[Tensor, list[Tensor]]:
    """The loss (float64, CPU) and the gradients of ``grads_of`` for a random upstream gradient
    in [0.5, 1.5) drawn from ``upstream_seed`` (a unit one hides scaling bugs)."""
    leaves = {k: _cast(v, dtype, device).requires_grad_() for k, v in grads_of.items()}
    loss = fn(**leaves, **{k: _cast(v, dtype, device) for k, v in constants.items()}, **extra)
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, list(leaves.values()), upstream.to(device, loss.dtype))
    return loss.detach().double().cpu(), [g.double().cpu() for g in grads]


def _max_error(ours: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    pairs = zip(ours, reference, strict=True)
    return max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in pairs)


def _limit(torch_error: float, reference: Sequence[Tensor], dtype: torch.dtype) -> float:
    scale = max(float(t.abs().max()) if t.numel() else 0.0 for t in reference)
    return error_limit(dtype, torch_error, scale)


def run_case(
    case: Case, device: torch.device, dtype: torch.dtype, backend: str, seed: int = 0
) -> CheckResult:
    """Compare ``case.fused`` (``backend``, ``dtype``) and torch in ``dtype`` with torch in
    float64, on ``device``; the same inputs and upstream gradient for all three."""
    grads_of, constants = case.make(torch.Generator().manual_seed(seed))
    cpu = torch.device("cpu")
    ref_loss, ref_grads = _loss_and_grads(
        case.reference, grads_of, constants, torch.float64, cpu, seed + 1
    )
    torch_loss, torch_grads = _loss_and_grads(
        case.reference, grads_of, constants, dtype, device, seed + 1
    )
    loss, grads = _loss_and_grads(
        case.fused, grads_of, constants, dtype, device, seed + 1, backend=backend
    )
    return CheckResult(
        case.op,
        case.name,
        str(device),
        str(dtype).removeprefix("torch."),
        backend,
        _max_error([loss], [ref_loss]),
        _max_error(grads, ref_grads),
        _limit(_max_error([torch_loss], [ref_loss]), [ref_loss], dtype),
        _limit(_max_error(torch_grads, ref_grads), ref_grads, dtype),
    )


def run_checks(
    devices: Sequence[torch.device], dtypes: Sequence[torch.dtype], seed: int = 0
) -> list[CheckResult]:
    """Every case on every device, dtype and backend available there."""
    return [
        run_case(case, device, dtype, backend, seed)
        for device in devices
        for backend in available_backends(device)
        for dtype in dtypes
        for case in cases()
        if backend in case.backends
    ]


def format_table(results: Sequence[CheckResult]) -> str:
    """A plain-text table, one row per result."""
    header = (
        "op",
        "case",
        "device",
        "dtype",
        "backend",
        "loss abs err",
        "limit",
        "grad abs err",
        "limit",
        "ok",
    )
    rows = [
        (
            r.op,
            r.case,
            r.device,
            r.dtype,
            r.backend,
            f"{r.loss_error:.2e}",
            f"{r.loss_limit:.1e}",
            f"{r.grad_error:.2e}",
            f"{r.grad_limit:.1e}",
            "ok" if r.ok else "FAIL",
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    title = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
    return "\n".join([title, "-" * len(title), *lines, "-" * len(title), LEGEND])


LEGEND = (
    "abs err: largest |fused - torch in float64| over the loss (every element for "
    "reduction='none')\nor over every gradient element; limit: fp32/fp64 "
    "(rtol + atol) x max(|reference|, 1),\nfp16/bf16 2 x torch's own error in that dtype "
    "+ eps x max(|reference|, 1)"
)
