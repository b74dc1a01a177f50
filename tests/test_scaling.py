"""Scaling-law fits recover planted laws; the sweep and the race train, cache and reload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.rnn import GRUConfig, GRULanguageModel
from minigpt.scaling import (
    LossSurfaceFit,
    compute_frontier,
    fit_loss_surface,
    fit_power_law,
    isoflop_profile,
    race,
    scaling_sweep,
    train_for,
)


def test_power_law_fit_recovers_planted_parameters():
    N = np.array([3e3, 1e4, 3e4, 1e5, 3e5, 1e6])
    rng = np.random.default_rng(0)
    L = 1.7 + 40.0 / N**0.45 + rng.normal(0, 1e-4, N.size)
    fit = fit_power_law(N, L)
    assert pytest.approx(1.7, abs=0.02) == fit.E
    assert fit.alpha == pytest.approx(0.45, abs=0.02)
    assert pytest.approx(40.0, rel=0.15) == fit.A
    np.testing.assert_allclose(fit.predict(N), L, atol=1e-3)


def test_power_law_fit_beats_a_pure_power_law_with_a_floor():
    # without the floor E, log L is not linear in log N: the fit must find E
    N = np.geomspace(1e3, 1e7, 8)
    L = 2.0 + 5.0 / N**0.3
    assert pytest.approx(2.0, abs=1e-3) == fit_power_law(N, L).E


def test_loss_surface_fit_recovers_planted_parameters_and_optimum():
    N, D = np.meshgrid(np.geomspace(1e4, 1e6, 5), np.geomspace(1e5, 1e8, 4))
    true = LossSurfaceFit(E=1.5, A=30.0, alpha=0.35, B=200.0, beta=0.3)
    L = true.predict(N, D)
    fit = fit_loss_surface(N.ravel(), D.ravel(), L.ravel())
    for name in ("E", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), abs=0.02), name
    C = 1e15
    assert fit.tokens_per_parameter(C) == pytest.approx(true.tokens_per_parameter(C), rel=0.2)


def test_compute_optimal_is_the_minimum_along_the_budget():
    fit = LossSurfaceFit(E=1.0, A=400.0, alpha=0.34, B=410.0, beta=0.28)  # Chinchilla-like
    C = 1e21
    N_opt, D_opt = fit.compute_optimal(C)
    assert 6 * N_opt * D_opt == pytest.approx(C)
    Ns = np.geomspace(N_opt / 100, N_opt * 100, 20001)
    brute = Ns[np.argmin(fit.predict(Ns, C / (6 * Ns)))]
    assert N_opt == pytest.approx(brute, rel=1e-3)
    with pytest.raises(ValueError, match="A or B"):
        LossSurfaceFit(1.0, -1.0, 0.3, 1.0, 0.3).compute_optimal(C)


def test_fits_refuse_what_they_cannot_fit():
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law([1e3, 1e4], [3.0, 2.5])
    with pytest.raises(ValueError, match="two model sizes"):
        fit_loss_surface([1e3] * 5, [1e4, 2e4, 3e4, 4e4, 5e4], [3.0, 2.9, 2.8, 2.7, 2.6])


def test_frontier():
    runs = [
        {"flops": 1, "val_loss": 3.0},
        {"flops": 2, "val_loss": 3.2},  # more compute, worse: off
        {"flops": 3, "val_loss": 2.5},
        {"flops": 3, "val_loss": 2.7},
    ]
    assert [r["val_loss"] for r in compute_frontier(runs)] == [3.0, 2.5]


def test_train_for_trains_both_kinds_on_the_same_batches():
    ids = np.arange(400) % 7
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=16))
    gru = GRULanguageModel(GRUConfig(vocab_size=7, block_size=8, n_embd=8, n_hidden=16))
    kw = dict(batch_size=8, lr=1e-2, min_lr=1e-3, steps=40, evals=4)
    for model in (gpt, gru):
        run = train_for(model, ids, ids, **kw)
        assert run["steps"] == 40 and run["tokens"] == 40 * 8 * 8
        assert [c[1] for c in run["curve"]] == [10, 20, 30, 40]
        assert run["curve"][0][2] > run["val_loss"] and run["val_loss"] < 1.5  # log 7 = 1.95
    timed = train_for(gru, ids, ids, batch_size=8, lr=1e-3, min_lr=1e-4, seconds=0.3, evals=3)
    assert timed["seconds"] >= 0.3 and len(timed["curve"]) >= 1
    with pytest.raises(ValueError, match="exactly one"):
        train_for(gru, ids, ids, batch_size=8, lr=1e-3, min_lr=1e-4)


def test_sweep_and_race_plumbing(tmp_path):
    recipe = {
        "sizes": [dict(n_layer=1, n_head=2, n_embd=8), dict(n_layer=1, n_head=2, n_embd=16)],
        "model": dict(block_size=16, dropout=0.0),
        "tokens": [256, 512],
        "train": dict(batch_size=4, lr=3e-3, min_lr=3e-4),
        "val_tokens": 512,
        "seed": 0,
    }
    runs = scaling_sweep(tmp_path, recipe)
    assert [(r["size"]["n_embd"], r["tokens"]) for r in runs] == [
        (8, 256),
        (8, 512),
        (16, 256),
        (16, 512),
    ]
    assert all(r["flops"] == 6 * r["params"] * r["tokens"] for r in runs)
    assert runs[0]["params"] < runs[2]["params"]
    (file,) = (tmp_path / "scaling").glob("sweep-*.json")
    records = json.loads(file.read_text())
    records[0]["val_loss"] = 123.0  # a cached record is read back, not retrained
    file.write_text(json.dumps(records))
    assert scaling_sweep(tmp_path, recipe)[0]["val_loss"] == 123.0
    assert len(list((tmp_path / "scaling").glob("sweep-*.json"))) == 1
    other = scaling_sweep(tmp_path, {**recipe, "tokens": [256]})  # a new recipe, a new file
    assert len(other) == 2 and len(list((tmp_path / "scaling").glob("sweep-*.json"))) == 2

    small = {
        "gpt": dict(n_layer=1, n_head=2, n_embd=8, block_size=16),
        "gru": dict(block_size=16, n_embd=8, n_hidden=8),
        "seconds": 0.2,
        "evals": 2,
        "train": dict(batch_size=4, lr=3e-3, min_lr=3e-4),
        "val_tokens": 256,
        "seed": 0,
    }
    result = race(tmp_path, small)
    assert set(result) == {"gpt", "gru"}
    assert all(r["seconds"] >= 0.2 and r["params"] > 0 for r in result.values())


def test_isoflop_profile_interpolates_inside_the_measured_budgets_only():
    runs = [
        {"params": 10, "tokens": 100, "val_loss": 3.0},
        {"params": 10, "tokens": 10_000, "val_loss": 2.0},
        {"params": 100, "tokens": 100, "val_loss": 2.8},
        {"params": 100, "tokens": 1_000, "val_loss": 2.4},
    ]
    # C = 6 * 10 * 1000: size 10 reads D = 1000, halfway in log D -> 2.5; size 100 reads D = 100
    profile = isoflop_profile(runs, 6 * 10 * 1000)
    assert [(p["params"], p["tokens"]) for p in profile] == [(10, 1000), (100, 100)]
    assert profile[0]["val_loss"] == pytest.approx(2.5)
    assert profile[1]["val_loss"] == pytest.approx(2.8)
    assert [p["params"] for p in isoflop_profile(runs, 6 * 10 * 200)] == [10]  # 100 would need D=20
    assert isoflop_profile(runs, 1.0) == []


def test_fits_keep_the_floor_and_coefficients_nonnegative():
    # a law with no floor: an unconstrained fit may put E below 0; ours stops at 0
    N = np.geomspace(1e3, 1e6, 6)
    fit = fit_power_law(N, 30.0 / N**0.2)
    assert fit.E >= 0 and fit.A > 0
    np.testing.assert_allclose(fit.predict(N), 30.0 / N**0.2, rtol=1e-3)


def test_train_for_refuses_a_model_without_gpts_interface():
    with pytest.raises(TypeError, match="GPT's interface"):
        train_for(
            torch.nn.Linear(2, 2),
            [0, 1] * 50,
            [0, 1] * 50,
            batch_size=2,
            lr=1e-3,
            min_lr=0.0,
            steps=1,
        )
