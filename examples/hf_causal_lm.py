"""Fine-tune a tiny Hugging Face causal LM on CPU twice from the same weights, once as
transformers computes its loss and once after ``fused_ce``'s one-call patch, and print both
loss curves and the peak memory of a training step.

    PYTHONPATH=. python examples/hf_causal_lm.py            # LLaMA-style, 32k vocabulary
    PYTHONPATH=. python examples/hf_causal_lm.py --arch gemma2 --steps 10

The model is built from a config (random weights, nothing downloaded) and learns to complete
a few fixed random "documents" whose first tokens are a prompt masked out of the loss
(labels -100). Each optimizer step accumulates gradients over micro-batches, dividing each
micro-batch's summed loss by the token count of the whole step (``num_items_in_batch``, as
``transformers.Trainer`` does), so both runs see exactly the same objective. The only change
to the training code is the line ``patch(model)``.
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers

from fused_ce._memory import peak_bytes
from fused_ce.integrations.transformers import patch

CONFIGS = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2, "head_dim": 16}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 16}),
}


def build_model(arch: str, *, vocab: int, hidden: int, seed: int) -> transformers.PreTrainedModel:
    config_name, extra = CONFIGS[arch]
    config = getattr(transformers, config_name)(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def make_corpus(
    *, n_docs: int, seq_len: int, vocab: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token documents; the first quarter of each is a prompt, masked from the loss."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (n_docs, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq_len // 4] = -100
    return input_ids, labels


def train(
    model: transformers.PreTrainedModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    accumulation: int,
    lr: float,
) -> list[float]:
    """AdamW steps over the corpus, ``accumulation`` micro-batches each; the loss per step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    per_step = batch_size * accumulation
    losses = []
    for step in range(steps):
        rows = torch.arange(step * per_step, (step + 1) * per_step) % input_ids.shape[0]
        num_items = (labels[rows, 1:] != -100).sum()
        step_loss = 0.0
        for micro in rows.split(batch_size):
            out = model(
                input_ids=input_ids[micro], labels=labels[micro], num_items_in_batch=num_items
            )
            out.loss.backward()
            step_loss += out.loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_loss)
    return losses


def step_peak_bytes(model: transformers.PreTrainedModel, input_ids, labels) -> int:
    """Peak memory of one training forward + backward (gradients included), then reset."""
    model.train()
    peak = peak_bytes(lambda: model(input_ids=input_ids, labels=labels).loss.backward())
    model.zero_grad()
    return peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(CONFIGS), default="llama")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backend", default=None, help="fused_ce backend: auto, triton, native, torch"
    )
    args = parser.parse_args(argv)

    model = build_model(args.arch, vocab=args.vocab, hidden=args.hidden, seed=args.seed)
    input_ids, labels = make_corpus(
        n_docs=2 * args.batch_size * args.accumulation,
        seq_len=args.seq_len,
        vocab=args.vocab,
        seed=args.seed + 1,
    )
    schedule = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "accumulation": args.accumulation,
        "lr": args.lr,
    }

    micro_batch = input_ids[: args.batch_size], labels[: args.batch_size]

    plain_model = copy.deepcopy(model)
    plain_peak = step_peak_bytes(plain_model, *micro_batch)
    plain_losses = train(plain_model, input_ids, labels, **schedule)

    fused_model = patch(model, backend=args.backend)  # the one call
    fused_peak = step_peak_bytes(fused_model, *micro_batch)
    fused_losses = train(fused_model, input_ids, labels, **schedule)

    tokens = args.batch_size * args.seq_len
    print(
        f"{args.arch}: vocab {args.vocab}, hidden {args.hidden}, {args.batch_size} x "
        f"{args.seq_len} tokens per micro-batch, {args.accumulation} micro-batches per step"
    )
    print(f"{'step':>4}  {'unpatched':>10}  {'fused_ce':>10}")
    for step, (plain, fused) in enumerate(zip(plain_losses, fused_losses, strict=True), 1):
        print(f"{step:>4}  {plain:>10.5f}  {fused:>10.5f}")
    largest = max(abs(p - f) for p, f in zip(plain_losses, fused_losses, strict=True))
    print(f"largest loss difference: {largest:.2e}")
    print(
        f"peak memory of one micro-batch forward + backward (PyTorch CPU allocator): "
        f"unpatched {plain_peak / 2**20:.1f} MiB, fused_ce {fused_peak / 2**20:.1f} MiB "
        f"({fused_peak / plain_peak:.2f}x); the {tokens} x {args.vocab} fp32 logits alone are "
        f"{tokens * args.vocab * 4 / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
