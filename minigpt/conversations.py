"""Conversations to learn chat from, and fine-tuning on them.

Chapter 07's tasks (``minigpt.tasks``) are one question and one answer. A chat needs
turns that depend on each other, so ``multi_turn_conversations`` continues a task with
follow-up questions about the previous answer, each with its one right answer::

    user:       Convert "seed" to upper case.      assistant:  SEED
    user:       Then write it backwards.           assistant:  DEES
    user:       How many letters are in it?        assistant:  4

A model can only answer the follow-up from the conversation: the word is not in it.
Every turn is a ``TaskExample`` (``minigpt.tasks.check`` scores a reply), the
conversations are deterministic from a seed, and a held-out conversation is built on
a held-out task (``make_tasks``), so its words and numbers never occur in training.

``ChatCollator`` pads conversations encoded by ``minigpt.chat.encode_chat`` into a
batch whose targets are masked (-100) outside the assistant's turns, and
``train_chat`` fine-tunes a model on conversations with it (``minigpt.finetune.fit``).
``conversation_accuracy`` scores a model's replies turn by turn, and ``chat_model()``
is the course's chat model: the assistant (``minigpt.assistant.assistant_model``)
given the chat markers and tuned on conversations with ``CHAT``, cached by recipe hash.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from minigpt.assistant import ASSISTANT, assistant_model
from minigpt.chat import ChatTemplate, Message, add_chat_tokens, chat, encode_chat
from minigpt.classify import IGNORE_INDEX
from minigpt.finetune import FinetuneConfig, History, fit
from minigpt.instruct import instruction_loss, pad_rows
from minigpt.model import GPT
from minigpt.pretrained import cached_model, recipe_folder
from minigpt.tasks import TaskExample, check, make_tasks, number_in_words
from minigpt.tokenizer import CharTokenizer

__all__ = [
    "CHAT",
    "FIRST_TURNS",
    "FOLLOW_UPS",
    "FOLLOW_UP_FAMILIES",
    "ChatCollator",
    "Conversation",
    "chat_model",
    "conversation_accuracy",
    "multi_turn_conversations",
    "train_chat",
]

# ---------------------------------------------------------------- task conversations


def _is_word(answer: str) -> bool:
    return answer.isascii() and answer.isalpha()


def _is_number(answer: str) -> bool:
    return answer.isascii() and answer.isdigit() and int(answer) < 999


# name -> (phrasings, does it apply to the previous answer?, the new answer). The
# phrasings use only words of the task instructions, never a task word (tasks.py keeps
# those out of the word list), so no held-out word is ever seen in training.
FOLLOW_UPS: dict[str, tuple[tuple[str, ...], Callable[[str], bool], Callable[[str], str]]] = {
    "backwards": (("Then write it backwards.", "And backwards?"), _is_word, lambda a: a[::-1]),
    "upper": (("And in upper case?", "Then in capital letters."), _is_word, str.upper),
    "lower": (("And in lower case?", "Then in small letters."), _is_word, str.lower),
    "length": (
        ("How many letters are in it?", "Count the letters in it."),
        _is_word,
        lambda a: str(len(a)),
    ),
    "in_words": (
        ("Write it in words.", "Spell it out in English words."),
        _is_number,
        lambda a: number_in_words(int(a)),
    ),
    "plus_one": (("Add one to it.", "What is it plus one?"), _is_number, lambda a: str(int(a) + 1)),
}
# The task families whose answers are one word or one number, which follow-ups take.
FOLLOW_UP_FAMILIES = ("uppercase", "lowercase", "last_letter", "last_upper", "count", "compare")
FOLLOW_UP_FAMILIES += ("reverse", "reverse_upper", "add", "subtract")
# The default first turns: families the course's assistant learned (tasks.FAMILIES).
FIRST_TURNS = ("uppercase", "lowercase", "compare", "count")


@dataclass(frozen=True)
class Conversation:
    """A task conversation: ``turns[0]`` a ``minigpt.tasks`` example, each later turn a
    follow-up about the previous answer, as a ``TaskExample`` (family: the follow-up's
    name, inputs: the first turn's), so ``minigpt.tasks.check`` scores every reply."""

    turns: tuple[TaskExample, ...]
    system: str | None = None

    def messages(self) -> list[Message]:
        """The whole conversation, every turn answered: training data."""
        return [*self.prompt(len(self.turns) - 1), Message("assistant", self.turns[-1].answer)]

    def prompt(self, turn: int) -> list[Message]:
        """The conversation up to turn ``turn``'s question (0-based), earlier turns answered."""
        if not 0 <= turn < len(self.turns):
            raise ValueError(f"turn must be in 0..{len(self.turns) - 1}, got {turn}")
        out = [Message("system", self.system)] if self.system is not None else []
        for t in self.turns[:turn]:
            out += [Message("user", t.instruction), Message("assistant", t.answer)]
        return [*out, Message("user", self.turns[turn].instruction)]


def _changes(name: str, answer: str) -> bool:
    _, applies, follow = FOLLOW_UPS[name]
    return applies(answer) and follow(answer) != answer


def _follow_ups(answer: str, last: bool) -> list[str]:
    """The follow-ups that change ``answer``; unless ``last``, only those whose own
    answer takes another follow-up (so a conversation never runs out of questions)."""
    names = [n for n in FOLLOW_UPS if _changes(n, answer)]
    if last:
        return names
    return [n for n in names if any(_changes(m, FOLLOW_UPS[n][2](answer)) for m in FOLLOW_UPS)]


def multi_turn_conversations(
    split: str = "train",
    n: int = 100,
    seed: int = 0,
    turns: int = 2,
    families: Sequence[str] | None = None,
    system: str | None = None,
) -> list[Conversation]:
    """``n`` task conversations of ``turns`` turns, deterministic from ``seed``.

    The first turn is a ``make_tasks`` example of ``split`` (the families taken in
    turn: default ``FIRST_TURNS``, any of ``FOLLOW_UP_FAMILIES``); each later turn asks
    a ``FOLLOW_UPS`` question about the previous answer ("Then write it backwards.")
    whose answer differs from it, drawn from a generator seeded by ``seed``, the split
    and the first instruction (so a conversation does not change with ``n``). The
    inputs are those of the first turn, so held-out conversations use held-out words
    and numbers only. Fewer than ``n`` when the families run out of distinct tasks.
    """
    names = FIRST_TURNS if families is None else tuple(dict.fromkeys(families))
    unknown = [f for f in names if f not in FOLLOW_UP_FAMILIES]
    if unknown or not names:
        raise ValueError(
            f"families {unknown or names} take no follow-ups; choose from {FOLLOW_UP_FAMILIES}"
        )
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 2:
        raise ValueError(
            f"turns must be an integer >= 2 (a question and a follow-up), got {turns!r}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if system is not None:
        Message("system", system)
    per_family = [make_tasks(split, math.ceil(n / len(names)), seed, [f]) for f in names]
    firsts = [ex for group in zip(*per_family) for ex in group]  # round robin
    firsts += [ex for group in per_family for ex in group[min(map(len, per_family)) :]]
    out = []
    for first in firsts[:n]:
        rng = random.Random(f"{seed}/{split}/chat/{first.instruction}")
        chain = [first]
        for k in range(1, turns):
            name = rng.choice(_follow_ups(chain[-1].answer, last=k == turns - 1))
            phrasings, _, answer = FOLLOW_UPS[name]
            chain.append(
                TaskExample(name, rng.choice(phrasings), answer(chain[-1].answer), first.inputs)
            )
        out.append(Conversation(tuple(chain), system))
    return out


# ---------------------------------------------------------------- training


class ChatCollator:
    """Pad a batch of ``(ids, loss_mask)`` pairs (``encode_chat``) into ``(inputs, targets)``.

    Inputs are all but the last token, targets all but the first; a target whose token
    is off in the mask, and every padding position, is ``ignore_index`` (-100, which
    ``GPT``'s loss skips). Sequences longer than ``max_length + 1`` are cut at the end.
    Returns two (B, T) long tensors.
    """

    def __init__(
        self, pad_id: int, max_length: int | None = None, ignore_index: int = IGNORE_INDEX
    ) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.pad_id, self.max_length, self.ignore_index = pad_id, max_length, ignore_index

    def __call__(
        self, batch: Sequence[tuple[Sequence[int], Sequence[bool]]]
    ) -> tuple[Tensor, Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        rows = []
        for ids, mask in batch:
            if len(ids) != len(mask) or len(ids) < 2:
                raise ValueError("each example needs ids and a mask of one length, at least 2")
            if self.max_length is not None:
                ids, mask = ids[: self.max_length + 1], mask[: self.max_length + 1]
            targets = [t if m else self.ignore_index for t, m in zip(ids[1:], mask[1:])]
            rows.append((list(ids[:-1]), targets))
        return pad_rows(rows, self.pad_id, self.ignore_index)


def train_chat(
    model: GPT,
    template: ChatTemplate,
    conversations: Sequence[Sequence[Message]],
    config: FinetuneConfig | None = None,
) -> History:
    """Fine-tune ``model`` on conversations, scoring the assistant's turns only
    (``encode_chat``'s mask); conversations are cut at ``config.max_length`` (default
    the block size). Returns ``fit``'s history (``step``, ``loss``)."""
    cfg = config or FinetuneConfig()
    device = model.device
    encoded = [encode_chat(template, c) for c in conversations]
    collate = ChatCollator(template.end_id, cfg.max_length or model.config.block_size)

    def loss_fn(batch: list[tuple[list[int], list[bool]]]) -> Tensor:
        inputs, targets = collate(batch)
        return instruction_loss(model, inputs.to(device), targets.to(device))

    lengths = [len(ids) for ids, _ in encoded] if cfg.bucket_by_length else None
    return fit(model, loss_fn, encoded, cfg, lengths=lengths)


def conversation_accuracy(
    model: GPT,
    template: ChatTemplate,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 40,
) -> list[float]:
    """The fraction of right greedy replies (``minigpt.tasks.check``) at each turn.

    Turn k is asked with the earlier turns answered rightly (``Conversation.prompt``),
    so a later turn measures the follow-up alone, not earlier mistakes. Returns one
    accuracy per turn of the longest conversation, over the conversations that have it.
    """
    if not conversations:
        raise ValueError("no conversations to score: make some with multi_turn_conversations")
    right: list[list[bool]] = [[] for _ in range(max(len(c.turns) for c in conversations))]
    for conv in conversations:
        for k, turn in enumerate(conv.turns):
            reply = chat(model, template, conv.prompt(k), max_new_tokens)
            right[k].append(check(turn, reply))
    return [sum(r) / len(r) for r in right]


# ---------------------------------------------------------------- the course's chat model

# The assistant tuned on two- and three-turn task conversations (half each), about
# two CPU minutes of steps; a small learning rate keeps what the assistant knew.
CHAT: dict[str, Any] = {
    "conversations": {"n": 1500, "turns": [2, 3], "seed": 0},
    "finetune": {"batch_size": 16, "lr": 1e-3, "warmup_steps": 20, "max_steps": 500, "seed": 0},
}


def _chat_data(recipe: dict[str, Any]) -> list[list[Message]]:
    c = recipe["conversations"]
    out: list[list[Message]] = []
    for turns in c["turns"]:
        out += [
            conv.messages() for conv in multi_turn_conversations("train", c["n"], c["seed"], turns)
        ]
    random.Random(c["seed"]).shuffle(out)
    return out


def chat_model(
    cache: str | os.PathLike[str] | None = None,
) -> tuple[GPT, ChatTemplate, dict[str, Any]]:
    """The course's chat model, trained once and cached like ``assistant_model``.

    ``assistant_model`` gets the chat markers (``add_chat_tokens``) and is tuned with
    ``train_chat`` on the ``CHAT`` recipe's training conversations; the folder
    ``<cache>/models/chat-<hash>/`` is named by a hash of the recipe, the
    conversations and the assistant's recipe. Returns the model (eval mode, CPU), its
    ``ChatTemplate``, and ``{"history": {"step", "loss"}, "seconds": training time}``.
    """
    conversations = _chat_data(CHAT)
    train = [[(m.role, m.content) for m in c] for c in conversations]
    folder = recipe_folder(cache, "chat", {"recipe": CHAT, "assistant": ASSISTANT, "train": train})

    def build() -> tuple[GPT, CharTokenizer, dict[str, Any]]:
        model, tokenizer, _ = assistant_model(cache)
        template = add_chat_tokens(model, tokenizer)
        start = time.perf_counter()
        history = train_chat(model, template, conversations, FinetuneConfig(**CHAT["finetune"]))
        return (
            model,
            template.tokenizer,
            {"history": history, "seconds": time.perf_counter() - start},
        )

    model, tokenizer, record = cached_model(folder, build)
    return model, ChatTemplate(tokenizer), record
