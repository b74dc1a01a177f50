"""The two question kinds that a function cannot fake: ``MultipleChoice`` (one letter,
every option explained) and ``Experiment`` (a number the check measures itself).

Unit tests run each kind on a small made-up question; then every multiple-choice and
every experiment question of the chapters is held to the rules: a wrong letter is
explained without naming the right one, every letter at once is refused, the lesson's
printed number (for its own setting) and a number off by more than the tolerance are
incorrect, each decoy and trivial answer is further than the tolerance from the truth,
the measurement is deterministic (and the same on two threads), and the notebooks show
the question text the module checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minigpt.exercises import ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, ch10
from minigpt.exercises.core import Experiment, MultipleChoice, Option, blank
from tests.test_exercises import ALL

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- MultipleChoice


class Toy(MultipleChoice):
    name = "toy"
    question = "Which number is even?"
    options = (
        Option("3", "3 leaves 1 when divided by 2."),
        Option("5", "5 leaves 1 when divided by 2."),
        Option("4", "4 = 2 x 2."),
        Option("7", "7 is prime and odd."),
    )
    answer = "c"
    _hint = "Divide by 2."


def test_the_right_letter_is_correct_and_explained():
    for answer in ("c", "C", "  c\n"):
        result = Toy().check(answer)
        assert result.status == "correct", result
        assert result.message == "(c) 4 = 2 x 2."


@pytest.mark.parametrize("letter", ["a", "b", "d"])
def test_a_wrong_letter_is_explained_without_the_right_one(letter):
    result = Toy().check(letter)
    why = Toy.options["abcd".index(letter)].why
    assert result.status == "incorrect" and result.message == f"({letter}) {why}", result
    assert "(c)" not in result.message and "4 = 2" not in result.message


@pytest.mark.parametrize("answer", [blank, None, ..., "", "   "])
def test_a_blank_letter_is_not_attempted(answer):
    assert Toy().check(answer).status == "not_attempted"


@pytest.mark.parametrize("answer", ["e", "z", "cd", "c)", "(c)", "4", 3, 2.0, True, object()])
def test_anything_but_one_letter_is_told_the_letters(answer):
    result = Toy().check(answer)
    assert result.status == "incorrect", result
    assert "answer with one of a, b, c, d" in result.message, result


@pytest.mark.parametrize("answer", [["a", "b", "c", "d"], ("c",), {"c"}, ["c", "c"], {"c": 1}])
def test_several_letters_are_refused_even_with_the_right_one(answer):
    result = Toy().check(answer)
    assert result.status == "incorrect" and "not several" in result.message, result


def test_a_function_is_incorrect_and_says_what_is_expected():
    result = Toy().check(lambda: "c")
    assert result.status == "incorrect" and "expected one letter" in result.message


def test_solution_and_markdown_show_the_options(capsys):
    Toy().solution()
    assert "(c) 4" in capsys.readouterr().out
    md = Toy().markdown()
    assert md.startswith("Which number is even?")
    assert all(f"**({k})** {o.text}" in md for k, o in zip("abcd", Toy.options))


def test_a_question_that_cannot_be_answered_is_refused_at_definition():
    class NoSuchLetter(Toy):
        answer = "e"

    class OneOption(Toy):
        options = (Option("4", "even"),)
        answer = "a"

    class Unexplained(Toy):
        options = (*Toy.options[:3], Option("7", ""))

    for bad in (NoSuchLetter, OneOption, Unexplained):
        with pytest.raises(ValueError):
            bad()


# ---------------------------------------------------------------- Experiment


class Draw(Experiment):
    """The mean of 1,000 standard normals times 10 (about 0.3), and a fixed number."""

    name = "draw"
    question = "Report the mean of torch.randn(1000, generator seeded 0) times 10."
    keys = ("mean", "fixed")
    atol = 0.01
    trivial = (0.0, 1.0, 1000.0)
    runs = 0

    def measure(self):
        type(self).runs += 1
        torch.randn(3)  # draws from the global generator: the check must not move it
        g = torch.Generator().manual_seed(0)
        return {"mean": 10 * torch.randn(1000, generator=g).mean().item(), "fixed": 2.5}

    def decoys(self):
        return {"the mean without the factor 10": {"mean": self.truth()["mean"] / 10}}


def test_an_experiment_is_measured_once_and_accepted_within_its_tolerance():
    Draw.runs = 0
    q = Draw()
    truth = q.truth()
    for delta in (0.0, 0.009, -0.009):
        result = q.check({"mean": truth["mean"] + delta, "fixed": 2.5})
        assert result.status == "correct", result
        assert "±0.01" in result.message
    assert Draw.runs == 1


def test_off_by_more_than_the_tolerance_is_incorrect_and_gives_nothing_away():
    q = Draw()
    truth = q.truth()["mean"]
    for delta in (0.011, -0.011, 0.5):
        result = q.check({"mean": truth + delta, "fixed": 2.5})
        assert result.status == "incorrect" and "not within ±0.01" in result.message, result
        assert f"{truth:.3}" not in result.message and "higher" not in result.message


def test_a_decoy_and_a_trivial_answer_are_named():
    q = Draw()
    truth = q.truth()
    result = q.check({"mean": truth["mean"] / 10, "fixed": 2.5})
    assert "without the factor 10" in result.message, result
    for trivial in (0, 1, 1000):
        result = q.check({"mean": truth["mean"], "fixed": trivial})
        assert result.status == "incorrect" and "not a measurement" in result.message, result


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (0.3, "expected a dict"),
        ({"mean": 0.3}, "missing 'fixed'"),
        ({"mean": 0.3, "fixed": 2.5, "other": 1}, "unexpected other"),
        ({"mean": float("nan"), "fixed": 2.5}, "NaN"),
        ({"mean": True, "fixed": 2.5}, "expected a number"),
        ({"mean": "0.3", "fixed": 2.5}, "expected a number"),
    ],
)
def test_a_report_of_the_wrong_shape_says_what_is_expected(answer, says):
    result = Draw().check(answer)
    assert result.status == "incorrect" and says in result.message, result


def test_the_check_leaves_the_learners_random_state_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    q = Draw()
    q.__dict__.pop("_truth", None)
    q.check({"mean": 0.0, "fixed": 2.5})
    assert torch.equal(torch.get_rng_state(), before)


def test_an_experiment_that_cannot_run_says_so():
    class Offline(Draw):
        def measure(self):
            raise OSError("no data here")

    result = Offline().check({"mean": 0.3, "fixed": 2.5})
    assert result.status == "incorrect", result
    assert "could not run the experiment" in result.message and "no data here" in result.message


def test_an_integer_experiment_is_exact():
    class Count(Experiment):
        name = "count"
        question = "How many?"
        integer = True

        def measure(self):
            return 828

    q = Count()
    assert q.tolerance == "exactly"
    assert q.check(828).status == "correct" and q.check(828.0).status == "correct"
    for wrong in (827, 829, 828.5):
        assert q.check(wrong).status == "incorrect"


# ---------------------------------------------------------------- the chapters' questions

CHOICES = [(c, q) for c, q in ALL if isinstance(q, MultipleChoice)]
EXPERIMENTS = [(c, q) for c, q in ALL if isinstance(q, Experiment)]


def _ids(rows):
    return [f"{c}-{q.name}" for c, q in rows]


def test_every_chapter_has_an_experiment_and_a_conceptual_question():
    for chapter in [*(f"ch0{i}" for i in range(10)), "ch10"]:
        assert any(c == chapter for c, _ in CHOICES), chapter
        assert any(c == chapter for c, _ in EXPERIMENTS), chapter


@pytest.mark.parametrize(("chapter", "q"), CHOICES, ids=_ids(CHOICES))
def test_no_wrong_option_gives_the_answer_away(chapter, q):
    right = q.options[q.letters.index(q.answer)]
    for letter in q.letters:
        if letter == q.answer:
            continue
        result = q.check(letter)
        assert result.status == "incorrect", result
        body = result.message.removeprefix(f"({letter}) ")
        assert f"({q.answer})" not in body and right.text not in body, result
    assert len({o.why for o in q.options}) == len(q.options), "one explanation per option"
    for guess in (list(q.letters), tuple(q.letters), "".join(q.letters)):
        assert q.check(guess).status == "incorrect"


@pytest.mark.parametrize(("chapter", "q"), EXPERIMENTS, ids=_ids(EXPERIMENTS))
def test_every_decoy_and_trivial_answer_is_further_than_the_tolerance(chapter, q):
    truth = q.truth()
    for key, want in truth.items():
        for t in q.trivial:
            assert not q._within(t, want), f"{key}: the trivial {t} would pass"
        for what, decoy in q.decoys().items():
            d = decoy.get(key) if isinstance(decoy, dict) else decoy
            assert d is None or not q._within(d, want), f"{key}: {what} ({d}) would pass"
    assert q.tolerance in q.question.replace("\n", " ") or q.integer


@pytest.mark.parametrize(("chapter", "q"), EXPERIMENTS, ids=_ids(EXPERIMENTS))
def test_the_measurement_is_deterministic(chapter, q):
    again = type(q)()  # a fresh instance measures again
    first, second = q.truth(), again.truth()
    assert first.keys() == second.keys()
    for key in first:
        assert abs(first[key] - second[key]) < 1e-9, key


@pytest.mark.parametrize(
    "q", [ch02.q6, ch05.q6, ch08.q6, ch09.q6], ids=["ch02-q6", "ch05-q6", "ch08-q6", "ch09-q6"]
)
def test_a_seeded_experiment_gives_the_same_number_on_two_threads(q):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = type(q)().truth()
    finally:
        torch.set_num_threads(threads)
    for key, value in q.truth().items():
        assert abs(value - two[key]) < q.atol / 4, key


def test_the_activation_count_is_the_same_on_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = type(ch10.q6)().truth()
    finally:
        torch.set_num_threads(threads)
    assert two == ch10.q6.truth()  # bytes follow from shapes alone


def _shifted(key: str, by: float):
    """The truth with ``key`` moved by ``by`` times 1.2 tolerances: just outside it.

    The message may name a decoy that lies there, so the rows ask only for "incorrect".
    """

    def make(q: Experiment):
        truth = dict(q.truth())
        tolerance = q.atol + q.rtol * abs(truth[key])
        truth[key] += by * 1.2 * tolerance if not q.integer else by
        return truth if q.keys else truth[""]

    return make


def _with(**values):
    def make(q: Experiment):
        return {**q.truth(), **values}

    return make


def _misread_activations(how: str) -> float:
    """ch10.q6's plain forward counted as a learner might misread it, measured here on its own:
    ``"every"`` adds up every saved tensor (views each time), ``"params"`` keeps the weights."""
    from minigpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=6, n_head=4, n_embd=48))
    x = torch.randint(65, (4, 65), generator=torch.Generator().manual_seed(0))
    counted: dict[int, int] = {}

    def pack(t):
        key = len(counted) if how == "every" else t.untyped_storage().data_ptr()
        counted[key] = (
            t.numel() * t.element_size() if how == "every" else t.untyped_storage().nbytes()
        )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x[:, :-1], x[:, 1:])
    return sum(counted.values()) / (4 * 64)


def _kl_by_hand(from_ref: bool = False) -> dict[str, float]:
    """ch08.q6's setting computed here on its own: k1 and k2 means and the exact KL;
    ``from_ref`` draws the 50 tokens from ref (a second draw of the same generator)."""
    policy = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08])
    ref = torch.full((5,), 0.2)
    g = torch.Generator().manual_seed(0)
    t = torch.multinomial(policy, 50, replacement=True, generator=g)
    if from_ref:
        t = torch.multinomial(ref, 50, replacement=True, generator=g)
    log_r = ref.log()[t] - policy.log()[t]
    return {
        "k1": (-log_r).mean().item(),
        "k2": (0.5 * log_r**2).mean().item(),
        "exact": (policy * (policy / ref).log()).sum().item(),
    }


def _probe_by_hand(which: str) -> dict[str, float]:
    """ch09.q6's two probes fitted here, read at ``which`` ("train_accuracy", ...)."""
    from minigpt.inspect import linear_probe

    features = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    labels = (features[:, 0] + 0.5 * features[:, 1] > 1.0).long()
    shuffled = labels[torch.randperm(400, generator=torch.Generator().manual_seed(1))]
    return {
        "probe": getattr(linear_probe(features, labels), which),
        "shuffled": getattr(linear_probe(features, shuffled), which),
    }


def test_the_kl_experiment_agrees_with_an_independent_count():
    """ch08.q6: k3 by hand from the sampled counts; the fraction from the 3 low tokens."""
    policy = [0.40, 0.25, 0.15, 0.12, 0.08]
    t = torch.multinomial(
        torch.tensor(policy), 50, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(t, minlength=5).tolist()
    k3 = sum(n * (0.2 / p - 1 - math.log(0.2 / p)) for n, p in zip(counts, policy)) / 50
    k1 = sum(n * math.log(p / 0.2) for n, p in zip(counts, policy)) / 50
    truth = ch08.q6.truth()
    assert abs(truth["k3"] - k3) < 1e-6 and abs(truth["k1"] - k1) < 1e-6
    assert truth["negative"] == sum(counts[2:]) / 50  # the tokens below 0.2
    assert truth["k3"] >= 0 and min(counts) > 0


def test_the_probe_experiment_agrees_with_an_independent_count():
    """ch09.q6: the majority rate counted; the real probe well above its control."""
    features = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    ones = int(((features[:, 0] + 0.5 * features[:, 1]) > 1.0).sum())
    truth = ch09.q6.truth()
    assert abs(truth["majority"] - max(ones, 400 - ones) / 400) < 1e-12
    assert truth["probe"] > truth["shuffled"] + 0.1
    assert abs(truth["shuffled"] - truth["majority"]) < 0.1  # the control sits near it


# (question, wrong answer or a function of the question that makes one, what the message says)
ROWS = [
    # the lesson's printed numbers, for the lesson's own setting
    (ch00.q7, {"train": 2.4546, "val": 2.4819}, "the lesson's loss with all of the training"),
    (ch01.q7, _with(heldout=1.99), "the lesson's number for a vocabulary of 600"),
    (ch02.q6, {"my/thy": 0.59, "king/sword": 0.25}, "the lesson's cosine"),
    (ch03.q6, {"raw": 0.75, "scaled": 0.36}, "the lesson's number for d = 16"),
    (ch04.q6, {"tied": 124_439_808, "untied": 124_439_808}, "GPT-2 small's count"),
    (ch05.q6, _with(grad_norm=0.7657), "the lesson's gradient norm"),
    (ch05.q6, _with(loss=4.209), "the lesson's initial loss"),
    (ch06.q6, _with(**{"T=0.5": 0.5381}), "the lesson's four-logit example"),
    (ch07.q9, 0.375, "the lesson's toy batch"),
    (ch10.q6, _with(plain=51_085), "the lesson's number for the course model"),
    (ch10.q6, _with(checkpointed=5_911), "the lesson's number for the course model"),
    (ch09.q6, _with(probe=0.986), "the lesson's number for its name-line probe"),
    (ch09.q6, _with(shuffled=0.914), "the lesson's number for its name-line probe"),
    (ch09.q6, _with(majority=0.906), "the lesson's number for its name-line probe"),
    # off by just more than the tolerance, each way
    *[
        (q, _shifted(key, sign), "")
        for q in (ch00.q7, ch01.q7, ch02.q6, ch03.q6, ch05.q6, ch06.q6, ch08.q6, ch09.q6, ch10.q6)
        for key in q.keys
        for sign in (1.0, -1.0)
    ],
    (ch04.q6, _shifted("tied", 1), "not within"),
    (ch04.q6, _shifted("untied", -1), "not within"),
    (ch07.q9, _shifted("", 1.0), "not within"),
    (ch07.q9, _shifted("", -1.0), ""),
    # readings of the question that are not what it asks
    (ch01.q7, lambda q: q._measure(300), "300 must be the number of merges"),
    (ch04.q6, lambda q: {"tied": q.truth()["untied"], "untied": q.truth()["tied"]}, "swapped"),
    (ch06.q6, lambda q: {k: v / 0.6931471805599453 for k, v in q.truth().items()}, "bits"),
    (ch07.q9, lambda q: ch07._scored_fractions()["mean_of_rows"], "the mean of each row"),
    (ch05.q6, _with(grad_norm=0.0), "not a measurement"),
    (ch07.q9, 1.0, "not a measurement"),
    (ch10.q6, lambda q: _with(plain=_misread_activations("every"))(q), "each time"),
    (ch10.q6, lambda q: _with(plain=_misread_activations("params"))(q), "parameters' storages"),
    (ch10.q6, lambda q: _with(checkpointed=q.truth()["checkpointed"] - 6 * 48 * 4)(q), "without"),
    (ch10.q6, lambda q: {k: v * 256 for k, v in q.truth().items()}, "whole batch"),
    (ch10.q6, lambda q: {k: v * 256 / 260 for k, v in q.truth().items()}, "4 x 65 ids"),
    (ch10.q6, lambda q: {k: v * 64 for k, v in q.truth().items()}, "per sequence"),
    (
        ch10.q6,
        lambda q: {"plain": q.truth()["checkpointed"], "checkpointed": q.truth()["plain"]},
        "",
    ),
    (ch10.q6, _with(checkpointed=256.0), "not a measurement"),
    (ch08.q6, lambda q: _with(k1=_kl_by_hand()["exact"], k3=_kl_by_hand()["exact"])(q), "exact KL"),
    (ch08.q6, lambda q: _with(k1=-q.truth()["k1"])(q), "upside down"),
    (ch08.q6, lambda q: _with(k3=_kl_by_hand()["k2"])(q), "k2"),
    (ch08.q6, lambda q: _with(k1=_kl_by_hand(from_ref=True)["k1"])(q), "drawn from ref"),
    (ch08.q6, lambda q: _with(k1=q.truth()["k1"] * 50, k3=q.truth()["k3"] * 50)(q), "sum"),
    (ch08.q6, lambda q: _with(k1=q.truth()["k1"] / 0.6931471805599453)(q), "bits"),
    (ch08.q6, lambda q: _with(negative=1 - q.truth()["negative"])(q), ""),
    (ch08.q6, _with(negative=0.6), "share of the 5 tokens"),
    (ch08.q6, _with(negative=0.0), "not a measurement"),
    (ch08.q6, lambda q: {"k1": q.truth()["k3"], "k3": q.truth()["k1"], "negative": 0.32}, ""),
    (ch09.q6, lambda q: _with(**_probe_by_hand("train_accuracy"))(q), "training split"),
    (ch09.q6, lambda q: _with(majority=1 - q.truth()["majority"])(q), "less common class"),
    (ch09.q6, _with(shuffled=0.5), "not a measurement"),
    (ch09.q6, lambda q: _with(shuffled=q.truth()["majority"])(q), ""),
    # conceptual: a wrong letter, and every letter at once
    *[
        (q, wrong, why)
        for q in (
            ch00.q8,
            ch01.q8,
            ch02.q7,
            ch03.q7,
            ch04.q7,
            ch05.q7,
            ch06.q7,
            ch07.q10,
            ch08.q7,
            ch09.q7,
            ch10.q7,
            ch10.q8,
        )
        for wrong, why in (
            (next(k for k in q.letters if k != q.answer), "("),
            (list(q.letters), "not several"),
            (tuple(q.letters), "not several"),
            ("".join(q.letters), "one letter only"),
        )
    ],
]


def _label(row) -> str:
    q, answer, why = row
    chapter = next(c for c, other in ALL if other is q)
    shown = "made" if callable(answer) else repr(answer)[:30]
    return f"{chapter}-{q.name}-{shown}-{why[:20] or 'off'}"


@pytest.mark.parametrize(("q", "answer", "says"), ROWS, ids=[_label(r) for r in ROWS])
def test_a_wrong_report_is_incorrect_and_says_why(q, answer, says):
    if callable(answer):
        answer = answer(q)
    result = q.check(answer)
    assert result.status == "incorrect", (answer, result)
    assert result.message and says in result.message, result


def test_every_new_question_of_every_chapter_has_rows():
    listed = {id(q) for q, _, _ in ROWS}
    mine = CHOICES + EXPERIMENTS
    assert len(mine) == 23 and all(id(q) in listed for _, q in mine)


# ---------------------------------------------------------------- the notebooks


def _markdown(folder: str, chapter: str) -> str:
    (path,) = REPO.glob(f"{folder}/{chapter[2:]}_*.ipynb")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@pytest.mark.parametrize(("chapter", "q"), CHOICES + EXPERIMENTS, ids=_ids(CHOICES + EXPERIMENTS))
def test_the_notebooks_ask_what_the_module_checks(chapter, q):
    text = q.markdown() if isinstance(q, MultipleChoice) else q.question.strip()
    for folder in ("exercises", "solutions"):
        assert text in _markdown(folder, chapter), f"{folder}: rebuild the {q.name} cell"
