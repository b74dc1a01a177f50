"""Generation: the decoding loop that turns a model into text, one token at a time.

A language model only scores the next token. Generation is a loop around it:
run the model, pick a token from its last-position logits (``minigpt.sampling``),
append it, repeat.

- ``generate`` runs the loop for a batch of prompts, with a KV cache by default so
  that each step processes only the newest token.
- ``stream`` yields the new tokens (or text pieces) as they are produced, and
  ``generate_text`` goes from a prompt string to the generated string.
- ``Tokenizer`` is what the text functions need from a tokenizer; the text decoder
  turns a stream of ids into complete characters, even when one character's
  bytes span several tokens.

All three take a ``SamplingConfig`` or its fields as keywords:
``generate(model, idx, 50, temperature=0.8, top_k=20)`` is
``generate(model, idx, 50, SamplingConfig(temperature=0.8, top_k=20))``.

Past the context length the model sees the last ``block_size`` tokens (a sliding
window). Every token in the window then sits at a new position and the deeper
layers' keys depend on the token that fell out, so no cached key stays valid: the
cache is rebuilt from the window at each such step. That is exact (cached and
uncached generation agree token for token) and costs what uncached generation
costs, only once the sequence is longer than ``block_size``.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from minigpt.model import GPT
from minigpt.sampling import SamplingConfig, sampling_config

__all__ = [
    "Tokenizer",
    "generate",
    "generate_text",
    "same_length_rows",
    "stream",
]


class Tokenizer(Protocol):
    """What ``generate_text`` and ``stream`` need from a tokenizer.

    A tokenizer that also has ``decode_bytes(ids) -> bytes`` (byte-level BPE) is
    streamed byte-exactly, even when one character's bytes span several tokens.
    """

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# ---------------------------------------------------------------- the loop


def _as_prompt(model: GPT, idx: Tensor) -> Tensor:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a minigpt GPT, got {type(model).__name__}")
    if not isinstance(idx, Tensor):
        raise TypeError(
            f"the prompt must be a (B, T) tensor of token ids, got {type(idx).__name__}; "
            "for a list of ids use torch.tensor([ids])"
        )
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"the prompt must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(
            f"the prompt must have shape (B, T), got {tuple(idx.shape)}; "
            "use idx[None] for a single sequence"
        )
    if idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(
            f"the prompt is empty (shape {tuple(idx.shape)}): the model needs at least one "
            "token to condition on, e.g. a newline or an end-of-text token"
        )
    V = model.config.vocab_size
    # the one range check of the whole generation (on a GPU, one host sync per call)
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()
    if lo < 0 or hi >= V:
        raise ValueError(f"prompt token ids must be in [0, {V}), got values in [{lo}, {hi}]")
    return idx.long()


def _check_stop_tokens(sampling: SamplingConfig, vocab_size: int) -> None:
    for t in sampling.stop_tokens:
        if t >= vocab_size:
            raise ValueError(
                f"stop_tokens must be token ids in [0, {vocab_size}) for this model, got {t}"
            )


@torch.inference_mode()
def _decode(
    model: GPT, idx: Tensor, max_new_tokens: int, sampling: SamplingConfig, use_cache: bool
) -> Iterator[tuple[Tensor, int]]:
    """The generation loop, on a prompt and settings that were checked already.

    Yields (seq, n) after each step: the first n columns of the preallocated
    (B, T + max_new_tokens) buffer ``seq`` are filled."""
    B, T = idx.shape
    block_size = model.config.block_size
    seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    seq[:, :T] = idx
    n = T  # tokens so far
    # a cache for the positions this call can fill, not the whole context: zeroing
    # block_size positions per layer (24 tensors of 3 MB for GPT-2) took about 0.4 s per
    # call on a 2-core AMD EPYC, the time of several tokens
    cache = model.new_kv_cache(B, T + max_new_tokens) if use_cache else None
    start = 0  # with a cache: the position in seq of the cache's first token
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(sampling.seed)
    stop_tokens = sampling.stop_tokens
    if stop_tokens:
        stops = torch.tensor(stop_tokens, device=idx.device)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        pad = torch.zeros(B, dtype=torch.long, device=idx.device)  # each row's stop token

    for _ in range(max_new_tokens):
        if cache is None:
            # no cache: run the whole window (the last block_size tokens) again
            window = seq[:, max(0, n - block_size) : n]
            logits = model.lm_head(model.hidden_states(window, None, last_only=True, check=False))
        else:
            if n - start > block_size:  # the window slid: rebuild the cache from it
                for layer in cache:
                    layer.reset()
                start = n - block_size
            new = seq[:, start + cache[0].length : n]  # the prompt, then one token a step
            logits = model.lm_head(model.hidden_states(new, cache, last_only=True, check=False))
        logits = logits[:, -1, :]  # (B, V)
        token = sampling.next_token(logits, seq[:, :n], generator)
        if stop_tokens:
            token = torch.where(finished, pad, token)  # finished rows repeat their stop token
            just_stopped = torch.isin(token, stops) & ~finished
            pad = torch.where(just_stopped, token, pad)
            finished |= just_stopped
        seq[:, n] = token
        n += 1
        yield seq, n
        if stop_tokens and bool(finished.all()):
            return


def _check_length(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    **settings: Any,
) -> Tensor:
    """Continue a batch of prompts by ``max_new_tokens`` tokens.

    Args:
        model: a ``GPT``; it is put in eval mode while generating (dropout off) and
            restored afterwards.
        idx: (B, T) int64 token ids, T >= 1. All rows have the same length.
        max_new_tokens: how many tokens to add (fewer if every row stops early).
        sampling: a ``SamplingConfig``; None = its defaults (temperature 1, no filters).
        use_cache: keep keys/values between steps (fast); False re-runs the model on
            the whole window at each step (the reference the cache must agree with).
        **settings: ``SamplingConfig`` fields (temperature, top_k, top_p,
            repetition_penalty, stop_tokens, seed), on top of ``sampling``.
    Returns:
        (B, T + n) int64 ids: the prompts followed by the n <= max_new_tokens new tokens.
        A row that stopped early repeats its stop token to the end.
    """
    config = sampling_config(sampling, settings)
    idx = _as_prompt(model, idx)
    _check_length(max_new_tokens)
    _check_stop_tokens(config, model.config.vocab_size)
    was_training = model.training
    model.eval()
    try:
        seq, n = idx, idx.shape[1]
        for step in _decode(model, idx, max_new_tokens, config, use_cache):
            seq, n = step
    finally:
        model.train(was_training)
    return seq[:, :n].clone()  # a normal tensor (not an inference-mode one)


# ---------------------------------------------------------------- text


def _prompt_ids(
    model: GPT, prompt: str | Sequence[int] | Tensor, tokenizer: Tokenizer | None
) -> Tensor:
    device = model.device
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TypeError("a text prompt needs a tokenizer: pass tokenizer=...")
        ids = tokenizer.encode(prompt)
        if len(ids) == 0:
            raise ValueError(
                f"the prompt {prompt!r} encodes to no tokens; give at least one character"
            )
        return torch.tensor([ids], dtype=torch.long, device=device)
    if isinstance(prompt, Tensor):
        if prompt.dim() == 1:
            prompt = prompt[None]
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(
                f"stream continues one sequence: give ids of shape (T,) or (1, T), got "
                f"{tuple(prompt.shape)}; use generate for a batch"
            )
        return prompt.to(device)
    ids = list(prompt)
    if ids and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError("the prompt must be a string, a list of int token ids, or a tensor")
    return torch.tensor([ids], dtype=torch.long, device=device).reshape(1, len(ids))


def stream(
    model: GPT,
    prompt: str | Sequence[int] | Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    use_cache: bool = True,
    **settings: Any,
) -> Iterator[int] | Iterator[str]:
    """Generate one sequence, yielding each new token as soon as it is sampled.

    Without a tokenizer ``prompt`` is token ids ((T,), (1, T) or a list) and the
    new ids are yielded as ints (a stop token included): the ids ``generate``
    returns for the same arguments.

    With a tokenizer ``prompt`` may be a string and the new text is yielded in
    pieces whose concatenation equals ``generate_text``; a stop token is not
    decoded. When a character's UTF-8 bytes are split over several tokens, its
    piece waits until the character is complete: with ``tokenizer.decode_bytes``
    the bytes go through an incremental UTF-8 decoder; otherwise the generated ids
    are decoded as a whole at each step and the new, complete suffix is yielded.

    The other arguments are those of ``generate``. Arguments are checked here, at
    the call; the model runs as the iterator is consumed.
    """
    config = sampling_config(sampling, settings)
    idx = _as_prompt(model, _prompt_ids(model, prompt, tokenizer))
    _check_length(max_new_tokens)
    _check_stop_tokens(config, model.config.vocab_size)
    steps = _decode(model, idx, max_new_tokens, config, use_cache)
    if tokenizer is None:
        return _stream_ids(model, steps)
    return _stream_text(model, steps, _TextDecoder(tokenizer, config.stop_tokens))


def _stream_ids(model: GPT, steps: Iterator[tuple[Tensor, int]]) -> Iterator[int]:
    was_training = model.training
    model.eval()
    try:
        for seq, n in steps:
            yield int(seq[0, n - 1])
    finally:
        model.train(was_training)


def _stream_text(
    model: GPT, steps: Iterator[tuple[Tensor, int]], decoder: _TextDecoder
) -> Iterator[str]:
    was_training = model.training
    model.eval()
    try:
        for seq, n in steps:
            piece = decoder.push(int(seq[0, n - 1]))
            if piece:
                yield piece
        piece = decoder.flush()
        if piece:
            yield piece
    finally:
        model.train(was_training)


class _TextDecoder:
    """Turns a stream of token ids into a stream of complete text pieces."""

    def __init__(self, tokenizer: Tokenizer, stops: Iterable[int]) -> None:
        self.tokenizer, self.stops = tokenizer, set(stops)
        self.decode_bytes = getattr(tokenizer, "decode_bytes", None)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []  # for the decode-everything fallback
        self.emitted = ""

    def push(self, token: int) -> str:
        """The new complete text after ``token`` (often "", mid-character)."""
        if token in self.stops:  # a stop token ends the text and is not decoded
            return ""
        if self.decode_bytes is not None:
            # keeps the bytes of an unfinished character until the rest arrives
            return self.utf8.decode(self.decode_bytes([token]))
        self.ids.append(token)
        # an unfinished character decodes to U+FFFD for now: hold it back
        stable = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        return self._advance(stable)

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character becomes U+FFFD)."""
        if self.decode_bytes is not None:
            return self.utf8.decode(b"", final=True)
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):
            return ""  # the tokenizer rewrote earlier text; what is out cannot change
        piece, self.emitted = text[len(self.emitted) :], text
        return piece


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    sampling: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    **settings: Any,
) -> str:
    """Continue ``prompt`` and return the generated text (without the prompt).

    ``sampling``, ``use_cache`` and ``settings`` are those of ``generate``. Stop
    tokens are not included in the text. Bytes are decoded with
    ``tokenizer.decode_bytes`` when the tokenizer has it (invalid UTF-8 becomes
    U+FFFD), else with ``decode``.
    """
    config = sampling_config(sampling, settings)
    idx = _prompt_ids(model, prompt, tokenizer)
    out = generate(model, idx, max_new_tokens, config, use_cache=use_cache)
    stops = set(config.stop_tokens)
    new = [t for t in out[0, idx.shape[1] :].tolist() if t not in stops]
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if decode_bytes is not None:
        return decode_bytes(new).decode("utf-8", errors="replace")
    return tokenizer.decode(new)


def same_length_rows(seqs: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """The indices of ``seqs`` grouped by length (lengths in first-seen order).

    ``generate`` takes rows of one length, so a batch of prompts of different
    lengths is generated group by group: ``idx = tensor([seqs[i] for i in rows])``.
    """
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(seqs):
        groups.setdefault(len(ids), []).append(i)
    return groups
