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
for something a function cannot fake: ``MultipleChoice`` (a conceptual question, one
letter, every option explained) and ``Experiment`` (a number the learner measures and
the check measures again, which names the numbers a wrong setting gives).
``reference()`` returns a correct answer and ``wrong_answers()`` plausible wrong
ones, so that tests can prove every check passes the right answer and rejects
wrong ones (a check that cannot fail is a defect).

When the text forbids a shortcut ("don't call F.layer_norm", "using only those four
parts"), the question lists it as a ``Shortcut`` and runs the learner's code inside
``forbid(...)`` (``minigpt.exercises.shortcuts``), which watches what the code calls and says "incorrect: F.layer_norm
is not allowed here: <what to do instead>" when the shortcut was taken.

The chapter modules import all of it from here; it is written in three modules, each
read on its own: ``question`` (``Question``, its verdict and the blank), ``answers``
(calling the learner's code and comparing its results) and ``kinds`` (``MultipleChoice``,
``Experiment`` and the text the experiments read).
"""

from minigpt.exercises.answers import call, call_modifying, close, ints, number, tensor
from minigpt.exercises.kinds import Experiment, MultipleChoice, Option, shakespeare
from minigpt.exercises.question import (
    Blank,
    CheckResult,
    Incorrect,
    LearnerError,
    NotAttempted,
    Question,
    blank,
)

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
