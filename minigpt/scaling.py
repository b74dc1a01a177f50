"""Scaling laws, measured: loss against model size and training tokens, and fits to it.

Kaplan et al. (2020) and Hoffmann et al. (2022, "Chinchilla") found that a language
model's loss falls as a power law in its parameters N and its training tokens D,
down to a floor E that no model of the data can beat::

    L(N)    = E + A / N**alpha                      (data not the limit)
    L(N, D) = E + A / N**alpha + B / D**beta        (both)

Training costs about C = 6 N D floating-point operations, so for a compute budget C
the best model balances N and D; Chinchilla's fit gives about 20 tokens per
parameter. This module measures the same thing at CPU scale on Tiny Shakespeare:

- ``SCALING_SWEEP`` is the recipe (five GPT sizes x three token budgets, small and
  short enough to train in a few CPU minutes); ``scaling_sweep()`` trains it once and
  caches a JSON record of (params, tokens, validation loss, seconds) per run, by a
  hash of the recipe, like the course models;
- ``train_for`` is the short training loop the sweep uses, for any model with the
  GPT interface (``model(x, y) -> (logits, loss)``): a ``GPT`` or a
  ``GRULanguageModel``, on the same batches, with the course's AdamW and schedule;
- ``RACE`` / ``race()``: a transformer and a GRU trained for the same wall time,
  their validation loss against seconds (cached the same way);
- ``fit_power_law`` and ``fit_loss_surface``: least-squares fits of the two laws
  (for fixed exponents the law is linear in E, A, B; the exponents are searched on
  a grid, then refined), and ``LossSurfaceFit.compute_optimal(C)``: the N and D that
  minimise the fitted loss at C = 6 N D;
- ``compute_frontier``: the runs no other run beats at equal or lower compute, and
  ``isoflop_profile``: at one compute budget, each size's loss read off its measured
  runs (Chinchilla's "IsoFLOP" approach, without a fitted law).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpt.checkpoint import RunLock
from minigpt.data import cache_dir
from minigpt.files import load_json, save_json
from minigpt.model import GPT, GPTConfig
from minigpt.optim import clip_grad_norm, configure_optimizer, lr_at, set_lr
from minigpt.pretrained import shakespeare_char_data
from minigpt.rnn import GRUConfig, GRULanguageModel
from minigpt.tokens import TokenDataset
from minigpt.train import validation_loss

__all__ = [
    "RACE",
    "SCALING_SWEEP",
    "LossSurfaceFit",
    "PowerLawFit",
    "compute_frontier",
    "fit_loss_surface",
    "fit_power_law",
    "isoflop_profile",
    "race",
    "scaling_sweep",
    "train_for",
]

# Five Llama-style GPTs from about 5 thousand to 340 thousand parameters, each trained
# from scratch for three token budgets (a fresh cosine schedule per budget, as
# Chinchilla did: a run cut short of its schedule would understate what its tokens buy).
SCALING_SWEEP: dict[str, Any] = {
    "sizes": [
        dict(n_layer=1, n_head=2, n_embd=16),
        dict(n_layer=1, n_head=2, n_embd=32),
        dict(n_layer=2, n_head=2, n_embd=32),
        dict(n_layer=2, n_head=4, n_embd=64),
        dict(n_layer=3, n_head=4, n_embd=96),
    ],
    "model": dict(
        block_size=64, dropout=0.0, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False
    ),
    "tokens": [40_960, 163_840, 655_360],  # 40, 160, 640 steps of 16 x 64 tokens
    "train": dict(batch_size=16, lr=3e-3, min_lr=3e-4, weight_decay=0.1, grad_clip=1.0),
    "val_tokens": 32_768,
    "seed": 0,
}

# A transformer and a GRU of similar size trained for the same wall time on the same
# batches (context 128), validation loss measured every few seconds off the clock.
RACE: dict[str, Any] = {
    "gpt": dict(
        n_layer=2,
        n_head=4,
        n_embd=96,
        block_size=128,
        dropout=0.0,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
    ),
    "gru": dict(block_size=128, n_embd=64, n_hidden=224, n_layer=1),
    "seconds": 40.0,
    "evals": 8,
    "train": dict(batch_size=16, lr=3e-3, min_lr=3e-4, weight_decay=0.1, grad_clip=1.0),
    "val_tokens": 32_768,
    "seed": 0,
}


# --------------------------------------------------------------------------- training


def train_for(
    model: nn.Module,
    train_ids: Any,
    val_ids: Any,
    *,
    batch_size: int,
    lr: float,
    min_lr: float,
    steps: int | None = None,
    seconds: float | None = None,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    evals: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` optimizer steps or for ``seconds`` of wall time.

    ``model`` has the GPT interface (``model(x, y) -> (logits, loss)`` and
    ``config.block_size``). Batches of ``batch_size`` windows come from a generator
    seeded with ``seed``, so two models trained with the same settings see the same
    text. The learning rate warms up over 5% of the steps (20 steps on the clock) and
    follows a cosine to ``min_lr`` (``minigpt.optim.lr_at``; with ``seconds`` the cosine
    follows the clock).
    Validation loss on every window of ``val_ids`` is measured ``evals`` times, evenly
    spaced (in steps, or in seconds), and at the end; evaluation is off the clock.
    Returns a record: ``steps``, ``tokens``, ``seconds`` (training only),
    ``val_loss`` (the last), and ``curve``, a list of ``[seconds, step, val_loss]``.
    """
    if (steps is None) == (seconds is None):
        raise ValueError("train_for needs exactly one of steps= or seconds=")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if not isinstance(block_size, int):
        raise TypeError(
            f"train_for trains a model with GPT's interface (config.block_size, "
            f"model(x, y) -> (logits, loss)), got {type(model).__name__}"
        )
    data = TokenDataset(np.asarray(train_ids), block_size)
    optimizer = configure_optimizer(model, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    total = steps if steps is not None else 10**9
    warmup = max(1, round(0.05 * steps)) if steps is not None else 20
    step, clock, curve = 0, 0.0, []
    next_eval = 1
    model.train()
    while True:
        start = time.perf_counter()
        fraction = None if seconds is None else clock / seconds
        set_lr(
            optimizer,
            lr_at(
                step,
                lr=lr,
                min_lr=min_lr,
                warmup_steps=warmup,
                decay_steps=total,
                time_fraction=fraction,
            ),
        )
        x, y = data.batch(batch_size, gen)
        _, loss = model(x, y)
        loss.backward()
        if grad_clip > 0:
            clip_grad_norm(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        clock += time.perf_counter() - start
        progress = step / steps if steps is not None else clock / seconds
        done = progress >= 1
        if done or progress >= next_eval / evals:
            curve.append([clock, step, validation_loss(model, val_ids)])
            model.train()
            while next_eval / evals <= progress:
                next_eval += 1
        if done:
            break
    model.eval()
    return {
        "steps": step,
        "tokens": step * batch_size * block_size,
        "seconds": clock,
        "val_loss": curve[-1][2],
        "curve": curve,
    }


def _cached_record(
    name: str,
    recipe: dict[str, Any],
    build: Callable[[], Any],
    cache: str | os.PathLike[str] | None,
) -> Any:
    """``build()``'s JSON record, computed once per recipe and kept under the cache."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    file = Path(cache or cache_dir()) / "scaling" / f"{name}-{digest}.json"
    if not file.is_file():
        with RunLock(file.parent, wait=True, name=f".{file.stem}.lock"):
            if not file.is_file():
                save_json(build(), file)
    return load_json(file)


def _data(recipe: dict[str, Any], cache: str | os.PathLike[str] | None) -> tuple[int, Any, Any]:
    tokenizer, train_ids, val_ids = shakespeare_char_data(cache)
    return tokenizer.vocab_size, train_ids, val_ids[: recipe["val_tokens"] + 1]


def scaling_sweep(
    cache: str | os.PathLike[str] | None = None, recipe: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Train every (size, token budget) of ``recipe`` (default ``SCALING_SWEEP``) once.

    The records are cached as JSON under ``<cache>/scaling/sweep-<recipe hash>.json``
    (``cache`` defaults to ``minigpt.data.cache_dir()``); later calls read them.
    Returns one dict per run: ``size`` (the recipe's entry), ``params`` (all
    parameters, N), ``non_embedding_params``, ``tokens`` (D), ``flops`` (6 N D),
    ``val_loss`` (on the first ``val_tokens`` of the validation text), ``seconds``.
    """
    recipe = SCALING_SWEEP if recipe is None else recipe

    def build() -> list[dict[str, Any]]:
        vocab_size, train_ids, val_ids = _data(recipe, cache)
        block, batch = recipe["model"]["block_size"], recipe["train"]["batch_size"]
        records = []
        for size in recipe["sizes"]:
            for tokens in recipe["tokens"]:
                torch.manual_seed(recipe["seed"])
                model = GPT(GPTConfig(vocab_size=vocab_size, **recipe["model"], **size))
                steps = max(1, tokens // (batch * block))
                run = train_for(
                    model, train_ids, val_ids, steps=steps, seed=recipe["seed"], **recipe["train"]
                )
                n = model.num_parameters()
                records.append(
                    {
                        "size": size,
                        "params": n,
                        "non_embedding_params": model.num_parameters(exclude_embeddings=True),
                        "tokens": run["tokens"],
                        "flops": 6 * n * run["tokens"],
                        "val_loss": run["val_loss"],
                        "seconds": run["seconds"],
                    }
                )
        return records

    return _cached_record("sweep", recipe, build, cache)


def race(
    cache: str | os.PathLike[str] | None = None, recipe: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Train a GPT and a GRU for the same wall time (``recipe``, default ``RACE``), once.

    Cached as JSON like ``scaling_sweep``. Returns ``{"gpt": record, "gru": record}``,
    each ``train_for``'s record plus ``params``.
    """
    recipe = RACE if recipe is None else recipe

    def build() -> dict[str, dict[str, Any]]:
        vocab_size, train_ids, val_ids = _data(recipe, cache)
        out = {}
        for name in ("gpt", "gru"):
            torch.manual_seed(recipe["seed"])
            if name == "gpt":
                model: nn.Module = GPT(GPTConfig(vocab_size=vocab_size, **recipe["gpt"]))
            else:
                model = GRULanguageModel(GRUConfig(vocab_size=vocab_size, **recipe["gru"]))
            run = train_for(
                model,
                train_ids,
                val_ids,
                seconds=recipe["seconds"],
                evals=recipe["evals"],
                seed=recipe["seed"],
                **recipe["train"],
            )
            out[name] = {**run, "params": sum(p.numel() for p in model.parameters())}
        return out

    return _cached_record("race", recipe, build, cache)


# --------------------------------------------------------------------------- fits


def _as_positive(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError(f"{what} must be finite numbers, got {x!r}")
    return a


def _refine(
    loss: Callable[..., float], best: Sequence[float], step: float, rounds: int = 40
) -> list:
    """Shrinking coordinate search around ``best`` (exponents stay in [0.01, 3])."""
    best, current = list(best), loss(*best)
    for _ in range(rounds):
        improved = False
        for i in range(len(best)):
            for sign in (1, -1):
                trial = list(best)
                trial[i] = min(3.0, max(0.01, trial[i] + sign * step))
                value = loss(*trial)
                if value < current:
                    best, current, improved = trial, value, True
        if not improved:
            step /= 2
    return best


def _linear_fit(columns: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares ``y ~ X @ coef`` with every coefficient >= 0 (a floor, and terms that
    fall with N and D, are never negative), and its squared error. With at most three
    columns, trying every set of free coefficients (the rest held at 0) is exact."""
    X = np.stack(columns, axis=1)
    k = X.shape[1]
    best: tuple[np.ndarray, float] | None = None
    for mask in range(1, 1 << k):
        free = [i for i in range(k) if mask >> i & 1]
        sub, *_ = np.linalg.lstsq(X[:, free], y, rcond=None)
        if np.any(sub < 0):
            continue
        coef = np.zeros(k)
        coef[free] = sub
        err = float(np.sum((X @ coef - y) ** 2))
        if best is None or err < best[1]:
            best = (coef, err)
    if best is None:  # every fit wants a negative coefficient: the all-zero model
        return np.zeros(k), float(np.sum(y**2))
    return best


@dataclass(frozen=True)
class PowerLawFit:
    """``L(N) = E + A / N**alpha``, fitted by least squares."""

    E: float
    A: float
    alpha: float

    def predict(self, N: Any) -> np.ndarray:
        """The fitted loss at ``N`` (a number or an array)."""
        return self.E + self.A / np.asarray(N, dtype=np.float64) ** self.alpha


def fit_power_law(N: Sequence[float], L: Sequence[float]) -> PowerLawFit:
    """Fit ``L = E + A / N**alpha`` to losses ``L`` measured at sizes ``N`` (>= 3 points).

    For a fixed alpha the law is linear in (E, A), solved exactly by least squares
    with E, A >= 0; alpha is searched on a grid over [0.01, 3] and then refined. With
    few sizes, or sizes far from the floor, E is poorly determined (it may sit at 0),
    which is the point to check before extrapolating.
    """
    n, y = _as_positive(N, "N"), _as_positive(L, "L")
    if n.shape != y.shape or n.size < 3 or np.any(n <= 0):
        raise ValueError("fit_power_law needs N > 0 and L of the same length, at least 3 points")
    scale = float(np.exp(np.mean(np.log(n))))  # fit in N / scale: better conditioned

    def sse(alpha: float) -> float:
        return _linear_fit([np.ones_like(n), (n / scale) ** -alpha], y)[1]

    grid = np.linspace(0.01, 3.0, 300)
    (alpha,) = _refine(sse, [float(grid[np.argmin([sse(a) for a in grid])])], 0.01)
    (E, A), _ = _linear_fit([np.ones_like(n), (n / scale) ** -alpha], y)
    return PowerLawFit(float(E), float(A * scale**alpha), float(alpha))


@dataclass(frozen=True)
class LossSurfaceFit:
    """``L(N, D) = E + A / N**alpha + B / D**beta``, fitted by least squares."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def predict(self, N: Any, D: Any) -> np.ndarray:
        """The fitted loss of a model of ``N`` parameters trained on ``D`` tokens."""
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """The (N, D) that minimise the fitted loss at ``flops = 6 N D``.

        Setting the derivative along D = C / (6 N) to zero gives
        N = G (C / 6) ** (beta / (alpha + beta)) with G = (alpha A / (beta B)) ** (1 / (alpha + beta)).
        """
        if not flops > 0:
            raise ValueError(f"flops must be positive, got {flops!r}")
        if self.A <= 0 or self.B <= 0:
            raise ValueError("the fit has A or B <= 0: loss does not fall with N or D, no optimum")
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1 / (a + b))
        N = G * (flops / 6) ** (b / (a + b))
        return float(N), float(flops / 6 / N)

    def tokens_per_parameter(self, flops: float) -> float:
        """D / N of the compute-optimal model at ``flops``."""
        N, D = self.compute_optimal(flops)
        return D / N


def fit_loss_surface(N: Sequence[float], D: Sequence[float], L: Sequence[float]) -> LossSurfaceFit:
    """Fit ``L = E + A / N**alpha + B / D**beta`` to runs of N parameters on D tokens.

    Needs at least 5 runs with more than one N and more than one D. For fixed
    exponents the law is linear in (E, A, B), solved with all three >= 0; the
    exponents are searched on a grid and refined, as in ``fit_power_law``.
    """
    n, d, y = _as_positive(N, "N"), _as_positive(D, "D"), _as_positive(L, "L")
    if not (n.shape == d.shape == y.shape) or n.size < 5 or np.any(n <= 0) or np.any(d <= 0):
        raise ValueError("fit_loss_surface needs N > 0, D > 0 and L of the same length, >= 5 runs")
    if len(set(n)) < 2 or len(set(d)) < 2:
        raise ValueError("fit_loss_surface needs at least two model sizes and two token budgets")
    sn, sd = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(d))))

    def columns(alpha: float, beta: float) -> list[np.ndarray]:
        return [np.ones_like(n), (n / sn) ** -alpha, (d / sd) ** -beta]

    def sse(alpha: float, beta: float) -> float:
        return _linear_fit(columns(alpha, beta), y)[1]

    grid = np.linspace(0.02, 3.0, 60)
    scores = [(sse(a, b), a, b) for a in grid for b in grid]
    _, a0, b0 = min(scores)
    alpha, beta = _refine(sse, [float(a0), float(b0)], 0.025)
    (E, A, B), _ = _linear_fit(columns(alpha, beta), y)
    return LossSurfaceFit(
        float(E), float(A * sn**alpha), float(alpha), float(B * sd**beta), float(beta)
    )


def compute_frontier(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs on the compute frontier: no run with at most their ``flops`` has a lower
    ``val_loss``. Returned in order of compute."""
    frontier, best = [], math.inf
    for r in sorted(records, key=lambda r: (r["flops"], r["val_loss"])):
        if r["val_loss"] < best:
            frontier.append(r)
            best = r["val_loss"]
    return frontier


def isoflop_profile(records: Sequence[dict[str, Any]], flops: float) -> list[dict[str, float]]:
    """Each model size's loss at the compute budget ``flops``, from measured runs only.

    A size trained on D = flops / (6 N) tokens is read off its runs by linear
    interpolation of the loss in log D, and only inside the token budgets it was
    trained for (no extrapolation): sizes whose D falls outside are left out.
    Returns ``[{"params": N, "tokens": D, "val_loss": L}, ...]`` by size; the row with
    the lowest loss is the compute-optimal size at this budget among those measured.
    """
    if not flops > 0:
        raise ValueError(f"flops must be positive, got {flops!r}")
    by_size: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        by_size.setdefault(int(r["params"]), []).append((float(r["tokens"]), float(r["val_loss"])))
    profile = []
    for n, runs in sorted(by_size.items()):
        runs.sort()
        d = flops / (6 * n)
        logs = np.log([t for t, _ in runs])
        if len(runs) < 2 or not logs[0] <= math.log(d) <= logs[-1]:
            continue
        loss = float(np.interp(math.log(d), logs, [v for _, v in runs]))
        profile.append({"params": float(n), "tokens": d, "val_loss": loss})
    return profile
