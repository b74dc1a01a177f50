"""Chapter 07 exercises on the instruction tasks (``ch07`` re-exports them): q7, a checker
that works a sort task's answer out itself, and q8, the masked training row of a task.
"""

from __future__ import annotations

import string

from minigpt import tasks
from minigpt.exercises.core import Incorrect, Question, call, ints
from minigpt.exercises.shortcuts import Shortcut, forbid
from minigpt.instruct import InstructionCollator

__all__ = ["q7", "q8"]


# ---------------------------------------------------------------- q7: checking a sort task


def _check_sort(instruction, response):
    words = instruction.split(":", 1)[1].strip().rstrip(".").split(", ")
    return response.strip() == ", ".join(sorted(words))


# Words that minigpt.tasks never uses (none is a Tiny Shakespeare word), so that looking
# the instruction up in make_tasks output finds nothing: the answer must be worked out.
_SORT_CASES = (
    ("Sort these words alphabetically: zebu, quokka, yak.", ("quokka", "yak", "zebu")),
    ("Put in alphabetical order: wombat, axolotl.", ("axolotl", "wombat")),
    (
        "Sort these words alphabetically: narwhal, okapi, capybara, armadillo, ibex.",
        ("armadillo", "capybara", "ibex", "narwhal", "okapi"),
    ),
    (
        "Put in alphabetical order: quoll, quokka, okapi, narwhal.",
        ("narwhal", "okapi", "quokka", "quoll"),
    ),
    ("Put in alphabetical order: yak, zebu, yak, okapi.", ("okapi", "yak", "yak", "zebu")),
)


def _sort_responses(instruction: str, words: tuple[str, ...]) -> list[tuple[str, bool, str]]:
    """(response, right?, why) for one instruction: right answers first, then wrong ones."""
    listed = instruction.split(":", 1)[1].strip().rstrip(".").split(", ")
    right = ", ".join(words)
    out = [
        (right, True, "the words in alphabetical order"),
        (f"  {right}\n", True, "the right answer: whitespace around it does not count"),
    ]
    wrong = [
        (", ".join(listed), "the words in the instruction's order, not sorted"),
        (", ".join(reversed(words)), "the words in reverse alphabetical order"),
        (", ".join(words[:-1]), "a word is missing"),
        (right[:-1], "the last word is cut short"),
        (right + ".", "padded with a period: exactly the words, nothing more"),
        (right + ", yak", "padded with an extra word"),
        (",".join(words), 'the words must be joined by ", " (a comma and one space)'),
        (" ".join(words), 'the words must be joined by ", ", not by spaces'),
        ("; ".join(words), 'the words must be joined by ", ", not by "; "'),
        (",  ".join(words), 'the words must be joined by ", " (one space, not two)'),
        (right.title(), "capitalised: the words must be exactly as written"),
        ("", "an empty response"),
    ]
    if len(set(words)) < len(words):
        wrong.append((", ".join(sorted(set(words))), "a repeated word must stay repeated"))
    return out + [(r, False, why) for r, why in wrong if r != right]


class CheckSort(Question):
    name = "q7"
    _hint = (
        "The words follow the colon and end before the final period: "
        'instruction.split(":", 1)[1].strip().rstrip(".").split(", "). Sort them '
        '(sorted keeps repeated words), join them with ", ", and compare with '
        "response.strip() using ==."
    )
    _solution = """
def check_sort(instruction, response):
    listed = instruction.split(":", 1)[1].strip().rstrip(".")  # "pear, fig, apple"
    words = listed.split(", ")
    return response.strip() == ", ".join(sorted(words))
"""

    shortcuts = (
        Shortcut(
            "minigpt.tasks",
            "read the words out of the instruction yourself, sort them and compare the "
            "stripped response with them joined by ', '",
            (tasks,),
        ),
    )

    def _check(self, fn):
        for instruction, words in _SORT_CASES:
            for response, want, why in _sort_responses(instruction, words):
                with forbid(*self.shortcuts):
                    got = call(fn, instruction, response)
                what = f"check_sort({instruction!r}, {response!r})"
                if not isinstance(got, bool):
                    raise Incorrect(f"{what}: return True or False, got {type(got).__name__}")
                if got != want:
                    raise Incorrect(f"{what} should be {want} ({why}), got {got}")

    def reference(self):
        return _check_sort

    def wrong_answers(self):
        import re

        def words_of(instruction):
            return instruction.split(":", 1)[1].strip().rstrip(".").split(", ")

        def no_strip(instruction, response):
            return response == ", ".join(sorted(words_of(instruction)))

        def any_order(instruction, response):
            return sorted(response.strip().split(", ")) == sorted(words_of(instruction))

        def ignores_case(instruction, response):
            return response.strip().lower() == ", ".join(sorted(words_of(instruction)))

        def allows_period(instruction, response):
            return response.strip().rstrip(".") == ", ".join(sorted(words_of(instruction)))

        def deduplicates(instruction, response):
            return response.strip() == ", ".join(sorted(set(words_of(instruction))))

        def ignores_separators(instruction, response):
            return re.findall(r"[a-z]+", response) == sorted(words_of(instruction))

        def looks_up(instruction, response):  # the shortcut the exercise forbids
            from minigpt import tasks

            for split in tasks.SPLITS:
                for ex in tasks.make_tasks(split, 100, families=["sort"]):
                    if ex.instruction == instruction:
                        return tasks.check(ex, response)
            return False

        return [
            no_strip,
            any_order,
            ignores_case,
            allows_period,
            deduplicates,
            ignores_separators,
            looks_up,
        ]


# ---------------------------------------------------------------- q8: a task's training row


def _task_example_ids(prompt, answer, encode, eos_id):
    prompt_ids = list(encode(prompt))
    seq = prompt_ids + list(encode(answer)) + [eos_id]
    inputs, targets = seq[:-1], seq[1:]
    n = max(len(prompt_ids) - 1, 0)  # targets 0 .. n-1 predict prompt tokens 1 .. n
    targets[:n] = [-100] * n
    return inputs, targets


def _held_out_examples():
    """A sort and a convert task of the held-out split (stored: the check needs no data)."""
    from minigpt.tasks import TaskExample

    return [
        TaskExample(
            "sort",
            "Put in alphabetical order: attend, frost, sleep.",
            "attend, frost, sleep",
            ("attend", "frost", "sleep"),
        ),
        TaskExample("convert", "Convert 57 liters to milliliters.", "57000 milliliters", ("57",)),
    ]


def _printable_encoder():
    from minigpt.tokenizer import CharTokenizer

    return CharTokenizer(sorted(set(string.printable))).encode


def _ord_encode(text):
    return [ord(c) for c in text]


def _row_cases():
    """(prompt, answer, encode, eos_id, what) for q8."""
    from minigpt.assistant import task_prompt

    encode = _printable_encoder()
    newline = encode("\n")[0]  # the course's end of answer for character models
    cases = []
    for i, ex in enumerate(_held_out_examples()):
        eos = newline if i == 0 else len(string.printable) + 1
        cases.append((task_prompt(ex), ex.answer, encode, eos, f"the task {ex.instruction!r}"))
    cases.append(("Q: 2+2?\nA: ", "4", _ord_encode, 0, "prompt 'Q: 2+2?\\nA: ', answer '4'"))
    cases.append(("?", "ab", _ord_encode, 1, "prompt '?', answer 'ab'"))
    return cases


def _diagnose_row(what, inputs, targets, seq, n_prompt, eos_id):
    """Incorrect, saying what is wrong, unless (inputs, targets) is the masked row of seq."""
    want_in = seq[:-1]
    n = max(n_prompt - 1, 0)
    want_tg = [-100] * n + seq[1:][n:]
    if inputs == want_in and targets == want_tg:
        return
    kept = [j for j, t in enumerate(targets) if t != -100]
    if kept and all(j < len(inputs) and targets[j] == inputs[j] for j in kept):
        raise Incorrect(
            f"{what}: your targets repeat the inputs; target j is the next token, seq[j + 1]"
        )
    if not targets or targets[-1] != eos_id:
        raise Incorrect(
            f"{what}: the last target should be eos_id={eos_id}: append it after the answer "
            "so the model learns to stop"
        )
    if len(inputs) != len(want_in) or len(targets) != len(want_tg):
        raise Incorrect(
            f"{what}: prompt + answer + eos is {len(seq)} tokens, so inputs and targets "
            f"should both have {len(seq) - 1}; got {len(inputs)} and {len(targets)}"
        )
    if inputs != want_in:
        raise Incorrect(f"{what}: inputs should be seq[:-1] (every token but the eos)")
    masked = sum(t == -100 for t in targets)
    if masked == 0 and n_prompt > 1:
        raise Incorrect(
            f"{what}: no target is masked; the {n_prompt - 1} targets that predict prompt "
            "tokens must be -100 so that the loss only scores the answer"
        )
    if masked > n_prompt - 1:
        raise Incorrect(
            f"{what}: you masked {masked} targets but the prompt has {n_prompt} tokens, so "
            f"only the first {n_prompt - 1} predict prompt tokens; target {n_prompt - 1} "
            "predicts the first answer token and must be kept"
        )
    if masked < n_prompt - 1:
        raise Incorrect(
            f"{what}: only {masked} targets are masked; the first {n_prompt - 1} predict "
            "prompt tokens and must all be -100"
        )
    j = next(j for j, (a, b) in enumerate(zip(targets, want_tg)) if a != b)
    raise Incorrect(f"{what}: targets[{j}] should be {want_tg[j]}, got {targets[j]}")


class TaskTrainingRow(Question):
    name = "q8"
    _hint = (
        "seq = encode(prompt) + encode(answer) + [eos_id]; inputs = seq[:-1] and targets "
        "= seq[1:]. Target j predicts token j + 1, a prompt token while j + 1 < "
        "len(encode(prompt)), so the first len(encode(prompt)) - 1 targets become -100."
    )
    _solution = """
def task_example_ids(prompt, answer, encode, eos_id):
    prompt_ids = list(encode(prompt))
    seq = prompt_ids + list(encode(answer)) + [eos_id]
    inputs, targets = seq[:-1], seq[1:]
    n = max(len(prompt_ids) - 1, 0)  # targets 0 .. n-1 predict prompt tokens
    targets[:n] = [-100] * n
    return inputs, targets
"""

    shortcuts = (
        Shortcut(
            "InstructionCollator",
            "build the row yourself: seq = encode(prompt) + encode(answer) + [eos_id], then "
            "shift it by one and mask the targets that predict prompt tokens",
            (InstructionCollator,),
        ),
    )

    def _check(self, fn):
        for prompt, answer, encode, eos_id, what in _row_cases():
            with forbid(*self.shortcuts):
                got = call(fn, prompt, answer, encode, eos_id)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise Incorrect(f"{what}: return a pair (inputs, targets)")
            inputs, targets = ints(got[0], "inputs"), ints(got[1], "targets")
            n_prompt = len(encode(prompt))
            seq = encode(prompt) + encode(answer) + [eos_id]
            _diagnose_row(what, inputs, targets, seq, n_prompt, eos_id)

    def reference(self):
        return _task_example_ids

    def wrong_answers(self):
        def no_eos(prompt, answer, encode, eos_id):
            seq = encode(prompt) + encode(answer)
            n = len(encode(prompt)) - 1
            return seq[:-1], [-100] * n + seq[1:][n:]

        def masks_first_answer_token(prompt, answer, encode, eos_id):
            seq = encode(prompt) + encode(answer) + [eos_id]
            n = len(encode(prompt))
            return seq[:-1], [-100] * n + seq[1:][n:]

        def masks_nothing(prompt, answer, encode, eos_id):
            seq = encode(prompt) + encode(answer) + [eos_id]
            return seq[:-1], seq[1:]

        def unshifted_targets(prompt, answer, encode, eos_id):
            seq = encode(prompt) + encode(answer) + [eos_id]
            n = len(encode(prompt)) - 1
            return seq[:-1], [-100] * n + seq[:-1][n:]

        def calls_the_collator(prompt, answer, encode, eos_id):  # the forbidden shortcut
            from minigpt.instruct import InstructionCollator

            collate = InstructionCollator(pad_id=0, eos_id=eos_id)
            inputs, targets = collate([(encode(prompt), encode(answer))])
            return inputs[0].tolist(), targets[0].tolist()

        return [
            no_eos,
            masks_first_answer_token,
            masks_nothing,
            unshifted_targets,
            calls_the_collator,
        ]


q7 = CheckSort()
q8 = TaskTrainingRow()
