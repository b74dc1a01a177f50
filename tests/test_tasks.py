"""minigpt.tasks: checkable instructions, their splits, checkers and styles."""

from __future__ import annotations

import pytest

from minigpt import tasks
from minigpt.instruct import format_prompt
from minigpt.tasks import (
    FAMILIES,
    HARD_FAMILIES,
    STYLES,
    accuracy_by_family,
    check,
    format_report,
    make_tasks,
    number_in_words,
    write_response,
    wrong_answer,
)


@pytest.fixture(scope="module")
def held_out(data_dir):
    return make_tasks("held_out", 40, seed=3, families=FAMILIES + HARD_FAMILIES)


@pytest.fixture(scope="module")
def train(data_dir):
    return make_tasks("train", 400, seed=0)


def test_at_least_eight_families_and_each_is_generated(held_out):
    assert len(FAMILIES) >= 8 and not set(FAMILIES) & set(HARD_FAMILIES)
    assert {e.family for e in make_tasks("held_out", 2)} == set(FAMILIES)
    everything = FAMILIES + HARD_FAMILIES
    assert [f for f in everything if any(e.family == f for e in held_out)] == list(everything)
    assert all(sum(e.family == f for e in held_out) == 40 for f in everything if f != "spell")


def test_generation_is_deterministic_with_a_seed(data_dir):
    assert make_tasks("train", 30, seed=5) == make_tasks("train", 30, seed=5)
    assert make_tasks("train", 30, seed=5) != make_tasks("train", 30, seed=6)
    # a family's examples do not depend on which other families are asked for
    alone = make_tasks("train", 30, seed=5, families=["convert"])
    assert alone == [e for e in make_tasks("train", 30, seed=5) if e.family == "convert"]


def test_no_held_out_input_occurs_in_training(train, held_out):
    train_inputs = {i for e in train for i in e.inputs}
    held_inputs = {i for e in held_out for i in e.inputs}
    assert held_inputs and not held_inputs & train_inputs
    # nor does a held-out word or number appear anywhere in a training instruction
    import re

    train_tokens = {t for e in train for t in re.findall(r"[a-z]+|\d+", e.instruction)}
    assert not held_inputs & train_tokens
    assert not {e.instruction for e in train} & {e.instruction for e in held_out}


def test_the_digit_pairs_of_held_out_numbers_are_written_in_training(train, held_out):
    """The model copies a held-out number (compare, convert) only if it has written
    its digits in that order before: every pair of adjacent digits of a held-out
    number occurs in a training answer, inside other numbers (47 in 147, 470)."""
    import re

    def pairs(text: str) -> set[str]:
        return {n[i : i + 2] for n in re.findall(r"\d+", text) for i in range(len(n) - 1)}

    written = set().union(*(pairs(e.answer) for e in train))
    for family in ("compare", "convert"):
        numbers = {i for e in held_out if e.family == family for i in e.inputs}
        assert any(len(n) == 3 for n in numbers)  # drawn from 0..999, not 0..99
        assert set().union(*(pairs(n) for n in numbers)) <= written, family


def test_examples_within_a_split_are_distinct(train):
    assert len({e.instruction for e in train}) == len(train)


@pytest.mark.parametrize("family", FAMILIES + HARD_FAMILIES)
def test_each_checker_accepts_the_answer_and_rejects_wrong_truncated_padded(family, held_out):
    for ex in [e for e in held_out if e.family == family]:
        assert check(ex, ex.answer)
        assert check(ex, f"  {ex.answer}\n")  # surrounding whitespace is not an answer
        for style in STYLES:
            assert check(ex, write_response(ex, style))
            assert not check(ex, write_response(ex, style, correct=False))
        for seed in range(3):
            assert wrong_answer(ex, seed) != ex.answer
            assert not check(ex, wrong_answer(ex, seed))
        assert not check(ex, ex.answer[:-1])  # truncated
        assert not check(ex, ex.answer[1:])
        assert not check(ex, ex.answer + ".")  # padded
        assert not check(ex, ex.answer + " and more")
        assert not check(ex, "The answer is " + ex.answer)
        assert not check(ex, "")


def test_the_answers_are_right(held_out):
    by_family = {e.family: e for e in held_out}
    ex = by_family["add"]
    a, b = map(int, ex.inputs)
    assert ex.answer == str(a + b)
    ex = by_family["subtract"]
    a, b = map(int, ex.inputs)
    assert ex.answer == str(a - b) and a >= b
    ex = by_family["reverse_upper"]
    assert ex.answer == ex.inputs[0][::-1].upper()
    counts = [e for e in held_out if e.family == "count"]
    for ex in counts:
        letter = ex.instruction.split('"')[1]
        assert ex.answer == str(ex.inputs[0].count(letter))
    answers = [e.answer for e in counts]  # "always 1" is no good guess
    assert max(answers.count(a) for a in set(answers)) < 0.5 * len(answers)
    ex = by_family["compare"]
    assert ex.answer == max(ex.inputs, key=int)
    ex = by_family["last_upper"]
    assert ex.answer == ex.inputs[0][-1].upper()
    ex = by_family["repeat"]
    assert set(ex.answer.split()) == {ex.inputs[0]}
    ex = by_family["sort"]
    assert ex.answer.split(", ") == sorted(ex.inputs)


def test_unit_conversion_example_of_the_issue(data_dir):
    found = [e for e in make_tasks("train", 700, families=["convert"]) if e.inputs == ("45",)]
    km = [e for e in found if e.instruction == "Convert 45 kilometers to meters."]
    assert km and km[0].answer == "45000 meters"


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (40, "forty"),
        (47, "forty-seven"),
        (100, "one hundred"),
        (305, "three hundred five"),
        (999, "nine hundred ninety-nine"),
    ],
)
def test_number_in_words(n, words):
    assert number_in_words(n) == words


@pytest.mark.parametrize("bad", [-1, 1000, 3.0, True, "7"])
def test_number_in_words_rejects_what_it_cannot_spell(bad):
    with pytest.raises(ValueError, match="0 to 999"):
        number_in_words(bad)


def test_bad_arguments_say_how_to_fix_them(data_dir):
    with pytest.raises(ValueError, match="split must be one of"):
        make_tasks("test")
    with pytest.raises(ValueError, match="positive integer"):
        make_tasks("train", 0)
    with pytest.raises(ValueError, match="unknown task families"):
        make_tasks("train", 2, families=["poetry"])
    ex = make_tasks("train", 1)[0]
    with pytest.raises(ValueError, match="unknown style"):
        write_response(ex, "sarcastic")
    with pytest.raises(ValueError, match="2 responses for 1 examples"):
        accuracy_by_family([ex], ["a", "b"])


def test_prompts_use_the_course_template_and_fit_the_context(train):
    for ex in train[::50]:
        prompt = format_prompt(ex.to_instruction(), intro="")
        assert prompt.startswith("### Instruction:\n") and prompt.endswith("### Response:\n")
        assert len(prompt) + len(ex.answer) + 1 <= 256
    assert ex.to_instruction("polite").output == write_response(ex, "polite")


def test_accuracy_and_report(held_out):
    responses = [e.answer if i % 2 == 0 else "no" for i, e in enumerate(held_out)]
    acc = accuracy_by_family(held_out, responses)
    assert list(acc) == list(FAMILIES + HARD_FAMILIES) and all(a == 0.5 for a in acc.values())
    report = format_report(acc, {f: 0.0 for f in acc})
    assert report.splitlines()[0].split() == ["family", "before", "accuracy"]
    assert report.splitlines()[-1].split() == ["mean", "0%", "50.0%"]


def test_words_come_from_tiny_shakespeare(data_dir):
    words = tasks.task_words()
    assert len(words) > 1000 and all(
        w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in words
    )
    assert list(words) == sorted(words)
