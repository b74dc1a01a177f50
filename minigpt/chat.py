"""Chat: a conversation written as one token sequence, and a model that takes turns.

A chat is a list of messages with roles: an optional ``system`` message first, then
``user`` and ``assistant`` turns in alternation, starting with the user. A language
model reads one sequence, so a chat template writes the conversation as one: each
turn opens with its role's marker and closes with an end marker::

    <|system|>Answer in one word.<|end|>
    <|user|>Convert "seed" to upper case.<|end|>
    <|assistant|>SEED<|end|>
    <|user|>Then write it backwards.<|end|>
    <|assistant|>DEES<|end|>

The markers are special tokens: vocabulary entries whose ids the template places
itself. Text is never searched for them, so a user who types "<|assistant|>" writes
13 ordinary characters, not a turn, and cannot forge the assistant's side.

- ``Message`` and ``check_conversation``: the roles and their order, checked once.
- ``ChatTemplate``: the markers and their ids in a tokenizer; ``add_chat_tokens``
  adds them to a ``CharTokenizer`` and grows its ``GPT`` (fresh embeddings drawn
  like the trained ones, ``minigpt.finetune.init_new_tokens``).
- ``render`` and ``parse``: the text form and back; ``encode_chat``: the ids and a
  loss mask that is True on the assistant's words and their end marker (the model
  learns to answer and to stop, not to write the user's side).
- ``chat`` and ``stream_chat`` answer a conversation; ``ChatSession`` keeps one going
  (for a notebook widget); ``run_repl`` is the terminal behind ``minigpt chat``.

``minigpt.conversations`` holds conversations to learn from (task conversations with
checkable answers), their batches, and ``train_chat``.

The context policy (``fit_context``): the prompt and the reply must fit in the
model's ``block_size``. When the history is longer than ``block_size`` minus
``max_new_tokens``, the oldest user/assistant exchanges are dropped, whole, until it
fits; the system message is always kept and no turn is ever cut in half. When the
system message and the last user message alone do not fit, that is an error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import Tensor

from minigpt.finetune import init_new_tokens
from minigpt.generate import generate, stream
from minigpt.model import GPT
from minigpt.sampling import SamplingConfig, sampling_config
from minigpt.tokenizer import BPETokenizer, CharTokenizer

__all__ = [
    "MARKERS",
    "ROLES",
    "ChatSession",
    "ChatTemplate",
    "Message",
    "add_chat_tokens",
    "chat",
    "chat_turn",
    "check_conversation",
    "encode_chat",
    "fit_context",
    "parse",
    "render",
    "run_repl",
    "stream_chat",
]

ROLES = ("system", "user", "assistant")
MARKERS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}


@dataclass(frozen=True)
class Message:
    """One turn of a chat: ``role`` is ``"system"``, ``"user"`` or ``"assistant"``."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: a message's role is one of {ROLES}")
        if not isinstance(self.content, str):
            raise TypeError(
                f"a {self.role} message's content must be a string, got "
                f"{type(self.content).__name__}; convert it with str(...) first"
            )


def check_conversation(messages: Sequence[Message], prompt: bool = False) -> list[Message]:
    """``messages`` as a list of ``Message``, after checking their order.

    The order is: an optional system message, then user and assistant turns in
    alternation, starting with a user turn. With ``prompt`` (a conversation to
    reply to) the last message must be a user turn. A ``{"role": ..., "content": ...}``
    mapping is accepted for a message.
    """
    if isinstance(messages, (str, Message, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError("a conversation is a list of messages: wrap a single Message in a list")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            m = Message(m.get("role"), m.get("content"))  # type: ignore[arg-type]
        elif not isinstance(m, Message):
            raise TypeError(f"message {i} is a {type(m).__name__}; give Message(role, content)")
        out.append(m)
    if not out:
        raise ValueError("the conversation is empty: give at least one user message")
    start = 1 if out[0].role == "system" else 0
    if start == len(out):
        raise ValueError("the conversation has only a system message: add a user message")
    for i, m in enumerate(out[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.role != expected:
            raise ValueError(
                f"message {i} is a {m.role} message where a {expected} message belongs: after "
                "an optional system message, turns alternate user, assistant, user, ..."
            )
    if prompt and out[-1].role != "user":
        raise ValueError(
            f"the conversation ends with a {out[-1].role} message: a prompt for a reply "
            "must end with a user message"
        )
    return out


# ---------------------------------------------------------------- the template


class ChatTemplate:
    """The chat markers and their ids in ``tokenizer``.

    Args:
        tokenizer: a ``CharTokenizer`` whose vocabulary holds the markers as entries
            of their own (``add_chat_tokens`` adds them), or a ``BPETokenizer`` that
            has them as special tokens.
        markers: the marker of each role and ``"end"`` (default ``MARKERS``); each at
            least two characters long, so no single typed character is a marker.

    ``ids`` maps each role and ``"end"`` to its id; ``end_id`` is the end marker's.
    """

    def __init__(self, tokenizer: Any, markers: Mapping[str, str] = MARKERS) -> None:
        if set(markers) != set(MARKERS):
            raise ValueError(f"markers must name exactly {sorted(MARKERS)}, got {sorted(markers)}")
        if any(not isinstance(s, str) or len(s) < 2 for s in markers.values()):
            raise ValueError("every marker must be a string of at least two characters")
        if isinstance(tokenizer, CharTokenizer):
            vocab = tokenizer.stoi
        elif isinstance(tokenizer, BPETokenizer):
            vocab = tokenizer.special_tokens
        else:
            raise TypeError(
                f"need a CharTokenizer or a BPETokenizer, got {type(tokenizer).__name__}"
            )
        missing = [s for s in markers.values() if s not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer has no chat markers {missing}: the model was not made for chat; "
                "add them with minigpt.chat.add_chat_tokens and fine-tune (minigpt.conversations.train_chat)"
            )
        self.tokenizer = tokenizer
        self.markers = dict(markers)
        self.ids: dict[str, int] = {k: vocab[s] for k, s in markers.items()}
        self.end_id = self.ids["end"]

    def encode_text(self, text: str) -> list[int]:
        """The ids of ``text`` as plain text: a marker written in it stays characters."""
        if isinstance(self.tokenizer, BPETokenizer):
            return self.tokenizer.encode(text, allowed_special="none")
        return self.tokenizer.encode(text)  # one id per character: never a marker's id


def add_chat_tokens(
    model: GPT, tokenizer: CharTokenizer, markers: Mapping[str, str] = MARKERS, seed: int = 0
) -> ChatTemplate:
    """Give ``tokenizer`` and ``model`` the chat markers; returns their template.

    The markers the tokenizer lacks become new vocabulary entries after its own; the
    model's vocabulary grows to match (``GPT.resize_vocab``, in place) and the new
    rows get fresh embeddings drawn from the trained rows' statistics
    (``init_new_tokens``, seeded by ``seed``), so the markers start out distinct.
    The template's ``tokenizer`` is the extended one; the one passed in is unchanged.
    """
    if not isinstance(tokenizer, CharTokenizer):
        raise TypeError(
            f"add_chat_tokens extends a CharTokenizer, got {type(tokenizer).__name__}; give a "
            "BPETokenizer the markers as special_tokens when you build it"
        )
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the model has {model.config.vocab_size} ids but the tokenizer "
            f"{tokenizer.vocab_size}: they do not belong together"
        )
    new = [s for s in dict(markers).values() if s not in tokenizer.stoi]
    extended = CharTokenizer(tokenizer.itos + new, unk_token=tokenizer.unk_token)
    template = ChatTemplate(extended, markers)
    if new:
        model.resize_vocab(max(model.config.vocab_size, extended.vocab_size))
        init_new_tokens(model, [extended.stoi[s] for s in new], seed=seed)
    return template


def render(messages: Sequence[Message], markers: Mapping[str, str] = MARKERS) -> str:
    """The conversation as text, one turn a line: ``<|user|>hi<|end|>\\n...``."""
    end = markers["end"]
    return "".join(f"{markers[m.role]}{m.content}{end}\n" for m in check_conversation(messages))


def _encode(template: ChatTemplate, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        content = template.encode_text(m.content)
        ids += [template.ids[m.role], *content, template.end_id]
        mask += [False] + [m.role == "assistant"] * (len(content) + 1)
    return ids, mask


def encode_chat(
    template: ChatTemplate, messages: Sequence[Message]
) -> tuple[list[int], list[bool]]:
    """``(ids, loss_mask)`` of a conversation, both of length T.

    Each turn is ``[role marker] + content + [end marker]``. ``loss_mask[t]`` is True
    exactly on the tokens of the assistant's content and the end marker that closes
    its turn: never on system or user turns, nor on the marker that opens a turn.
    """
    return _encode(template, check_conversation(messages))


def parse(
    source: str | Sequence[int] | Tensor, template: ChatTemplate | None = None
) -> list[Message]:
    """The messages of a conversation: the inverse of ``encode_chat`` and ``render``.

    ``source`` is token ids (then ``template`` is needed) or text in ``render``'s form
    (the newline after each end marker optional; markers from ``template``, else
    ``MARKERS``). Ids are exact; text is not when a message itself contains an end
    marker's characters, which text cannot tell from the marker.
    """
    if isinstance(source, str):
        return _parse_text(source, template.markers if template is not None else MARKERS)
    if template is None:
        raise TypeError("parsing token ids needs the template: parse(ids, template)")
    ids = source.flatten().tolist() if isinstance(source, Tensor) else list(source)
    role_of = {i: k for k, i in template.ids.items()}
    messages, role, content = [], None, []
    for pos, i in enumerate(ids):
        kind = role_of.get(i)
        if role is None and kind not in ROLES:
            raise ValueError(
                f"token {pos} ({i}) is outside a turn: a turn opens with a role marker"
            )
        if role is None:
            role, content = kind, []
        elif kind == "end":
            messages.append(Message(role, template.tokenizer.decode(content)))
            role = None
        elif kind is not None:
            raise ValueError(f"token {pos} opens a turn inside a {role} turn that was not closed")
        else:
            content.append(i)
    if role is not None:
        raise ValueError(f"the last turn ({role}) has no end marker")
    return check_conversation(messages)


def _parse_text(text: str, markers: Mapping[str, str]) -> list[Message]:
    opens = "|".join(re.escape(markers[r]) for r in ROLES)
    turn = re.compile(f"({opens})(.*?){re.escape(markers['end'])}\n?", re.DOTALL)
    role_of = {markers[r]: r for r in ROLES}
    messages, pos = [], 0
    while pos < len(text):
        match = turn.match(text, pos)
        if match is None:
            raise ValueError(f"character {pos} of the text is not the start of a complete turn")
        messages.append(Message(role_of[match.group(1)], match.group(2)))
        pos = match.end()
    return check_conversation(messages)


# ---------------------------------------------------------------- replies


def fit_context(
    template: ChatTemplate, messages: Sequence[Message], block_size: int, reply_tokens: int
) -> list[Message]:
    """The messages a reply is written from: the context policy (see the module text).

    The prompt (the kept messages and the assistant marker that opens the reply) gets
    at most ``block_size - reply_tokens`` tokens. The oldest user/assistant exchanges
    are dropped, whole, until it fits; the system message stays. Raises ValueError
    when the system message and the last user message alone do not fit.
    """
    msgs = check_conversation(messages, prompt=True)
    budget = block_size - reply_tokens
    sizes = [len(_encode(template, [m])[0]) for m in msgs]
    head = 1 if msgs[0].role == "system" else 0
    first = head  # first turn kept
    while sum(sizes[:head]) + sum(sizes[first:]) + 1 > budget and first < len(msgs) - 1:
        first += 2  # one user/assistant exchange
    need = sum(sizes[:head]) + sum(sizes[first:]) + 1
    if need > budget:
        extra = " with the system message" if head else ""
        raise ValueError(
            f"the last user message needs {need} tokens{extra}, more than the {max(budget, 0)} "
            f"that block_size {block_size} leaves after {reply_tokens} for the reply: shorten "
            "it, or lower max_new_tokens"
        )
    return msgs[:head] + msgs[first:]


def _sampling(
    model: GPT,
    template: ChatTemplate,
    max_new_tokens: int,
    sampling: SamplingConfig | None,
    settings: dict[str, Any],
) -> SamplingConfig:
    """The checked settings of a reply: greedy unless told, stopping at any marker."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a minigpt GPT, got {type(model).__name__}")
    if not isinstance(template, ChatTemplate):
        raise TypeError(f"template must be a ChatTemplate, got {type(template).__name__}")
    if type(max_new_tokens) is not int or max_new_tokens < 1:  # (a bool is not an int here)
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    greedy = SamplingConfig(temperature=0.0)
    config = sampling_config(greedy if sampling is None else sampling, settings)
    stops = tuple(dict.fromkeys((*config.stop_tokens, *template.ids.values())))
    return dataclasses.replace(config, stop_tokens=stops)


def _prompt(
    model: GPT, template: ChatTemplate, messages: Sequence[Message], max_new_tokens: int
) -> list[int]:
    """The ids the reply continues: the fitted history, then the assistant marker."""
    kept = fit_context(template, messages, model.config.block_size, max_new_tokens)
    return _encode(template, kept)[0] + [template.ids["assistant"]]


def chat(
    model: GPT,
    template: ChatTemplate,
    messages: Sequence[Message],
    max_new_tokens: int = 64,
    sampling: SamplingConfig | None = None,
    **settings: Any,
) -> str:
    """The assistant's reply to a conversation that ends with a user message.

    The history is fitted to the context (``fit_context``), the assistant marker
    opens the reply, and generation stops at the first marker (the end marker, when
    the model learned to close its turn) or after ``max_new_tokens``; the marker is
    not part of the reply. Decoding is greedy unless ``sampling`` or ``settings``
    (``SamplingConfig`` fields: ``temperature=0.8, seed=0``) say otherwise.
    """
    config = _sampling(model, template, max_new_tokens, sampling, settings)
    ids = _prompt(model, template, messages, max_new_tokens)
    idx = torch.tensor([ids], dtype=torch.long, device=model.device)  # (1, T)
    new = generate(model, idx, max_new_tokens, config)[0, len(ids) :].tolist()
    stops = set(config.stop_tokens)
    end = next((k for k, t in enumerate(new) if t in stops), len(new))
    return template.tokenizer.decode(new[:end])


def stream_chat(
    model: GPT,
    template: ChatTemplate,
    messages: Sequence[Message],
    max_new_tokens: int = 64,
    sampling: SamplingConfig | None = None,
    **settings: Any,
) -> Iterator[str]:
    """``chat``'s reply in pieces, yielded as they are generated (they join to it).

    Arguments are checked at the call; the model runs as the iterator is consumed.
    """
    config = _sampling(model, template, max_new_tokens, sampling, settings)
    ids = _prompt(model, template, messages, max_new_tokens)
    return stream(model, ids, max_new_tokens, config, tokenizer=template.tokenizer)


class ChatSession:
    """A conversation with a model that remembers what was said: a chat widget's state.

    ``send(text)`` returns an iterator over the reply's pieces (``stream_chat``); when
    it is exhausted, the user message and the whole reply join ``history``. A reply
    that is not read to the end leaves the history as it was. ``reset()`` forgets the
    history; the system message stays.
    """

    def __init__(
        self,
        model: GPT,
        template: ChatTemplate,
        system: str | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
    ) -> None:
        self.system = None if system is None else Message("system", system)
        self.sampling = _sampling(model, template, max_new_tokens, sampling, {})
        self.model, self.template, self.max_new_tokens = model, template, max_new_tokens
        self._history: list[Message] = []

    @property
    def history(self) -> list[Message]:
        """The conversation so far (without the system message), a copy."""
        return list(self._history)

    def _with(self, text: str) -> list[Message]:
        return [*([self.system] if self.system else []), *self._history, Message("user", text)]

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to the user message ``text``."""
        pieces = stream_chat(
            self.model, self.template, self._with(text), self.max_new_tokens, self.sampling
        )
        return self._record(text, pieces)

    def _record(self, text: str, pieces: Iterator[str]) -> Iterator[str]:
        reply = []
        for piece in pieces:
            reply.append(piece)
            yield piece
        self._history += [Message("user", text), Message("assistant", "".join(reply))]

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self._history.clear()


def chat_turn(session: ChatSession, text: str, show: Callable[[str], None] | None = None) -> str:
    """One turn of a chat widget (its callback, testable without a browser).

    ``"/reset"`` forgets the history and returns ""; any other ``text`` is sent to
    ``session`` and its reply streamed: ``show(reply so far)`` after each piece (a
    widget redraws its output box). Returns the whole reply, which joins the history.
    """
    if text.strip() == "/reset":
        session.reset()
        return ""
    reply = ""
    for piece in session.send(text):
        reply += piece
        if show is not None:
            show(reply)
    return reply


def run_repl(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """The terminal chat of ``minigpt chat``: each line of ``stdin`` is a user message.

    The reply streams to ``stdout`` and ends with a newline. ``/reset`` clears the
    history, ``/exit`` or the end of input leaves; a refused message (too long, say)
    is reported on ``stderr`` as one line and the chat goes on. Prompts are shown only
    when ``stdin`` is a terminal. Returns the exit status: 0, or 130 after Ctrl-C, or
    2 when piped input had a refused message.
    """
    interactive = stdin.isatty()
    if interactive:
        stdout.write("Chatting (/reset clears the history, /exit or Ctrl-D leaves).\n")
    refused = False
    try:
        while True:
            if interactive:
                stdout.write("you> ")
                stdout.flush()
            line = stdin.readline()
            text = line.rstrip("\r\n")
            if not line or text.strip() == "/exit":
                return 2 if refused and not interactive else 0
            if text.strip() == "/reset":
                session.reset()
                stdout.write("(history cleared)\n" if interactive else "")
                continue
            try:
                pieces = session.send(text)
            except (TypeError, ValueError) as e:
                stderr.write(f"minigpt: error: {' '.join(str(e).split())}\n")
                refused = True
                continue
            stdout.write("assistant> " if interactive else "")
            for piece in pieces:
                stdout.write(piece)
                stdout.flush()
            stdout.write("\n")
            stdout.flush()
    except KeyboardInterrupt:
        stdout.write("\n")
        return 130
