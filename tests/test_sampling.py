"""minigpt.sampling: the filters, the repetition penalty, one draw, the settings object."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    sample_next_token,
    sampling_config,
    top_k_filter,
    top_p_filter,
)

# ---------------------------------------------------------------- one step


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))
    # top-k and top-p always keep the argmax, so they cannot change greedy decoding
    assert torch.equal(sample_next_token(logits, 0, top_k=3, top_p=0.1), logits.argmax(-1))


def test_shapes():
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(torch.randn(7), generator=g).shape == ()
    assert sample_next_token(torch.randn(3, 7), generator=g).shape == (3,)
    assert sample_next_token(torch.randn(2, 3, 7), generator=g).shape == (2, 3)
    assert sample_next_token(torch.randn(3, 7), generator=g).dtype == torch.long


def test_low_temperature_always_picks_the_likeliest_and_high_flattens():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    cold = sample_next_token(logits, temperature=0.01, generator=g)
    assert (cold == 1).all()
    hot = sample_next_token(logits, temperature=100.0, generator=g)
    counts = torch.bincount(hot, minlength=4).float() / len(hot)
    assert (counts - 0.25).abs().max() < 0.05  # nearly uniform


def test_draws_follow_the_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.repeat(20000, 1), temperature=0.7, generator=g)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits / 0.7, -1), atol=0.015, rtol=0)


def test_seeded_draws_repeat_and_leave_the_global_rng_alone():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    a = sample_next_token(logits, generator=torch.Generator().manual_seed(5))
    b = sample_next_token(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=40, unique=True),
    st.integers(1, 45),
)
def test_top_k_keeps_exactly_the_k_largest(values, k):
    logits = torch.tensor(values, dtype=torch.float32)[None]
    if logits.unique().numel() != logits.numel():  # float32 rounding merged two values
        return
    kept = top_k_filter(logits, k).isfinite()[0]
    expected = set(sorted(range(len(values)), key=lambda i: -values[i])[:k])
    assert set(kept.nonzero().flatten().tolist()) == expected
    # and the kept logits are unchanged
    assert torch.equal(top_k_filter(logits, k)[0, kept], logits[0, kept])


def _nucleus(probs: list[float], p: float) -> set[int] | None:
    """Brute force in float64; None when p sits too close to a boundary to be decided."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if abs(mass - p) < 1e-4:
            return None
        if mass >= p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(-8, 8, allow_nan=False), min_size=1, max_size=30),
    st.floats(0.01, 1.0),
)
def test_top_p_keeps_exactly_the_nucleus(values, p):
    logits = torch.tensor(values, dtype=torch.float32)
    probs = torch.softmax(logits.double(), -1).tolist()
    # ties make "the nucleus" ambiguous: equal probabilities, also from distinct logits
    # such as -1e-23 and 0.0, whose difference is lost in exp()
    if len(set(probs)) != len(probs):
        return
    expected = _nucleus(probs, p)
    if expected is None:
        return
    kept = top_p_filter(logits[None], p).isfinite()[0]
    assert set(kept.nonzero().flatten().tolist()) == expected


def test_top_p_worked_example():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[False, True, False, False]]
    assert top_p_filter(logits, 0.6).isfinite().tolist() == [[False, True, True, False]]
    assert top_p_filter(logits, 0.9).isfinite().tolist() == [[False, True, True, True]]
    assert top_p_filter(logits, 1.0).isfinite().all()
    assert top_p_filter(logits, 0.01).isfinite().sum() == 1  # the likeliest always stays


def test_filters_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 3
    ids = torch.randint(0, 300, (4, 20), generator=g)
    for k in (1, 5, 50):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = top_p_filter(logits, p).isfinite()
        theirs = TopPLogitsWarper(p)(ids, logits.clone()).isfinite()
        assert torch.equal(ours, theirs), p
    for penalty in (0.7, 1.3, 2.0):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, ids, penalty), theirs)


def test_sampling_stays_inside_the_filters():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)).repeat(3000, 1)
    g = torch.Generator().manual_seed(0)
    draws = set(sample_next_token(logits, top_k=4, generator=g).tolist())
    assert draws == set(logits[0].topk(4).indices.tolist())
    nucleus = top_p_filter(logits[:1], 0.5).isfinite()[0].nonzero().flatten().tolist()
    draws = set(sample_next_token(logits, top_p=0.5, generator=g).tolist())
    assert draws == set(nucleus)


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 1.0), logits)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"temperature": -0.5}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 2.5}, ValueError, "top_k"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
    ],
)
def test_bad_sampling_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        sample_next_token(torch.randn(2, 5), **kwargs)
    with pytest.raises(error, match=words):
        SamplingConfig(**kwargs)


def test_bad_logits():
    with pytest.raises(TypeError, match="floating-point"):
        sample_next_token(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="repetition_penalty"):
        apply_repetition_penalty(torch.randn(1, 4), torch.tensor([[1]]), 0.0)


def test_temperature_is_not_nan_sensitive():
    # very small temperatures divide large logits: still a valid draw, never NaN
    logits = torch.tensor([[1000.0, -1000.0, 0.0]])
    tok = sample_next_token(logits, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    assert tok.item() == 0
    assert math.isfinite(torch.softmax(logits / 1e-6, -1).sum().item())


# ---------------------------------------------------------------- settings


def test_sampling_config_is_validated_once_and_frozen():
    config = SamplingConfig(temperature=0.7, top_k=5, stop_tokens=3, seed=1)
    assert config.stop_tokens == (3,)
    assert SamplingConfig(stop_tokens=[4, 5]).stop_tokens == (4, 5)
    assert SamplingConfig(stop_tokens=None).stop_tokens == ()
    with pytest.raises(AttributeError):
        config.temperature = 1.0  # type: ignore[misc]
    for bad, error, words in [
        ({"temperature": -1}, ValueError, "temperature"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"repetition_penalty": 0}, ValueError, "repetition_penalty"),
        ({"stop_tokens": "\n"}, TypeError, "encode a stop string"),
        ({"stop_tokens": [1, -2]}, ValueError, "stop_tokens"),
        ({"seed": 1.5}, TypeError, "seed"),
    ]:
        with pytest.raises(error, match=words):
            SamplingConfig(**bad)


def test_next_token_is_the_penalty_then_sample_next_token():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(4, 30, generator=g), torch.randint(0, 30, (4, 6), generator=g)
    config = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.5)
    expected = sample_next_token(
        apply_repetition_penalty(logits, ids, 1.5), 0.8, 10, 0.9, torch.Generator().manual_seed(1)
    )
    assert torch.equal(config.next_token(logits, ids, torch.Generator().manual_seed(1)), expected)
    greedy = SamplingConfig(temperature=0)  # no penalty: the ids are not looked at
    assert torch.equal(greedy.next_token(logits, ids), logits.argmax(-1))


def test_sampling_config_merges_keywords_and_refuses_unknown_ones():
    base = SamplingConfig(temperature=0.5, seed=1)
    assert sampling_config(None, {}) == SamplingConfig()
    assert sampling_config(base, {}) is base
    assert sampling_config(base, {"top_k": 3}) == SamplingConfig(temperature=0.5, top_k=3, seed=1)
    with pytest.raises(TypeError, match="did you mean 'temperature'"):
        sampling_config(None, {"temprature": 0.5})
    with pytest.raises(TypeError, match="SamplingConfig or None"):
        sampling_config(0.8, {})  # type: ignore[arg-type]
