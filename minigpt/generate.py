"""Sampling and generation: turn next-token logits into text, one token at a time.

A language model only scores the next token. Generation is a loop around it:
run the model, pick a token from its last-position logits, append it, repeat.

- ``sample_next_token`` picks one token from logits: greedy (temperature 0) or a
  random draw after temperature scaling, ``top_k_filter`` and ``top_p_filter``.
- ``apply_repetition_penalty`` makes tokens already in the sequence less likely.
- ``generate`` runs the loop for a batch of prompts, with a KV cache by default so
  that each step processes only the newest token.
- ``stream`` yields the new tokens (or text pieces) as they are produced, and
  ``generate_text`` goes from a prompt string to the generated string.

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
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from minigpt.model import GPT

__all__ = [
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
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
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
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"prompt token ids must be in [0, {V}), got values in [{lo}, {hi}]")
    return idx.long()


def _as_stop_tokens(stop_tokens: int | Iterable[int] | None, vocab_size: int) -> list[int]:
    if stop_tokens is None:
        return []
    tokens = [stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens)
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"stop_tokens must be token ids in [0, {vocab_size}), got {t!r}")
    return tokens


class _RowBlockLinear(TorchFunctionMode):
    """While active, ``F.linear`` on a single row on the CPU runs as a batched matmul.

    Generating one sequence with a KV cache multiplies one vector by every weight
    matrix at each step. On the CPU the matrix-vector kernel behind ``F.linear``
    (a vector times an (out, in) weight) barely uses a second thread and reads
    memory slowly; cutting the weight into ``blocks`` groups of rows and handing
    them to ``torch.bmm``, which shares a batch out over the threads, computes the
    same dot products about 1.5x (blocks) to 2x (the output head) faster, with no
    copy of the weights. ``benchmarks/generate.py`` measures the whole loop.
    Below about half a million weights the extra call costs more than it saves,
    so smaller matrices, and every other call, pass through unchanged. With a
    single thread there is nothing to share out and ``_decode`` leaves it off.
    """

    def __init__(self, blocks: int = 8, min_size: int = 1 << 19) -> None:
        super().__init__()
        self.blocks, self.min_size = blocks, min_size

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            one_row = x.numel() == x.shape[-1]
            big = weight.dim() == 2 and weight.numel() >= self.min_size
            if one_row and big and x.device.type == "cpu" and weight.is_contiguous():
                return self._linear(x, weight, bias)
        return func(*args, **kwargs)

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """(..., in) with one row, (out, in), (out,) -> (..., out); equal to F.linear."""
        out_features, in_features = weight.shape
        k = self.blocks
        rows = out_features // k * k  # the rows that fill k equal blocks
        w = weight[:rows].reshape(k, rows // k, in_features).transpose(1, 2)  # (k, in, rows/k)
        v = x.reshape(1, 1, in_features).expand(k, 1, in_features)  # (k, 1, in)
        if bias is None:
            y = torch.bmm(v, w)
        else:
            y = torch.baddbmm(bias[:rows].view(k, 1, rows // k), v, w)
        y = y.reshape(1, rows)
        if rows < out_features:  # the few rows left over
            rest = F.linear(v[0], weight[rows:], None if bias is None else bias[rows:])
            y = torch.cat([y, rest], dim=1)
        return y.view(*x.shape[:-1], out_features)


@torch.inference_mode()
def _decode(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    stop_tokens: list[int],
    seed: int | None,
    use_cache: bool,
) -> Iterator[tuple[Tensor, int]]:
    """The generation loop. Yields (seq, n) after each step: the first n columns
    of the preallocated (B, T + max_new_tokens) buffer ``seq`` are filled."""
    B, T = idx.shape
    block_size = model.config.block_size
    seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    seq[:, :T] = idx
    n = T  # tokens so far
    cache = model.new_kv_cache(B) if use_cache else None
    start = 0  # with a cache: the position in seq of the cache's first token
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    # see _RowBlockLinear (with one thread the batched matmul gains nothing)
    fast_gemv = B == 1 and idx.device.type == "cpu" and torch.get_num_threads() > 1
    if stop_tokens:
        stops = torch.tensor(stop_tokens, device=idx.device)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        pad = torch.zeros(B, dtype=torch.long, device=idx.device)  # each row's stop token

    for _ in range(max_new_tokens):
        if cache is None:
            # no cache: run the whole window (the last block_size tokens) again
            logits, _ = model(seq[:, max(0, n - block_size) : n], last_only=True)
        else:
            if n - start > block_size:  # the window slid: rebuild the cache from it
                for layer in cache:
                    layer.reset()
                start = n - block_size
            new = seq[:, start + cache[0].length : n]  # the prompt, then one token a step
            # the fast path only around the model call, never across a yield
            with _RowBlockLinear() if fast_gemv and new.shape[1] == 1 else nullcontext():
                logits, _ = model(new, kv_cache=cache, last_only=True)
        logits = logits[:, -1, :]  # (B, V)
        if repetition_penalty is not None:
            logits = apply_repetition_penalty(logits, seq[:, :n], repetition_penalty)
        token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
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
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: int | Iterable[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue a batch of prompts by ``max_new_tokens`` tokens.

    Args:
        model: a ``GPT``; it is put in eval mode while generating (dropout off) and
            restored afterwards.
        idx: (B, T) int64 token ids, T >= 1. All rows have the same length.
        max_new_tokens: how many tokens to add (fewer if every row stops early).
        temperature, top_k, top_p: see ``sample_next_token``; temperature 0 is greedy.
        repetition_penalty: > 1 discourages tokens already in the sequence (None = off).
        stop_tokens: token id(s) that end a row. The stop token is kept; a finished
            row repeats it while the other rows go on, and generation ends when
            every row has stopped.
        seed: seeds a private ``torch.Generator``, so results do not depend on (or
            change) the global random state. None uses the global state.
        use_cache: keep keys/values between steps (fast); False re-runs the model on
            the whole window at each step (the reference the cache must agree with).
    Returns:
        (B, T + n) int64 ids: the prompts followed by the n <= max_new_tokens new tokens.
    """
    idx = _as_prompt(model, idx)
    _check_sampling(temperature, top_k, top_p)
    _check_length(max_new_tokens)
    stops = _as_stop_tokens(stop_tokens, model.config.vocab_size)
    _check_penalty(repetition_penalty)
    was_training = model.training
    model.eval()
    try:
        seq, n = idx, idx.shape[1]
        for step in _decode(
            model, idx, max_new_tokens, temperature, top_k, top_p,
            repetition_penalty, stops, seed, use_cache,
        ):  # fmt: skip
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
    *,
    tokenizer: Tokenizer | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: int | Iterable[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
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
    idx = _as_prompt(model, _prompt_ids(model, prompt, tokenizer))
    _check_sampling(temperature, top_k, top_p)
    _check_length(max_new_tokens)
    _check_penalty(repetition_penalty)
    stops = _as_stop_tokens(stop_tokens, model.config.vocab_size)
    steps = _decode(
        model, idx, max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, stops, seed, use_cache,
    )  # fmt: skip
    if tokenizer is None:
        return _stream_ids(model, steps)
    return _stream_text(model, steps, _TextDecoder(tokenizer, stops))


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

    def __init__(self, tokenizer: Tokenizer, stops: list[int]) -> None:
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
    **options: object,
) -> str:
    """Continue ``prompt`` and return the generated text (without the prompt).

    ``options`` are those of ``generate`` (temperature, top_k, top_p,
    repetition_penalty, stop_tokens, seed, use_cache). Stop tokens are not
    included in the text. Bytes are decoded with ``tokenizer.decode_bytes`` when
    the tokenizer has it (invalid UTF-8 becomes U+FFFD), else with ``decode``.
    """
    idx = _prompt_ids(model, prompt, tokenizer)
    out = generate(model, idx, max_new_tokens, **options)  # type: ignore[arg-type]
    stops = set(_as_stop_tokens(options.get("stop_tokens"), model.config.vocab_size))  # type: ignore[arg-type]
    new = [t for t in out[0, idx.shape[1] :].tolist() if t not in stops]
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if decode_bytes is not None:
        return decode_bytes(new).decode("utf-8", errors="replace")
    return tokenizer.decode(new)
