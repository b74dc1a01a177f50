"""Checks for chapter 05, pretraining: batches, cross-entropy, AdamW, the schedule, clipping,
and backpropagation by hand.

This module holds q1 and q2 (batches and the loss) and q6 and q7 (a short run and the
loss before training); the optimizer questions q3 to q5 are in ``ch05_optim`` and the
backpropagation questions q8 and q9 in ``ch05_backprop``. All of them are read from here:
``ch05.q8`` is ``ch05_backprop.q8``.

The exercises are "written by you and checked against PyTorch": each check rejects the
library function that would do the whole job (TokenDataset, F.cross_entropy, torch.optim,
minigpt.optim, clip_grad_norm_, and autograd itself for the two backpropagation questions,
q8 and q9, whose answers are compared with autograd's gradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minigpt.exercises.ch05_backprop import Value, q8, q9
from minigpt.exercises.ch05_optim import q3, q4, q5
from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    close,
    number,
)
from minigpt.exercises.shortcuts import Shortcut, forbid
from minigpt.tokens import TokenDataset

__all__ = ["Value", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8", "q9"]


def _data() -> torch.Tensor:
    return torch.arange(100, 160)  # ids whose values show where a window starts


class GetBatch(Question):
    name = "q1"
    _hint = (
        "For each offset i, the input is data[i : i + block_size] and the target is the same "
        "window moved one token right: data[i + 1 : i + 1 + block_size]. torch.stack the rows."
    )
    _solution = """
def get_batch(data, offsets, block_size):
    x = torch.stack([data[i : i + block_size] for i in offsets.tolist()])          # (B, T)
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in offsets.tolist()])  # (B, T)
    return x, y
"""

    shortcuts = (
        Shortcut(
            "minigpt's TokenDataset",
            "slice the windows out of data yourself and torch.stack them",
            (TokenDataset,),
        ),
    )

    def _check(self, fn) -> None:
        data = _data()
        for offsets, T in (
            (torch.tensor([0, 5, 17]), 4),
            (torch.tensor([50]), 8),
            (torch.tensor([3, 3]), 1),
        ):
            with forbid(*self.shortcuts):
                out = call(fn, data, offsets, T)
            if not isinstance(out, tuple) or len(out) != 2:
                raise Incorrect("return a pair (x, y)")
            x, y = out
            ex, ey = self.reference()(data, offsets, T)
            close(x, ex, what=f"x for offsets {offsets.tolist()}, block_size {T}")
            if isinstance(y, torch.Tensor) and y.shape == ex.shape and torch.equal(y, ex):
                raise Incorrect("y equals x: the targets must be the inputs shifted by one token")
            close(y, ey, what=f"y for offsets {offsets.tolist()}, block_size {T}")

    def reference(self):
        def get_batch(data, offsets, block_size):
            x = torch.stack([data[i : i + block_size] for i in offsets.tolist()])
            y = torch.stack([data[i + 1 : i + 1 + block_size] for i in offsets.tolist()])
            return x, y

        return get_batch

    def wrong_answers(self):
        def same(data, offsets, T):
            x = torch.stack([data[i : i + T] for i in offsets.tolist()])
            return x, x.clone()

        def too_far(data, offsets, T):
            x = torch.stack([data[i : i + T] for i in offsets.tolist()])
            y = torch.stack([data[i + 2 : i + 2 + T] for i in offsets.tolist()])
            return x, y

        def transposed(data, offsets, T):
            x, y = self.reference()(data, offsets, T)
            return x.T, y.T

        return [same, too_far, transposed]


class CrossEntropy(Question):
    name = "q2"
    _hint = (
        "log_softmax(z)_j = z_j - logsumexp(z). Subtract each row's max before exp so that large "
        "logits do not overflow; pick the target's log-probability with gather or indexing; "
        "average the negatives over the rows."
    )
    _solution = """
def cross_entropy(logits, targets):
    z = logits - logits.max(dim=-1, keepdim=True).values        # (N, V), stable
    log_probs = z - z.exp().sum(dim=-1, keepdim=True).log()       # (N, V)
    return -log_probs[torch.arange(len(targets)), targets].mean() # scalar
"""

    shortcuts = (
        Shortcut(
            "F.cross_entropy (or F.log_softmax)",
            "subtract each row's max, take log_softmax = z - log(sum(exp(z))) yourself, pick "
            "the targets' entries and average their negatives",
            ("cross_entropy", "cross_entropy_loss", "log_softmax", "_log_softmax"),
        ),
    )

    def _check(self, fn) -> None:
        g = torch.Generator().manual_seed(5)
        for scale in (1.0, 200.0):  # 200: exp overflows without the max trick
            logits = torch.randn(6, 11, generator=g) * scale
            targets = torch.randint(0, 11, (6,), generator=g)
            with forbid(*self.shortcuts):
                got = call(fn, logits, targets)
            if isinstance(got, torch.Tensor):
                if got.dim() != 0:
                    raise Incorrect(
                        f"return one number (the mean loss), got shape {tuple(got.shape)}"
                    )
                got = got.item()
            if isinstance(got, float) and not math.isfinite(got):
                raise Incorrect(
                    f"got {got} for logits of size ~{scale:g}: subtract the row max before exp"
                )
            got = number(got, "the loss")
            close(
                got, F.cross_entropy(logits, targets), what=f"the loss (logits of size ~{scale:g})"
            )

    def reference(self):
        def cross_entropy(logits, targets):
            z = logits - logits.max(dim=-1, keepdim=True).values
            log_probs = z - z.exp().sum(dim=-1, keepdim=True).log()
            return -log_probs[torch.arange(len(targets)), targets].mean()

        return cross_entropy

    def wrong_answers(self):
        def unstable(logits, targets):
            log_probs = logits - logits.exp().sum(dim=-1, keepdim=True).log()
            return -log_probs[torch.arange(len(targets)), targets].mean()

        def summed(logits, targets):
            z = logits - logits.max(dim=-1, keepdim=True).values
            log_probs = z - z.exp().sum(dim=-1, keepdim=True).log()
            return -log_probs[torch.arange(len(targets)), targets].sum()

        def probs_not_logs(logits, targets):
            return -F.softmax(logits, -1)[torch.arange(len(targets)), targets].mean()

        return [unstable, summed, probs_not_logs]


q1 = GetBatch()
q2 = CrossEntropy()


# ---------------------------------------------------------------- q6, q7: a short run, and ln V


_RECIPE = dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)
_STEPS, _LR = 60, 3e-3


def _shakespeare_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (8, 32) batch of character ids of Tiny Shakespeare's training text."""
    from minigpt.exercises.core import shakespeare

    train, val = shakespeare()
    stoi = {c: i for i, c in enumerate(sorted(set(train + val)))}
    ids = torch.tensor([stoi[c] for c in train])
    offsets = torch.randint(len(ids) - 32, (8,), generator=torch.Generator().manual_seed(3))
    x = torch.stack([ids[i : i + 32] for i in offsets])  # (B, T)
    y = torch.stack([ids[i + 1 : i + 33] for i in offsets])  # (B, T)
    return x, y


def _short_run(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from minigpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**_RECIPE))
    opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=0.0)
    out = {}
    for step in range(_STEPS):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            out["initial"] = loss.item()
            out["grad_norm"] = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
            out["wte_grad_norm"] = model.wte.weight.grad.norm().item()
        opt.step()
    with torch.no_grad():
        out["loss"] = model(x, y)[1].item()
    out["grad_norm"] = float(out["grad_norm"])
    return out


class ShortRun(Experiment):
    name = "q6"
    question = f"""
Train a fresh model on one fixed batch, `x, y = ch05.q6.batch()` (8 windows of 32
characters of Tiny Shakespeare, ids of the lesson's 65-character tokenizer): seed with
`torch.manual_seed(0)` just before building `GPT(GPTConfig(vocab_size=65, block_size=32,
n_layer=2, n_head=2, n_embd=32))`, and run **{_STEPS} steps** of
`torch.optim.AdamW(model.parameters(), lr={_LR}, weight_decay=0.0)`, one
`model(x, y)`, `zero_grad`, `backward`, `step` each. Report
`{{"grad_norm": ..., "loss": ...}}`: the global gradient norm (the square root of the sum
of every parameter gradient's squares) at the first step, before the optimizer moved
anything, and the loss on `(x, y)` after the {_STEPS} steps. Each within ±0.01.
"""
    keys = ("grad_norm", "loss")
    atol = 0.01
    trivial = (0.0, 1.0, float(_STEPS), _LR, 65.0)
    _hint = """
model(x, y) returns (logits, loss). After loss.backward() at step 0, the global norm is
torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())), which is also what
torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")) returns. The last loss
is one more model(x, y) after the loop.
"""
    _solution = f"""
from minigpt.model import GPT, GPTConfig

x, y = ch05.q6.batch()
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
opt = torch.optim.AdamW(model.parameters(), lr={_LR}, weight_decay=0.0)
for step in range({_STEPS}):
    _, loss = model(x, y)
    opt.zero_grad()
    loss.backward()
    if step == 0:
        grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    opt.step()
with torch.no_grad():
    final_loss = model(x, y)[1].item()
run = {{"grad_norm": grad_norm, "loss": final_loss}}
"""

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experiment's batch: inputs and targets, both (8, 32) int64."""
        return _shakespeare_batch()

    def run_experiment(self) -> dict[str, float]:
        return _short_run(*self.batch())

    def decoys(self):
        run = self.record()
        return {
            "the loss before training (about ln 65)": {"loss": run["initial"]},
            "ln 65, the uniform model's loss": {"loss": math.log(65)},
            "the lesson's initial loss": {"loss": 4.209},
            "the gradient norm of the token embedding alone, not of every parameter": {
                "grad_norm": run["wte_grad_norm"]
            },
            "the lesson's gradient norm of the token embedding": {"grad_norm": 0.7657},
            "the squared norm (no square root)": {"grad_norm": run["grad_norm"] ** 2},
        }


q6 = ShortRun()


class WhyLnV(MultipleChoice):
    name = "q7"
    question = """
Before any training, a GPT over 65 characters has a loss close to ln 65 ≈ 4.17 (the
lesson's 4.209, and the loss at the first step of your run). Why is that the loss to expect?
"""
    options = (
        Option(
            "Cross-entropy is divided by ln V, so every loss is measured against it.",
            "Nothing divides by ln V: cross-entropy is the plain average of -log p of the "
            "right token. ln V only appears because of what a fresh model predicts.",
        ),
        Option(
            "No model can have a loss below ln V, and a fresh one starts at that floor.",
            "ln V is a ceiling to beat, not a floor: your run took the loss well below it in "
            "60 steps, and the trained course model reaches about 1.5.",
        ),
        Option(
            "Small random weights give small, nearly equal logits, so the softmax gives every "
            "token about 1/V, and -ln(1/V) = ln V.",
            "A fresh model knows nothing and says so: close to the uniform guess. A first "
            "loss much above ln V means over-confident wrong predictions, a sign of a bug "
            "or a bad initialisation.",
        ),
        Option(
            "The initialisation gives the model the character frequencies of the text.",
            "The weights are drawn at random, before any text is read; knowing the "
            "frequencies would give the unigram loss (3.347 in chapter 00), not ln 65.",
        ),
    )
    answer = "c"
    _hint = "What does softmax give when all V logits are (nearly) equal?"


q7 = WhyLnV()
