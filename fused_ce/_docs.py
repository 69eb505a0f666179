"""Docstring parts that several public functions share, so that one text says it once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

# The cross-entropy math, shared by the docstrings of softmax_cross_entropy and
# linear_cross_entropy (each says what its logits z are) through share_ce_math.
CE_MATH = r"""With logits :math:`z` over :math:`C` classes, :math:`\mathrm{lse}_n = \log\sum_c
    e^{z_{n,c}}`, class weights :math:`w` (ones when ``None``), :math:`v_n = [y_n \ne
    \text{ignore\_index}]` and smoothing :math:`\varepsilon`:

    * class-index target :math:`y`:
      :math:`\ell_n = v_n[(1-\varepsilon)\,w_{y_n}(\mathrm{lse}_n - z_{n,y_n})
      + \tfrac{\varepsilon}{C}\sum_c w_c(\mathrm{lse}_n - z_{n,c})]`; ``'mean'`` divides the sum
      by :math:`\sum_n w_{y_n} v_n`.
    * probability target :math:`t` (floating point, one probability per class):
      :math:`\ell_n = \sum_c w_c\,t'_{n,c}(\mathrm{lse}_n - z_{n,c})` with
      :math:`t' = (1-\varepsilon)t + \varepsilon/C`; ``'mean'`` divides by the number of rows.

    The gradient with respect to the logits is the lecture's :math:`o - t` (softmax minus the
    one-hot or smoothed target), weighted; probability targets receive a gradient too.

    Options (their defaults keep torch's results; docs/options.md): the logits are scaled,
    :math:`z \leftarrow s\,z` (``logit_scale`` :math:`s`), then capped,
    :math:`z \leftarrow c\tanh(z/c)` (``softcap`` :math:`c`), and everything above uses the
    result; ``z_loss`` adds :math:`\lambda\,\mathrm{lse}_n^2` per non-ignored row, reduced like
    the CE term (``'mean'`` uses the same divisor)."""

_Function = TypeVar("_Function", bound=Callable[..., Any])


def share_ce_math(function: _Function) -> _Function:
    """Put :data:`CE_MATH` where ``function``'s docstring says ``{CE_MATH}``."""
    function.__doc__ = (function.__doc__ or "").replace("{CE_MATH}", CE_MATH)
    return function
