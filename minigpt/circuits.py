"""A model that has induction heads, trained on purpose to study them.

An induction head completes ``A B ... A`` with ``B``: it looks back for an earlier
copy of the current token and attends to the token that came after it (Olsson et al.
2022). It needs two layers: a head in layer 0 copies each position's previous token
into it, and a head in layer 1 matches "my token" against "your previous token".
The Shakespeare course model has none (its text rarely pays for exact copying), so
this module trains a small two-layer GPT on text that does:

- ``repeated_blocks``: windows of Tiny Shakespeare in which a block of characters is
  written twice in a row, with its length and place drawn per window. Natural text
  rewards previous-token heads (they help to predict a character from the two before
  it), which the induction heads then build on; on uniform random tokens neither pays
  off alone and training stalls for thousands of steps. Because the block's length
  and place vary, a head cannot find the first copy by looking a fixed distance back
  or at a fixed position (rows that repeat one block end to end let a layer-0 head
  copy by position alone): only by matching content.
- ``train_copying_model`` trains on them and records, every few steps, the loss, the
  largest induction score of any head and the loss drop on a repeated sequence of
  *random* characters (``minigpt.inspect``), a kind of text it never trained on: the
  curves on which induction heads appear.
- ``induction_model`` trains ``INDUCTION`` once and caches it by recipe hash, like
  the course models (``minigpt.pretrained.cached_model``).
- ``attention_map``: one head's (T, T) weights on a text, with the tokens to label
  its axes: what an attention-map widget draws.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt.generate import Tokenizer
from minigpt.inspect import capture, induction_loss_drop, induction_score, repeated_random_tokens
from minigpt.model import GPT, GPTConfig
from minigpt.optim import clip_grad_norm
from minigpt.pretrained import cached_model, recipe_folder, shakespeare_char_data
from minigpt.tokenizer import CharTokenizer

__all__ = [
    "INDUCTION",
    "attention_map",
    "induction_model",
    "repeated_blocks",
    "train_copying_model",
]

# The recipe of ``induction_model``: a two-layer GPT on Tiny Shakespeare's characters,
# 32 positions, GPT-2-style layers (learned positions).
INDUCTION: dict[str, Any] = {
    "model": {"block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 64, "dropout": 0.0},
    "min_period": 4,
    "batch_size": 32,
    "lr": 3e-3,
    "steps": 3000,
    "eval_every": 100,
}


def repeated_blocks(
    ids: Tensor,
    length: int,
    batch_size: int,
    *,
    min_period: int = 4,
    max_period: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Windows of ``ids`` in which one block is written twice: data that rewards copying.

    Row b is a window of ``length + 1`` ids from a random place in ``ids`` (1-D, e.g. a
    text's token ids). It draws a block length n_b uniformly in ``min_period..max_period``
    (default ``length // 2``) and a start s_b uniformly among the places where two
    copies fit; ids s_b + n_b .. s_b + 2n_b - 1 are replaced by a copy of ids s_b ..
    s_b + n_b - 1. Because n_b and s_b vary, neither the distance back to the first copy
    nor its position is fixed. Returns ``(inputs, targets)``, both (batch_size, length),
    targets shifted by one as in pretraining.
    """
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        raise ValueError("ids must be a 1-D tensor of token ids (a text to cut windows from)")
    for name, value in (("length", length), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(ids) < length + 1:
        raise ValueError(f"ids has {len(ids)} tokens: a window needs length + 1 = {length + 1}")
    hi = length // 2 if max_period is None else max_period
    if not (isinstance(min_period, int) and isinstance(hi, int) and 1 <= min_period <= hi):
        raise ValueError(f"need 1 <= min_period <= max_period, got {min_period!r} and {hi!r}")
    if 2 * hi > length + 1:
        raise ValueError(f"max_period {hi} is too long: two copies must fit in {length + 1} ids")
    start = torch.randint(0, len(ids) - length, (batch_size, 1), generator=generator)  # (B, 1)
    n = torch.randint(min_period, hi + 1, (batch_size, 1), generator=generator)  # (B, 1)
    s = (torch.rand(batch_size, 1, generator=generator) * (length + 2 - 2 * n)).long()  # (B, 1)
    t = torch.arange(length + 1)[None, :]  # (1, T + 1)
    second = (t >= s + n) & (t < s + 2 * n)  # (B, T + 1): the second copy
    rows = ids.long()[start + torch.where(second, t - n, t)]  # the second copy reads the first
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def _measure(model: GPT, probe: Tensor, seed: int) -> tuple[float, float]:
    """(largest induction score of any head, induction loss drop) on a repeated sequence."""
    model.eval()
    with capture(model) as rec:
        model(probe)
    score = float(induction_score(rec.attention_stack(), probe.shape[1] // 2).max())
    drop = induction_loss_drop(model, seed=seed)
    model.train()
    return score, drop


def train_copying_model(
    recipe: dict[str, Any] = INDUCTION, *, steps: int | None = None, seed: int = 0
) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """Train a GPT of ``recipe`` on ``repeated_blocks`` of Tiny Shakespeare's training
    text (``shakespeare_char_data``), measuring induction as it learns.

    AdamW at a constant learning rate, gradients clipped at 1, one fresh batch per
    step (seeded). Returns the model (eval mode), its ``CharTokenizer`` and a record
    with lists ``step``, ``loss`` (on the step's batch, before the update),
    ``induction_score`` (the largest head's, on 8 repeated random sequences of half the
    context) and ``loss_drop`` (``induction_loss_drop``), measured every ``eval_every``
    steps and at the end, plus ``steps`` and ``seed``.
    """
    steps = recipe["steps"] if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    tokenizer, train_ids, _ = shakespeare_char_data()
    text = torch.tensor(train_ids[:], dtype=torch.long)  # (N,) the training text's ids
    V, T = tokenizer.vocab_size, recipe["model"]["block_size"]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, **recipe["model"]))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    probe = repeated_random_tokens(V, T // 2, batch_size=8, seed=seed + 2)
    record: dict[str, Any] = {"step": [], "loss": [], "induction_score": [], "loss_drop": []}
    model.train()
    for step in range(steps + 1):
        x, y = repeated_blocks(
            text, T, recipe["batch_size"], min_period=recipe["min_period"], generator=g
        )
        if step % recipe["eval_every"] == 0 or step == steps:
            with torch.no_grad():
                loss = float(F.cross_entropy(model(x)[0].transpose(1, 2), y))
            score, drop = _measure(model, probe, seed + 3)
            for key, value in zip(record, (step, loss, score, drop)):
                record[key].append(value)
        if step == steps:
            break
        _, loss_t = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        clip_grad_norm(model.parameters(), 1.0)  # summed in row-major order (minigpt.optim)
        opt.step()
    record.update(steps=steps, seed=seed)
    return model.eval(), tokenizer, record


def induction_model(
    cache: str | os.PathLike[str] | None = None, *, steps: int | None = None, seed: int = 0
) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """The two-layer copying model of ``INDUCTION``: trained once, then loaded.

    Cached under ``<cache>/models/induction-<recipe hash>/`` (``cache`` defaults to
    ``minigpt.data.cache_dir()``). Returns the model (eval mode, CPU), its tokenizer and
    the training record of ``train_copying_model``.
    """
    steps = INDUCTION["steps"] if steps is None else steps
    folder = recipe_folder(cache, "induction", {**INDUCTION, "steps": steps, "seed": seed})
    return cached_model(folder, lambda: train_copying_model(INDUCTION, steps=steps, seed=seed))


@torch.no_grad()
def attention_map(
    model: GPT, tokenizer: Tokenizer, text: str, layer: int, head: int
) -> tuple[Tensor, list[str]]:
    """Head ``head`` of layer ``layer`` reading ``text``: its (T, T) attention weights
    (row i: how query i spreads over keys 0..i) and the T decoded tokens, for labels.

    ``text`` is cut to its last ``block_size`` tokens.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    ids = tokenizer.encode(text)[-model.config.block_size :]
    if not ids:
        raise ValueError(f"text {text!r} encodes to no tokens")
    with capture(model, [layer]) as rec:  # checks the model and the layer
        if (
            not isinstance(head, int)
            or isinstance(head, bool)
            or not 0 <= head < model.config.n_head
        ):
            raise ValueError(
                f"head {head!r} does not exist: each layer has heads 0..{model.config.n_head - 1}"
            )
        model(torch.tensor([ids], device=model.device))
    return rec.attention[layer][0, head].cpu(), [tokenizer.decode([i]) for i in ids]
