"""What a check does with the learner's answer: call the learner's function safely, and
read what it returned (a number, a list of ids, a tensor) or compare it with the expected
result, with a message that says what is wrong."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from minigpt.exercises.question import (
    Incorrect,
    LearnerError,
    NotAttempted,
    safe_text,
    type_name,
)

__all__ = ["call", "call_modifying", "close", "ints", "number", "tensor"]


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
        raise Incorrect(f"expected a function, got {type_name(fn)}")
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
            + f": {safe_text(e)}"
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
            f"{what}: expected {'an integer' if integer else 'a number'}, got {type_name(x)}"
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
        raise Incorrect(f"{what}: expected a list of ints, got {type_name(x)}")
    return [number(i, f"{what}[{n}]", integer=True) for n, i in enumerate(x)]


def tensor(x: Any, what: str = "result") -> Any:
    """The learner's result if it is a tensor, else ``Incorrect`` naming what it is."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise Incorrect(f"{what}: expected a tensor, got {type_name(x)}")
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
            raise Incorrect(f"{what}: expected a tensor, got {type_name(a)}") from None
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
