"""The question and its verdict: what every self-checking exercise is built on.

``Question.check(answer)`` reports one of three outcomes (a ``CheckResult``) and never
raises into the learner's notebook: correct, not attempted (the answer is still the
blank), or incorrect with what is wrong, including when the learner's own code raises.
A check says what is wrong by raising ``Incorrect`` (or failing an ``assert``).

``type_name``, ``safe_text`` and ``describe`` render learner objects and exceptions in a
message whatever those objects do; the other exercise modules use them too.
"""

from __future__ import annotations

import html
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from minigpt.exercises.shortcuts import Shortcut

__all__ = [
    "Blank",
    "CheckResult",
    "Incorrect",
    "LearnerError",
    "NotAttempted",
    "Question",
    "blank",
    "describe",
    "safe_text",
    "type_name",
]


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


class LearnerError(Exception):
    """The learner's function raised ``error`` (anything but KeyboardInterrupt).

    ``call`` wraps it so that ``check`` can tell the learner's bug from an answer
    the checker could not work with; a checker that expects an error (a function
    that must raise ``ValueError``) catches this and looks at ``error``.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(type_name(error))
        self.error = error


_MAX_MESSAGE = 600  # characters: a huge answer must not flood the notebook


def _shorten(text: str, limit: int = _MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 5] + " ..."


def type_name(x: Any) -> str:
    try:
        return str.__str__(type(x).__name__)
    except Exception:
        return "object"


def safe_text(x: Any) -> str:
    """``str(x)``, or its repr, or its type: learner objects may break all of those."""
    for render in (str, repr):
        try:
            return str.__str__(render(x))  # a plain str, even from a str subclass
        except KeyboardInterrupt:
            raise
        except BaseException:  # str() of learner objects may do anything
            continue
    return f"<{type_name(x)} object>"


def _library_dirs() -> tuple[str, ...]:
    """Folders whose frames are never the learner's line: this package, torch, the stdlib."""
    import sysconfig
    from pathlib import Path

    dirs = {str(Path(__file__).resolve().parents[1])}
    paths = sysconfig.get_paths()
    dirs.update(paths[k] for k in ("stdlib", "purelib", "platlib") if k in paths)
    return tuple(d.replace("\\", "/").rstrip("/") + "/" for d in dirs)


def _learner_line(e: BaseException) -> str:
    """' (line N: code)' for the innermost frame of the learner's own code, or ''."""
    try:
        frames = traceback.extract_tb(e.__traceback__)[1:]  # [0] is call() itself
        skip = _library_dirs()
        for frame in reversed(frames):
            if not frame.filename.replace("\\", "/").startswith(skip):
                return f" (line {frame.lineno}: {frame.line.strip()})" if frame.line else ""
    except Exception:
        pass
    return ""


def describe(e: BaseException, where: str = "") -> str:
    """One line naming an exception: its type, its message, and where it happened."""
    text = safe_text(e)
    return f"{type_name(e)}" + (f": {text}" if text else "") + where


class Question:
    """One exercise. Subclasses set ``name``, ``_hint``, ``_solution`` and ``_check``.

    ``shortcuts`` lists what the exercise's text forbids (``Shortcut``); ``_check``
    runs the learner's code inside ``forbid(*self.shortcuts)``.
    """

    name: ClassVar[str] = "Question"
    _hint: ClassVar[str] = ""
    _solution: ClassVar[str] = ""
    shortcuts: ClassVar[tuple[Shortcut, ...]] = ()

    def reference(self) -> Any:
        """A correct answer (used by the tests)."""
        raise NotImplementedError

    def wrong_answers(self) -> Sequence[Any]:
        """Plausible wrong answers that the check must reject (used by the tests)."""
        raise NotImplementedError

    def _check(self, answer: Any) -> str | None:  # pragma: no cover - overridden
        """Raise ``Incorrect`` (or ``NotAttempted``) unless ``answer`` is right.

        A returned string is a note shown with the Correct verdict (an explanation).
        """
        raise NotImplementedError

    def check(self, answer: Any = blank) -> CheckResult:
        """Check ``answer``; print-friendly result, never raises.

        Whatever the learner's code does (raise, ``sys.exit()``, return NaN or a
        hostile object) is reported, not raised. Only ``KeyboardInterrupt`` goes
        through, so that the learner can stop a long check.
        """
        try:
            status, message = self._outcome(answer)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # e.g. an exit while rendering the message
            status, message = "incorrect", f"checking your answer raised {describe(e)}"
        return CheckResult(self.name, status, _shorten(safe_text(message)))

    def _outcome(self, answer: Any) -> tuple[str, str]:
        if _is_blank(answer):
            return "not_attempted", "replace the blank with your answer"
        try:
            note = self._check(answer)
        except KeyboardInterrupt:
            raise
        except NotAttempted as e:
            return "not_attempted", safe_text(e) or "fill in the function"
        except Incorrect as e:
            return "incorrect", safe_text(e)
        except AssertionError as e:
            return "incorrect", safe_text(e) or "the answer is not right"
        except LearnerError as e:
            if isinstance(e.error, NotImplementedError):
                return "not_attempted", "fill in the function body"
            return "incorrect", f"your code raised {describe(e.error, _learner_line(e.error))}"
        except BaseException as e:  # the answer broke the checker: say so
            return (
                "incorrect",
                f"checking your answer raised {describe(e)}: look at what your answer is "
                "(its type, its shape)",
            )
        return "correct", note if isinstance(note, str) else ""

    def hint(self) -> None:
        """Print a hint."""
        print(f"Hint ({self.name}): {self._hint.strip()}")

    def solution(self) -> None:
        """Print a worked solution."""
        print(f"Solution ({self.name}):\n{self._solution.strip()}")

    def __repr__(self) -> str:
        return f"<exercise {self.name}: .check(answer), .hint(), .solution()>"
