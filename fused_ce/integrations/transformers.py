r"""Hugging Face transformers: train a causal LM with :func:`fused_ce.linear_cross_entropy` as
its loss, so the ``N x V`` logits of the language-model head are never materialized.

``patch(model)`` changes no weights and copies no model code. In training mode with ``labels``
it runs the model's own ``forward`` with two stand-ins installed for that one call:

* the output layer (``model.get_output_embeddings()``, an ``nn.Linear``) records the hidden
  states it is given (already sliced by ``logits_to_keep``) and returns small *probe* logits,
  ``(..., 8)`` known values instead of ``(..., V)`` real ones;
* ``model.loss_function`` computes, from the recorded hidden states and the head's weight and
  bias, what transformers' ``ForCausalLMLoss`` computes from the full logits: labels shifted by
  one (padded with ``ignore_index``, or ``shift_labels`` when given), ``ignore_index=-100``, the
  mean over non-ignored tokens, or with ``num_items_in_batch`` the sum divided by it (the
  gradient-accumulation normalisation), returned in float32.

Everything else in ``forward`` (the decoder, caches, attention masks, ``logits_to_keep``,
whatever a model does between its head and its loss) runs unchanged. A model that transforms
its logits before the loss is handled by mapping the transform to ``linear_cross_entropy``'s
options, ``z -> softcap * tanh(logit_scale * z / softcap)``:

* ``softcap``: ``config.final_logit_softcapping`` (Gemma 2/3) or ``config.logits_soft_cap``;
* ``logit_scale``: the model's ``logit_scale`` attribute or ``config.logit_scale`` (Cohere),
  ``1 / config.logits_scaling`` (Granite).

The first patched training call checks the mapping on the probe logits: the model's own
transform of the probe values must equal the mapped one, else the call raises (one host sync,
once per patched model). A model whose forward calls its head or its loss other than exactly
once per call, or computes the loss without ``self.loss_function``, is refused.

In training mode with labels ``outputs.logits`` is ``None`` (``loss`` and the other outputs are
as before); in eval mode, or without labels, the model's forward runs untouched and returns its
logits (and loss) exactly as before.

``patch(model, eval_logits=False)`` extends the fused path to eval mode with labels (the
``prediction_loss_only`` evaluation of ``Trainer``): the loss and the token accuracy from the
hidden states, no logits (``outputs.logits`` is ``None``, ``outputs.token_accuracy`` the
fraction of non-ignored shifted labels that are the head's argmax). A call that passes
``return_logits=True`` runs the model's own forward and gets its logits, in any mode.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers.loss.loss_utils import ForCausalLMLoss

from .._backend import BACKENDS
from ..linear import linear_cross_entropy

__all__ = ["apply_to_trainer", "is_patched", "patch", "unpatch"]

_STATE = "_fused_ce_patch"

# How many probe logits the stand-in head returns per position.
_PROBE_SIZE = 8


def _probe(device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """The stand-in head's logits: (v - 3.5) * 2**(v - 2) for v = 0..7, i.e. -0.875, -1.25,
    -1.5, -1, 2, 12, 40, 112: both signs, inside and beyond a typical soft cap, exact in bf16,
    so a scale, a cap or any other elementwise transform shows in what the model makes of them.
    Built on ``device`` (no host-to-device copy, which would sync with the host on CUDA)."""
    v = torch.arange(_PROBE_SIZE, device=device, dtype=dtype)
    return (v - 3.5) * torch.exp2(v - 2)


@dataclass
class _PatchState:
    backend: str | None
    logit_scale: float
    softcap: float | None
    verified: bool = False
    eval_logits: bool = True


def _text_config(model: transformers.PreTrainedModel):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _logit_options(model: transformers.PreTrainedModel) -> tuple[float, float | None]:
    """The model's logit transform as (logit_scale, softcap), read from its config."""
    config = _text_config(model)
    scale = getattr(model, "logit_scale", None)
    if not isinstance(scale, (int, float)):
        scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is None:
        softcap = getattr(config, "logits_soft_cap", None)
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def _refuse(model: Any, why: str) -> ValueError:
    return ValueError(
        f"model: fused_ce cannot patch {type(model).__name__}: {why}. patch() supports causal LMs "
        "whose forward computes logits = lm_head(hidden_states) with an nn.Linear output layer "
        "and then loss = self.loss_function(logits, labels, ...) (transformers' ForCausalLMLoss)"
    )


def _check_patchable(model: Any) -> None:
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"model: expected a transformers PreTrainedModel (a causal LM), got {type(model)!r}"
        )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise _refuse(model, f"its output layer (get_output_embeddings()) is {type(head).__name__}")
    if "forward" in vars(head):
        raise _refuse(
            model,
            "its output layer's forward is replaced on the instance (hooks such as accelerate's "
            "device_map offloading); patch a model whose lm_head is a plain nn.Linear",
        )
    if not head.weight.is_floating_point():
        raise _refuse(model, f"its output layer's weight is {head.weight.dtype}")
    if "forward" in vars(model):
        raise _refuse(
            model,
            "its forward is already replaced on the instance (by another patch, or by "
            "accelerate.prepare); call patch() before wrapping the model",
        )
    if model.loss_function is not ForCausalLMLoss:
        raise _refuse(
            model,
            f"its loss_function is {getattr(model.loss_function, '__name__', model.loss_function)}"
            ", not transformers' ForCausalLMLoss",
        )
    parameters = inspect.signature(type(model).forward).parameters
    if "labels" not in parameters or not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        raise _refuse(model, "its forward takes no `labels` or no **kwargs for the loss")
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source (frozen install): the per-call checks still guard
        source = "self.loss_function"
    if "self.loss_function" not in source:
        raise _refuse(model, "its forward computes the loss without self.loss_function")


def patch(
    model: transformers.PreTrainedModel, *, backend: str | None = None, eval_logits: bool = True
):
    r"""Make ``model`` compute its training loss with :func:`fused_ce.linear_cross_entropy`
    on the final hidden states and the output layer's weight (and bias), without the ``N x V``
    logits.

    With hidden states :math:`h_t` (the ones the model feeds its head), head weight :math:`W`,
    bias :math:`b`, labels :math:`y` and the model's logit transform :math:`f` (identity,
    ``logit_scale`` and/or ``softcap``, see the module docstring), the loss is

    .. math::
        L = \frac{1}{D}\sum_{t:\,y_{t+1} \ne -100} \bigl(\mathrm{lse}(f(W h_t + b))
            - f(W h_t + b)_{y_{t+1}}\bigr)

    with :math:`D` the number of non-ignored shifted labels, or ``num_items_in_batch`` when the
    caller (e.g. ``Trainer`` under gradient accumulation) passes it: the loss transformers'
    ``ForCausalLMLoss`` computes from the logits, and the same gradients, within float32
    round-off. ``shift_labels`` and ``ignore_index`` passed to the model are honoured as by
    transformers. Tied input/output embeddings need nothing special: the head's weight *is* the
    embedding matrix and receives both gradients.

    In training mode with ``labels``, ``outputs.logits`` is ``None``; in eval mode, or without
    labels, the model runs its original forward and returns its logits as before. Patching a
    patched model does nothing (its ``backend`` stays); :func:`unpatch` undoes it.

    With ``eval_logits=False``, eval mode with ``labels`` takes the fused path too and adds
    ``outputs.token_accuracy`` (0-d float32: the fraction of non-ignored shifted labels
    :math:`y_{t+1}` equal to :math:`\arg\max_v f(W h_t + b)_v`, first index on ties), made in
    the same pass as the loss; ``outputs.logits`` is ``None`` (with ``return_dict=False`` the
    accuracy is the tuple's last item). For evaluation loops that use
    only the loss (``Trainer``'s ``prediction_loss_only=True``) it saves the ``N x V`` logits.
    ``model(..., return_logits=True)`` asks for the logits: that call runs the model's own
    forward (logits and loss as without the patch), in any mode.

    Args:
        model: a causal LM (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
            ``Qwen3ForCausalLM``, ``GemmaForCausalLM``, ``Gemma2ForCausalLM``,
            ``Gemma3ForCausalLM``, ``Phi3ForCausalLM``, ``GPT2LMHeadModel``, and any model
            built the same way): an ``nn.Linear`` output layer from
            ``get_output_embeddings()``, a forward that takes ``labels`` and ``**kwargs`` and
            calls ``self.loss_function``, whose loss function is transformers'
            ``ForCausalLMLoss``. Anything else raises ``ValueError``/``TypeError`` naming why.
        backend: ``linear_cross_entropy``'s ``backend`` (``None``/``'auto'``, ``'triton'``,
            ``'torch'``).
        eval_logits: ``False`` computes eval-mode losses (and the token accuracy) without
            logits, as above. Default: ``True`` (eval mode runs the model's own forward).

    Returns:
        ``model``, patched in place.

    Shape:
        as the model's forward: ``input_ids``/``labels`` ``(B, T)``; ``logits_to_keep``
        slices the hidden states before the head as in transformers, and the labels must then
        match the kept positions (as they must without the patch).

    Examples::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from fused_ce.integrations.transformers import patch
        >>> model = patch(LlamaForCausalLM(LlamaConfig(
        ...     vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2)))
        >>> ids = torch.randint(0, 1000, (2, 16))
        >>> out = model.train()(input_ids=ids, labels=ids)
        >>> out.logits is None, out.loss.shape
        (True, torch.Size([]))
        >>> model.eval()(input_ids=ids).logits.shape
        torch.Size([2, 16, 1000])
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if not isinstance(eval_logits, bool):
        raise TypeError(f"eval_logits: expected a bool, got {eval_logits!r}")
    if isinstance(model, nn.Module) and _STATE in vars(model):
        return model
    _check_patchable(model)
    logit_scale, softcap = _logit_options(model)
    if not math.isfinite(logit_scale) or (softcap is not None and not softcap > 0):
        raise _refuse(model, f"its logit options logit_scale={logit_scale}, softcap={softcap}")
    setattr(model, _STATE, _PatchState(backend, logit_scale, softcap, eval_logits=eval_logits))
    forward = type(model).forward
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def fused_forward(self, *args, **kwargs):
        return _forward(self, forward, signature, *args, **kwargs)

    # A bound method in the instance dict: nn.Module.__call__ finds it before the class's
    # forward, inspect.signature still shows the model's parameters (Trainer reads **kwargs
    # there to pass num_items_in_batch), and copy.deepcopy rebinds it to the copy.
    model.forward = types.MethodType(fused_forward, model)
    return model


def unpatch(model: transformers.PreTrainedModel):
    """Undo :func:`patch`: the model computes its logits and loss as transformers does.
    Returns ``model``; a model that is not patched is returned unchanged.

    Examples::

        >>> model = unpatch(patch(model))
    """
    if _STATE not in vars(model):
        return model
    forward = vars(model).get("forward")
    if getattr(getattr(forward, "__func__", None), "__wrapped__", None) is not type(model).forward:
        raise RuntimeError(
            "model: its forward was replaced again after fused_ce's patch() (e.g. by "
            "accelerate.prepare); unpatch before wrapping the model"
        )
    del model.forward
    delattr(model, _STATE)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has been applied to ``model`` (and not undone)."""
    return _STATE in vars(model)


def apply_to_trainer(
    trainer: transformers.Trainer, *, backend: str | None = None, eval_logits: bool = True
):
    """Patch the model a ``transformers.Trainer`` trains (see :func:`patch`, whose
    ``eval_logits=False`` suits ``prediction_loss_only=True`` evaluation). Returns the
    trainer. Call it after constructing the trainer and before ``trainer.train()``.

    ``Trainer``'s default loss is the model's own (``outputs.loss``), with
    ``num_items_in_batch`` passed to the model under gradient accumulation: both are kept, so
    the loss curve is the unpatched one. ``Trainer`` options that compute the loss from
    ``outputs.logits`` instead (``label_smoothing_factor``, ``compute_loss_func``) take the
    labels away from the model, so the patch would never act: they raise ``ValueError``.

    Examples::

        >>> trainer = apply_to_trainer(Trainer(model=model, args=args, train_dataset=data))
        >>> trainer.train()
    """
    if getattr(trainer, "label_smoother", None) is not None:
        raise ValueError(
            "trainer: label_smoothing_factor makes Trainer compute the loss from outputs.logits, "
            "which a patched model does not return in training; set label_smoothing_factor=0"
        )
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError(
            "trainer: a compute_loss_func computes the loss from outputs.logits, which a patched "
            "model does not return in training; drop compute_loss_func to use the fused loss"
        )
    patch(trainer.model, backend=backend, eval_logits=eval_logits)
    return trainer


class _Call:
    """The stand-in head and loss for one patched training call."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        head: nn.Linear,
        state: _PatchState,
        with_accuracy: bool = False,
    ):
        self.model = model
        self.head = head
        self.state = state
        self.with_accuracy = with_accuracy
        self.accuracy: Tensor | None = None
        self.hidden: Tensor | None = None
        self.probe: Tensor | None = None
        self.head_calls = 0
        self.loss_calls = 0
        self.logits_seen: Tensor | None = None

    def head_forward(self, hidden: Tensor) -> Tensor:
        self.head_calls += 1
        self.hidden = hidden
        probe = _probe(hidden.device, _head_dtype(hidden, self.head.weight))
        self.probe = probe.expand(*hidden.shape[:-1], _PROBE_SIZE).contiguous()
        return self.probe

    def loss(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        self.loss_calls += 1
        self.logits_seen = logits
        if self.hidden is None:
            raise RuntimeError(
                f"model: {type(self.model).__name__} computed its loss without calling its "
                "output layer first; fused_ce's patch cannot serve it (unpatch the model)"
            )
        options = _logit_options(self.model)
        if options != (self.state.logit_scale, self.state.softcap):  # config edited since
            self.state.logit_scale, self.state.softcap = options
            self.state.verified = False
        if not self.state.verified:
            self._verify(logits)
        if shift_labels is None:
            padded = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = padded[..., 1:]
        hidden = self.hidden
        target = shift_labels.reshape(-1).to(hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] != target.shape[0]:
            raise ValueError(
                f"labels: {target.shape[0]} label positions after the shift, but the model "
                f"kept {rows.shape[0]} hidden states (logits_to_keep); they must match, as "
                "without the patch"
            )
        weight, bias = self.head.weight, self.head.bias
        dtype = _head_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            loss = linear_cross_entropy(
                rows.to(dtype),
                weight.to(dtype),
                target,
                linear_bias=None if bias is None else bias.to(dtype),
                reduction="mean" if num_items_in_batch is None else "sum",
                ignore_index=ignore_index,
                logit_scale=self.state.logit_scale,
                softcap=self.state.softcap,
                return_stats=self.with_accuracy,
                backend=self.state.backend,
            )
        if self.with_accuracy:
            self.accuracy = loss.accuracy.float()
            loss = loss.loss
        # transformers upcasts the logits, so its loss is float32 whatever the model's dtype.
        loss = loss.float()
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    def _verify(self, logits: Tensor) -> None:
        """The model's transform of the probe logits must be the mapped (scale, softcap)."""
        scale, cap = self.state.logit_scale, self.state.softcap
        probe = _probe("cpu", torch.float64)
        expected = probe * scale
        if cap is not None:
            expected = cap * torch.tanh(expected / cap)
        seen = logits.detach()
        if seen.shape != self.probe.shape or not seen.is_floating_point():
            got = f"a {seen.dtype} tensor of shape {list(seen.shape)}"
        elif seen.numel() == 0:  # no rows to check: verify on a later call
            return
        else:
            row = seen.reshape(-1, _PROBE_SIZE)[0].to("cpu", torch.float64)
            eps = torch.finfo(self.probe.dtype).eps
            if torch.allclose(row, expected, rtol=8 * eps, atol=8 * eps):
                self.state.verified = True
                return
            got = row.tolist()
        raise RuntimeError(
            f"model: {type(self.model).__name__} transforms its logits between its output "
            "layer and its loss in a way fused_ce does not reproduce: for probe logits "
            f"{probe.tolist()} it computed {got}, the mapped options (logit_scale={scale}, "
            f"softcap={cap}) give {expected.tolist()}. unpatch(model) to train it unfused"
        )


def _head_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in: autocast's, when it is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _forward(
    model: transformers.PreTrainedModel, forward, signature: inspect.Signature, *args, **kwargs
):
    state: _PatchState = vars(model)[_STATE]
    if kwargs.pop("return_logits", False) or (not model.training and state.eval_logits):
        return forward(model, *args, **kwargs)
    try:
        labels = signature.bind(model, *args, **kwargs).arguments.get("labels")
    except TypeError:  # bad arguments: let the model's forward raise its own error
        labels = None
    if labels is None:
        return forward(model, *args, **kwargs)
    head = model.get_output_embeddings()
    call = _Call(model, head, state, with_accuracy=not model.training)
    had_loss_function = "_loss_function" in vars(model)
    saved_loss_function = vars(model).get("_loss_function")
    head.forward = call.head_forward
    model.loss_function = call.loss
    try:
        outputs = forward(model, *args, **kwargs)
    finally:
        del head.forward
        if had_loss_function:
            model.loss_function = saved_loss_function
        else:
            del model._loss_function
    if call.head_calls != 1 or call.loss_calls != 1:
        raise RuntimeError(
            f"model: {type(model).__name__}'s forward called its output layer {call.head_calls} "
            f"times and its loss function {call.loss_calls} times; fused_ce's patch serves "
            "exactly one of each (unpatch the model)"
        )
    outputs = _drop_logits(outputs, call.logits_seen)
    if call.accuracy is not None:
        if isinstance(outputs, tuple):
            return (*outputs, call.accuracy)
        outputs["token_accuracy"] = call.accuracy
    return outputs


def _drop_logits(outputs, logits: Tensor):
    """The outputs without the probe logits: ``logits`` None, or absent from a tuple."""
    if isinstance(outputs, tuple):
        return tuple(item for item in outputs if item is not logits)
    fields = {key: value for key, value in outputs.items() if key != "logits"}
    return type(outputs)(**fields)
