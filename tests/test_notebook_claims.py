"""What the lessons say about their own figures, checked on the figures they show.

A lesson cell prints a measured figure (a loss, an accuracy, a timing) and the prose
around it makes a claim ("well below 3", "about a coin flip", "far faster"). The
threshold behind each claim lives here, not in the lesson: each test reads the stored
output of one cell, by its cell id, and asserts the claim on the printed numbers. The
stored outputs are the ones a learner reads; only ``tools/execute_notebooks.py`` writes
them (one thread, a fresh kernel), and nbval re-runs and compares every cell that is
not tagged ``nbval-ignore-output``, so those figures cannot drift from the code.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parents[1] / "notebooks"
NUM = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"  # one printed number


def stored_stdout(chapter: str, cell_id: str) -> str:
    """The stdout that a lesson's code cell stored, all its stream pieces joined."""
    (path,) = LESSONS.glob(f"{chapter}_*.ipynb")
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell.get("id") == cell_id:
            return "".join(
                "".join(out["text"])
                for out in cell.get("outputs", [])
                if out["output_type"] == "stream" and out["name"] == "stdout"
            )
    raise KeyError(f"{path.name} has no cell {cell_id!r}")


def lesson_stream(chapter: str) -> str:
    """Every stream output (stdout and stderr) that a lesson stored, joined."""
    (path,) = LESSONS.glob(f"{chapter}_*.ipynb")
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "".join(
        "".join(out["text"])
        for cell in nb["cells"]
        for out in cell.get("outputs", [])
        if out["output_type"] == "stream"
    )


def figures(text: str, pattern: str) -> list[tuple[float, ...]]:
    """Every match of ``pattern`` in ``text``, its groups as floats; at least one match."""
    found = [m.groups() for m in re.finditer(pattern, text)]
    assert found, f"{pattern!r} does not match the stored output {text!r}"
    return [tuple(float(x) for x in groups) for groups in found]


CLAIMS: dict[str, tuple[str, str, Callable[[str], bool]]] = {}


def claim(chapter: str, cell_id: str, what: str):
    def register(check: Callable[[str], bool]) -> Callable[[str], bool]:
        CLAIMS[f"{chapter}: {what}"] = (chapter, cell_id, check)
        return check

    return register


@claim("02", "ac25f59d", "word2vec's loss ends below 2.6")
def _(out: str) -> bool:
    return figures(out, rf"loss {NUM}")[-1][0] < 2.6


@claim("02", "8a5bfbc9", "my/thy closer than 99% and father/son than 95% of random pairs")
def _(out: str) -> bool:
    (my,), (father,) = figures(out, rf"are closer than {NUM}%")
    return my >= 99 and father >= 95


@claim("04", "16384cc1", "both variants memorise the batch: the loss falls below 0.3x its start")
def _(out: str) -> bool:
    runs = figures(out, rf"loss {NUM} -> {NUM} -> {NUM}")
    return len(runs) == 2 and all(last < 0.3 * first for first, _, last in runs)


@claim("04", "e98d1cc3", "the converted GPT-2 matches transformers up to float32 rounding")
def _(out: str) -> bool:
    return figures(out, rf"difference vs transformers: {NUM}")[0][0] < 1e-5


@claim("05", "fb15333b", "one gradient step lowers the loss on its batch")
def _(out: str) -> bool:
    ((before, after),) = figures(out, rf"loss {NUM} -> {NUM} after one step")
    return after < before


@claim("05", "27ba328c", "200 steps take the validation loss well below 3 (below 2.9)")
def _(out: str) -> bool:
    return figures(out, rf"val {NUM}")[-1][0] < 2.9


@claim("05", "44ae8fe5", "the BPE model learns: validation loss below 5.5 per token (ln 512 = 6.2)")
def _(out: str) -> bool:
    return figures(out, rf"validation loss {NUM} per token")[0][0] < 5.5


@claim("05", "b8a3063d", "on 2,000 characters train and validation part ways; dropout slows it")
def _(out: str) -> bool:
    runs = figures(out, rf"train {NUM}, validation {NUM} at step \d+ \(lowest validation {NUM}")
    (train0, val0, low0), (train5, val5, _) = runs
    return val0 > low0 + 1 and train0 < val0 - 2 and val5 < val0 and train5 > train0


@claim("06", "c539af85", "after 'th' the model's first choice is 'e'")
def _(out: str) -> bool:
    return "most likely: 'e'" in out


@claim("06", "9474cd7e", "greedy text repeats itself: more than 20% of its 8-grams are repeats")
def _(out: str) -> bool:
    return figures(out, rf"greedy: {NUM}%")[0][0] > 20


@claim("06", "3a63b716", "a low temperature repeats more than a high one")
def _(out: str) -> bool:
    rates = dict(figures(out, rf"T = {NUM}: {NUM}% repeated"))
    return rates[0.1] > rates[3.0]


@claim("06", "2a6385ce", "at 256 tokens the KV cache more than halves the time of a step")
def _(out: str) -> bool:
    ((without, with_cache),) = figures(out, rf"{NUM} ms without, {NUM} ms with the cache")
    return with_cache < without / 2


@claim("07", "3c42ee71", "a random head is about a coin flip (25% to 75%)")
def _(out: str) -> bool:
    return 25 < figures(out, rf"before fine-tuning: {NUM}%")[0][0] < 75


@claim("07", "649a54e4", "fine-tuning every layer for 60 steps beats 70% on spam")
def _(out: str) -> bool:
    return figures(out, rf"test accuracy {NUM}%")[0][0] > 70


@claim("07", "7edbd1ef", "the generative classifier beats 70% on spam")
def _(out: str) -> bool:
    return figures(out, rf"test accuracy {NUM}%")[0][0] > 70


@claim("07", "a015e2a9", "SST-2: the GPT stays above 40%, the bag of words above 65%")
def _(out: str) -> bool:
    ((gpt, bow),) = figures(out, rf"fine-tuned GPT {NUM}%, bag of words {NUM}%")
    return gpt > 40 and bow > 65


@claim("07", "c3933fab20d04ec698c2621248eb3be0", "live instruction tuning lowers the response loss")
def _(out: str) -> bool:
    ((first, last),) = figures(out, rf"first steps {NUM}, last steps {NUM}")
    return last < first


@claim(
    "07",
    "f5a1fa73e5044315a093ec459c9be902",
    "the translator knows its training pairs by heart, not new ones",
)
def _(out: str) -> bool:
    ((test_em, test_chrf),) = figures(out, rf"test sentences: +exact match {NUM}%, chrF {NUM}")
    ((seen_em, seen_chrf),) = figures(out, rf"training sentences: exact match {NUM}%, chrF {NUM}")
    return seen_em > 50 > test_em * 5 and seen_chrf > test_chrf + 30


@claim("07", "598372df", "LoRA beats 70% on spam")
def _(out: str) -> bool:
    return figures(out, rf"LoRA {NUM}%")[0][0] > 70


@claim("08", "efe5e842", "the GPT reward model reaches 90% on preferences, below the bag of words")
def _(out: str) -> bool:
    ((before, after, bow),) = figures(out, rf"{NUM}% before, {NUM}% after \d+ steps .*?{NUM}%")
    return before == 50.0 and 90 <= after < bow


@claim("08", "d6c4886d", "the live RLHF steps raise the reward and move the policy off SFT")
def _(out: str) -> bool:
    steps = figures(out, rf"mean reward \+?{NUM}, KL \(k1, per response\) \+?{NUM}")
    return len(steps) == 6 and steps[-1][0] > steps[0][0] and steps[-1][1] > steps[0][1]


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_lesson_claim_holds(name: str):
    chapter, cell_id, check = CLAIMS[name]
    out = stored_stdout(chapter, cell_id)
    assert check(out), f"chapter {chapter}, cell {cell_id}: {name}\nstored output:\n{out}"


def test_a_claim_can_fail():
    """The checks reject figures that break the claim, and a missing figure is an error."""
    _, _, coin_flip = CLAIMS["07: a random head is about a coin flip (25% to 75%)"]
    assert coin_flip("validation accuracy before fine-tuning: 59.7%\n")
    assert not coin_flip("validation accuracy before fine-tuning: 91.3%\n")
    _, _, cache = CLAIMS["06: at 256 tokens the KV cache more than halves the time of a step"]
    assert not cache("at 256 tokens: 10.0 ms without, 6.0 ms with the cache\n")
    with pytest.raises(AssertionError, match="does not match"):
        coin_flip("no figure here\n")
    with pytest.raises(KeyError):
        stored_stdout("00", "no-such-cell")


@pytest.mark.parametrize("path", sorted(LESSONS.glob("*.ipynb")), ids=lambda p: p.name)
def test_lesson_text_holds_no_test_scaffolding(path: Path):
    """nbval markers are cell tags, not comments in the code a learner reads, and every
    lesson shows at least three figures."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    marked = [c.get("id") for c in code if "NBVAL_" in "".join(c["source"]).upper()]
    assert not marked, f"cells {marked} use an nbval comment; tag them nbval-ignore-output"
    images = sum("image/png" in out.get("data", {}) for c in code for out in c.get("outputs", []))
    assert images >= 3, f"{path.name} shows {images} figures; a lesson needs at least 3"


# Multiple-choice explanations that quote a lesson's figure, copied by hand:
# (chapter module, question, the lesson that shows it, the figures as quoted).
QUOTED_FIGURES = [
    ("ch05", "q7", "00", ["3.347"]),  # the unigram loss of chapter 00
    ("ch08", "q7", "08", ["8.05", "0.77", "38.3%", "74.4%", "86.7%"]),  # the RLHF runs
    ("ch09", "q7", "09", ["97.1%", "90.6%"]),  # the probe on the embeddings, the majority
    ("ch10", "q7", "10", ["9.5%"]),  # the gradients below fp16's smallest normal number
]


@pytest.mark.parametrize(("chapter", "question", "lesson", "quoted"), QUOTED_FIGURES)
def test_exercise_explanations_quote_the_lessons_figures(chapter, question, lesson, quoted):
    """A multiple-choice explanation that quotes a lesson's figure quotes the one the
    lesson shows (a re-executed lesson would otherwise leave it stale)."""
    q = getattr(importlib.import_module(f"minigpt.exercises.{chapter}"), question)
    text = " ".join(o.why for o in q.options)
    gone = [f for f in quoted if f not in text]
    assert not gone, f"{chapter}.{question} no longer quotes {gone}: update QUOTED_FIGURES"
    shown = lesson_stream(lesson)
    missing = [f for f in quoted if f not in shown]
    assert not missing, (
        f"{chapter}.{question} quotes {missing}, which lesson {lesson} does not show"
    )


# ---------------------------------------------------------------- experiments' lesson decoys

# Every Experiment decoy that is a lesson's figure copied by hand into minigpt/exercises:
# (chapter, question, the decoy's name, {key: (where the lesson prints it, how)}). The
# pattern's one group is the figure as the lesson's stored output shows it, and must match
# that output once; "how" formats the decoy's number the way the lesson prints it.
Shown = dict[str, tuple[str, str | Callable[[float], str]]]
LESSON_DECOYS: list[tuple[str, str, str, Shown]] = [
    (
        "00",
        "q7",
        "the lesson's loss with all of the training text",
        {"train": (r"train NLL: +(\S+)", ".4f"), "val": (r"validation NLL: +(\S+)", ".4f")},
    ),
    (
        "01",
        "q7",
        "the lesson's number for a vocabulary of 600 trained on all the training text",
        {"heldout": (r"vocab +600: (\S+) bytes per token", ".2f")},
    ),
    (
        "01",
        "q7",
        "the lesson's number for a vocabulary of 400",
        {"heldout": (r"vocab +400: (\S+) bytes per token", ".2f")},
    ),
    (
        "02",
        "q6",
        "the lesson's cosine with 1,500 words and D = 64",
        {
            "my/thy": (r"cos\(my, thy\) = (\S+)", ".2f"),
            "king/sword": (r"cos\(king, sword\) = (\S+)", ".2f"),
        },
    ),
    (
        "03",
        "q6",
        "the lesson's number for d = 16 with 8 keys",
        {"raw": (r"(?m)^ +16 .* (\S+) → \S+$", ".2f"), "scaled": (r"(?m)^ +16 .* → (\S+)$", ".2f")},
    ),
    (
        "03",
        "q6",
        "the lesson's number for d = 64 with 8 keys",
        {"raw": (r"(?m)^ +64 .* (\S+) → \S+$", ".2f"), "scaled": (r"(?m)^ +64 .* → (\S+)$", ".2f")},
    ),
    (
        "04",
        "q6",
        "GPT-2 small's count from the lesson",  # the column of counted parameters
        {
            "tied": (r"(?m)^gpt2 +[\d,]+ +([\d,]+) ", ","),
            "untied": (r"(?m)^gpt2 +[\d,]+ +([\d,]+) ", ","),
        },
    ),
    ("05", "q6", "the lesson's initial loss", {"loss": (r"initial loss (\S+),", ".3f")}),
    (
        "05",
        "q6",
        "the lesson's gradient norm of the token embedding",
        {"grad_norm": (r"wte\.weight .* grad norm (\S+)", ".4f")},
    ),
    (
        "07",
        "q9",
        "the share of kept targets in the lesson's toy batch (3 of 8)",
        # of the toy batch's 2 x 4 targets, the lesson prints how many the loss keeps
        {"": (r"loss over the (\d+) kept positions", lambda share: f"{share * 8:g}")},
    ),
    (
        "09",
        "q6",
        "the lesson's number for its name-line probe after block 1",
        {  # one accuracy per layer: emb, block 0, block 1, ...
            "probe": (r"in a name line: (?:\S+, ){2}(\S+),", ".1%"),
            "shuffled": (r"shuffled: (?:\S+, ){2}(\S+),", ".1%"),
            "majority": (r"majority: (\S+)", ".1%"),
        },
    ),
    (
        "10",
        "q6",
        "the lesson's number for the course model",
        {
            "plain": (r"B = +6, T = 128: activations .* = (\S+) bytes per token", ",.0f"),
            # per token; the lesson prints the megabytes of its batch of 6 x 128 tokens
            "checkpointed": (r"checkpointed (\S+) MB \(", lambda b: f"{b * 6 * 128 / 1e6:.2f}"),
        },
    ),
]
# decoys that name the lesson but are computed here, from the lesson's inputs: they
# cannot go stale when a lesson is re-executed
COMPUTED_LESSON_DECOYS = {
    ("06", "q6", "the entropy of the lesson's four-logit example, not of these 65 logits"),
}


def lesson_figure_mismatches(
    decoy: float | dict[str, float],
    shown: Shown,
    out: str,
) -> list[str]:
    """What differs between a decoy's numbers and the figures ``out`` shows (none: [])."""
    values = decoy if isinstance(decoy, dict) else {"": decoy}
    if sorted(values) != sorted(shown):
        return [f"the decoy has the keys {sorted(values)}, the table {sorted(shown)}"]
    wrong = []
    for key, (pattern, how) in shown.items():
        found = [m.group(1) for m in re.finditer(pattern, out)]
        if len(found) != 1:
            wrong.append(f"{pattern!r} matches the lesson's output {len(found)} times, not once")
            continue
        printed = how(values[key]) if callable(how) else format(values[key], how)
        if printed != found[0]:
            wrong.append(
                f"{key or 'the number'}: the decoy prints as {printed}, the lesson {found[0]}"
            )
    return wrong


def _experiment(chapter: str, question: str):
    import importlib

    return getattr(importlib.import_module(f"minigpt.exercises.ch{chapter}"), question)


@pytest.mark.parametrize(
    ("chapter", "question", "decoy", "shown"),
    LESSON_DECOYS,
    ids=[f"ch{c}.{q}: {d}" for c, q, d, _ in LESSON_DECOYS],
)
def test_experiment_decoys_quote_the_lessons_figures(chapter, question, decoy, shown):
    """A decoy that names the lesson's figure is the figure the lesson's stored output
    shows: a re-executed lesson would otherwise leave the check quoting a stale number."""
    decoys = _experiment(chapter, question).decoys()
    assert decoy in decoys, f"ch{chapter}.{question} has no decoy {decoy!r}: update LESSON_DECOYS"
    wrong = lesson_figure_mismatches(decoys[decoy], shown, lesson_stream(chapter))
    assert not wrong, f"ch{chapter}.{question}, {decoy!r}: " + "; ".join(wrong)


def test_every_lesson_decoy_is_checked():
    """An experiment's decoy that names the lesson is in LESSON_DECOYS (or is computed)."""
    from minigpt.exercises.core import Experiment
    from tests.test_exercises import ALL

    checked = {(c, q, d) for c, q, d, _ in LESSON_DECOYS} | COMPUTED_LESSON_DECOYS
    named = {
        (chapter[2:], q.name, what)
        for chapter, q in ALL
        if isinstance(q, Experiment)
        for what in q.decoys()
        if "lesson" in what
    }
    assert named - checked == set(), "add these decoys to LESSON_DECOYS in this file"
    assert checked - named == set(), "these decoys are gone: drop them from this file"


def test_a_stale_lesson_decoy_is_caught():
    out = "train NLL:      2.4546\nvalidation NLL: 2.4819\n"
    shown = LESSON_DECOYS[0][3]
    assert lesson_figure_mismatches({"train": 2.4546, "val": 2.4819}, shown, out) == []
    assert lesson_figure_mismatches({"train": 2.4546, "val": 2.48}, shown, out) == [
        "val: the decoy prints as 2.4800, the lesson 2.4819"
    ]
    assert (
        "matches the lesson's output 0 times"
        in lesson_figure_mismatches(
            {"train": 2.4546, "val": 2.4819}, shown, "validation NLL: 2.4819\n"
        )[0]
    )
