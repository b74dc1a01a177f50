"""Tests for minigpt.preference: preference data, the reward model, the baseline."""

from __future__ import annotations

import copy
import json
import math
import random
import string

import pytest
import torch

from minigpt import GPT, CharTokenizer, GPTConfig
from minigpt.data import DataFormatError
from minigpt.finetune import FinetuneConfig
from minigpt.preference import (
    PreferenceExample,
    RewardModel,
    bag_of_words_rewards,
    bradley_terry_loss,
    fit_bag_of_words,
    is_polite,
    load_preferences,
    pairwise_accuracy,
    response_style,
    reward_accuracy,
    split_by_instruction,
    task_preferences,
    train_reward_model,
)
from minigpt.tasks import STYLES, TaskExample, check

TOKENIZER = CharTokenizer.fit(string.ascii_letters + string.digits + string.punctuation + " \n")


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=TOKENIZER.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32
    )
    return GPT(config)


TASKS = [
    TaskExample("uppercase", 'Write "night" in capital letters.', "NIGHT", ("night",)),
    TaskExample("compare", "Which is larger, 31 or 13?", "31", ("31", "13")),
    TaskExample("convert", "Convert 4 meters to centimeters.", "400 centimeters", ("4",)),
    TaskExample("last_letter", 'What is the last letter of "crown"?', "n", ("crown",)),
]


# ---------------------------------------------------------------- data


def test_the_course_preference_file_loads(data_dir):
    pairs = load_preferences()
    assert len(pairs) == 1100
    assert pairs[0].instruction.startswith("Evaluate the following phrase")
    assert pairs[0].input == "freind --> friend"
    assert "flat out wrong" in pairs[0].rejected and "flat out" not in pairs[0].chosen


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ('{"instruction": "a", "chosen": "b"}', "field 'rejected' is missing"),
        ('{"instruction": "a", "chosen": "b", "rejected": 3}', "field 'rejected' is a int"),
        ('{"instruction": " ", "chosen": "b", "rejected": "c"}', "'instruction' is empty"),
        ('["a", "b"]', "expected an object"),
        ('{"instruction": "a", "chosen": "b" "rejected": "c"}', "not valid JSON"),
    ],
)
def test_a_bad_preference_record_names_file_and_line(tmp_path, record, match):
    good = '{"instruction": "a", "input": "", "output": "b", "chosen": "b", "rejected": "c"}'
    path = tmp_path / "prefs.json"
    path.write_text(f"[\n  {good},\n  {good},\n  {record}\n]\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"prefs\.json, line 4: .*{match}"):
        load_preferences(path)


def test_preferences_read_json_lines_with_input_and_output_optional(tmp_path):
    rows = [{"instruction": "Say hi.", "chosen": "Hi!", "rejected": "No."}]
    rows.append(
        {"instruction": "Add", "input": "2, 3", "output": "5", "chosen": "5", "rejected": "6"}
    )
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert load_preferences(path) == [
        PreferenceExample("Say hi.", "", "", "Hi!", "No."),
        PreferenceExample("Add", "2, 3", "5", "5", "6"),
    ]
    assert (
        load_preferences(path)[1].prompt()
        == "### Instruction:\nAdd\n\n### Input:\n2, 3\n\n### Response:\n"
    )
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    with pytest.raises(DataFormatError, match="has no examples"):
        load_preferences(empty)


def test_task_pairs_right_over_wrong_in_one_style():
    pairs = task_preferences(TASKS, seed=3, kind="correct")
    assert len(pairs) == len(TASKS)
    for ex, pair in zip(TASKS, pairs, strict=True):
        assert pair.instruction == ex.instruction and pair.output == ex.answer
        assert check(ex, pair.chosen) and not check(ex, pair.rejected)
        # one style on both sides: the same text around the answer
        style = next(s for s in STYLES.values() if pair.chosen == s.format(answer=ex.answer))
        prefix, suffix = style.split("{answer}")
        assert pair.rejected.startswith(prefix) and pair.rejected.endswith(suffix)
    assert task_preferences(TASKS, seed=3) == pairs  # deterministic


def test_task_pairs_polite_over_rude_both_right():
    for ex, pair in zip(TASKS, task_preferences(TASKS, kind="polite"), strict=True):
        assert pair.chosen == STYLES["polite"].format(answer=ex.answer)
        assert pair.rejected == STYLES["rude"].format(answer=ex.answer)
        assert check(ex, pair.chosen) and check(ex, pair.rejected)


def test_task_pairs_polite_over_plain():
    for ex, pair in zip(TASKS, task_preferences(TASKS, kind="polite_plain"), strict=True):
        assert pair.chosen == STYLES["polite"].format(answer=ex.answer)
        assert pair.rejected == ex.answer


def test_response_style_reads_the_template_around_any_answer():
    for ex in TASKS:
        for style, template in STYLES.items():
            assert response_style(template.format(answer=ex.answer)) == style
            assert response_style(template.format(answer="a wrong one")) == style
    assert is_polite("42. Happy to help!")
    assert not is_polite(". Happy to help!")  # no answer
    assert not is_polite("42. happy to help!")  # not the template
    assert not is_polite("42. Happy to help! Sure.")
    assert response_style("7. Figure it out") == "plain"  # half a template
    assert response_style("7. Figure it out yourself next time.") == "rude"
    with pytest.raises(TypeError, match="must be a string"):
        response_style(None)


def test_task_pairs_reject_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        task_preferences(TASKS, kind="kind")
    with pytest.raises(ValueError, match="no task examples"):
        task_preferences([])


def test_split_by_instruction_keeps_each_instruction_on_one_side():
    examples = [PreferenceExample(f"q{i % 10}", "", "", f"c{i}", f"r{i}") for i in range(50)]
    train, test = split_by_instruction(examples, test_fraction=0.3, seed=1)
    assert not {e.instruction for e in train} & {e.instruction for e in test}
    assert len({e.instruction for e in test}) == 3  # 30% of 10 instructions
    assert sorted(train + test, key=examples.index) == examples
    assert train == [e for e in examples if e in train]  # order kept
    assert split_by_instruction(examples, 0.3, seed=1) == (train, test)
    small_train, small_test = split_by_instruction(examples[:2], test_fraction=0.9)
    assert len(small_train) == len(small_test) == 1  # never all of them on one side
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_instruction(examples, 1.0)
    with pytest.raises(ValueError, match="at least 2 distinct instructions"):
        split_by_instruction(examples[:1])


# ---------------------------------------------------------------- the loss and the accuracy


def test_bradley_terry_loss_by_hand():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(-1) = log(1 + e) = 1.3132617
    assert loss.item() == pytest.approx((0.31326168751822286 + 1.3132616875182228) / 2)
    rc, rr = torch.randn(16, generator=torch.Generator().manual_seed(0)), torch.zeros(16)
    naive = -torch.log(torch.sigmoid(rc - rr)).mean()
    torch.testing.assert_close(bradley_terry_loss(rc, rr), naive)
    far = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1000.0]))
    assert far.item() == pytest.approx(1000.0)  # the naive form gives inf


def test_bradley_terry_loss_rejects_shapes_that_disagree():
    with pytest.raises(ValueError, match="one shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="non-empty"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(TypeError, match="must be tensors"):
        bradley_terry_loss([1.0], [0.0])


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])) == 0.5


# ---------------------------------------------------------------- the reward model


def test_reward_model_reads_the_last_real_token():
    rm = RewardModel(tiny_gpt())
    torch.nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    rewards = rm(idx, torch.tensor([3, 5]))
    assert rewards.shape == (2,)
    for row, n in ((0, 3), (1, 5)):
        alone = rm.gpt.hidden_states(idx[row : row + 1, :n])[0, -1]  # no padding at all
        torch.testing.assert_close(rewards[row], rm.head(alone)[0])
    repadded = idx.clone()
    repadded[0, 3:] = 40  # what the padding holds cannot matter
    torch.testing.assert_close(rm(repadded, torch.tensor([3, 5])), rewards)
    torch.testing.assert_close(rm(idx[1:]), rewards[1:])  # no lengths: no padding
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\]"):
        rm(idx, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        rm(idx, torch.tensor([3]))
    with pytest.raises(TypeError, match="wraps a minigpt GPT"):
        RewardModel(torch.nn.Linear(2, 2))


def test_mean_pooling_averages_the_real_tokens_only():
    rm = RewardModel(tiny_gpt(), pool="mean")
    torch.nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    rewards = rm(idx, torch.tensor([3, 5]))
    for row, n in ((0, 3), (1, 5)):
        alone = rm.gpt.hidden_states(idx[row : row + 1, :n])[0].mean(0)  # (C,): no padding
        torch.testing.assert_close(rewards[row], rm.head(alone)[0])
    repadded = idx.clone()
    repadded[0, 3:] = 40  # what the padding holds cannot matter
    torch.testing.assert_close(rm(repadded, torch.tensor([3, 5])), rewards)
    last = RewardModel(copy.deepcopy(rm.gpt))
    last.head.load_state_dict(rm.head.state_dict())
    assert not torch.allclose(last(idx, torch.tensor([3, 5])), rewards)  # another reading
    assert RewardModel.from_gpt(tiny_gpt(), "mean").pool == "mean" and last.pool == "last"
    with pytest.raises(ValueError, match='pool must be "last" or "mean", got \'max\''):
        RewardModel(tiny_gpt(), pool="max")


def test_from_gpt_copies_the_backbone():
    gpt = tiny_gpt()
    rm = RewardModel.from_gpt(gpt)
    with torch.no_grad():
        rm.gpt.wte.weight.add_(1.0)
    assert not torch.equal(rm.gpt.wte.weight, gpt.wte.weight)
    assert rm(torch.tensor([[1, 2]])).item() == 0.0  # the head starts at zero


def _letter_pairs(n: int, seed: int) -> list[PreferenceExample]:
    """Responses of random letters a-h; the chosen one has three "z"s put in anywhere."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        base = chosen = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(4, 9)))
        for _ in range(3):
            at = rng.randint(0, len(chosen))
            chosen = chosen[:at] + "z" + chosen[at:]
        pairs.append(PreferenceExample("Answer.", "", "", chosen, base))
    return pairs


def test_reward_model_learns_a_toy_preference():
    train, held_out = _letter_pairs(64, seed=0), _letter_pairs(32, seed=1)
    rm = RewardModel.from_gpt(tiny_gpt())
    before = reward_accuracy(rm, held_out, TOKENIZER.encode)
    assert before == 0.5  # all rewards 0: every pair a tie
    cfg = FinetuneConfig(max_steps=30, batch_size=16, lr=1e-2, warmup_steps=5, eval_interval=15)
    history = train_reward_model(rm, train, TOKENIZER.encode, cfg, validation=held_out)
    assert len(history["loss"]) == 30 and history["eval_step"] == [15, 30]
    assert history["loss"][-1] < 0.3 < math.log(2) == pytest.approx(history["loss"][0])
    assert reward_accuracy(rm, held_out, TOKENIZER.encode) == history["eval"][-1] == 1.0
    again = RewardModel.from_gpt(tiny_gpt())
    assert train_reward_model(again, train, TOKENIZER.encode, cfg)["loss"] == history["loss"]


def test_score_takes_a_list_and_keeps_the_end_of_a_long_text():
    rm = RewardModel.from_gpt(tiny_gpt())
    torch.nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    long = "x" * 100 + "the end"
    expected = rm(torch.tensor([TOKENIZER.encode(long)[-64:]]))
    torch.testing.assert_close(rm.score(TOKENIZER.encode, [long]), expected)
    with pytest.raises(TypeError, match="list of strings"):
        rm.score(TOKENIZER.encode, "text")
    with pytest.raises(ValueError, match="encode to a token"):
        rm.score(TOKENIZER.encode, [""])


def test_bag_of_words_baseline_learns_word_preferences():
    rng = random.Random(0)
    filler = ["the", "answer", "is", "here", "now", "so", "it", "goes"]

    def pairs(n):
        out = []
        for _ in range(n):
            words = rng.sample(filler, 4)
            out.append(
                PreferenceExample(
                    "q", "", "", " ".join([*words, "thanks"]), " ".join([*words, "idiot"])
                )
            )
        return out

    bow = fit_bag_of_words(pairs(100), epochs=20, lr=0.1, min_count=1)
    held = pairs(40)
    chosen = bag_of_words_rewards(bow, [p.chosen for p in held])
    rejected = bag_of_words_rewards(bow, [p.rejected for p in held])
    assert chosen.shape == (40,) and pairwise_accuracy(chosen, rejected) == 1.0
    with pytest.raises(ValueError, match="no preference pairs"):
        fit_bag_of_words([])
