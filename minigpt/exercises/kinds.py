"""The two kinds of question a function cannot fake, and the data their experiments read.

- ``MultipleChoice``: a conceptual question; the answer is one letter, and every
  option carries an explanation that the check shows for the letter chosen;
- ``Experiment``: the learner runs something and reports the number (or a small dict
  of numbers) it gave; the check recomputes it, seeded, and accepts it within a
  stated tolerance. Its settings differ from the ones the lesson prints, and the
  numbers a wrong setting gives (the lesson's, the training loss instead of the
  validation loss, ...) are named when a learner reports one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from minigpt.exercises.answers import number
from minigpt.exercises.question import (
    Incorrect,
    NotAttempted,
    Question,
    describe,
    safe_text,
    type_name,
)

__all__ = ["Experiment", "MultipleChoice", "Option", "shakespeare"]


# ---------------------------------------------------------------- conceptual questions


@dataclass(frozen=True)
class Option:
    """One option of a multiple-choice question, and why it is right or wrong.

    ``why`` is shown to a learner who picks this option. For a wrong option it says
    what is wrong with it and never names the right letter.
    """

    text: str
    why: str


class MultipleChoice(Question):
    """A conceptual question: ``q.check("b")`` with one letter.

    Subclasses set ``name``, ``_hint``, ``question`` (the text the notebook shows),
    ``options`` (lettered a, b, c, ... in order) and ``answer`` (the right letter).
    The check shows the chosen option's explanation: why it is right, or why it is
    wrong without giving the right letter away. A blank or an empty string is not
    attempted; several letters at once (a list, a tuple, ``"ab"``) are refused, so
    guessing every option is never rewarded.
    """

    question: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    answer: ClassVar[str] = ""

    def __init__(self) -> None:
        letters = self.letters
        if len(letters) < 2 or self.answer not in letters:
            raise ValueError(
                f"{type(self).__name__}: answer {self.answer!r} must be one of the letters "
                f"{', '.join(letters)} of its {len(letters)} options (at least 2)"
            )
        if not self.question or not all(o.text and o.why for o in self.options):
            raise ValueError(f"{type(self).__name__}: give the question and every option's why")

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple("abcdefgh"[: len(self.options)])

    def _choose(self) -> str:
        return f"answer with one of {', '.join(self.letters)}"

    def markdown(self) -> str:
        """The question and its lettered options, as the notebook shows them."""
        lines = [self.question.strip(), ""]
        lines += [f"- **({k})** {o.text}" for k, o in zip(self.letters, self.options)]
        return "\n".join(lines)

    def _check(self, answer: Any) -> str:
        if isinstance(answer, (list, tuple, set, frozenset, dict)):
            raise Incorrect(f"give one letter, not several: {self._choose()}")
        if not isinstance(answer, str):
            raise Incorrect(
                f'expected one letter such as "a", got {type_name(answer)}: {self._choose()}'
            )
        letter = str.strip(answer).lower()
        if not letter:
            raise NotAttempted(f"write your letter between the quotes: {self._choose()}")
        if letter not in self.letters:
            raise Incorrect(self._choose() + (" (one letter only)" if len(letter) > 1 else ""))
        option = self.options[self.letters.index(letter)]
        if letter != self.answer:
            raise Incorrect(f"({letter}) {option.why}")
        return f"({letter}) {option.why}"

    def reference(self) -> str:
        return self.answer

    def wrong_answers(self) -> list[Any]:
        others: list[Any] = [k for k in self.letters if k != self.answer]
        return [*others, list(self.letters), tuple(self.letters), "".join(self.letters), "z"]

    def solution(self) -> None:
        option = self.options[self.letters.index(self.answer)]
        print(f"Solution ({self.name}): ({self.answer}) {option.text}\n{option.why}")


# ---------------------------------------------------------------- experiments


def shakespeare() -> tuple[str, str]:
    """Tiny Shakespeare split as the lessons split it: (first 90%, last 10%).

    Read once through ``minigpt.data`` (``$MINIGPT_DATA_DIR`` or the cache).
    """
    cached = _SHAKESPEARE.get("split")
    if cached is None:
        from minigpt import data

        text = data.load_text("tinyshakespeare")
        n = int(0.9 * len(text))
        cached = _SHAKESPEARE["split"] = (text[:n], text[n:])
    return cached


_SHAKESPEARE: dict[str, tuple[str, str]] = {}


def _fmt(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:.4g}"


class Experiment(Question):
    """An experiment: the learner runs something and reports the number it gave.

    Subclasses set ``name``, ``_hint``, ``_solution``, ``question`` (the text the
    notebook shows, settings and tolerance included) and write ``measure()``, which
    runs the experiment (seeded, a few seconds at most) and returns the number, or a
    dict of numbers when ``keys`` names them. The check runs ``measure()`` once (the
    result is kept) inside ``torch.random.fork_rng``, so the learner's random state is
    left as it was, and accepts each number within ``atol`` + ``rtol`` * |truth|.

    ``decoys()`` names the numbers that a wrong setting gives (the lesson's printed
    number for its own setting, the training loss for the validation loss, ...), and
    ``trivial`` the answers that are no measurement at all (0, 1, the setting itself):
    a report of one of them is told what it is. A report off by more than the
    tolerance is told it is off, not by how much or in which direction.
    """

    question: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()  # () = one number
    atol: ClassVar[float] = 0.0
    rtol: ClassVar[float] = 0.0
    integer: ClassVar[bool] = False
    trivial: ClassVar[tuple[float, ...]] = (0.0, 1.0)

    def measure(self) -> float | dict[str, float]:
        """Run the experiment; the number, or ``{key: number}`` for every key. By default
        the ``keys`` of ``record()``, for an experiment that defines ``run_experiment``."""
        return {k: self.record()[k] for k in self.keys}

    def run_experiment(self) -> dict[str, float]:  # pragma: no cover - overridden
        """One run that measures every figure at once (the ``keys`` and what the decoys need)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines neither measure nor run_experiment"
        )

    def record(self) -> dict[str, float]:
        """``run_experiment()``'s figures, computed on the first call and kept."""
        cached = self.__dict__.get("_record")
        if cached is None:
            cached = self.__dict__["_record"] = self.run_experiment()
        return cached

    def decoys(self) -> dict[str, float | dict[str, float]]:
        """What a wrong setting gives: ``{"what it is": number or {key: number}}``."""
        return {}

    @property
    def tolerance(self) -> str:
        """The stated tolerance, in words."""
        if self.integer and not self.atol and not self.rtol:
            return "exactly"
        parts = [f"±{_fmt(self.atol)}"] if self.atol else []
        parts += [f"±{self.rtol:.0%}"] if self.rtol else []
        return " or ".join(parts)

    def truth(self) -> dict[str, float]:
        """The measured numbers by key ("" for a single number), computed once."""
        cached = self.__dict__.get("_truth")
        if cached is None:
            import torch

            with torch.random.fork_rng(devices=[]):
                got = self.measure()
            cached = dict(got) if self.keys else {"": got}
            if sorted(cached) != sorted(self.keys or ("",)):
                raise RuntimeError(f"{self.name}.measure() must return the keys {self.keys}")
            self.__dict__["_truth"] = cached
        return cached

    def _within(self, got: float, want: float) -> bool:
        return abs(got - want) <= self.atol + self.rtol * abs(want) + 1e-12

    def _read(self, answer: Any) -> dict[str, float]:
        if not self.keys:
            return {"": number(answer, "your number", integer=self.integer)}
        shape = "{" + ", ".join(f"{k!r}: ..." for k in self.keys) + "}"
        if not isinstance(answer, dict):
            raise Incorrect(f"expected a dict {shape}, got {type_name(answer)}")
        names = [k for k in answer if isinstance(k, str)]
        missing = [k for k in self.keys if k not in names]
        extra = [safe_text(k) for k in answer if k not in self.keys]
        if missing or extra:
            raise Incorrect(
                f"expected the keys {', '.join(map(repr, self.keys))}"
                + (f"; missing {', '.join(map(repr, missing))}" if missing else "")
                + (f"; unexpected {', '.join(extra)}" if extra else "")
            )
        return {k: number(answer[k], f"{k!r}", integer=self.integer) for k in self.keys}

    def _check(self, answer: Any) -> str:
        got = self._read(answer)
        try:
            truth = self.truth()
        except Exception as e:  # no data offline, say: the check cannot judge
            raise Incorrect(
                f"the check could not run the experiment itself: {describe(e)}"
            ) from None
        for key, want in truth.items():
            value = got[key]
            label = f"{key!r}: " if key else ""
            if self._within(value, want):
                continue
            for what, decoy in self.decoys().items():
                d = decoy.get(key) if isinstance(decoy, dict) else decoy
                if d is not None and self._within(value, d):
                    raise Incorrect(f"{label}{_fmt(value)} is {what}; {self._ask()}")
            if any(self._within(value, t) for t in self.trivial):
                raise Incorrect(f"{label}{_fmt(value)} is not a measurement; {self._ask()}")
            raise Incorrect(
                f"{label}{_fmt(value)} is not within {self.tolerance} of what the experiment "
                "gives: check each setting of the question and rerun it"
            )
        return "the check's own run agrees with yours " + self.tolerance.replace("±", "to ±")

    def _ask(self) -> str:
        return "run the experiment with the question's settings and report what it prints"

    def reference(self) -> Any:
        truth = self.truth()
        return dict(truth) if self.keys else truth[""]

    def wrong_answers(self) -> list[Any]:
        """Off by twice the tolerance (each way), every decoy, every trivial answer."""
        truth = self.truth()
        step = {k: 2 * (self.atol + self.rtol * abs(v)) or 1 for k, v in truth.items()}
        rounding = round if self.integer else float

        def answer(values: dict[str, float]) -> Any:
            return dict(values) if self.keys else values[""]

        out = [
            answer({**truth, k: rounding(truth[k] + sign * step[k])})
            for k in truth
            for sign in (1, -1)
        ]
        for decoy in self.decoys().values():
            d = decoy if isinstance(decoy, dict) else {"": decoy}
            out.append(answer({**truth, **{k: v for k, v in d.items() if k in truth}}))
        out += [answer({**truth, k: rounding(t)}) for k in truth for t in self.trivial]
        return out
