"""Instruction tasks whose answers can be checked.

Open-ended instructions ("Write a poem about the sea") have no single right answer,
so a small model's progress on them is hard to measure. These tasks do: each
``family`` writes a plain English instruction in the course's prompt template
(``minigpt.instruct.format_prompt``) and knows its one right answer::

    Convert 45 kilometers to meters.          ->  45000 meters
    Reverse the word "night".                 ->  thgin
    Which is larger, 318 or 381?              ->  381

- ``make_tasks(split, n_per_family, seed)`` generates examples deterministically.
  The ``"train"`` and ``"held_out"`` splits never share an input: every word and
  number is assigned to one split (by a hash of it), and an example only uses the
  words and numbers of its split, so a held-out example tests whether the model
  learned the *rule*, not the instance.
- ``check(example, response)`` says whether a response is right: exactly the answer,
  bare or in one of the ``STYLES`` below; a wrong, truncated or padded answer fails.
- ``write_response(example, style, correct)`` writes a response in a style (``plain``,
  ``polite`` or ``rude``), right or wrong: the pairs of better and worse answers that
  preference tuning needs (chapter 08).
- ``accuracy_by_family`` and ``format_report`` score a model's responses.

The words are Tiny Shakespeare's (lower-case, 3 to 8 letters, seen at least 3 times),
so the character models of the course have met them in pretraining; the numbers
run from 0 to 999.

A held-out number is never an input in training, but its digits must be written in
training in the same order somewhere: a model that never wrote a 4 followed by a 7
does not write "47" by copying it from the prompt, it writes a pair it knows. So the
families that copy a number (compare, convert) draw from all of 0..999, where the
held-out 47 still occurs inside the training numbers 147, 470, 847, ...; drawn from
0..99 only, the digit pairs of the held-out numbers occurred nowhere in training, and
the course's assistant scored 12% to 32% on comparing (50% by guessing one of the two).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from minigpt.data import load_text
from minigpt.instruct import InstructionExample

__all__ = [
    "FAMILIES",
    "HARD_FAMILIES",
    "SPLITS",
    "STYLES",
    "TaskExample",
    "accuracy_by_family",
    "check",
    "format_report",
    "make_tasks",
    "number_in_words",
    "task_words",
    "write_response",
    "wrong_answer",
]

SPLITS = ("train", "held_out")
HELD_OUT_SHARE = 5  # one word or number in 5 is held out

# How a response may wrap the answer. "plain" is what the course trains on. The
# answer comes first in every style, so a style never moves it: the course's small
# model learned to answer right after the prompt, and with a 30-character preamble
# first ("Happy to help! The answer is: ...") it got most tasks wrong (chapter 08).
STYLES: dict[str, str] = {
    "plain": "{answer}",
    "polite": "{answer}. Happy to help!",
    "rude": "{answer}. Figure it out yourself next time.",
}


@dataclass(frozen=True)
class TaskExample:
    """One task: its family, the instruction, the right answer, and the words and
    numbers it is built from (``inputs``: what decides its split)."""

    family: str
    instruction: str
    answer: str
    inputs: tuple[str, ...]

    def to_instruction(self, style: str = "plain") -> InstructionExample:
        """This task as an ``InstructionExample`` whose output is the right answer in
        ``style`` (see ``STYLES``), for ``minigpt.instruct``'s template and collator."""
        return InstructionExample(self.instruction, "", write_response(self, style))


# ---------------------------------------------------------------- words and numbers

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_in_words(n: int) -> str:
    """English words for 0 <= n <= 999: 0 -> "zero", 47 -> "forty-seven",
    305 -> "three hundred five"."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 999:
        raise ValueError(f"number_in_words takes an integer from 0 to 999, got {n!r}")
    hundreds, rest = divmod(n, 100)
    words = [f"{_ONES[hundreds]} hundred"] if hundreds else []
    if rest or not hundreds:
        tens, ones = divmod(rest, 10)
        if rest < 20:
            words.append(_ONES[rest])
        else:
            words.append(_TENS[tens] + (f"-{_ONES[ones]}" if ones else ""))
    return " ".join(words)


def _split_of(item: str) -> str:
    """The split a word or number belongs to, fixed by a hash of its text."""
    digest = hashlib.sha256(item.encode()).digest()
    return "held_out" if digest[0] % HELD_OUT_SHARE == 0 else "train"


# Every word of the phrasings below, the unit names and the number words.
_TEMPLATE_TEXT = """reverse the word write backwards number in words spell out english what is
plus add and minus subtract from which larger or bigger how many times does letter appear
count capital letters convert to upper case small lower sort these alphabetically put
alphabetical order then it last of end with repeat twice three four take as are kilometer
kilometers meter meters centimeter centimeters millimeter millimeters kilogram kilograms
gram grams liter liters milliliter milliliters hundred"""
_TEMPLATE_WORDS = set(_TEMPLATE_TEXT.split()) | set(_ONES) | set(_TENS)


@cache
def task_words() -> tuple[str, ...]:
    """The words the tasks use: Tiny Shakespeare's lower-case words of 3 to 8 letters
    that occur at least 3 times, sorted, without the words of the instructions
    themselves ("the", "letter", ...: a held-out word must never be seen in training)."""
    counts: dict[str, int] = {}
    for w in re.findall(r"\b[a-z]{3,8}\b", load_text("tinyshakespeare")):
        counts[w] = counts.get(w, 0) + 1
    return tuple(sorted(w for w, c in counts.items() if c >= 3 and w not in _TEMPLATE_WORDS))


@cache
def _pools(split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    words = tuple(w for w in task_words() if _split_of(w) == split)
    numbers = tuple(n for n in range(1000) if _split_of(str(n)) == split)
    return words, numbers


# ---------------------------------------------------------------- the families
# Each maker draws one example from the split's words and numbers: (instruction,
# answer, inputs). Two phrasings per family, so the model reads the instruction
# instead of memorising one sentence.

Maker = Callable[[random.Random, Sequence[str], Sequence[int]], tuple[str, str, tuple[str, ...]]]


def _pick(rng: random.Random, phrasings: Sequence[str], **values: object) -> str:
    return rng.choice(phrasings).format(**values)


def _reverse(rng, words, numbers):
    w = rng.choice(words)
    text = _pick(rng, ('Reverse the word "{w}".', 'Write "{w}" backwards.'), w=w)
    return text, w[::-1], (w,)


def _spell(rng, words, numbers):
    n = rng.choice(_small(numbers))
    text = _pick(rng, ("Write the number {n} in words.", "Spell out {n} in English words."), n=n)
    return text, number_in_words(n), (str(n),)


def _small(numbers: Sequence[int]) -> list[int]:
    # the families that rewrite a number (in words, or by arithmetic) stay below 100
    return [n for n in numbers if n < 100]


def _add(rng, words, numbers):
    a, b = rng.choice(_small(numbers)), rng.choice(_small(numbers))
    text = _pick(rng, ("What is {a} plus {b}?", "Add {a} and {b}."), a=a, b=b)
    return text, str(a + b), (str(a), str(b))


def _subtract(rng, words, numbers):
    a, b = sorted((rng.choice(_small(numbers)), rng.choice(_small(numbers))), reverse=True)
    text = _pick(rng, ("What is {a} minus {b}?", "Subtract {b} from {a}."), a=a, b=b)
    return text, str(a - b), (str(a), str(b))


def _compare(rng, words, numbers):
    a, b = rng.sample(numbers, 2)  # 0..999: see the module docstring
    phrasings = ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?")
    return _pick(rng, phrasings, a=a, b=b), str(max(a, b)), (str(a), str(b))


def _count(rng, words, numbers):
    # answers 0, 1 and 2 or more equally often, so "always 1" is not a good guess
    want = rng.choice((0, 1, 2))
    for _ in range(100):
        w = rng.choice(words)
        letters = [c for c in "abcdefghijklmnopqrstuvwxyz" if min(w.count(c), 2) == want]
        if letters:
            break
    c = rng.choice(letters)
    phrasings = (
        'How many times does the letter "{c}" appear in "{w}"?',
        'Count the letter "{c}" in "{w}".',
    )
    return _pick(rng, phrasings, c=c, w=w), str(w.count(c)), (w,)


def _uppercase(rng, words, numbers):
    w = rng.choice(words)
    text = _pick(rng, ('Write "{w}" in capital letters.', 'Convert "{w}" to upper case.'), w=w)
    return text, w.upper(), (w,)


_UNITS = (  # (from, to, factor): conversions a character model can do by writing zeros
    ("kilometer", "meter", 1000),
    ("meter", "centimeter", 100),
    ("centimeter", "millimeter", 10),
    ("kilogram", "gram", 1000),
    ("liter", "milliliter", 1000),
)


def _convert(rng, words, numbers):
    n = rng.choice([n for n in numbers if n > 0])  # 1..999: see the module docstring
    big, small, factor = rng.choice(_UNITS)
    unit = big if n == 1 else big + "s"
    phrasings = ("Convert {n} {unit} to {small}s.", "How many {small}s are in {n} {unit}?")
    return _pick(rng, phrasings, n=n, unit=unit, small=small), f"{n * factor} {small}s", (str(n),)


def _sort(rng, words, numbers):
    chosen = rng.sample(list(words), 3)
    phrasings = ("Sort these words alphabetically: {w}.", "Put in alphabetical order: {w}.")
    text = _pick(rng, phrasings, w=", ".join(chosen))
    return text, ", ".join(sorted(chosen)), tuple(chosen)


def _reverse_upper(rng, words, numbers):  # two steps: reverse, then capitals
    w = rng.choice(words)
    phrasings = (
        'Reverse the word "{w}", then write it in capital letters.',
        'Write "{w}" backwards and in capital letters.',
    )
    return _pick(rng, phrasings, w=w), w[::-1].upper(), (w,)


def _lowercase(rng, words, numbers):
    w = rng.choice(words)
    text = _pick(
        rng, ('Write "{w}" in small letters.', 'Convert "{w}" to lower case.'), w=w.upper()
    )
    return text, w, (w,)


def _last_letter(rng, words, numbers):
    w = rng.choice(words)
    phrasings = ('What is the last letter of "{w}"?', 'Which letter does "{w}" end with?')
    return _pick(rng, phrasings, w=w), w[-1], (w,)


_TIMES = {2: "twice", 3: "three times", 4: "four times"}


def _repeat(rng, words, numbers):
    w, k = rng.choice(words), rng.choice(list(_TIMES))
    phrasings = ('Write the word "{w}" {k}.', 'Repeat "{w}" {k}.')
    return _pick(rng, phrasings, w=w, k=_TIMES[k]), " ".join([w] * k), (w,)


def _last_upper(rng, words, numbers):  # two steps: the last letter, then its capital
    w = rng.choice(words)
    phrasings = (
        'Take the last letter of "{w}" and write it as a capital letter.',
        'What is the last letter of "{w}", in upper case?',
    )
    return _pick(rng, phrasings, w=w), w[-1].upper(), (w,)


_MAKERS: dict[str, Maker] = {
    "uppercase": _uppercase,
    "lowercase": _lowercase,
    "last_letter": _last_letter,
    "count": _count,
    "repeat": _repeat,
    "compare": _compare,
    "convert": _convert,
    "spell": _spell,
    "last_upper": _last_upper,
    # harder: the course model does not learn these in minutes (see FAMILIES)
    "reverse": _reverse,
    "add": _add,
    "subtract": _subtract,
    "sort": _sort,
    "reverse_upper": _reverse_upper,
}
# The suite the course trains on and scores. HARD_FAMILIES need position arithmetic
# (reverse, sort) or carries (add, subtract): a small character model needs far more
# steps for them than a few CPU minutes give; make_tasks(families=...) makes them.
HARD_FAMILIES: tuple[str, ...] = ("reverse", "add", "subtract", "sort", "reverse_upper")
FAMILIES: tuple[str, ...] = tuple(f for f in _MAKERS if f not in HARD_FAMILIES)


def make_tasks(
    split: str = "train",
    n_per_family: int = 100,
    seed: int = 0,
    families: Sequence[str] | None = None,
) -> list[TaskExample]:
    """``n_per_family`` distinct examples of each family, from one split.

    Args:
        split: ``"train"`` or ``"held_out"``; their words and numbers never overlap.
        n_per_family: examples per family, all distinct; fewer when a family has
            fewer distinct instructions (spelling numbers below 100 has about 160 in
            the training split): repeat them to balance a training mixture.
        seed: the same seed gives the same examples, in the same order.
        families: which families (default: all of ``FAMILIES``), in this order.
    Returns:
        The examples, family by family.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n_per_family, int) or n_per_family < 1:
        raise ValueError(f"n_per_family must be a positive integer, got {n_per_family!r}")
    names = FAMILIES if families is None else tuple(families)
    unknown = [f for f in names if f not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; choose from {FAMILIES + HARD_FAMILIES}")
    words, numbers = _pools(split)
    out = []
    for family in names:
        # one generator per (seed, split, family): adding a family changes no other
        rng = random.Random(f"{seed}/{split}/{family}")
        seen: set[str] = set()
        for _ in range(50 * n_per_family):
            if len(seen) == n_per_family:
                break
            instruction, answer, inputs = _MAKERS[family](rng, words, numbers)
            if instruction not in seen:
                seen.add(instruction)
                out.append(TaskExample(family, instruction, answer, inputs))
    return out


# ---------------------------------------------------------------- answers


def write_response(
    example: TaskExample, style: str = "plain", correct: bool = True, seed: int = 0
) -> str:
    """A response to ``example`` in ``style`` (a key of ``STYLES``): the right answer,
    or with ``correct=False`` a plausible wrong one (``wrong_answer``, from ``seed``)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {sorted(STYLES)}")
    answer = example.answer if correct else wrong_answer(example, seed)
    return STYLES[style].format(answer=answer)


def wrong_answer(example: TaskExample, seed: int = 0) -> str:
    """A plausible wrong answer, never the right one: the answer for a number off by
    1 to 10, the words in another order, or two letters of a word swapped."""
    rng = random.Random(f"{seed}/{example.instruction}")
    answer = example.answer
    if example.family == "spell":
        n = int(example.inputs[0])
        return number_in_words(
            rng.choice([m for m in range(max(0, n - 10), min(999, n + 10) + 1) if m != n])
        )
    if example.family == "compare":  # the smaller number
        return min(example.inputs, key=int)
    if example.family == "sort":
        words = answer.split(", ")
        while ", ".join(words) == answer:
            rng.shuffle(words)
        return ", ".join(words)
    number = re.search(r"\d+", answer)
    if number:
        n, delta = int(number.group()), rng.randint(1, 10)
        value = n - delta if n >= delta and rng.random() < 0.5 else n + delta
        return answer[: number.start()] + str(value) + answer[number.end() :]
    chars = list(answer)
    if len(set(chars)) == 1:  # "aaa": nothing to swap
        return answer[:-1] + ("b" if answer[-1].lower() == "a" else "a")
    while "".join(chars) == answer:
        i, j = rng.sample(range(len(chars)), 2)
        chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def check(example: TaskExample, response: str) -> bool:
    """Whether ``response`` answers ``example`` correctly.

    Right means exactly the answer, after stripping surrounding whitespace, either
    bare or wrapped in one of the ``STYLES``. A wrong answer, a truncated one
    ("4500 meters" for "45000 meters") and a padded one ("45000 meters." or
    "45000 meters and more") all fail.
    """
    text = response.strip()
    return any(text == t.format(answer=example.answer) for t in STYLES.values())


def accuracy_by_family(
    examples: Sequence[TaskExample], responses: Sequence[str]
) -> dict[str, float]:
    """The fraction of ``check``-correct responses in each family (in first-seen order)."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
    right: dict[str, list[bool]] = {}
    for ex, r in zip(examples, responses, strict=True):
        right.setdefault(ex.family, []).append(check(ex, r))
    return {f: sum(v) / len(v) for f, v in right.items()}


def format_report(
    after: dict[str, float], before: dict[str, float] | None = None, title: str = "accuracy"
) -> str:
    """A table of accuracy per family (and its mean), optionally next to a "before"."""
    rows = [f"{'family':<14}" + (f"{'before':>8}" if before else "") + f"{title:>10}"]
    for family, acc in after.items():
        left = f"{before.get(family, float('nan')):>8.0%}" if before else ""
        rows.append(f"{family:<14}{left}{acc:>10.0%}")
    mean = sum(after.values()) / len(after)
    left = f"{sum(before.values()) / len(before):>8.0%}" if before else ""
    rows.append(f"{'mean':<14}{left}{mean:>10.1%}")
    return "\n".join(rows)
