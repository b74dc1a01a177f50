"""The machinery behind self-checking exercises.

An exercise is a ``Question``: ``q.check(answer)`` reports one of three outcomes
and never raises into the learner's notebook:

- ``correct``,
- ``not attempted`` (the answer is still the blank: ``None``, ``...``, or a function
  that raises ``NotImplementedError`` or returns ``None``),
- ``incorrect: <what is wrong>`` (including when the learner's own code raises).

``q.hint()`` and ``q.solution()`` print help. Each chapter module (``ch00``, ...)
defines its questions by subclassing ``Question`` and writing ``_check``, which
raises ``Incorrect("...")`` (or fails an ``assert``) when the answer is wrong
(and may return a note that a correct verdict shows).

Most questions ask for a function that matches a reference. Two other kinds ask
for something a function cannot fake:

- ``MultipleChoice``: a conceptual question; the answer is one letter, and every
  option carries an explanation that the check shows for the letter chosen;
- ``Experiment``: the learner runs something and reports the number (or a small dict
  of numbers) it gave; the check recomputes it, seeded, and accepts it within a
  stated tolerance. Its settings differ from the ones the lesson prints, and the
  numbers a wrong setting gives (the lesson's, the training loss instead of the
  validation loss, ...) are named when a learner reports one of them.
``reference()`` returns a correct answer and ``wrong_answers()`` plausible wrong
ones, so that tests can prove every check passes the right answer and rejects
wrong ones (a check that cannot fail is a defect).

When the text forbids a shortcut ("don't call F.layer_norm", "using only those four
parts"), the question lists it as a ``Shortcut`` and runs the learner's code inside
``forbid(...)`` (``minigpt.exercises.shortcuts``), which watches what the code calls and says "incorrect: F.layer_norm
is not allowed here: <what to do instead>" when the shortcut was taken.
"""

from __future__ import annotations

import html
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from minigpt.exercises.shortcuts import Shortcut

__all__ = [
    "Blank",
    "CheckResult",
    "Experiment",
    "Incorrect",
    "LearnerError",
    "MultipleChoice",
    "NotAttempted",
    "Option",
    "Question",
    "blank",
    "call",
    "call_modifying",
    "close",
    "ints",
    "number",
    "shakespeare",
    "tensor",
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
        super().__init__(_type_name(error))
        self.error = error


_MAX_MESSAGE = 600  # characters: a huge answer must not flood the notebook


def _shorten(text: str, limit: int = _MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 5] + " ..."


def _type_name(x: Any) -> str:
    try:
        return str.__str__(type(x).__name__)
    except Exception:
        return "object"


def _safe_text(x: Any) -> str:
    """``str(x)``, or its repr, or its type: learner objects may break all of those."""
    for render in (str, repr):
        try:
            return str.__str__(render(x))  # a plain str, even from a str subclass
        except KeyboardInterrupt:
            raise
        except BaseException:  # str() of learner objects may do anything
            continue
    return f"<{_type_name(x)} object>"


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


def _describe(e: BaseException, where: str = "") -> str:
    """One line naming an exception: its type, its message, and where it happened."""
    text = _safe_text(e)
    return f"{_type_name(e)}" + (f": {text}" if text else "") + where


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
            status, message = "incorrect", f"checking your answer raised {_describe(e)}"
        return CheckResult(self.name, status, _shorten(_safe_text(message)))

    def _outcome(self, answer: Any) -> tuple[str, str]:
        if _is_blank(answer):
            return "not_attempted", "replace the blank with your answer"
        try:
            note = self._check(answer)
        except KeyboardInterrupt:
            raise
        except NotAttempted as e:
            return "not_attempted", _safe_text(e) or "fill in the function"
        except Incorrect as e:
            return "incorrect", _safe_text(e)
        except AssertionError as e:
            return "incorrect", _safe_text(e) or "the answer is not right"
        except LearnerError as e:
            if isinstance(e.error, NotImplementedError):
                return "not_attempted", "fill in the function body"
            return "incorrect", f"your code raised {_describe(e.error, _learner_line(e.error))}"
        except BaseException as e:  # the answer broke the checker: say so
            return (
                "incorrect",
                f"checking your answer raised {_describe(e)}: look at what your answer is "
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


# ---------------------------------------------------------------- calling the learner's code


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function on copies of the inputs and return its result.

    The function gets deep copies (tensors, modules, lists, ...), so that the
    checker's own inputs stay intact for computing the expected answer, and the
    copies are compared with the originals afterwards: changing an input in place
    is reported as incorrect. A ``None`` result means the function is still a blank.
    """
    return _call(fn, args, kwargs, copy_inputs=True)


def call_modifying(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Like ``call``, for the exercises whose job is to change their input (tie weights)."""
    return _call(fn, args, kwargs, copy_inputs=False)


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict, *, copy_inputs: bool) -> Any:
    import copy
    import inspect

    if not callable(fn):
        raise Incorrect(f"expected a function, got {_type_name(fn)}")
    names = _bind(fn, args, kwargs)
    given_args, given_kwargs = copy.deepcopy((args, kwargs)) if copy_inputs else (args, kwargs)
    try:
        out = fn(*given_args, **given_kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit too: the check reports it
        raise LearnerError(e) from None
    if copy_inputs:
        for i, (orig, given) in enumerate(zip(args, given_args)):
            if not _same(orig, given):
                _changed_in_place(repr(names[i]) if i < len(names) else f"number {i + 1}")
        for k, orig in kwargs.items():
            if not _same(orig, given_kwargs[k]):
                _changed_in_place(repr(k))
    if out is None:
        raise NotAttempted("your function returned None: fill in its body and return the result")
    if inspect.isgenerator(out) or inspect.iscoroutine(out):
        raise Incorrect(
            "your function returned a generator or coroutine (it uses yield or async): "
            "return the result itself"
        )
    return out


def _bind(fn: Callable[..., Any], args: tuple, kwargs: dict) -> list[str]:
    """The names the learner gave the positional arguments; Incorrect if they do not fit."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except Exception:  # builtins and odd callables: just call them
        return []
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        n = len(args) + len(kwargs)
        raise Incorrect(
            f"your function cannot take the {n} argument{'s' * (n != 1)} the check passes"
            + (f" (keywords {', '.join(kwargs)})" if kwargs else "")
            + f": {_safe_text(e)}"
        ) from None
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _changed_in_place(name: str) -> None:
    raise Incorrect(
        f"your function changed its input {name} in place: leave the inputs as they are "
        "and build a new result (y = x * 2, not x *= 2 or x.mul_(2))"
    )


def _same(orig: Any, given: Any) -> bool:
    """Whether the copy handed to the learner still equals the checker's original.

    Data is compared (tensors, modules' weights, containers, numbers, strings);
    tools such as a tokenizer are copied but not compared (they may keep caches).
    """
    import torch
    from torch import nn

    if isinstance(orig, torch.Tensor):
        if not isinstance(given, torch.Tensor):
            return False
        if orig.shape != given.shape or orig.dtype != given.dtype:
            return False
        a, b = orig.detach(), given.detach()
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return bool(torch.equal(a, b))
    if isinstance(orig, nn.Module):
        if not isinstance(given, nn.Module):
            return False
        sa, sb = orig.state_dict(), given.state_dict()
        return list(sa) == list(sb) and all(_same(sa[k], sb[k]) for k in sa)
    if isinstance(orig, (list, tuple)):
        return (
            type(given) is type(orig)
            and len(given) == len(orig)
            and all(_same(a, b) for a, b in zip(orig, given))
        )
    if isinstance(orig, dict):
        return (
            type(given) is type(orig)
            and len(given) == len(orig)
            and all(k in given and _same(v, given[k]) for k, v in orig.items())
        )
    if orig is None or isinstance(orig, (bool, int, float, complex, str, bytes, frozenset, set)):
        if type(given) is not type(orig):
            return False
        if isinstance(orig, float) and math.isnan(orig):
            return math.isnan(given)
        return bool(orig == given)
    return True


# ---------------------------------------------------------------- comparing the learner's results


def number(x: Any, what: str = "result", *, integer: bool = False) -> float | int:
    """The learner's result as a plain finite Python number, or ``Incorrect`` saying why not.

    Accepts ints, floats and one-element tensors (and numpy scalars); rejects bools,
    NaN and inf. With ``integer=True`` the value must be a whole number.
    """
    import numbers

    import torch

    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise Incorrect(f"{what}: expected one number, got a tensor of shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            raise Incorrect(f"{what}: expected a number, got a {x.dtype} tensor")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise Incorrect(
            f"{what}: expected {'an integer' if integer else 'a number'}, got {_type_name(x)}"
        )
    if integer and isinstance(x, numbers.Integral):
        return int(x)
    try:
        value = float(x)
    except OverflowError:
        raise Incorrect(f"{what} is too large to be right") from None
    if math.isnan(value):
        raise Incorrect(f"{what} is NaN (not a number): look for 0 / 0 or inf - inf")
    if math.isinf(value):
        raise Incorrect(f"{what} is {value}: look for a division by zero or an overflow")
    if integer:
        if not value.is_integer():
            raise Incorrect(f"{what}: expected an integer, got {value}")
        return int(value)
    return value


def ints(x: Any, what: str = "result") -> list[int]:
    """The learner's list (or tuple, or 1-D tensor) of whole numbers as plain ints.

    Comparing plain ints means a learner object cannot pass by claiming to equal anything.
    """
    import torch

    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise Incorrect(
                f"{what}: expected a list of ids, got a tensor of shape {tuple(x.shape)}"
            )
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        raise Incorrect(f"{what}: expected a list of ints, got {_type_name(x)}")
    return [number(i, f"{what}[{n}]", integer=True) for n, i in enumerate(x)]


def tensor(x: Any, what: str = "result") -> Any:
    """The learner's result if it is a tensor, else ``Incorrect`` naming what it is."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise Incorrect(f"{what}: expected a tensor, got {_type_name(x)}")
    return x


def close(a: Any, b: Any, *, atol: float = 1e-5, rtol: float = 1e-4, what: str = "result") -> None:
    """Assert the learner's ``a`` matches the expected ``b`` in shape and value.

    ``a`` may be a tensor or anything ``torch.as_tensor`` reads (a list of numbers).
    NaN never matches, and inf only matches the same inf in ``b`` (top-k's -inf).
    """
    import torch

    if isinstance(a, torch.Tensor):
        ta = a
    else:
        try:
            ta = torch.as_tensor(a)
        except KeyboardInterrupt:
            raise
        except Exception:
            raise Incorrect(f"{what}: expected a tensor, got {_type_name(a)}") from None
    tb = b if isinstance(b, torch.Tensor) else torch.as_tensor(b)
    if tuple(ta.shape) != tuple(tb.shape):
        raise Incorrect(f"{what} has shape {tuple(ta.shape)}, expected {tuple(tb.shape)}")
    if ta.is_complex() or ta.device.type == "meta":
        raise Incorrect(f"{what}: expected real numbers, got a {ta.dtype} tensor on {ta.device}")
    ta, tb = ta.detach().cpu().double(), tb.detach().cpu().double()
    if ta.isnan().any():
        raise Incorrect(
            f"{what} contains NaN (not a number): look for 0 / 0, inf - inf, or the log "
            "of a negative number"
        )
    if (ta.isinf() & ~tb.isinf()).any():
        raise Incorrect(f"{what} contains inf where a finite value was expected")
    if not torch.allclose(ta, tb, atol=atol, rtol=rtol, equal_nan=False):
        finite = tb.isfinite()
        worst = (ta - tb)[finite].abs().max().item() if finite.any() else float("inf")
        raise Incorrect(
            f"{what} values differ from the expected ones (largest difference {worst:.3g})"
        )


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
                f'expected one letter such as "a", got {_type_name(answer)}: {self._choose()}'
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

    def measure(self) -> float | dict[str, float]:  # pragma: no cover - overridden
        """Run the experiment; the number, or ``{key: number}`` for every key."""
        raise NotImplementedError

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
            raise Incorrect(f"expected a dict {shape}, got {_type_name(answer)}")
        names = [k for k in answer if isinstance(k, str)]
        missing = [k for k in self.keys if k not in names]
        extra = [_safe_text(k) for k in answer if k not in self.keys]
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
                f"the check could not run the experiment itself: {_describe(e)}"
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
