"""Preferences: pairs of answers to one prompt, one better, and a reward learned from them.

Instruction tuning shows a model answers to imitate. A preference says only which of
two answers is better, and that is what people (or a checker) can give at scale.
This module holds the data and the reward it teaches; ``minigpt.align`` then tunes
a policy towards it (policy gradient) or straight from the pairs (DPO).

- ``load_preferences`` reads the course's preference file (instruction, input,
  output, chosen, rejected), naming the file and line of a bad record;
  ``task_preferences`` makes pairs from the task suite (``minigpt.tasks``: right vs
  wrong, polite vs rude); ``split_by_instruction`` holds instructions out.
- ``RewardModel``: the GPT with a scalar head read at the last real token or at the
  mean of the real tokens, fit to the Bradley-Terry likelihood p(chosen > rejected)
  = sigmoid(r_chosen - r_rejected) (``bradley_terry_loss``, ``train_reward_model``,
  ``pairwise_accuracy``).
- ``fit_bag_of_words``: the baseline to beat, a logistic regression on word counts.

Prompts are the course template (``minigpt.instruct.format_prompt``) with the
assistant's preamble (``PreferenceExample.prompt``), as ``minigpt.assistant`` answers them.
"""

from __future__ import annotations

import copy
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt import data
from minigpt.assistant import PROMPT_INTRO_USED
from minigpt.classify import BagOfWords, Encode
from minigpt.finetune import FinetuneConfig, History, fit
from minigpt.instruct import InstructionExample, format_prompt, read_string_records
from minigpt.model import GPT
from minigpt.tasks import STYLES, TaskExample, write_response

__all__ = [
    "PREFERENCE_KINDS",
    "PreferenceExample",
    "RewardModel",
    "bag_of_words_rewards",
    "bradley_terry_loss",
    "fit_bag_of_words",
    "is_polite",
    "load_preferences",
    "pairwise_accuracy",
    "response_style",
    "reward_accuracy",
    "split_by_instruction",
    "task_preferences",
    "train_reward_model",
]

# ---------------------------------------------------------------- preference data


@dataclass(frozen=True)
class PreferenceExample:
    """An instruction (``input`` may be empty) and two responses, ``chosen`` preferred
    to ``rejected``; ``output`` is the data set's reference response ("" if none)."""

    instruction: str
    input: str
    output: str
    chosen: str
    rejected: str

    def prompt(self, intro: str = PROMPT_INTRO_USED) -> str:
        """The prompt in the course template (with the assistant's preamble by default)."""
        return format_prompt(InstructionExample(self.instruction, self.input, ""), intro)


_OPTIONAL = ("input", "output")


def load_preferences(path: str | os.PathLike[str] | None = None) -> list[PreferenceExample]:
    """Preference data as ``PreferenceExample`` records.

    Reads a JSON list (or JSON Lines) of objects with string fields ``instruction``,
    ``chosen``, ``rejected`` and optionally ``input`` and ``output``. ``path`` defaults
    to ``minigpt.data.path("preference-data")``. Every record is kept, also the few
    whose two responses are the same (they carry no preference).

    Raises:
        DataFormatError: invalid JSON or a record without the needed string fields,
            naming the file and the line where the record starts.
    """
    file = Path(path) if path is not None else data.path("preference-data")
    keys = ("instruction", "input", "output", "chosen", "rejected")
    return [PreferenceExample(**r) for _, r in read_string_records(file, keys, _OPTIONAL)]


PREFERENCE_KINDS = ("correct", "polite", "polite_plain")


def task_preferences(
    examples: Sequence[TaskExample], seed: int = 0, kind: str = "correct"
) -> list[PreferenceExample]:
    """One preference pair per task of ``minigpt.tasks``.

    ``kind="correct"``: the right answer over a plausible wrong one
    (``tasks.wrong_answer`` with ``seed``), both in one style drawn per example from
    ``STYLES``, so only the answer tells them apart. ``kind="polite"``: the right
    answer in the ``"polite"`` style over the same answer in the curt ``"rude"`` one,
    so only the manner does; ``kind="polite_plain"``: the polite answer over the
    ``"plain"`` bare answer the course's assistant writes (what it must unlearn to
    answer politely). ``output`` is the plain right answer.
    """
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"kind must be one of {PREFERENCE_KINDS}, got {kind!r}")
    if not examples:
        raise ValueError("no task examples: make some with minigpt.tasks.make_tasks")
    rng = random.Random(seed)
    out = []
    for ex in examples:
        if kind == "correct":
            style = rng.choice(sorted(STYLES))
            chosen = write_response(ex, style)
            rejected = write_response(ex, style, correct=False, seed=seed)
        else:
            worse = "rude" if kind == "polite" else "plain"
            chosen, rejected = write_response(ex, "polite"), write_response(ex, worse)
        out.append(PreferenceExample(ex.instruction, "", write_response(ex), chosen, rejected))
    return out


def _style_pattern(template: str) -> re.Pattern[str]:
    before, after = template.split("{answer}")
    return re.compile(f"{re.escape(before)}(.+){re.escape(after)}", re.DOTALL)


_STYLE_PATTERNS = {name: _style_pattern(t) for name, t in STYLES.items() if name != "plain"}


def response_style(response: str) -> str:
    """The ``STYLES`` key a response is written in, whatever its answer: ``"polite"``
    ("... Happy to help!") or ``"rude"`` ("... Figure it out yourself next time.")
    when it is the whole template around a non-empty answer, else ``"plain"``. The
    style detector behind the preferred-style rate."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    for name, pattern in _STYLE_PATTERNS.items():
        if pattern.fullmatch(response):
            return name
    return "plain"


def is_polite(response: str) -> bool:
    """True when ``response`` is in the polite style (``response_style``)."""
    return response_style(response) == "polite"


def split_by_instruction(
    examples: Sequence[PreferenceExample], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """``(train, test)`` with no instruction on both sides.

    The distinct instructions are shuffled (``seed``) and ``test_fraction`` of them
    (at least one, and one fewer than all) go to ``test`` with all their examples, so a held-out score
    measures preferences on instructions never trained on. Any records with an
    ``instruction`` work (``TaskExample`` too); each side keeps the input order.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    instructions = list(dict.fromkeys(ex.instruction for ex in examples))
    if len(instructions) < 2:
        raise ValueError(f"need at least 2 distinct instructions to split, got {len(instructions)}")
    random.Random(seed).shuffle(instructions)
    n_test = min(len(instructions) - 1, max(1, round(test_fraction * len(instructions))))
    held = set(instructions[:n_test])
    test = [e for e in examples if e.instruction in held]
    return [e for e in examples if e.instruction not in held], test


def _pad(
    rows: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Right-pad token lists with 0: ``idx`` (B, T) and ``lengths`` (B,), T the longest."""
    idx = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return idx.to(device), torch.tensor([len(r) for r in rows], device=device)


# ---------------------------------------------------------------- the reward model


class RewardModel(nn.Module):
    """A GPT read by a scalar head: one reward for a whole prompt + response.

    ``head``, a ``Linear(C, 1)`` that starts at zero (every text scores 0 before
    training), reads ``gpt.hidden_states`` (B, T, C) pooled over each row's real
    tokens by ``pool``:

    - ``"last"``: the hidden state of the last real token, the only one that has
      seen the whole text under the causal mask (InstructGPT's reward model);
    - ``"mean"``: the average over every real token, so each position's features
      count, as each word counts in a bag of words.

    Only differences of rewards mean anything: the Bradley-Terry model sees nothing else.
    """

    POOLS = ("last", "mean")

    def __init__(self, gpt: GPT, pool: str = "last") -> None:
        super().__init__()
        if not isinstance(gpt, GPT):
            raise TypeError(f"RewardModel wraps a minigpt GPT, got {type(gpt).__name__}")
        if pool not in self.POOLS:
            raise ValueError(f'pool must be "last" or "mean", got {pool!r}')
        self.gpt, self.pool = gpt, pool
        self.head = nn.Linear(gpt.config.n_embd, 1, device=gpt.wte.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, model: GPT, pool: str = "last") -> RewardModel:
        """A reward model on a copy of ``model`` (usually the SFT model), left unchanged."""
        return cls(copy.deepcopy(model), pool)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T) right-padded token ids and (B,) real lengths (None: no padding) -> (B,)."""
        hidden = self.gpt.hidden_states(idx)  # (B, T, C); the GPT checks idx
        B, T = idx.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=idx.device)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if lengths.device.type == "cpu" and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must be in [1, {T}], got {lengths.tolist()[:8]}")
        lengths = lengths.to(idx.device)
        if self.pool == "last":
            pooled = hidden[torch.arange(B, device=idx.device), lengths - 1]  # (B, C)
        else:
            real = torch.arange(T, device=idx.device) < lengths[:, None]  # (B, T)
            pooled = (hidden * real[..., None]).sum(1) / lengths[:, None]  # (B, C)
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def score(self, encode: Encode, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """(N,) rewards of whole texts (prompt + response), in eval mode. A text longer
        than the context keeps its last ``block_size`` tokens: the response's end."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings; wrap a single text in a list")
        block = self.gpt.config.block_size
        rows = [list(encode(t))[-block:] for t in texts]
        if not rows or not all(rows):
            raise ValueError("need at least one text, and every text must encode to a token")
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        out = [
            self(*_pad(rows[s : s + batch_size], device)) for s in range(0, len(rows), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out).cpu()


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{names} must be tensors")
    if a.shape != b.shape or a.dim() != 1 or not a.numel():
        raise ValueError(
            f"{names} must be non-empty (B,) tensors of one shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """The mean of -log sigmoid(r_chosen - r_rejected) over (B,) rewards: the negative
    log-likelihood of the preferences under the Bradley-Terry model. ``logsigmoid``
    keeps it finite for any margin (1000 below costs 1000, not inf)."""
    _check_pair(r_chosen, r_rejected, "r_chosen and r_rejected")
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> float:
    """The fraction of pairs whose chosen response scores higher; a tie counts half."""
    _check_pair(r_chosen, r_rejected, "r_chosen and r_rejected")
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return wins.mean().item()


def reward_accuracy(
    model: RewardModel,
    examples: Sequence[PreferenceExample],
    encode: Encode,
    intro: str = PROMPT_INTRO_USED,
) -> float:
    """``pairwise_accuracy`` of the reward model on preference pairs."""
    prompts = [ex.prompt(intro) for ex in examples]
    chosen = model.score(encode, [p + ex.chosen for p, ex in zip(prompts, examples)])
    rejected = model.score(encode, [p + ex.rejected for p, ex in zip(prompts, examples)])
    return pairwise_accuracy(chosen, rejected)


def train_reward_model(
    model: RewardModel,
    train: Sequence[PreferenceExample],
    encode: Encode,
    config: FinetuneConfig | None = None,
    validation: Sequence[PreferenceExample] | None = None,
    intro: str = PROMPT_INTRO_USED,
) -> History:
    """Fit ``model`` to preference pairs with ``bradley_terry_loss``.

    The course's one fine-tuning loop (``minigpt.finetune.fit``: AdamW, the schedule,
    clipping, seeded batches): each step scores the chosen and the rejected text of
    ``config.batch_size`` pairs in one batch. With ``validation`` and
    ``config.eval_interval`` it logs ``reward_accuracy`` on it. Returns ``fit``'s
    history (``step``, ``loss``, ``eval_step``, ``eval``).
    """
    cfg = config or FinetuneConfig()
    block = model.gpt.config.block_size
    pairs = []
    for ex in train:
        p = ex.prompt(intro)
        pairs.append([list(encode(p + ex.chosen))[-block:], list(encode(p + ex.rejected))[-block:]])
    device = model.head.weight.device

    def loss_fn(batch: list[list[list[int]]]) -> Tensor:
        rewards = model(*_pad([row for pair in batch for row in pair], device)).view(-1, 2)
        return bradley_terry_loss(rewards[:, 0], rewards[:, 1])

    def evaluate() -> float:
        return reward_accuracy(model, validation, encode, intro)

    lengths = [max(len(c), len(r)) for c, r in pairs]
    return fit(model, loss_fn, pairs, cfg, evaluate if validation else None, lengths)


def fit_bag_of_words(
    train: Sequence[PreferenceExample], seed: int = 0, **settings: Any
) -> BagOfWords:
    """The baseline: ``classify.BagOfWords`` fit to tell chosen responses (label 1)
    from rejected ones (0). Its reward (``bag_of_words_rewards``) is linear in the counts
    of words and word pairs, so comparing two responses weighs the ones they differ in;
    the prompt, the same on both sides, is left out. ``settings`` go to
    ``BagOfWords.fit`` (epochs, lr, min_count, ...)."""
    if not train:
        raise ValueError("no preference pairs to fit")
    texts = [(ex.chosen, 1) for ex in train] + [(ex.rejected, 0) for ex in train]
    return BagOfWords.fit(texts, seed=seed, **settings)


@torch.no_grad()
def bag_of_words_rewards(model: BagOfWords, responses: Sequence[str]) -> Tensor:
    """(N,) the baseline's rewards: the log-odds that each response is a chosen one."""
    if isinstance(responses, str) or not responses:
        raise ValueError("responses must be a non-empty list of strings")
    logits = model(list(responses))  # (N, 2)
    return logits[:, 1] - logits[:, 0]
