"""minigpt.assistant: prompts, batched greedy responses, data, the embedding reset, caching."""

from __future__ import annotations

import string

import pytest
import torch

from minigpt import assistant
from minigpt.assistant import (
    ASSISTANT,
    TRANSLATOR,
    instruction_data,
    respond,
    task_prompt,
    translation_data,
    translation_prompt,
)
from minigpt.finetune import init_new_tokens
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.tasks import FAMILIES, make_tasks
from minigpt.tokenizer import CharTokenizer


@pytest.fixture
def tiny():
    tok = CharTokenizer("\n" + string.printable[:-5])
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=256)
    return GPT(cfg).eval(), tok


def test_prompts_task_template_and_short_translation_prompt(data_dir):
    ex = make_tasks("held_out", 1, families=["convert"])[0]
    assert task_prompt(ex) == f"### Instruction:\n{ex.instruction}\n\n### Response:\n"
    assert translation_prompt("Hi.") == "English: Hi.\nFrench: "


def test_respond_batches_like_one_prompt_at_a_time(tiny):
    model, tok = tiny
    prompts = ["ab", "cd", "hello", "x", "hello"]
    got = respond(model, tok, prompts, max_new_tokens=7, batch_size=2)
    for p, r in zip(prompts, got, strict=True):
        ids = generate(model, torch.tensor([tok.encode(p)]), 7, temperature=0.0)
        alone = tok.decode(ids[0, len(p) :].tolist()).split("\n")[0]
        assert r == alone and "\n" not in r
    with pytest.raises(TypeError, match="list of strings"):
        respond(model, tok, "one prompt")


def test_instruction_data_balances_the_families(data_dir):
    recipe = {**ASSISTANT, "tasks": {**ASSISTANT["tasks"], "n_per_family": 300}}
    data = instruction_data(recipe)
    counts = {f: 0 for f in FAMILIES}
    for ex in data["train"]:
        counts[next(f for f in FAMILIES if ex in _examples(f))] += 1
    weights = recipe["tasks"].get("weights", {})
    # spell has ~160 distinct examples: repeated to its share
    assert counts == {f: round(300 * weights.get(f, 1)) for f in FAMILIES}
    assert {e.family for e in data["held_out"]} == set(FAMILIES)
    held = {i for e in data["held_out"] for i in e.inputs}
    train_text = " ".join(e.instruction for e in data["train"])
    assert not any(f'"{w}"' in train_text for w in held if w.isalpha())


_CACHE: dict[str, set] = {}


def _examples(family):
    if family not in _CACHE:
        _CACHE[family] = {e.to_instruction() for e in make_tasks("train", 600, families=[family])}
    return _CACHE[family]


def test_translation_data_keeps_test_sentences_out(data_dir):
    data = translation_data()
    train_sources = {p.source for p in data["train_pairs"]}
    assert not train_sources & {p.source for p in data["test_pairs"]}
    n = len(data["train_pairs"])
    assert len(data["train"]) == 2 * n  # both ways: English to French, then back
    assert data["train"][0].input == data["train_pairs"][0].source
    back, first = data["train"][n], data["train_pairs"][0]
    assert (back.input, back.output) == (first.target, first.source)
    one_way = {**TRANSLATOR, "translation": {**TRANSLATOR["translation"], "both_ways": False}}
    assert translation_data(one_way)["train"] == data["train"][:n]


def test_init_new_tokens_makes_collapsed_rows_distinct(tiny):
    model, _ = tiny
    w = model.wte.weight
    with torch.no_grad():
        w[10:20] = w[10:20].mean(0) * 0 + torch.ones(w.shape[1])  # ten identical rows
    before = w[0:10].detach().clone()
    init_new_tokens(model, range(10, 20), seed=1)
    cos = torch.nn.functional.cosine_similarity(w[10:20, None], w[None, 10:20], dim=-1)
    assert cos[~torch.eye(10, dtype=torch.bool)].abs().max() < 0.9
    assert torch.equal(w[0:10], before)  # other rows untouched
    assert model.lm_head.weight is model.wte.weight
    init_again = w[10:20].detach().clone()
    init_new_tokens(model, range(10, 20), seed=1)
    assert torch.equal(w[10:20], init_again)  # seeded
    with pytest.raises(ValueError, match="token ids must be in"):
        init_new_tokens(model, [w.shape[0]])
    with pytest.raises(ValueError, match="no trained embeddings"):
        init_new_tokens(model, range(w.shape[0]))


def test_a_tuned_model_is_cached_and_loaded(tiny, tmp_path, monkeypatch, data_dir):
    model, tok = tiny
    calls = []

    def start(cache):
        calls.append(cache)
        return model, tok, []

    monkeypatch.setattr(assistant, "tuning_start", start)
    recipe = {**ASSISTANT, "finetune": {**ASSISTANT["finetune"], "max_steps": 3}}
    train = [e.to_instruction() for e in make_tasks("train", 4)]
    first, tok1, record = assistant._cached(tmp_path, "assistant", recipe, lambda: train)
    assert len(record["history"]["loss"]) == 3 and record["seconds"] > 0
    again, _, _ = assistant._cached(tmp_path, "assistant", recipe, lambda: train)
    assert len(calls) == 1  # trained once
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert tok1.itos == tok.itos
    # other training data (a changed task generator, say) is another model, not a stale one
    assistant._cached(tmp_path, "assistant", recipe, lambda: train[:3])
    assert len(calls) == 2
    # and so is another prompt format for the same data
    assistant._cached(tmp_path, "assistant", recipe, lambda: train, lambda e: e.instruction)
    assert len(calls) == 3
