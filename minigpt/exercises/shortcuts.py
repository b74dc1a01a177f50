"""Shortcuts an exercise forbids, and how a check spots them.

An exercise that says "don't call F.layer_norm" or "using only those four parts"
lists the forbidden thing as a ``Shortcut``; its check runs the learner's code
inside ``forbid(...)``, which watches what the code calls (a profile hook for
Python functions, a torch function mode for torch's) and raises ``Incorrect``
("F.layer_norm is not allowed here: <what to do instead>") when it was used.
Nothing is patched, so the learner's code runs exactly as it would anyway.
``BACKWARD_PASS`` in a shortcut's ``uses`` catches autograd by what it does rather than
by name: any backward pass that reads a tensor saved while the learner's code ran
(``loss.backward()``, ``torch.autograd.grad``, a ``grad_fn`` called by hand; a step
through nodes that save nothing, such as a sum, goes unseen, so name the functions too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from minigpt.exercises.question import Incorrect

__all__ = ["BACKWARD_PASS", "Shortcut", "forbid"]


class _BackwardPass:
    def __repr__(self) -> str:
        return "BACKWARD_PASS"


BACKWARD_PASS = (
    _BackwardPass()
)  # a ``uses`` entry: any autograd backward pass over the code's graph


@dataclass(frozen=True, eq=False)
class Shortcut:
    """Something an exercise's text forbids ("don't call F.layer_norm"), and how to spot it.

    ``uses`` lists what gives the shortcut away when the learner's code runs it:

    - a Python function or method: its code object, so any alias counts
      (``from torch.nn.functional import layer_norm``, ``block.forward``, ``block(x)``);
    - a class: every method it defines; a module: any code in its file; a package:
      any code in its folder;
    - a string: the name of a torch function, which matches it wherever it lives
      (``"layer_norm"`` is ``F.layer_norm``, ``torch.layer_norm``, ``torch.ops.aten.layer_norm``;
      ``"__getitem__"`` is indexing a tensor). ``when(args, kwargs)``, if given, says which
      of those calls count (indexing one tensor, not every tensor);
    - ``BACKWARD_PASS``: autograd reading a tensor saved for backward while the code
      ran, however the backward pass was started (seen through
      ``torch.autograd.graph.saved_tensors_hooks``; ``torch.func`` refuses to run
      under those hooks, so name its functions too).

    What is seen is code that runs: reading a module's constant, or a call that
    ``functools.cache`` answers without running the function, goes unseen.
    The message reads "<name> is not allowed here: <instead>".
    """

    name: str
    instead: str
    uses: tuple[Any, ...]
    when: Callable[[tuple, dict], bool] | None = None

    @property
    def message(self) -> str:
        return f"{self.name} is not allowed here: {self.instead}"


class _Spotter:
    """What ``forbid`` watches for: code objects, files, folders and torch function names."""

    def __init__(self, shortcuts: Sequence[Shortcut]) -> None:
        import inspect
        import os
        import types

        self.codes: dict[Any, Shortcut] = {}
        self.files: dict[str, Shortcut] = {}
        self.folders: list[tuple[str, Shortcut]] = []
        self.names: dict[str, list[Shortcut]] = {}
        self.backward: Shortcut | None = None
        self.used: list[Shortcut] = []

        def add_function(f: Any, s: Shortcut) -> None:
            f = getattr(f, "__func__", f)  # bound methods, classmethods, staticmethods
            for g in (f, inspect.unwrap(f)):  # a decorator's wrapper and what it wraps
                code = getattr(g, "__code__", None)
                if code is None:
                    raise TypeError(f"{s.name}: cannot spot {g!r}; name a torch function by str")
                self.codes[code] = s

        for s in shortcuts:
            for use in s.uses:
                if use is BACKWARD_PASS:
                    self.backward = s
                elif isinstance(use, str):
                    self.names.setdefault(use, []).append(s)
                elif isinstance(use, types.ModuleType) and hasattr(use, "__path__"):
                    self.folders += [(os.path.join(p, ""), s) for p in use.__path__]
                elif isinstance(use, types.ModuleType):
                    self.files[use.__file__] = s
                elif isinstance(use, type):
                    for member in vars(use).values():
                        member = member.fget if isinstance(member, property) else member
                        if inspect.isfunction(getattr(member, "__func__", member)):
                            add_function(member, s)
                else:
                    add_function(use, s)

    def note(self, s: Shortcut) -> None:
        if s not in self.used:
            self.used.append(s)

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        """``sys.setprofile`` hook: a Python frame starts running one of the watched codes."""
        if event != "call":
            return
        code = frame.f_code
        s = self.codes.get(code) or self.files.get(code.co_filename)
        if s is None and self.folders:
            s = next((s for d, s in self.folders if code.co_filename.startswith(d)), None)
        if s is not None:
            self.note(s)

    def torch_call(self, func: Any, args: tuple, kwargs: dict) -> None:
        """A torch function is about to run (seen through a TorchFunctionMode)."""
        name = str(getattr(func, "__name__", "")).split(".")[0]  # "layer_norm.default"
        for s in self.names.get(name, ()):
            try:
                counts = s.when is None or bool(s.when(args, kwargs))
            except Exception:  # a learner's odd argument: not this shortcut
                counts = False
            if counts:
                self.note(s)


def _backward_watch(spotter: _Spotter) -> Any:
    """Saved-tensor hooks that tell ``spotter`` when a backward pass unpacks a saved tensor."""
    from torch.autograd.graph import saved_tensors_hooks

    def unpack(t: Any) -> Any:
        spotter.note(spotter.backward)
        return t

    return saved_tensors_hooks(lambda t: t, unpack)


def _torch_watch(spotter: _Spotter) -> Any:
    """A TorchFunctionMode that tells ``spotter`` of every torch call, then makes it."""
    from torch.overrides import TorchFunctionMode

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            spotter.torch_call(func, args, kwargs)
            return func(*args, **kwargs)

    return Watch()


@contextmanager
def forbid(*shortcuts: Shortcut) -> Iterator[None]:
    """Run the learner's code (``call(...)`` inside the block), then reject a shortcut it used.

    Nothing is patched and nothing is refused while the code runs: a profile hook
    (``sys.setprofile``) sees which Python functions start and a ``TorchFunctionMode``
    sees which torch functions are called (and saved-tensor hooks see a backward pass,
    when a shortcut uses ``BACKWARD_PASS``). After the block, ``Incorrect(shortcut.message)``
    if one was used, even when the code caught an error or raised itself; otherwise the
    block's own outcome. The previous profile hook and the torch mode stack are restored
    whatever happens. Keep the block to the learner's call: the checker's own code inside
    it (``W[ids]`` for the expected answer) would count too.
    """
    import sys

    spotter = _Spotter(shortcuts)
    previous = sys.getprofile()
    watch_code = bool(spotter.codes or spotter.files or spotter.folders)
    try:
        with (
            _torch_watch(spotter) if spotter.names else nullcontext(),
            _backward_watch(spotter) if spotter.backward else nullcontext(),
        ):
            if watch_code:
                sys.setprofile(spotter.profile)
            try:
                yield
            finally:
                if watch_code:
                    sys.setprofile(previous)
    except KeyboardInterrupt:
        raise
    except BaseException:
        if not spotter.used:
            raise
    if spotter.used:
        raise Incorrect(spotter.used[0].message)
