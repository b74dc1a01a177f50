"""Sampling: choose the next token from a model's next-token logits.

A language model only scores the next token: (B, V) logits, one row per sequence.
Turning a row into a token is a choice, and the choices shape the text:

- ``sample_next_token`` picks one token from logits: greedy (temperature 0) or a
  random draw after temperature scaling, ``top_k_filter`` and ``top_p_filter``.
- ``apply_repetition_penalty`` makes tokens already in the sequence less likely.
- ``SamplingConfig`` holds the settings of one way of sampling (temperature,
  top-k, top-p, repetition penalty, stop tokens, seed), validated once, when it
  is made. ``SamplingConfig.next_token`` is one whole step on settings that were
  checked already: what the generation loop (``minigpt.generate``) calls.
- ``sampling_config`` merges a ``SamplingConfig`` with settings given as keywords,
  so that ``generate(model, idx, 50, temperature=0.8, top_k=20)`` is
  ``generate(model, idx, 50, SamplingConfig(temperature=0.8, top_k=20))``.

Order of operations at each step (the same as Hugging Face ``transformers``):
repetition penalty on the raw logits, then temperature, then top-k, then top-p,
then softmax and a draw.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SamplingConfig",
    "apply_repetition_penalty",
    "sample_next_token",
    "sampling_config",
    "top_k_filter",
    "top_p_filter",
]

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


# ---------------------------------------------------------------- settings


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

    def next_token(
        self, logits: Tensor, ids: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """One sampling step with these settings: the penalty, then ``sample_next_token``.

        The settings were checked when the config was made and the loop passes the
        model's own logits, so nothing is checked again here (it runs at every step).

        Args:
            logits: (B, V) next-token logits.
            ids: (B, T) the tokens so far, for the repetition penalty.
            generator: a seeded ``torch.Generator``, or None for the global state.
        Returns:
            (B,) int64 token ids.
        """
        if self.repetition_penalty is not None:
            logits = _penalize(logits, ids, self.repetition_penalty)
        return _sample(logits, self.temperature, self.top_k, self.top_p, generator)


_SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


def sampling_config(sampling: SamplingConfig | None, settings: dict[str, Any]) -> SamplingConfig:
    """The one ``SamplingConfig`` a call uses: ``sampling`` with ``settings`` on top.

    ``settings`` are ``SamplingConfig`` fields given by name (a misspelt one gets a
    suggestion); None for ``sampling`` means the defaults.
    """
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
