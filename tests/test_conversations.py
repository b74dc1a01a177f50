"""minigpt.conversations: task conversations with follow-ups, the chat collator."""

from __future__ import annotations

import re

import pytest
import torch

from minigpt.chat import Message, check_conversation
from minigpt.conversations import (
    FOLLOW_UP_FAMILIES,
    FOLLOW_UPS,
    ChatCollator,
    Conversation,
    multi_turn_conversations,
)
from minigpt.tasks import check, make_tasks, number_in_words, task_words

# The follow-ups, written again from their phrasings (not from FOLLOW_UPS).
BY_HAND = {
    "Then write it backwards.": lambda a: a[::-1],
    "And backwards?": lambda a: a[::-1],
    "And in upper case?": str.upper,
    "Then in capital letters.": str.upper,
    "And in lower case?": str.lower,
    "Then in small letters.": str.lower,
    "How many letters are in it?": lambda a: str(len(a)),
    "Count the letters in it.": lambda a: str(len(a)),
    "Write it in words.": lambda a: number_in_words(int(a)),
    "Spell it out in English words.": lambda a: number_in_words(int(a)),
    "Add one to it.": lambda a: str(int(a) + 1),
    "What is it plus one?": lambda a: str(int(a) + 1),
}


def _first_answer(instruction: str) -> str:
    """The answer of a first turn, worked out from its text alone."""
    quoted = re.findall(r'"([^"]*)"', instruction)
    numbers = [int(n) for n in re.findall(r"\d+", instruction)]
    if "upper case" in instruction or "capital letters" in instruction:
        return quoted[0].upper()
    if "lower case" in instruction or "small letters" in instruction:
        return quoted[0].lower()
    if "letter" in instruction and len(quoted) == 2:
        return str(quoted[1].count(quoted[0]))
    assert len(numbers) == 2, instruction
    return str(max(numbers))


def test_conversations_are_deterministic_and_their_answers_right(data_dir):
    convs = multi_turn_conversations("train", 60, seed=1, turns=4)
    assert convs == multi_turn_conversations("train", 60, seed=1, turns=4)
    assert convs != multi_turn_conversations("train", 60, seed=2, turns=4)
    assert len(convs) == 60 and len({c.turns[0].instruction for c in convs}) == 60
    families = [c.turns[0].family for c in convs]
    assert families[:4] == ["uppercase", "lowercase", "compare", "count"]  # taken in turn
    used = set()
    for c in convs:
        assert len(c.turns) == 4
        first = c.turns[0]
        assert first.answer == _first_answer(first.instruction)
        for prev, turn in zip(c.turns, c.turns[1:]):
            assert turn.answer == BY_HAND[turn.instruction](prev.answer)
            assert turn.answer != prev.answer  # the follow-up needs the previous answer
            assert turn.inputs == first.inputs and turn.family in FOLLOW_UPS
            assert check(turn, turn.answer) and not check(turn, prev.answer)
            used.add(turn.family)
    assert used == set(FOLLOW_UPS)  # every follow-up occurs


def test_held_out_conversations_use_held_out_inputs_only(data_dir):
    held = multi_turn_conversations("held_out", 200, seed=0, turns=3)
    train = multi_turn_conversations("train", 400, seed=0, turns=3)
    held_inputs = {i for c in held for t in c.turns for i in t.inputs}
    train_inputs = {i for c in train for t in c.turns for i in t.inputs}
    assert held_inputs and not held_inputs & train_inputs
    # the first turns are make_tasks' own held-out examples
    pool = make_tasks("held_out", 200, seed=0, families=["uppercase", "lowercase"])
    assert {c.turns[0] for c in held if c.turns[0].family == "uppercase"} <= set(pool)
    # and the follow-up phrasings hold no task word (such a word could be a held-out one)
    words = {w.lower() for p in BY_HAND for w in re.findall(r"[A-Za-z]+", p)}
    assert set(BY_HAND) == {p for f in FOLLOW_UPS.values() for p in f[0]}
    assert not words & set(task_words())


def test_every_follow_up_family_and_the_messages(data_dir):
    convs = multi_turn_conversations("train", 40, seed=0, families=FOLLOW_UP_FAMILIES, system="Hi.")
    assert {c.turns[0].family for c in convs} == set(FOLLOW_UP_FAMILIES)
    c = convs[0]
    msgs = check_conversation(c.messages())
    assert msgs[0] == Message("system", "Hi.") and len(msgs) == 5
    assert [m.content for m in msgs[1:]] == [
        c.turns[0].instruction,
        c.turns[0].answer,
        c.turns[1].instruction,
        c.turns[1].answer,
    ]
    assert c.prompt(1) == msgs[:4] and c.prompt(0) == msgs[:2]
    with pytest.raises(ValueError, match="turn must be in 0..1"):
        c.prompt(2)
    assert Conversation(c.turns).messages() == msgs[1:]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"families": ["convert"]}, ValueError, "take no follow-ups"),
        ({"families": []}, ValueError, "take no follow-ups"),
        ({"turns": 1}, ValueError, "turns must be an integer >= 2"),
        ({"n": 0}, ValueError, "n must be a positive integer"),
        ({"split": "test"}, ValueError, "split must be one of"),
        ({"system": 3}, TypeError, "content must be a string"),
    ],
)
def test_bad_arguments_are_one_line_errors(data_dir, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        multi_turn_conversations(**kwargs)
    assert "\n" not in str(info.value)


def test_collator_masks_all_but_the_assistant_tokens():
    # two conversations: (ids, mask) as encode_chat gives them
    a = ([9, 1, 8, 7, 2, 3, 8], [0, 0, 0, 0, 1, 1, 1])
    b = ([9, 4, 8, 7, 5, 8, 9, 6, 8], [0, 0, 0, 0, 1, 1, 0, 0, 0])
    inputs, targets = ChatCollator(pad_id=0)([a, b])
    assert inputs.tolist() == [[9, 1, 8, 7, 2, 3, 0, 0], [9, 4, 8, 7, 5, 8, 9, 6]]
    X = -100
    assert targets.tolist() == [[X, X, X, 2, 3, 8, X, X], [X, X, X, 5, 8, X, X, X]]
    assert inputs.dtype == targets.dtype == torch.long
    inputs, targets = ChatCollator(pad_id=0, max_length=4)([a])
    assert inputs.tolist() == [[9, 1, 8, 7]] and targets.tolist() == [[X, X, X, 2]]
    with pytest.raises(ValueError, match="one length"):
        ChatCollator(0)([([1, 2], [True])])
    with pytest.raises(ValueError, match="empty batch"):
        ChatCollator(0)([])
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        ChatCollator(0, max_length=0)
