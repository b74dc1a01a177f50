"""The machinery behind self-checking exercises.

An exercise is a ``Question``: ``q.check(answer)`` reports one of three outcomes
and never raises into the learner's notebook:

- ``correct``,
- ``not attempted`` (the answer is still the blank: ``None``, ``...``, or a function
  that raises ``NotImplementedError`` or returns ``None``),
- ``incorrect: <what is wrong>`` (including when the learner's own code raises).

``q.hint()`` and ``q.solution()`` print help. Each chapter module (``ch00``, ...)
defines its questions by subclassing ``Question`` and writing ``_check``, which
raises ``Incorrect("...")`` (or fails an ``assert``) when the answer is wrong.
``reference()`` returns a correct answer and ``wrong_answers()`` plausible wrong
ones, so that tests can prove every check passes the right answer and rejects
wrong ones (a check that cannot fail is a defect).
"""

from __future__ import annotations

import html
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Blank", "CheckResult", "Incorrect", "NotAttempted", "Question", "blank"]


class Incorrect(Exception):
    """Raised by a checker to say what is wrong with an answer."""


class NotAttempted(Exception):
    """Raised (or detected) when the answer is still the exercise's blank."""


class Blank:
    """The placeholder exercises start from: ``answer = blank``."""

    def __repr__(self) -> str:
        return "blank"


blank = Blank()

_STYLE = {
    "correct": ("#1a7f37", "Correct"),
    "not_attempted": ("#9a6700", "Not attempted yet"),
    "incorrect": ("#cf222e", "Incorrect"),
}


@dataclass(frozen=True)
class CheckResult:
    """What a check found. Truthy only when the answer is correct."""

    question: str
    status: str  # "correct" | "not_attempted" | "incorrect"
    message: str = ""

    def __bool__(self) -> bool:
        return self.status == "correct"

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    def _text(self) -> str:
        label = _STYLE[self.status][1]
        return f"{self.question}: {label}" + (f": {self.message}" if self.message else "")

    def __repr__(self) -> str:
        return self._text()

    def _repr_html_(self) -> str:
        color, label = _STYLE[self.status]
        msg = f": {html.escape(self.message)}" if self.message else ""
        return (
            f'<span style="color:{color};font-weight:bold">{html.escape(self.question)}: '
            f"{label}</span>{msg}"
        )


def _is_blank(answer: Any) -> bool:
    return answer is None or answer is Ellipsis or isinstance(answer, Blank)


def _describe(e: BaseException) -> str:
    """One line naming an exception from learner code and where it happened."""
    frames = traceback.extract_tb(e.__traceback__)
    where = ""
    # the innermost frame that is not inside this package is the learner's line
    for frame in reversed(frames):
        if "minigpt/exercises" not in frame.filename.replace("\\", "/"):
            where = f" (line {frame.lineno}: {frame.line.strip()})" if frame.line else ""
            break
    return f"{type(e).__name__}: {e}{where}"


class Question:
    """One exercise. Subclasses set ``name``, ``_hint``, ``_solution`` and ``_check``."""

    name: ClassVar[str] = "Question"
    _hint: ClassVar[str] = ""
    _solution: ClassVar[str] = ""

    def reference(self) -> Any:
        """A correct answer (used by the tests)."""
        raise NotImplementedError

    def wrong_answers(self) -> Sequence[Any]:
        """Plausible wrong answers that the check must reject (used by the tests)."""
        raise NotImplementedError

    def _check(self, answer: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def check(self, answer: Any = blank) -> CheckResult:
        """Check ``answer``; print-friendly result, never raises."""
        if _is_blank(answer):
            return CheckResult(self.name, "not_attempted", "replace the blank with your answer")
        try:
            self._check(answer)
        except NotAttempted as e:
            return CheckResult(self.name, "not_attempted", str(e) or "fill in the function")
        except NotImplementedError:
            return CheckResult(self.name, "not_attempted", "fill in the function body")
        except Incorrect as e:
            return CheckResult(self.name, "incorrect", str(e))
        except AssertionError as e:
            return CheckResult(self.name, "incorrect", str(e) or "the answer is not right")
        except Exception as e:  # the learner's code raised: report it, don't crash
            return CheckResult(self.name, "incorrect", f"your code raised {_describe(e)}")
        return CheckResult(self.name, "correct")

    def hint(self) -> None:
        """Print a hint."""
        print(f"Hint ({self.name}): {self._hint.strip()}")

    def solution(self) -> None:
        """Print a worked solution."""
        print(f"Solution ({self.name}):\n{self._solution.strip()}")

    def __repr__(self) -> str:
        return f"<exercise {self.name}: .check(answer), .hint(), .solution()>"


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function; a ``None`` result means it is still a blank."""
    if not callable(fn):
        raise Incorrect(f"expected a function, got {type(fn).__name__}")
    out = fn(*args, **kwargs)
    if out is None:
        raise NotAttempted("your function returned None: fill in its body and return the result")
    return out


def close(a: Any, b: Any, *, atol: float = 1e-5, rtol: float = 1e-4, what: str = "result") -> None:
    """Assert two tensors (or array-likes) match in shape and value, with a clear message."""
    import torch

    ta = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    tb = b if isinstance(b, torch.Tensor) else torch.as_tensor(b)
    if tuple(ta.shape) != tuple(tb.shape):
        raise Incorrect(f"{what} has shape {tuple(ta.shape)}, expected {tuple(tb.shape)}")
    ta, tb = ta.detach().double(), tb.detach().double()
    if not torch.allclose(ta, tb, atol=atol, rtol=rtol, equal_nan=False):
        worst = (ta - tb).abs().max().item()
        raise Incorrect(
            f"{what} values differ from the expected ones (largest difference {worst:.3g})"
        )
