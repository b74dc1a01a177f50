"""Tests for minigpt.aligned: the scoring of a run and its recipes (the runs themselves
are the chapter's cached models, measured by benchmarks/align.py)."""

from __future__ import annotations

import copy
import string

import pytest
import torch

from minigpt import GPT, CharTokenizer, GPTConfig
from minigpt.aligned import RECIPES, aligned_model, evaluate_style, kl_to_reference
from minigpt.preference import is_polite
from minigpt.tasks import TaskExample, accuracy_by_family, check

TOKENIZER = CharTokenizer.fit(string.ascii_letters + string.digits + string.punctuation + " \n")
TASKS = [
    TaskExample("uppercase", 'Write "night" in capital letters.', "NIGHT", ("night",)),
    TaskExample("compare", "Which is larger, 31 or 13?", "31", ("31", "13")),
]


def tiny_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=TOKENIZER.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32
    )
    return GPT(config).eval()


def test_evaluate_style_counts_what_its_parts_say():
    model = tiny_gpt(0)
    got = evaluate_style(model, TOKENIZER, TASKS)
    responses = got["responses"]
    assert len(responses) == len(TASKS) and got["kl"] == 0.0
    assert got["by_family"] == accuracy_by_family(TASKS, responses)
    assert got["accuracy"] == sum(check(e, r) for e, r in zip(TASKS, responses)) / len(TASKS)
    assert got["polite"] == sum(map(is_polite, responses)) / len(responses)


def test_kl_to_reference_is_zero_for_the_same_model_and_positive_otherwise():
    model, other = tiny_gpt(0), tiny_gpt(1)
    responses = ["NIGHT", "31"]
    assert kl_to_reference(model, copy.deepcopy(model), TOKENIZER, TASKS, responses) == (
        pytest.approx(0.0, abs=1e-6)
    )
    kl = kl_to_reference(model, other, TOKENIZER, TASKS, responses)
    assert kl > 0.01
    scored = evaluate_style(model, TOKENIZER, TASKS, ref=other)  # at the model's own responses
    own = kl_to_reference(model, other, TOKENIZER, TASKS, scored["responses"])
    assert scored["kl"] == pytest.approx(own) and own > 0


def test_the_no_kl_run_is_the_rlhf_recipe_without_its_penalty():
    from minigpt.aligned import _recipe

    loose, rlhf = _recipe("rlhf_no_kl"), _recipe("rlhf")
    assert loose["rl"]["kl_coef"] == 0.0 < rlhf["rl"]["kl_coef"]
    assert {**loose["rl"], "kl_coef": rlhf["rl"]["kl_coef"]} == rlhf["rl"]
    assert loose["reward"] == rlhf["reward"] and loose["tasks"] == rlhf["tasks"]
    assert set(RECIPES) >= {"reward", "dpo", "rlvr", "rlhf", "rlhf_no_kl"}
    with pytest.raises(ValueError, match="unknown run"):
        aligned_model("ppo")
    with pytest.raises(ValueError, match="aligned_model makes"):
        aligned_model("reward")


def test_the_reward_model_starts_from_a_named_model(monkeypatch, tmp_path):
    from minigpt.aligned import course_reward_model

    assert RECIPES["reward"]["start"] in ("base", "sft")
    monkeypatch.setitem(RECIPES, "reward", {**RECIPES["reward"], "start": "chat"})
    with pytest.raises(ValueError, match='must be "base" or "sft", got \'chat\''):
        course_reward_model(tmp_path)
    assert not any((tmp_path / "models").glob("reward-*/model.safetensors"))


def test_the_reward_model_is_built_saved_and_loaded_with_its_head(monkeypatch, tmp_path):
    """The cold-cache path: build once (from the recipe's start), then load the same
    reward model (the head rides in the record) without building again."""
    import minigpt.aligned as aligned
    from minigpt.preference import RewardModel

    starts, built = [], []

    def fake_start(where, cache=None):
        starts.append((where, cache))
        return tiny_gpt(0), TOKENIZER

    def fake_run(model, tokenizer, seed=None, pool=None):
        assert tokenizer is TOKENIZER and pool is None
        rm = RewardModel.from_gpt(model, "mean")
        with torch.no_grad():
            rm.head.weight.normal_()
            rm.head.bias.fill_(0.25)
        built.append(rm)
        return rm, {"accuracy": 0.5, "pool": "mean"}

    monkeypatch.setattr(aligned, "reward_start", fake_start)
    monkeypatch.setattr(aligned, "run_reward_model", fake_run)
    rm, tokenizer, record = aligned.course_reward_model(tmp_path)
    again, _, _ = aligned.course_reward_model(tmp_path)
    assert starts == [(RECIPES["reward"]["start"], tmp_path)] and len(built) == 1
    assert tokenizer.vocab_size == TOKENIZER.vocab_size and record["accuracy"] == 0.5
    assert rm.pool == again.pool == "mean"
    idx = torch.tensor([TOKENIZER.encode("Which is larger, 31 or 13?")])
    with torch.no_grad():
        want = built[0].eval()(idx)
        assert torch.allclose(rm(idx), want) and torch.allclose(again(idx), want)


def test_mixed_tones_writes_the_shares_of_each_style_in_order():
    from minigpt.aligned import mixed_tones
    from minigpt.preference import response_style
    from minigpt.tasks import make_tasks

    examples = make_tasks("train", 300, seed=0, families=["uppercase"])
    toned = mixed_tones(examples, {"polite": 0.4, "rude": 0.2}, seed=0)
    assert [t.instruction for t in toned] == [e.instruction for e in examples]
    assert all(check(e, t.output) for e, t in zip(examples, toned, strict=True))
    styles = [response_style(t.output) for t in toned]
    for style, share in (("polite", 0.4), ("rude", 0.2), ("plain", 0.4)):
        assert abs(styles.count(style) / len(styles) - share) < 0.07, style
    assert mixed_tones(examples, {"polite": 0.4, "rude": 0.2}, seed=0) == toned
    assert mixed_tones(examples, {"polite": 0.4, "rude": 0.2}, seed=1) != toned
    assert {response_style(t.output) for t in mixed_tones(examples, {})} == {"plain"}
    for bad in ({"polite": 0.7, "rude": 0.5}, {"kind": 0.1}, {"plain": 0.5}, {"rude": -0.1}):
        with pytest.raises(ValueError, match="tones maps styles"):
            mixed_tones(examples, bad)
    with pytest.raises(TypeError, match="tones must be a dict"):
        mixed_tones(examples, [("polite", 0.4)])
