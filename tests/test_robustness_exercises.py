"""Exercise checks survive whatever the learner's code does.

A fuzz runs every question of every chapter against a battery of garbage answers
(code that calls sys.exit, raises odd exceptions, returns NaN or the wrong type,
changes its inputs in place, non-callables, ...): ``check()`` must never raise and
never say Correct. Regression tests pin the holes the fuzz found, and
KeyboardInterrupt must still stop a check.

    python -m tests.test_robustness_exercises   # how many garbage calls raised, passed
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping

import pytest
import torch
from torch import nn

from minigpt.exercises import Question
from tests.test_exercises import ALL

IDS = [f"{c}-{q.name}" for c, q in ALL]

# ---------------------------------------------------------------- hostile objects


class OddBaseException(BaseException):
    """Not an Exception: a bare ``except Exception`` lets it through."""


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("__str__ is broken")

    def __repr__(self):
        raise RuntimeError("__repr__ is broken")


class ExitingStr(Exception):
    def __str__(self):
        sys.exit("__str__ exits")

    __repr__ = __str__


class Hostile:
    """Every dunder a check might touch raises."""

    def _boom(self, *args, **kwargs):
        raise RuntimeError("hostile object")

    __eq__ = __ne__ = __lt__ = __gt__ = __bool__ = __len__ = __iter__ = _boom
    __getitem__ = __float__ = __int__ = __index__ = __str__ = __repr__ = __format__ = _boom
    __hash__ = None


class ExitingHostile(Hostile):
    def _boom(self, *args, **kwargs):
        sys.exit("hostile object exits")

    __eq__ = __ne__ = __bool__ = __len__ = __iter__ = __getitem__ = _boom
    __float__ = __int__ = __index__ = __str__ = __repr__ = __format__ = _boom


class AlwaysEqual:
    """Says it equals anything: a check comparing with == would call it Correct."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = object.__hash__

    def __repr__(self):
        return "AlwaysEqual()"


# ---------------------------------------------------------------- garbage functions


def _sys_exit(*args, **kwargs):
    sys.exit(1)


def _exit_zero(*args, **kwargs):
    raise SystemExit(0)


def _odd_base(*args, **kwargs):
    raise OddBaseException("odd")


def _generator_exit(*args, **kwargs):
    raise GeneratorExit


def _bad_str(*args, **kwargs):
    raise BadStr


def _exiting_str(*args, **kwargs):
    raise ExitingStr


def _recurses(*args, **kwargs):
    return _recurses(*args, **kwargs)


def _generator(*args, **kwargs):
    yield 1


def _returns(value) -> Callable:
    def fn(*args, **kwargs):
        return value() if callable(value) else value

    return fn


def _poison(out, value=float("nan")):
    """The reference's result with one number replaced by NaN (or inf)."""
    if isinstance(out, torch.Tensor):
        out = out.detach().clone() if out.is_floating_point() else out.double()
        if out.numel():
            out.view(-1)[0] = value
        return out
    if isinstance(out, (list, tuple)) and out:
        return type(out)([_poison(out[0], value), *out[1:]])
    if isinstance(out, Mapping) and out:
        k = next(iter(out))
        return {**out, k: value}
    return value


def _zero_in_place(args, kwargs) -> bool:
    """Wreck every tensor, module, list and dict the check handed over; False if none."""
    wrecked = False

    def zero(t: torch.Tensor) -> None:
        nonlocal wrecked
        if t.dtype != torch.bool and t.numel() and bool(t.detach().ne(0).any()):
            t.detach().zero_()
            wrecked = True

    for a in (*args, *kwargs.values()):
        if isinstance(a, nn.Module):
            for p in a.parameters():
                zero(p)
        elif isinstance(a, torch.Tensor):
            zero(a)
        elif isinstance(a, list) and a and all(isinstance(t, torch.Tensor) for t in a):
            for t in a:
                zero(t)
        elif isinstance(a, (list, dict)) and a:
            a.clear()
            wrecked = True
    return wrecked


def _battery(q: Question) -> list[tuple[str, object]]:
    """(label, garbage answer) pairs for one question."""
    import math as a_module

    garbage: list[tuple[str, object]] = [
        ("42", 42),
        ("'x'", "x"),
        ("a module", a_module),
        ("bytes", b"\x00"),
        ("an empty list", []),
        ("an object", object()),
        ("True", True),
        ("NaN", float("nan")),
        ("inf", float("inf")),
        ("a NaN tensor", torch.tensor(float("nan"))),
        ("a generator object", (i for i in range(3))),
        ("a hostile object", Hostile()),
        ("an exiting object", ExitingHostile()),
        ("an always-equal object", AlwaysEqual()),
        ("sys.exit", _sys_exit),
        ("SystemExit(0)", _exit_zero),
        ("a BaseException", _odd_base),
        ("GeneratorExit", _generator_exit),
        ("an exception whose str raises", _bad_str),
        ("an exception whose str exits", _exiting_str),
        ("infinite recursion", _recurses),
        ("a generator function", _generator),
        ("no arguments", lambda: 1),
        ("too many arguments", lambda a, b, c, d, e, f, g, h, i, j, k: 1),
        ("keyword-only", lambda *, x: 1),
        ("returns NaN", _returns(float("nan"))),
        ("returns inf", _returns(float("inf"))),
        ("returns a NaN tensor", _returns(lambda: torch.full((2, 3), float("nan")))),
        ("returns a string", _returns("x")),
        ("returns a tuple", _returns((1, 2, 3))),
        ("returns a module", _returns(a_module)),
        ("returns an object", _returns(object())),
        ("returns a huge list", _returns(lambda: list(range(10**6)))),
        ("returns a huge string", _returns(lambda: "x" * 10**6)),
        ("returns a hostile object", _returns(Hostile)),
        ("returns an exiting object", _returns(ExitingHostile)),
        ("returns an always-equal object", _returns(AlwaysEqual)),
        ("returns a list of always-equal objects", _returns(lambda: [AlwaysEqual()] * 8)),
    ]
    ref = q.reference()
    if callable(ref):
        # with nothing mutable to wreck (only ints and strings) they answer NaN instead
        def zero_then_reference(*args, **kwargs):
            if not _zero_in_place(args, kwargs):
                return float("nan")
            return ref(*args, **kwargs)

        def reference_then_zero(*args, **kwargs):
            out = ref(*args, **kwargs)
            return out if _zero_in_place(args, kwargs) else float("nan")

        garbage += [
            ("zeroes its inputs, then answers", zero_then_reference),
            ("answers, then zeroes its inputs", reference_then_zero),
            ("the answer with a NaN in it", lambda *a, **k: _poison(ref(*a, **k))),
            ("the answer with an inf in it", lambda *a, **k: _poison(ref(*a, **k), math.inf)),
        ]
    return garbage


def fuzz() -> tuple[int, list[str], list[str], list[str]]:
    """Run every garbage answer on every question.

    Returns (calls, what raised, what was called Correct, what got an odd message).
    """
    calls, raised, passed, odd = 0, [], [], []
    for chapter, q in ALL:
        for label, answer in _battery(q):
            calls += 1
            where = f"{chapter}.{q.name} <- {label}"
            try:
                result = q.check(answer)
                repr(result), result._repr_html_()
            except BaseException as e:  # counting what escapes is the point
                if isinstance(e, KeyboardInterrupt):
                    raise
                raised.append(f"{where}: {type(e).__name__}")
                continue
            if result.status == "correct":
                passed.append(where)
            elif type(result.message) is not str or not 0 < len(result.message) <= 1000:
                odd.append(where)
    return calls, raised, passed, odd


def test_fuzz_never_raises_and_never_says_correct():
    calls, raised, passed, odd = fuzz()
    assert calls > 1000
    assert raised == [], f"{len(raised)} of {calls} garbage calls raised out of check()"
    assert passed == [], f"{len(passed)} of {calls} garbage answers were called Correct"
    assert odd == [], "every verdict says what is wrong, in a plain str of at most 1000 chars"


# ---------------------------------------------------------------- regressions


def test_ch01_q6_nan_is_not_correct():
    from minigpt.exercises import ch01

    result = ch01.q6.check(lambda tok, text: float("nan"))
    assert result.status == "incorrect" and "NaN" in result.message, result


@pytest.mark.parametrize("name", ["q1", "q5"])
def test_ch04_norms_that_zero_their_weights_in_place_are_incorrect(name):
    from minigpt.exercises import ch04

    def zeroes_weights(x, weight, *rest):
        weight.zero_()
        if rest and isinstance(rest[0], torch.Tensor):
            rest[0].zero_()  # the bias, for layer_norm
        return torch.zeros_like(x)

    result = getattr(ch04, name).check(zeroes_weights)
    assert result.status == "incorrect" and "in place" in result.message, result


def test_tie_weights_must_not_change_the_weights():
    from minigpt.exercises import ch04

    def ties_zeroed(model):
        with torch.no_grad():
            model.wte.weight.zero_()
        model.lm_head.weight = model.wte.weight
        return model

    result = ch04.q4.check(ties_zeroed)
    assert result.status == "incorrect", result


@pytest.mark.parametrize(("chapter", "q"), ALL, ids=IDS)
def test_system_exit_is_reported_not_raised(chapter, q):
    result = q.check(_sys_exit)
    assert result.status == "incorrect", result
    if callable(q.reference()):
        assert "SystemExit" in result.message, result


def test_exception_whose_str_raises_is_named():
    from minigpt.exercises import ch03

    result = ch03.q1.check(_bad_str)
    assert result.status == "incorrect" and "BadStr" in result.message, result


def test_wrong_arity_says_how_the_check_calls_it():
    from minigpt.exercises import ch03

    result = ch03.q1.check(lambda: 1)
    assert result.status == "incorrect" and "argument" in result.message, result


@pytest.mark.parametrize(("chapter", "q"), ALL, ids=IDS)
def test_keyboard_interrupt_still_stops_a_check(chapter, q):
    if not callable(q.reference()):
        pytest.skip("a value question runs no learner code")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        q.check(interrupted)


if __name__ == "__main__":
    n, raised, passed, _ = fuzz()
    print(f"{n} garbage calls: {len(raised)} raised out of check(), {len(passed)} said Correct")
    for line in raised + [f"{p}: Correct" for p in passed]:
        print("  " + line)
