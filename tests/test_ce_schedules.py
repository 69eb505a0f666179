"""The scalar-loss CE forward's opt-in schedules (issue 22, ``fused_ce.launch.cross_entropy``'s
``scalar_schedule``): "row_on_chip" keeps a one-block row in registers between the forward and
gradient passes, "l2" re-reads a longer row from its end. Both must give the oracle's loss and
gradient and the very bits of the default "loop" schedule. Triton only (the interpreter on
CPU); tiny shapes, with the block sizes shrunk so that the tiny rows take the multi-block
paths. The upstream gradient is 1 (``loss.backward()``), so the gradient checked is the one
the forward wrote: any other value makes the backward kernel rewrite it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import generator, positive
from conftest import fresh_launch_caches

import fused_ce
from fused_ce._backend import triton_runs_on

pytestmark = pytest.mark.skipif(not triton_runs_on("cpu"), reason="Triton is not installed")


def _run(schedule, logits, target, monkeypatch, **kwargs):
    """Loss and gradients of a scalar CE under ``schedule``, and the flags of its forward."""
    import fused_ce.launch.cross_entropy as launch_ce
    from fused_ce.kernels.cross_entropy import ce_forward_kernel

    monkeypatch.setattr(launch_ce, "scalar_schedule", schedule)
    fresh_launch_caches(monkeypatch, launch_ce)
    launches = []
    cached = launch_ce._forward_launch

    def recording(*args):
        launch = cached(*args)
        names = ce_forward_kernel.arg_names[len(launch_ce._FORWARD_POINTERS) :]
        launches.append(dict(zip(names, launch.arguments, strict=True)))
        return launch

    monkeypatch.setattr(launch_ce, "_forward_launch", recording)
    logits = logits.detach().clone().requires_grad_()
    target = target.detach().clone().requires_grad_(target.is_floating_point())
    loss = fused_ce.softmax_cross_entropy(logits, target, backend="triton", **kwargs)
    loss.backward()
    grads = [logits.grad] + ([target.grad] if target.is_floating_point() else [])
    return loss.detach(), grads, launches


def _oracle(logits, target, **kwargs):
    logits = logits.detach().double().requires_grad_()
    target = target.detach()
    target = target.double().requires_grad_() if target.is_floating_point() else target
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    softcap = kwargs.pop("softcap", 0.0)
    final = softcap * torch.tanh(logits / softcap) if softcap else logits
    loss = F.cross_entropy(final, target, **kwargs)
    loss.backward()
    return loss.detach(), [logits.grad] + ([target.grad] if target.is_floating_point() else [])


def _case(shape, kind, dtype):
    logits = torch.randn(shape, generator=generator(0), dtype=torch.float64) * 3
    logits[0, 1] = 25.0  # a row's max in its first block: the online rescale and the reversal
    if kind == "prob":
        target = torch.softmax(torch.randn(shape, generator=generator(1), dtype=torch.float64), 1)
        target = target.to(dtype)
    else:
        batch = shape[:1] + shape[2:]
        target = torch.randint(0, shape[1], batch, generator=generator(1))
        target.view(-1)[::3] = -100
    return logits.to(dtype), target


def _check(schedule, shape, kind, dtype, monkeypatch, expected_flags, oracle=True, **kwargs):
    import fused_ce.launch.cross_entropy as launch_ce

    logits, target = _case(shape, kind, dtype)
    kwargs["weight"] = positive((shape[1],), 5, "cpu", dtype)
    loss, grads, launches = _run(schedule, logits, target, monkeypatch, **kwargs)
    assert [{k: launch[k] for k in expected_flags} for launch in launches] == [expected_flags]
    # The same bits as the default schedule over the same class blocks (the online softmax's
    # sums are rounded block by block)...
    block_c = expected_flags["BLOCK_C"]
    original_tile = launch_ce.tile
    monkeypatch.setattr(launch_ce, "tile", lambda rows, cols: original_tile(rows, cols, block_c))
    loop_loss, loop_grads, _ = _run("loop", logits, target, monkeypatch, **kwargs)
    monkeypatch.setattr(launch_ce, "tile", original_tile)
    torch.testing.assert_close(loss, loop_loss, rtol=0, atol=0)
    for ours, loop in zip(grads, loop_grads, strict=True):
        torch.testing.assert_close(ours, loop, rtol=0, atol=0)
    # ...and the oracle's values (fp32 tightly; bf16 is held by its identity with "loop",
    # which tests/test_cross_entropy.py holds against the oracle).
    if dtype == torch.float32 and oracle:
        ref_loss, ref_grads = _oracle(logits, target, **kwargs)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        for ours, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(6, 11), (3, 11, 2)], ids=["NC", "NCL"])
def test_row_on_chip_reads_the_row_once(shape, kind, dtype, monkeypatch):
    _check(
        "row_on_chip",
        shape,
        kind,
        dtype,
        monkeypatch,
        {"ROW_ON_CHIP": True, "REVERSE_SECOND_READ": False, "BLOCK_C": 16},
        reduction="mean",
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(5, 11), (3, 11, 2)], ids=["NC", "NCL"])
def test_l2_schedule_rereads_from_the_row_end(shape, kind, dtype, monkeypatch):
    import fused_ce.launch.cross_entropy as launch_ce

    # Blocks of 4 classes: 11 classes are blocks 0, 4, 8 (the last one partial).
    monkeypatch.setattr(launch_ce, "L2_BLOCK_C", 4)
    _check(
        "l2",
        shape,
        kind,
        dtype,
        monkeypatch,
        {"ROW_ON_CHIP": False, "REVERSE_SECOND_READ": True, "BLOCK_R": 1, "BLOCK_C": 4},
        reduction="sum",
        softcap=5.0,
    )


@pytest.mark.parametrize("schedule", ["row_on_chip", "l2"])
def test_schedules_with_z_loss_and_logit_scale(schedule, monkeypatch):
    """The z-loss's gradient (through the lse) and the logit scale's slope on the new paths,
    held to the default schedule's bits (tests/test_options.py holds those to the oracle)."""
    import fused_ce.launch.cross_entropy as launch_ce

    monkeypatch.setattr(launch_ce, "L2_BLOCK_C", 4)
    on_chip = schedule == "row_on_chip"
    _check(
        schedule,
        (5, 11),
        "index",
        torch.float32,
        monkeypatch,
        {
            "ROW_ON_CHIP": on_chip,
            "REVERSE_SECOND_READ": not on_chip,
            "BLOCK_C": 16 if on_chip else 4,
        },
        oracle=False,
        reduction="mean",
        z_loss=1e-2,
        logit_scale=0.5,
    )


def test_row_on_chip_falls_back_to_l2_for_long_rows(monkeypatch):
    import fused_ce.launch.cross_entropy as launch_ce

    monkeypatch.setattr(launch_ce, "ROW_ON_CHIP_MAX_C", 8)
    monkeypatch.setattr(launch_ce, "L2_BLOCK_C", 4)
    _check(
        "row_on_chip",
        (4, 11),
        "index",
        torch.float32,
        monkeypatch,
        {"ROW_ON_CHIP": False, "REVERSE_SECOND_READ": True, "BLOCK_C": 4},
        reduction="mean",
    )


def test_unknown_schedule_is_refused(monkeypatch):
    logits, target = _case((2, 3), "index", torch.float32)
    with pytest.raises(ValueError, match="scalar_schedule must be one of"):
        _run("fastest", logits, target, monkeypatch)
