"""Chapter 10 exercises on where training memory goes (``ch10`` re-exports them): q4, the
bytes of Adam's state, and q6, an experiment (the activation bytes per token a GPT saves
for backward, plain and with activation checkpointing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt import optim as package_optim
from minigpt.exercises.core import Experiment, Incorrect, Question, call, number
from minigpt.exercises.shortcuts import Shortcut, forbid
from minigpt.model import GPT, GPTConfig

__all__ = ["q4", "q6"]


# ---------------------------------------------------------------- q4: the memory of Adam's state


class AdamStateBytes(Question):
    name = "q4"
    _hint = (
        "AdamW keeps two running averages per trainable parameter (exp_avg and exp_avg_sq), "
        "each the parameter's shape and dtype. Sum 2 * p.numel() * p.element_size() over "
        "model.parameters() that require a gradient."
    )
    _solution = """
def adam_state_bytes(model):
    return sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
"""

    shortcuts = (
        Shortcut(
            "building an optimizer (torch.optim or minigpt.optim)",
            "count the two moments per trainable parameter from model.parameters() yourself",
            (torch.optim.Adam, torch.optim.AdamW, torch.optim.Optimizer, package_optim),
        ),
    )

    @staticmethod
    def _model() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Embedding(11, 6), nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 11)
        )
        model[2].requires_grad_(False)  # frozen: no optimizer state
        model[1].to(torch.bfloat16)  # 2-byte parameters: 2-byte moments
        return model

    @staticmethod
    def _reference(model):
        return sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def _check(self, fn) -> None:
        model = self._model()
        with forbid(*self.shortcuts):
            got = number(call(fn, model), "the bytes", integer=True)
        want = self._reference(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if got == self._reference(model) // 2:
            raise Incorrect(f"got {got}: that is one moment; Adam keeps two (exp_avg, exp_avg_sq)")
        if got == sum(2 * p.numel() * p.element_size() for p in model.parameters()):
            raise Incorrect(f"got {got}: frozen parameters (requires_grad=False) have no state")
        if got == sum(8 * p.numel() for p in trainable):
            raise Incorrect(f"got {got}: a bf16 parameter's moments take 2 bytes, not 4")
        if got != want:
            raise Incorrect(f"expected {want:,} bytes, got {got:,}")

    def reference(self):
        return self._reference

    def wrong_answers(self):
        return [
            lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad),
            lambda m: sum(2 * p.numel() * p.element_size() for p in m.parameters()),
            lambda m: sum(8 * p.numel() for p in m.parameters() if p.requires_grad),
        ]


q4 = AdamStateBytes()


# ---------------------------------------------------------------- q6: activation memory, measured

_MEM = {"n_layer": 6, "n_head": 4, "n_embd": 48, "B": 4, "T": 64}
_LESSON_PLAIN = 51_085  # bytes per token, the course model at B = 6, T = 128
_LESSON_CHECKPOINTED = 4.54e6 / (6 * 128)  # the lesson's 4.54 MB for that batch


def _saved(fn, exclude=()) -> dict[str, int]:
    """Bytes autograd saves while ``fn()`` runs: distinct storages (less ``exclude``),
    every saved tensor counted each time, and distinct storages parameters included."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    distinct: dict[int, int] = {}
    every = [0]

    def pack(t):
        s = t.untyped_storage()
        every[0] += t.numel() * t.element_size()
        distinct[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    mine = sum(n for ptr, n in distinct.items() if ptr not in skip)
    return {"distinct": mine, "every": every[0], "with_params": sum(distinct.values())}


def _forward_checkpointed(m: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    h = m.drop(m.wte(idx))  # (B, T, C)
    for block in m.h:
        h = checkpoint(block, h, use_reentrant=False)
    logits = m.lm_head(m.ln_f(h))  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _activation_bytes() -> dict[str, float]:
    """Bytes per token saved for backward by the q6 model, and what misreadings give."""
    c = _MEM
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=65,
            block_size=c["T"],
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
        )
    )
    x = torch.randint(65, (c["B"], c["T"] + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:]  # (B, T) each
    params = list(model.parameters())
    plain = _saved(lambda: model(inputs, targets)[1], exclude=params)
    ckpt = _saved(lambda: _forward_checkpointed(model, inputs, targets), exclude=params)
    kept = c["n_layer"] * c["B"] * c["T"] * c["n_embd"] * 4  # the blocks' float32 inputs
    tokens = c["B"] * c["T"]
    return {
        "plain": plain["distinct"] / tokens,
        "checkpointed": (ckpt["distinct"] + kept) / tokens,
        "plain_every": plain["every"] / tokens,
        "plain_with_params": plain["with_params"] / tokens,
        "ckpt_with_params": (ckpt["with_params"] + kept) / tokens,
        "ckpt_without_inputs": ckpt["distinct"] / tokens,
        "plain_total": plain["distinct"],
        "ckpt_total": ckpt["distinct"] + kept,
        "per_row_tokens": c["B"] * (c["T"] + 1),
    }


class ActivationMemory(Experiment):
    name = "q6"
    question = """
The lesson counted the activation bytes per token of the course model (4 layers of width
128). Measure them for a deeper, narrower GPT: `torch.manual_seed(0)`, then
`GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=6, n_head=4, n_embd=48))` (in its
default training mode), on one batch `x = torch.randint(65, (4, 65),
generator=torch.Generator().manual_seed(0))` with inputs `x[:, :-1]` and targets
`x[:, 1:]`. Count, as the lesson's `saved_bytes` does, the bytes of the distinct
storages autograd saves during the forward pass that returns the loss, leaving out the
parameters. Report `{"plain": ..., "checkpointed": ...}` in bytes per token (divided by
the 4 × 64 tokens the model reads): the plain forward, and the forward with every block
run through `checkpoint(block, h, use_reentrant=False)` plus the block inputs that
`checkpoint` keeps (6 × 4 × 64 × 48 float32 numbers), as in the lesson. Each within ±1%.
"""
    keys = ("plain", "checkpointed")
    rtol = 0.01
    trivial = (0.0, 1.0, 4.0, 48.0, 64.0, 256.0, 4 * 48.0, 6 * 4 * 48.0)
    _hint = """
Copy the lesson's saved_bytes(fn, exclude) (a saved_tensors_hooks pack function that
records each saved tensor's untyped_storage() by its data_ptr(), skipping the
parameters' storages) and forward_checkpointed(m, idx, targets). Run both with
exclude=list(model.parameters()), add n_layer * B * T * n_embd * 4 bytes of block
inputs to the checkpointed count, and divide both by B * T = 256.
"""
    _solution = """
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from minigpt import GPT, GPTConfig


def saved_bytes(fn, exclude=()):
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()  # one entry per storage: views count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def forward_checkpointed(m, idx, targets):
    h = m.drop(m.wte(idx))  # (B, T, C)
    for block in m.h:
        h = checkpoint(block, h, use_reentrant=False)
    logits = m.lm_head(m.ln_f(h))  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=6, n_head=4, n_embd=48))
x = torch.randint(65, (4, 65), generator=torch.Generator().manual_seed(0))
inputs, targets = x[:, :-1], x[:, 1:]  # (4, 64) each
params = list(model.parameters())
plain, _ = saved_bytes(lambda: model(inputs, targets)[1], exclude=params)
ckpt, _ = saved_bytes(lambda: forward_checkpointed(model, inputs, targets), exclude=params)
kept = 6 * 4 * 64 * 48 * 4  # the block inputs checkpoint keeps, float32
activation_bytes = {"plain": plain / (4 * 64), "checkpointed": (ckpt + kept) / (4 * 64)}
"""

    def run_experiment(self) -> dict[str, float]:
        return _activation_bytes()

    def decoys(self):
        run = self.record()
        per_row = run["per_row_tokens"]
        return {
            "the lesson's number for the course model": {
                "plain": _LESSON_PLAIN,
                "checkpointed": _LESSON_CHECKPOINTED,
            },
            "the count with the parameters' storages in (exclude the parameters)": {
                "plain": run["plain_with_params"],
                "checkpointed": run["ckpt_with_params"],
            },
            "every saved tensor counted each time, not each distinct storage once": {
                "plain": run["plain_every"]
            },
            "what checkpoint's hooks let through, without the block inputs it keeps": {
                "checkpointed": run["ckpt_without_inputs"]
            },
            "the bytes of the whole batch, not per token": {
                "plain": run["plain_total"],
                "checkpointed": run["ckpt_total"],
            },
            "divided by the 4 x 65 ids of x, not the 4 x 64 tokens the model reads": {
                "plain": run["plain"] * 256 / per_row,
                "checkpointed": run["checkpointed"] * 256 / per_row,
            },
            "bytes per sequence (divided by 4), not per token": {
                "plain": run["plain"] * 64,
                "checkpointed": run["checkpointed"] * 64,
            },
        }


q6 = ActivationMemory()
