"""Every exercise check accepts its reference answer, reports a blank as not
attempted, never raises, and rejects each plausible wrong answer. The stored
notebooks agree: solutions say Correct, untouched exercises say Not attempted."""

from __future__ import annotations

import contextlib
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest

import minigpt.exercises
from minigpt.exercises import Question, blank

REPO = Path(__file__).resolve().parents[1]

CHAPTERS = sorted(
    m.name
    for m in pkgutil.iter_modules(minigpt.exercises.__path__)
    if re.fullmatch(r"ch\d\d", m.name)
)


def _questions(chapter: str) -> list[Question]:
    mod = importlib.import_module(f"minigpt.exercises.{chapter}")
    return [getattr(mod, n) for n in sorted(vars(mod)) if isinstance(getattr(mod, n), Question)]


ALL = [(ch, q) for ch in CHAPTERS for q in _questions(ch)]

# a group of a chapter's questions in a module of its own (ch05_backprop: q8, q9)
PARTS = sorted(
    m.name
    for m in pkgutil.iter_modules(minigpt.exercises.__path__)
    if re.fullmatch(r"ch\d\d_\w+", m.name)
)


def test_there_are_chapters():
    assert "ch00" in CHAPTERS


@pytest.mark.parametrize("part", PARTS)
def test_a_chapters_part_is_read_through_the_chapter(part):
    """``ch05.q8`` is ``ch05_backprop.q8``: the chapter module lists every name of its part
    in ``__all__`` and holds the very same object, so a notebook reads one question."""
    mod = importlib.import_module(f"minigpt.exercises.{part}")
    chapter = importlib.import_module(f"minigpt.exercises.{part[:4]}")
    mine = [n for n in sorted(vars(mod)) if isinstance(getattr(mod, n), Question)]
    assert mine and sorted(mine) == sorted(n for n in mod.__all__ if n.startswith("q"))
    for name in mod.__all__:
        assert name in chapter.__all__, f"add {name!r} to {chapter.__name__}.__all__"
        assert getattr(chapter, name, None) is getattr(mod, name), (
            f"{chapter.__name__}.{name} must be {part}.{name}: import it from {part}"
        )


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_at_least_four_questions(chapter):
    assert len(_questions(chapter)) >= 4


@pytest.mark.parametrize(("chapter", "q"), ALL, ids=[f"{c}-{q.name}" for c, q in ALL])
def test_reference_is_correct(chapter, q):
    result = q.check(q.reference())
    assert result.status == "correct", result


@pytest.mark.parametrize(("chapter", "q"), ALL, ids=[f"{c}-{q.name}" for c, q in ALL])
def test_blank_is_not_attempted(chapter, q):
    def unfinished(*args, **kwargs):
        raise NotImplementedError

    def returns_none(*args, **kwargs):
        pass

    for answer in (blank, None, ..., unfinished, returns_none):
        result = q.check(answer)
        if answer in (unfinished, returns_none) and result.status == "incorrect":
            # value questions reject a function outright, which is also fine
            assert "expected" in result.message
            continue
        assert result.status == "not_attempted", (answer, result)


@pytest.mark.parametrize(("chapter", "q"), ALL, ids=[f"{c}-{q.name}" for c, q in ALL])
def test_wrong_answers_are_rejected(chapter, q):
    wrong = list(q.wrong_answers())
    assert wrong, f"{q.name} has no wrong answers to prove its check can fail"
    for answer in wrong:
        result = q.check(answer)
        assert result.status == "incorrect", (answer, result)
        assert result.message, "an incorrect answer must say what is wrong"


@pytest.mark.parametrize(("chapter", "q"), ALL, ids=[f"{c}-{q.name}" for c, q in ALL])
def test_learner_exceptions_do_not_escape(chapter, q):
    def crashes(*args, **kwargs):
        raise ZeroDivisionError("oops")

    result = q.check(crashes)
    assert result.status == "incorrect"
    q.hint()
    q.solution()


def _check_outputs(path: Path) -> list[str]:
    """The text of every output of a cell that calls .check( in a stored notebook."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or ".check(" not in "".join(cell["source"]):
            continue
        texts = []
        for out in cell.get("outputs", []):
            if "data" in out:
                texts.append("".join(out["data"].get("text/plain", "")))
            elif out.get("output_type") == "stream":
                texts.append("".join(out["text"]))
        found.append("\n".join(texts))
    return found


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_stored_notebooks_report_as_expected(chapter):
    num = chapter[2:]
    (exercise,) = REPO.glob(f"exercises/{num}_*.ipynb")
    (solution,) = REPO.glob(f"solutions/{num}_*.ipynb")
    assert exercise.name == solution.name
    n = len(_questions(chapter))
    ex, sol = _check_outputs(exercise), _check_outputs(solution)
    assert len(ex) >= n and len(sol) >= n, "every question is checked in both notebooks"
    for text in ex:
        assert "Not attempted yet" in text and "Correct" not in text, text
    for text in sol:
        assert ": Correct" in text and "Incorrect" not in text, text


# ---------------------------------------------------------------- chapter-specific


def test_ch07_sort_checker_uses_words_the_tasks_never_use(data_dir):
    """q7's instructions cannot be looked up in make_tasks output."""
    from minigpt.exercises import ch07_tasks
    from minigpt.tasks import task_words

    words = {w for _, sorted_words in ch07_tasks._SORT_CASES for w in sorted_words}
    assert words and not words & set(task_words())
    for _, sorted_words in ch07_tasks._SORT_CASES:
        assert 2 <= len(sorted_words) <= 5 and list(sorted_words) == sorted(sorted_words)


def test_ch07_collator_shortcut_is_named_and_the_collator_restored():
    from minigpt.exercises import ch07
    from minigpt.instruct import InstructionCollator

    def catches_the_refusal(prompt, answer, encode, eos_id):
        with contextlib.suppress(Exception):
            InstructionCollator(pad_id=0, eos_id=eos_id)([(encode(prompt), encode(answer))])
        return ch07.q8.reference()(prompt, answer, encode, eos_id)

    for answer in (catches_the_refusal, ch07.q8.wrong_answers()[-1]):
        result = ch07.q8.check(answer)
        assert result.status == "incorrect" and "InstructionCollator" in result.message, result
    inputs, targets = InstructionCollator(pad_id=0, eos_id=9)([([1, 2], [3])])
    assert inputs.tolist() == [[1, 2, 3]] and targets.tolist() == [[-100, 3, 9]]
