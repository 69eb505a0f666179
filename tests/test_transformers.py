"""fused_ce.integrations.transformers: a patched Hugging Face causal LM trains on the loss and
gradients of the unpatched one, without the N x V logits.

Tiny random models built from configs (hidden 32, 2 layers, vocab 1000); nothing is
downloaded. The oracle is the unpatched transformers model run in float64: the patched fp32
model's loss and every parameter gradient must be within twice the error of the unpatched
fp32 model (plus 1e-5 relative slack for the different summation order).
"""

from __future__ import annotations

import copy
import doctest
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import backend_cases

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

import fused_ce._memory  # noqa: E402
import fused_ce.integrations.transformers as hf_integration  # noqa: E402
from fused_ce._memory import peak_bytes  # noqa: E402
from fused_ce.integrations.transformers import (  # noqa: E402
    apply_to_trainer,
    is_patched,
    patch,
    unpatch,
)

VOCAB = 1000
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    **IDS,
}

# name -> (config class, its arguments); the named architectures first, then models built the
# same way that exercise a logit scale (Cohere, Granite) and a bias in the head (Phi).
ARCHITECTURES = {
    "llama": ("LlamaConfig", {**LLAMA_LIKE, "head_dim": 8}),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "head_dim": 8}),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma": ("GemmaConfig", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3TextConfig", {**LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", LLAMA_LIKE),
    "gpt2": (
        "GPT2Config",
        {
            "vocab_size": VOCAB,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 64,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **IDS,
        },
    ),
    "cohere": ("CohereConfig", {**LLAMA_LIKE, "head_dim": 8, "logit_scale": 0.25}),
    "granite": ("GraniteConfig", {**LLAMA_LIKE, "logits_scaling": 4.0}),
    "phi": ("PhiConfig", {**LLAMA_LIKE, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
}


def make_model(arch: str, *, tie: bool = False, vocab: int = VOCAB, seed: int = 0):
    """A tiny random causal LM of ``arch`` in training mode, its head initialised with unit
    variance so the logits are O(5): the softmax is far from uniform and a soft cap of 3
    bites."""
    config_name, kwargs = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(
        **{**kwargs, "vocab_size": vocab, "tie_word_embeddings": tie}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    assert (head.weight is model.get_input_embeddings().weight) == tie
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0)
        if head.bias is not None:
            head.bias.normal_(0.0, 1.0)
    return model.train()


def make_batch(n_seqs: int = 2, length: int = 12, *, seed: int = 1, n_ignored: int = 4):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (n_seqs, length), generator=generator)
    labels = input_ids.clone()
    for row in range(n_seqs):  # prompt-style padding: a different count of -100 per sequence
        labels[row, : (n_ignored + row) % length] = -100
    return input_ids, labels


def loss_and_grads(model, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    outputs = model(**inputs)
    outputs.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return outputs.loss.detach(), grads


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().clamp_min(1e-30)
    return ((value.double() - reference).abs().max() / scale).item()


def assert_matches(patched, unpatched32, unpatched64) -> None:
    """patched and unpatched fp32 (loss, grads) against the fp64 oracle."""
    (loss, grads), (loss32, grads32), (loss64, grads64) = patched, unpatched32, unpatched64
    assert math.isfinite(loss.item())
    assert rel_err(loss, loss64) <= 2 * rel_err(loss32, loss64) + 1e-5, (loss, loss64)
    assert grads.keys() == grads64.keys()
    for name, grad64 in grads64.items():
        assert grad64.abs().max() > 0, name  # every parameter takes part
        bound = 2 * rel_err(grads32[name], grad64) + 1e-5
        assert rel_err(grads[name], grad64) <= bound, name


def three_runs(model, *, backend: str | None = "torch", **inputs):
    """(loss, grads) of the patched model, the unpatched fp32 model and the fp64 oracle."""
    reference = copy.deepcopy(model)
    oracle = copy.deepcopy(model).double()
    patched = patch(model, backend=backend)
    return (
        loss_and_grads(patched, **inputs),
        loss_and_grads(reference, **inputs),
        loss_and_grads(oracle, **inputs),
    )


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_loss_and_gradients_match_unpatched(arch, tie):
    input_ids, labels = make_batch()
    runs = three_runs(make_model(arch, tie=tie), input_ids=input_ids, labels=labels)
    assert_matches(*runs)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_gradient_accumulation_with_num_items_in_batch(arch):
    """Three micro-batches with their own padding, each loss divided by the token count of all
    three (as Trainer passes num_items_in_batch), sum to the one big batch's loss and grads."""
    model = make_model(arch)
    input_ids, labels = make_batch(6, 10, n_ignored=3)
    num_items = (labels[:, 1:] != -100).sum()
    oracle = copy.deepcopy(model).double()
    big32 = loss_and_grads(copy.deepcopy(model), input_ids=input_ids, labels=labels)
    big64 = loss_and_grads(oracle, input_ids=input_ids, labels=labels)
    patch(model, backend="torch")
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        loss = model(
            input_ids=input_ids[rows], labels=labels[rows], num_items_in_batch=num_items
        ).loss
        loss.backward()
        total += loss.detach().double()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    assert_matches((total, grads), big32, big64)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_logits_to_keep(arch):
    """Training on the last k positions (labels for those positions), as unpatched; in eval the
    patched model returns the same k logits."""
    model = make_model(arch)
    input_ids, labels = make_batch(2, 12, n_ignored=0)
    keep = 5
    runs = three_runs(model, input_ids=input_ids, labels=labels[:, -keep:], logits_to_keep=keep)
    assert_matches(*runs)
    reference = copy.deepcopy(model)
    unpatch(reference)
    with torch.no_grad():
        logits = model.eval()(input_ids=input_ids, logits_to_keep=keep).logits
        expected = reference.eval()(input_ids=input_ids, logits_to_keep=keep).logits
    assert logits.shape == (2, keep, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_logits_to_keep_mismatched_labels_raise():
    model = patch(make_model("llama"), backend="torch")
    input_ids, labels = make_batch(2, 12)
    with pytest.raises(ValueError, match="labels: 24 label positions .* kept 10 hidden states"):
        model(input_ids=input_ids, labels=labels, logits_to_keep=5)


def test_softcap_matters():
    """Gemma 2's soft cap changes the loss at these logits, so matching it is a real check."""
    model = make_model("gemma2")
    input_ids, labels = make_batch()
    capped = model(input_ids=input_ids, labels=labels).loss
    model.config.final_logit_softcapping = None
    uncapped = model(input_ids=input_ids, labels=labels).loss
    assert abs(capped.item() - uncapped.item()) > 0.1


def test_shift_labels_and_ignore_index_kwargs():
    """Pre-shifted labels (context parallelism) and a custom ignore_index reach the loss."""
    model = make_model("qwen3")
    input_ids, labels = make_batch()
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-7)
    shift_labels[shift_labels == -100] = -7
    runs = three_runs(
        model, input_ids=input_ids, labels=labels, shift_labels=shift_labels, ignore_index=-7
    )
    assert_matches(*runs)


@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("mode", ["bf16-weights", "bf16-autocast"])
def test_bfloat16(mode, arch, num_items):
    """A bf16 model, and an fp32 model under CPU autocast: the fused loss is accumulated and
    returned in fp32 from the bf16 GEMMs (issue #23: it was rounded to bf16, 18.125 for
    18.0968), so it is the unpatched model's loss to fp32 rounding where the model's logits go
    straight to the loss (llama), and within twice its error against the fp64 oracle where the
    unpatched model soft-caps its bf16 logits in bf16 first (gemma2); with and without
    num_items_in_batch. Gradients (for the mean; num_items_in_batch only scales them) within
    twice the error of transformers' own bf16 computation (plus 2**-8 of the largest entry)."""
    model = make_model(arch)
    oracle = copy.deepcopy(model).double()
    input_ids, labels = make_batch()
    inputs = {"input_ids": input_ids, "labels": labels}
    if num_items:
        inputs["num_items_in_batch"] = torch.tensor(7)
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
        oracle = copy.deepcopy(model).double()
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast")
    reference = copy.deepcopy(model)
    patch(model, backend="torch")
    with context:
        loss, grads = loss_and_grads(model, **inputs)
        loss_ref, grads_ref = loss_and_grads(reference, **inputs)
    loss64, grads64 = loss_and_grads(oracle, **inputs)
    assert loss.dtype == loss_ref.dtype == torch.float32
    assert rel_err(loss, loss64) <= 2 * rel_err(loss_ref, loss64) + 2**-20, (loss, loss_ref)
    if arch == "llama":
        assert rel_err(loss, loss_ref.double()) <= 2**-20, (loss, loss_ref)
    if num_items:
        return
    for name, grad64 in grads64.items():
        bound = 2 * rel_err(grads_ref[name], grad64) + 2**-8
        assert rel_err(grads[name], grad64) <= bound, name


@pytest.mark.parametrize(("backend", "device"), backend_cases())
def test_backends(backend, device):
    model = make_model("llama").to(device)
    input_ids, labels = (t.to(device) for t in make_batch())
    runs = three_runs(model, backend=backend, input_ids=input_ids, labels=labels)
    assert_matches(*runs)


def test_outputs_training_eval_and_no_labels():
    model = make_model("llama")
    reference = copy.deepcopy(model)
    patch(model, backend="torch")
    input_ids, labels = make_batch()
    out = model(input_ids=input_ids, labels=labels)
    assert out.logits is None and "logits" not in out
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0
    as_tuple = model(input_ids=input_ids, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], out.loss)
    assert all(item.shape[-1] != 8 for item in as_tuple[1:] if isinstance(item, torch.Tensor))
    # No labels, or eval mode: the model's own forward, logits and loss exactly as before.
    torch.testing.assert_close(
        model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits, rtol=0, atol=0
    )
    model.eval()
    reference.eval()
    with torch.no_grad():
        got = model(input_ids=input_ids, labels=labels)
        expected = reference(input_ids=input_ids, labels=labels)
    assert got.logits.shape == (2, 12, VOCAB)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_patch_twice_unpatch_and_deepcopy():
    model = make_model("gpt2", tie=True)
    input_ids, labels = make_batch()
    assert patch(model, backend="torch") is model and is_patched(model)
    patched_forward = model.forward
    assert patch(model, backend="triton") is model
    assert model.forward == patched_forward  # the second call changed nothing
    copied = copy.deepcopy(model)
    assert copied.forward.__self__ is copied and is_patched(copied)
    assert copied(input_ids=input_ids, labels=labels).logits is None
    assert unpatch(model) is model and not is_patched(model)
    assert "forward" not in vars(model) and unpatch(model) is model
    assert model(input_ids=input_ids, labels=labels).logits.shape == (2, 12, VOCAB)
    assert copied(input_ids=input_ids, labels=labels).logits is None  # the copy stays patched


def test_refuses_what_it_cannot_patch():
    with pytest.raises(TypeError, match="model: expected a transformers PreTrainedModel"):
        patch(torch.nn.Linear(4, 4))
    config = transformers.GPT2Config(**ARCHITECTURES["gpt2"][1])
    with pytest.raises(ValueError, match="cannot patch GPT2Model: its output layer"):
        patch(transformers.GPT2Model(config))
    with pytest.raises(ValueError, match="computes the loss without self.loss_function"):
        patch(transformers.GPT2DoubleHeadsModel(config))
    model = make_model("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="its loss_function is <lambda>"):
        patch(model)
    with pytest.raises(ValueError, match="backend: expected one of"):
        patch(make_model("llama"), backend="cuda")
    model = make_model("llama")
    model.forward = model.forward  # as accelerate.prepare and other patches leave it
    with pytest.raises(ValueError, match="its forward is already replaced on the instance"):
        patch(model)
    model = make_model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match=r"its output layer \(get_output_embeddings\(\)\) is Seq"):
        patch(model)


def test_refuses_an_unmapped_logit_transform():
    """A config that claims a soft cap the forward does not apply fails the probe check on the
    first training call, loudly, instead of training on a different loss."""
    model = make_model("llama")
    model.config.final_logit_softcapping = 3.0
    patch(model, backend="torch")
    input_ids, labels = make_batch()
    with pytest.raises(RuntimeError, match="transforms its logits .* softcap=3.0"):
        model(input_ids=input_ids, labels=labels)
    assert "forward" not in vars(model.get_output_embeddings())  # stand-ins removed
    assert "_loss_function" not in vars(model)
    # Editing the config of a patched, verified model is noticed too.
    model.config.final_logit_softcapping = None
    assert model(input_ids=input_ids, labels=labels).logits is None
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(RuntimeError, match="transforms its logits .* softcap=30.0"):
        model(input_ids=input_ids, labels=labels)


def trainer_losses(model, *, fused: bool, tmp_path) -> tuple[list[float], torch.Tensor]:
    input_ids, labels = make_batch(12, 10, seed=3, n_ignored=3)
    data = [{"input_ids": i, "labels": y} for i, y in zip(input_ids, labels, strict=True)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    if fused:
        apply_to_trainer(trainer, backend="torch")
        assert is_patched(trainer.model)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = model.get_output_embeddings().weight.detach().clone()
    return losses, weights


def test_trainer_loss_curve(tmp_path):
    """Trainer with gradient accumulation (so num_items_in_batch is used): the same loss curve
    and the same trained weights, patched and unpatched."""
    pytest.importorskip("accelerate")
    model = make_model("llama")
    fused, fused_weights = trainer_losses(copy.deepcopy(model), fused=True, tmp_path=tmp_path)
    plain, plain_weights = trainer_losses(model, fused=False, tmp_path=tmp_path)
    assert len(fused) == 4 and fused[0] != fused[-1]
    assert fused == pytest.approx(plain, rel=1e-5)
    torch.testing.assert_close(fused_weights, plain_weights, rtol=1e-4, atol=1e-5)


def test_apply_to_trainer_refuses_logit_based_losses(tmp_path):
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, label_smoothing_factor=0.1
    )
    trainer = transformers.Trainer(model=make_model("llama"), args=args)
    with pytest.raises(ValueError, match="trainer: label_smoothing_factor"):
        apply_to_trainer(trainer)
    assert not is_patched(trainer.model)


# The CPU backends `auto` can pick outside the interpreter tests: native where it is built.
CPU_LOSS_BACKENDS = [b for b, device in backend_cases() if device == "cpu" and b != "triton"]


@pytest.mark.parametrize("backend", CPU_LOSS_BACKENDS)
@pytest.mark.parametrize(
    ("vocab", "n_seqs", "length"),
    [(64000, 2, 512), (32000, 4, 128)],
    ids=["64k-2x512", "32k-4x128"],
)
def test_peak_memory_large_vocabulary(backend, vocab, n_seqs, length):
    """Forward + backward of a large-vocabulary model: the patched model's peak is at most a
    quarter of the unpatched one's and below one ``N x V`` fp32 logits tensor (the unpatched
    peak holds several logits-sized tensors; the patched one a chunk of them). The 32k case is
    the example's micro-batch (``examples/hf_causal_lm.py``), where the whole logits (62.5 MiB)
    fit the native path's 64 MiB chunk budget: a chunk held all of them there.

    Peak memory on CPU is read from PyTorch's own CPU allocator: with the profiler's
    ``profile_memory=True`` each tensor allocation and free is an event with its size, and the
    running sum of those events in time order is the live tensor memory, whose maximum is the
    peak (``fused_ce._memory.peak_bytes``). Process RSS would also count glibc's caching and
    fragmentation (noisy, and shared with whatever else the process did before); tracemalloc
    does not see tensor memory at all.
    """
    model = make_model("llama", vocab=vocab)
    reference = copy.deepcopy(model)
    patch(model, backend=backend)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (n_seqs, length), generator=generator)

    def step(m):
        return lambda: m(input_ids=input_ids, labels=input_ids).loss.backward()

    fused, plain = peak_bytes(step(model)), peak_bytes(step(reference))
    logits_bytes = n_seqs * length * vocab * 4
    assert plain >= 2 * logits_bytes  # the measurement sees the logits
    assert fused <= plain / 4, (fused, plain)
    assert fused < logits_bytes, (fused, logits_bytes)


def test_example_runs(capsys):
    path = Path(__file__).resolve().parent.parent / "examples" / "hf_causal_lm.py"
    spec = importlib.util.spec_from_file_location("hf_causal_lm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(
        [
            "--steps",
            "2",
            "--vocab",
            "1000",
            "--hidden",
            "32",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
        ]
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["step", "unpatched", "fused_ce"]
    for row in lines[2:4]:
        _, plain, fused = row.split()
        assert float(fused) == pytest.approx(float(plain), rel=1e-5)
    assert "largest loss difference" in lines[4] and "peak memory" in lines[5]


DOCUMENTED = {
    hf_integration.patch: ("Args:", "Returns:", "Shape:", "Examples::"),
    fused_ce._memory.peak_bytes: ("Examples::",),
}


@pytest.mark.parametrize("function", list(DOCUMENTED), ids=lambda f: f.__name__)
def test_docstring_examples(function):
    for section in DOCUMENTED[function]:
        assert f"\n    {section}\n" in function.__doc__, section
    (test,) = doctest.DocTestFinder().find(function, globs={"torch": torch})
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and test.examples


def test_eval_loss_and_accuracy_without_logits():
    """patch(eval_logits=False): in eval mode with labels, the loss and the token accuracy
    without logits, equal to what the unpatched model's logits give; return_logits=True gets
    the model's own forward back."""
    model = make_model("gemma2")  # a soft cap: the accuracy is taken on the final logits
    reference = copy.deepcopy(model).eval()
    patch(model, backend="torch", eval_logits=False).eval()
    input_ids, labels = make_batch()
    with torch.no_grad():
        # Some labels are the model's own predictions, so the accuracy is neither 0 nor 1.
        predicted = reference(input_ids=input_ids).logits.argmax(-1)
        labels[:, 7::2] = predicted[:, 6:-1:2]
        got = model(input_ids=input_ids, labels=labels)
        expected = reference(input_ids=input_ids, labels=labels)
        as_tuple = model(input_ids=input_ids, labels=labels, return_dict=False)
        asked = model(input_ids=input_ids, labels=labels, return_logits=True)
    assert got.logits is None and "logits" not in got
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    valid = shifted != -100
    hits = (expected.logits.argmax(-1) == shifted) & valid
    assert 0 < hits.sum() < valid.sum()  # the check below can tell a wrong accuracy
    assert got.token_accuracy.dtype == torch.float32
    assert got.token_accuracy.item() == pytest.approx(hits.sum().item() / valid.sum().item())
    assert torch.equal(as_tuple[0], got.loss) and torch.equal(as_tuple[-1], got.token_accuracy)
    torch.testing.assert_close(asked.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(asked.loss, expected.loss, rtol=0, atol=0)
    # Training is untouched by the option; eval_logits must be a bool.
    out = model.train()(input_ids=input_ids, labels=labels)
    assert out.logits is None and "token_accuracy" not in out
    with pytest.raises(TypeError, match="eval_logits"):
        patch(make_model("llama"), eval_logits="no")
