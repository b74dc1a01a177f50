"""Time to quality: how low does the validation loss go in a fixed CPU wall-clock budget?

Trains a character-level GPT on Tiny Shakespeare (the first 90% of the text) for
``--budget`` seconds of wall-clock time and prints the loss on the last 10%,
measured on every non-overlapping window (not a random sample).

The reference point is nanoGPT's documented CPU recipe (4 layers, 4 heads, 128
wide, context 64, batch 12, lr 1e-3, 2000 iterations, no dropout), which takes
about 270 s on a 2-core machine and reaches val loss 1.88. ``--baseline`` also
runs that recipe with minigpt's trainer in the same budget, so both numbers come
from the same machine under the same load. Goal: 1.60 or lower in 270 s.

minigpt's recipe is the same small shape with Llama-style layers (rotary
positions, RMSNorm, SwiGLU, no biases) and twice the learning rate, and it ties
the schedule to the clock: a short linear warmup, then a cosine decay whose
progress is the fraction of the budget used, so the learning rate reaches its
minimum exactly when time runs out, whatever the machine's speed.

    python benchmarks/time_to_quality.py                 # the 270 s run
    python benchmarks/time_to_quality.py --baseline      # + nanoGPT's recipe (2 x the time)
    python benchmarks/time_to_quality.py --quick         # a 20 s smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from minigpt.data import TokenDataset, cached_tokens, load_text, train_val_split
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from minigpt.train import TrainConfig, Trainer

# Many small steps win at this budget: in equal CPU time, 1600 steps of 12 x 64 tokens
# at lr 2e-3 reached 1.86, 600 steps of 16 x 128 only 2.04. So the model stays small and
# batches short, with the cosine tied to the clock. The Llama-style layers (rotary
# positions, RMSNorm, SwiGLU, no biases) are the biggest single gain: in paired
# one-thread runs of 270 s, GPT-2-style layers reached 1.734 and Llama-style ones
# 1.643 at lr 2e-3 (at lr 4e-3: 1.709 and 1.671; at 6e-3 Llama-style: 1.702).
RECIPE = dict(
    model=dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=64,
        dropout=0.0,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
    ),
    train=dict(batch_size=12, lr=2e-3, min_lr=2e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1),
)
NANOGPT = dict(
    model=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    train=dict(batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1),
    steps=2000,
)


class ClockTrainer(Trainer):
    """A trainer whose cosine decay follows the fraction of the time budget used."""

    def __init__(self, *args, budget: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget = budget
        self.start = time.perf_counter()

    def lr(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        progress = min(1.0, (time.perf_counter() - self.start) / self.budget)
        return c.final_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (c.lr - c.final_lr)


@torch.no_grad()
def full_val_loss(model: GPT, val_ids) -> float:
    """Mean loss over every non-overlapping window of the validation text."""
    model.eval()
    T = model.config.block_size
    ids = torch.from_numpy(val_ids.astype("int64"))
    n = (len(ids) - 1) // T
    x = ids[: n * T].view(n, T)
    y = ids[1 : n * T + 1].view(n, T)
    total = 0.0
    for i in range(0, n, 64):
        _, loss = model(x[i : i + 64], y[i : i + 64])
        total += loss.item() * len(x[i : i + 64])
    return total / n


def run(
    name: str, recipe: dict, budget: float, data, vocab_size: int, steps: int | None, progress: bool
):
    train_ids, val_ids = data
    mc = GPTConfig(vocab_size=vocab_size, **recipe["model"])
    torch.manual_seed(0)
    model = GPT(mc)
    tc = TrainConfig(
        max_steps=steps or 10**9,
        eval_interval=10**9,  # only the final evaluation below
        time_limit=budget,
        device="cpu",
        progress=progress,
        compile=recipe.get("compile", False),
        **recipe["train"],
    )
    train_data = TokenDataset(train_ids, mc.block_size)
    if steps:  # nanoGPT's recipe: a step-based schedule over its 2000 iterations
        trainer = Trainer(model, train_data, None, tc)
    else:
        trainer = ClockTrainer(model, train_data, None, tc, budget=budget)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    val = full_val_loss(model, val_ids)
    tokens = trainer.step * tc.batch_size * mc.block_size
    print(
        f"{name:8s} val loss {val:.4f} after {trainer.step} steps ({tokens / 1e6:.2f}M tokens) "
        f"in {seconds:.0f} s; {model.num_parameters() / 1e6:.2f}M params; "
        f"model {recipe['model']}; train {recipe['train']}",
        flush=True,
    )
    return val


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=270.0, help="training seconds (wall clock)")
    p.add_argument("--quick", action="store_true", help="a 20 s smoke run")
    p.add_argument("--baseline", action="store_true", help="also run nanoGPT's CPU recipe")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile minigpt's model")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    budget = 20.0 if args.quick else args.budget
    if args.threads:
        torch.set_num_threads(args.threads)
    text = load_text("tinyshakespeare")
    tok = CharTokenizer.fit(text)
    ids = cached_tokens(text, tok.encode, vocab_size=tok.vocab_size, key="char", progress=False)
    data = train_val_split(ids, 0.1)
    print(
        f"Tiny Shakespeare, characters: {len(data[0]):,} train / {len(data[1]):,} val tokens; "
        f"budget {budget:.0f} s; {torch.get_num_threads()} threads; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    recipe = dict(RECIPE, compile=args.compile)
    ours = run("minigpt", recipe, budget, data, tok.vocab_size, None, args.progress)
    if args.baseline:
        base = run(
            "nanoGPT", NANOGPT, budget, data, tok.vocab_size, NANOGPT["steps"], args.progress
        )
        print(f"loss ratio minigpt / nanoGPT recipe: {ours / base:.3f} (lower is better)")
    print(f"goal: val loss <= 1.60 in 270 s; got {ours:.4f} in {budget:.0f} s")


if __name__ == "__main__":
    main()
