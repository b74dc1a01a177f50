"""Sampling and generation: turn next-token logits into text, one token at a time.

A language model only scores the next token. Generation is a loop around it:
run the model, pick a token from its last-position logits, append it, repeat.

- ``sample_next_token`` picks one token from logits: greedy (temperature 0) or a
  random draw after temperature scaling, ``top_k_filter`` and ``top_p_filter``.
- ``apply_repetition_penalty`` makes tokens already in the sequence less likely.
- ``SamplingConfig`` holds the settings of one way of sampling (temperature,
  top-k, top-p, repetition penalty, stop tokens, seed), validated once.
- ``generate`` runs the loop for a batch of prompts, with a KV cache by default so
  that each step processes only the newest token.
- ``stream`` yields the new tokens (or text pieces) as they are produced, and
  ``generate_text`` goes from a prompt string to the generated string.

All three take a ``SamplingConfig`` or its fields as keywords:
``generate(model, idx, 50, temperature=0.8, top_k=20)`` is
``generate(model, idx, 50, SamplingConfig(temperature=0.8, top_k=20))``.

Order of operations at each step (the same as Hugging Face ``transformers``):
repetition penalty on the raw logits, then temperature, then top-k, then top-p,
then softmax and a draw.

Past the context length the model sees the last ``block_size`` tokens (a sliding
window). Every token in the window then sits at a new position and the deeper
layers' keys depend on the token that fell out, so no cached key stays valid: the
cache is rebuilt from the window at each such step. That is exact (cached and
uncached generation agree token for token) and costs what uncached generation
costs, only once the sequence is longer than ``block_size``.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt.model import GPT

__all__ = [
    "SamplingConfig",
    "Tokenizer",
    "apply_repetition_penalty",
    "generate",
    "generate_text",
    "sample_next_token",
    "stream",
    "top_k_filter",
    "top_p_filter",
]


class Tokenizer(Protocol):
    """What ``generate_text`` and ``stream`` need from a tokenizer.

    A tokenizer that also has ``decode_bytes(ids) -> bytes`` (byte-level BPE) is
    streamed byte-exactly, even when one character's bytes span several tokens.
    """

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# ---------------------------------------------------------------- validation


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy, 1 = the model's "
            f"distribution), got {temperature}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token) or None, got {top_p!r}")


def _check_penalty(penalty: float | None) -> None:
    if penalty is None:
        return
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
        raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {penalty!r}")


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a floating-point tensor (..., V), got {got}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """How ``generate``, ``stream`` and ``generate_text`` pick each next token.

    Validated once, when it is made; the functions take it as ``sampling=`` or its
    fields as keywords (``temperature=0.8, top_k=20``).

    Attributes:
        temperature: >= 0; 0 is greedy decoding (the argmax), 1 the model's
            distribution, < 1 sharper, > 1 flatter (see ``sample_next_token``).
        top_k: keep only the k likeliest tokens (None = all).
        top_p: keep the smallest set of likeliest tokens with mass >= top_p, in (0, 1]
            (None = all).
        repetition_penalty: > 0; > 1 discourages tokens already in the sequence,
            1 or None changes nothing.
        stop_tokens: token ids that end a row (kept in the output; a finished row
            repeats its stop token while the others go on). An int or any iterable
            of ints is accepted and stored as a tuple.
        seed: seeds a private ``torch.Generator``, so the draws do not depend on
            (or change) the global random state; None uses the global state.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_sampling(self.temperature, self.top_k, self.top_p)
        _check_penalty(self.repetition_penalty)
        stops = self.stop_tokens
        if stops is None:
            stops = ()
        elif _is_int(stops):
            stops = (stops,)
        elif isinstance(stops, (str, bytes)) or not isinstance(stops, Iterable):
            raise TypeError(
                f"stop_tokens must be a token id or a list of token ids, got {stops!r}; "
                "encode a stop string with the tokenizer first"
            )
        stops = tuple(stops)
        for t in stops:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_tokens must be token ids (ints >= 0), got {t!r}")
        object.__setattr__(self, "stop_tokens", stops)  # frozen: set once, here
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")


_SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


def _sampling_config(sampling: SamplingConfig | None, settings: dict[str, Any]) -> SamplingConfig:
    """The one ``SamplingConfig`` a call uses: ``sampling`` with ``settings`` on top."""
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        hints = [difflib.get_close_matches(name, _SETTINGS, n=1) for name in unknown]
        hint = "".join(f"; did you mean {h[0]!r} for {n!r}?" for n, h in zip(unknown, hints) if h)
        raise TypeError(
            f"unknown sampling setting(s) {unknown}{hint} (the settings are {_SETTINGS})"
        )
    if sampling is None:
        return SamplingConfig(**settings)
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(
            f"sampling must be a SamplingConfig or None, got {sampling!r}; pass sampling "
            "settings by name, e.g. generate(model, idx, 50, temperature=0.8)"
        )
    return dataclasses.replace(sampling, **settings) if settings else sampling


# ---------------------------------------------------------------- one step


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row and set the rest to -inf.

    Exactly ``k`` tokens survive (ties at the boundary are broken by ``torch.topk``);
    ``k >= V`` keeps everything.

    Args:
        logits: (..., V).
        k: how many tokens to keep, >= 1.
    Returns:
        (..., V), a new tensor.
    """
    _check_logits(logits)
    _check_sampling(1.0, k, None)
    return _top_k(logits, k)


def _top_k(logits: Tensor, k: int) -> Tensor:
    if k >= logits.shape[-1]:
        return logits.clone()
    values, indices = torch.topk(logits, k, dim=-1)  # (..., k)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of likeliest tokens whose probabilities
    add up to at least ``p``; set the rest to -inf.

    A token is dropped when the tokens ranked above it already have ``p`` of the
    mass, so the likeliest token always survives and ``p = 1`` keeps everything.

    Args:
        logits: (..., V).
        p: the probability mass to keep, in (0, 1].
    Returns:
        (..., V), a new tensor.
    """
    _check_logits(logits)
    _check_sampling(1.0, None, p)
    return _top_p(logits, p)


def _top_p(logits: Tensor, p: float) -> Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def apply_repetition_penalty(logits: Tensor, ids: Tensor, penalty: float) -> Tensor:
    """Make tokens that already occur in ``ids`` less likely (CTRL, Keskar et al. 2019).

    A seen token's logit is divided by ``penalty`` when positive and multiplied by
    it when negative, so ``penalty > 1`` always lowers it (and ``< 1`` raises it).
    Each token counts once however often it occurred, as in ``transformers``.

    Args:
        logits: (B, V) next-token logits.
        ids: (B, T) the tokens so far (prompt and generated).
        penalty: > 0; 1 changes nothing.
    Returns:
        (B, V), a new tensor.
    """
    _check_logits(logits)
    _check_penalty(penalty)
    if logits.dim() != 2 or ids.dim() != 2 or ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"need logits (B, V) and ids (B, T) with the same B, got {tuple(logits.shape)} "
            f"and {tuple(ids.shape)}"
        )
    return _penalize(logits, ids, penalty)


def _penalize(logits: Tensor, ids: Tensor, penalty: float) -> Tensor:
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids.long(), True)  # (B, V)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from logits. A pure function of its arguments.

    ``temperature == 0`` is greedy decoding (the argmax; ``top_k`` and ``top_p``
    cannot change it). Otherwise the logits are divided by ``temperature``
    (< 1 sharpens the distribution, > 1 flattens it), filtered by ``top_k`` and
    ``top_p``, and one token is drawn from their softmax.

    Args:
        logits: (..., V) unnormalised scores, typically (B, V).
        temperature: >= 0.
        top_k: keep only the k likeliest tokens (None = all).
        top_p: keep the smallest set of likeliest tokens with mass >= top_p (None = all).
        generator: a seeded ``torch.Generator`` for reproducible draws; None uses
            PyTorch's global random state.
    Returns:
        (...) int64 token ids, one per row of ``logits``.
    """
    _check_logits(logits)
    _check_sampling(temperature, top_k, top_p)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``sample_next_token`` on arguments that were checked already."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = _top_k(logits, top_k)
    if top_p is not None:
        logits = _top_p(logits, top_p)
    probs = F.softmax(logits, dim=-1)  # (..., V)
    flat = probs.reshape(-1, probs.shape[-1])  # multinomial wants 1-D or 2-D input
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


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
    cache = model.new_kv_cache(B) if use_cache else None
    start = 0  # with a cache: the position in seq of the cache's first token
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(sampling.seed)
    stop_tokens, penalty = sampling.stop_tokens, sampling.repetition_penalty
    if stop_tokens:
        stops = torch.tensor(stop_tokens, device=idx.device)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        pad = torch.zeros(B, dtype=torch.long, device=idx.device)  # each row's stop token

    for _ in range(max_new_tokens):
        if cache is None:
            # no cache: run the whole window (the last block_size tokens) again
            window = seq[:, max(0, n - block_size) : n]
            logits = model.lm_head(model._hidden_states(window, None, last_only=True))
        else:
            if n - start > block_size:  # the window slid: rebuild the cache from it
                for layer in cache:
                    layer.reset()
                start = n - block_size
            new = seq[:, start + cache[0].length : n]  # the prompt, then one token a step
            logits = model.lm_head(model._hidden_states(new, cache, last_only=True))
        logits = logits[:, -1, :]  # (B, V)
        if penalty is not None:
            logits = _penalize(logits, seq[:, :n], penalty)
        token = _sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
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
    config = _sampling_config(sampling, settings)
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
    device = model.lm_head.weight.device
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
    config = _sampling_config(sampling, settings)
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
    config = _sampling_config(sampling, settings)
    idx = _prompt_ids(model, prompt, tokenizer)
    out = generate(model, idx, max_new_tokens, config, use_cache=use_cache)
    stops = set(config.stop_tokens)
    new = [t for t in out[0, idx.shape[1] :].tolist() if t not in stops]
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if decode_bytes is not None:
        return decode_bytes(new).decode("utf-8", errors="replace")
    return tokenizer.decode(new)
