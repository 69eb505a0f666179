"""``nn.Module`` forms of the distillation losses (re-exported by ``fused_ce.nn``).

They subclass ``torch.nn.Module``, not ``torch.nn.KLDivLoss``: ``KLDivLoss.forward(input,
target)`` takes log-probabilities and a target distribution, its default ``'mean'`` divides
by every element, and its ``log_target`` has no meaning for logits, so an ``isinstance``
check for ``KLDivLoss`` would promise a call signature these modules do not have. The options
are checked at construction; ``forward`` takes the operands and the optional ``target`` /
``mask`` of the rows that count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._backend import checked_backend
from ._validation import (
    check_beta,
    check_ce_weight,
    check_chunk_size,
    check_direction,
    check_distill_reduction,
    check_temperature,
)
from .distill import (
    jsd_with_logits,
    kl_div_with_logits,
    linear_jsd,
    linear_kl_div,
)


class _DistillLoss(torch.nn.Module):
    """The options shared by the four modules, checked once."""

    def __init__(
        self,
        *,
        temperature: float,
        ignore_index: int,
        reduction: str,
        backend: str | None,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_distill_reduction(reduction)
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = checked_backend(backend)

    def _options(self) -> dict:
        return {
            "temperature": self.temperature,
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "backend": self.backend,
        }


class _KLOptions(_DistillLoss):
    def __init__(self, *, direction: str, **options) -> None:
        super().__init__(**options)
        check_direction(direction)
        self.direction = direction

    def _divergence(self) -> dict:
        return {"direction": self.direction}

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, direction={self.direction!r}, "
            f"reduction={self.reduction!r}"
        )


class _JSDOptions(_DistillLoss):
    def __init__(self, *, beta: float, **options) -> None:
        super().__init__(**options)
        check_beta(beta)
        self.beta = beta

    def _divergence(self) -> dict:
        return {"beta": self.beta}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}"


class _OnLogits:
    """``forward`` of the logits modules: the module's ``_function`` with its options."""

    _function: Callable[..., Tensor]

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return self._function(
            student_logits,
            teacher_logits,
            target=target,
            mask=mask,
            **self._divergence(),
            **self._options(),
        )


class _OnHeads:
    """``ce_weight``, ``chunk_size`` and ``forward`` (the module's ``_function`` with its
    options) of the linear-head modules."""

    _function: Callable[..., Tensor]

    def _head_options(self, ce_weight: float, chunk_size: int | None) -> None:
        check_ce_weight(ce_weight)
        check_chunk_size(chunk_size)
        self.ce_weight = ce_weight
        self.chunk_size = chunk_size

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        target: Tensor | None = None,
        mask: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        return self._function(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            target=target,
            mask=mask,
            ce_weight=self.ce_weight,
            chunk_size=self.chunk_size,
            **self._divergence(),
            **self._options(),
        )


class KLDivWithLogitsLoss(_OnLogits, _KLOptions):
    r"""KL divergence between teacher and student, from logits:
    :func:`fused_ce.kl_div_with_logits` with the options given at construction.

    Args (keyword-only): ``temperature`` (1.0), ``direction`` (``"forward"``:
    :math:`\mathrm{KL}(p_t\|p_s)`; ``"reverse"``), ``ignore_index`` (-100, for a ``target``
    passed to ``forward``), ``reduction`` (``'batchmean'``, as torch's ``kl_div`` has it;
    ``'sum'``, ``'mean'`` per unmasked row, ``'none'``), ``backend``. No :math:`T^2` factor.

    Shape:
        ``forward(student_logits (*, V), teacher_logits (*, V), target=None (*), mask=None
        (*))``; output a scalar, or :math:`(*)` with ``reduction='none'``, fp32 for
        half-precision logits.

    Examples::

        >>> loss_fn = fused_ce.nn.KLDivWithLogitsLoss(temperature=2.0)
        >>> student = torch.randn(4, 10, requires_grad=True)
        >>> loss = loss_fn(student, torch.randn(4, 10))
        >>> loss.backward()
        >>> loss_fn
        KLDivWithLogitsLoss(temperature=2.0, direction='forward', reduction='batchmean')
    """

    _function = staticmethod(kl_div_with_logits)

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        direction: str = "forward",
        ignore_index: int = -100,
        reduction: str = "batchmean",
        backend: str | None = None,
    ) -> None:
        super().__init__(
            temperature=temperature,
            direction=direction,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
        )


class JSDWithLogitsLoss(_OnLogits, _JSDOptions):
    r"""Generalized Jensen-Shannon divergence between teacher and student, from logits:
    :func:`fused_ce.jsd_with_logits` with the options given at construction.

    Args (keyword-only): ``beta`` (0.5, the teacher's weight in the mixture; 0 and 1 are the
    forward and reverse KL), ``temperature``, ``ignore_index``, ``reduction``, ``backend`` as
    :class:`KLDivWithLogitsLoss`.

    Shape:
        As :class:`KLDivWithLogitsLoss`.

    Examples::

        >>> loss_fn = fused_ce.nn.JSDWithLogitsLoss(beta=0.5)
        >>> student = torch.randn(4, 10, requires_grad=True)
        >>> target = torch.tensor([1, -100, 3, 2])
        >>> loss = loss_fn(student, torch.randn(4, 10), target)
        >>> loss.backward()
        >>> student.grad[1].abs().sum().item()
        0.0
    """

    _function = staticmethod(jsd_with_logits)

    def __init__(
        self,
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        backend: str | None = None,
    ) -> None:
        super().__init__(
            beta=beta,
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
        )


class LinearKLDivLoss(_OnHeads, _KLOptions):
    r"""KL divergence of two linear heads' logits without materializing them:
    :func:`fused_ce.linear_kl_div` with the options given at construction. The heads belong to
    the student and teacher models, so this module owns no parameters: ``forward`` takes them.

    Args (keyword-only): those of :class:`KLDivWithLogitsLoss`, plus ``ce_weight`` (0.0:
    :math:`\alpha` of :math:`\alpha\,\mathrm{CE} + (1-\alpha)\,\mathrm{KL}`, needs ``target``)
    and ``chunk_size`` (None: automatic).

    Shape:
        ``forward(student_hidden (*, D_s), student_weight (V, D_s), teacher_hidden (*, D_t),
        teacher_weight (V, D_t), target=None (*), mask=None (*), student_bias=None (V),
        teacher_bias=None (V))``; output a scalar, or :math:`(*)` with ``reduction='none'``.

    Examples::

        >>> loss_fn = fused_ce.nn.LinearKLDivLoss(temperature=2.0, ce_weight=0.5)
        >>> student_head = torch.nn.Linear(8, 11, bias=False)
        >>> hidden, labels = torch.randn(6, 8), torch.tensor([1, 2, 3, -100, 5, 6])
        >>> loss = loss_fn(hidden, student_head.weight, torch.randn(6, 16),
        ...                torch.randn(11, 16), labels)
        >>> loss.backward()
        >>> student_head.weight.grad.shape
        torch.Size([11, 8])
    """

    _function = staticmethod(linear_kl_div)

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        direction: str = "forward",
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        reduction: str = "batchmean",
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            temperature=temperature,
            direction=direction,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
        )
        self._head_options(ce_weight, chunk_size)


class LinearJSDLoss(_OnHeads, _JSDOptions):
    r"""Generalized JSD of two linear heads' logits without materializing them:
    :func:`fused_ce.linear_jsd` with the options given at construction (``beta`` as
    :class:`JSDWithLogitsLoss`, the rest as :class:`LinearKLDivLoss`).

    Shape:
        As :class:`LinearKLDivLoss`.

    Examples::

        >>> loss_fn = fused_ce.nn.LinearJSDLoss(beta=0.5)
        >>> hidden = torch.randn(6, 8, requires_grad=True)
        >>> loss = loss_fn(hidden, torch.randn(11, 8), torch.randn(6, 16), torch.randn(11, 16))
        >>> loss.backward()
        >>> hidden.grad.shape
        torch.Size([6, 8])
    """

    _function = staticmethod(linear_jsd)

    def __init__(
        self,
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        reduction: str = "batchmean",
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            beta=beta,
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
        )
        self._head_options(ce_weight, chunk_size)
