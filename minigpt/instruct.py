"""Instruction tuning: the data, the prompt template, and a loss on the responses only.

- ``load_instructions`` reads Alpaca-style records (``instruction``, ``input``,
  ``output``) from a JSON list or JSON Lines, naming the file and line of a bad one;
  ``read_json_records`` is the reading underneath, for other records of that kind
  (``minigpt.align``'s preference pairs).
- ``format_prompt`` writes the prompt template, ending where the response begins.
- ``InstructionCollator`` pads a batch and masks the prompt and the padding out of
  the loss (target -100, which ``GPT`` ignores), so the model learns to answer,
  not to reproduce the template; ``instruction_loss`` is that loss.

``minigpt.finetune.train_instructions`` trains on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from minigpt import data
from minigpt.classify import IGNORE_INDEX, Encode
from minigpt.data import DataFormatError
from minigpt.model import GPT

__all__ = [
    "PROMPT_INTRO",
    "InstructionCollator",
    "InstructionExample",
    "format_prompt",
    "instruction_loss",
    "load_instructions",
    "pad_rows",
    "read_json_records",
    "read_string_records",
    "tokenize_instruction",
]


@dataclass(frozen=True)
class InstructionExample:
    """One instruction-following example; ``input`` may be empty."""

    instruction: str
    input: str
    output: str


def _json_records(file: Path, text: str) -> Iterable[tuple[int, object]]:
    """(line number, value) for each element of a JSON list, or each line of JSON Lines."""
    decoder = json.JSONDecoder()

    def lineno(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if not text.startswith("[", pos):  # JSON Lines: one object per line
        for i, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{file}, line {i}: not valid JSON: {e.msg}") from e
        return
    pos = skip_ws(pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{file}, line {e.lineno}: not valid JSON: {e.msg}") from e
        yield lineno(pos), value
        pos = skip_ws(end)
        if text.startswith(",", pos):
            pos = skip_ws(pos + 1)
        elif text.startswith("]", pos):
            if skip_ws(pos + 1) != len(text):
                raise DataFormatError(f"{file}, line {lineno(pos)}: text after the closing ']'")
            return
        else:
            raise DataFormatError(f"{file}, line {lineno(pos)}: expected ',' or ']' in the list")


def read_json_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, object]]:
    """``(line, value)`` for each element of a JSON list, or each line of JSON Lines,
    read as they come (a caller's error about one record comes before a syntax error
    further down).

    ``line`` is where the value starts, for error messages that name it. A UTF-8
    byte-order mark is dropped.

    Raises:
        DataFormatError: a file that is not UTF-8 or not valid JSON, naming the file
            and the line.
    """
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{file} is not UTF-8 text: {e}") from e
    yield from _json_records(file, text)


def load_instructions(path: str | os.PathLike[str] | None = None) -> list[InstructionExample]:
    """Instruction data as ``InstructionExample`` records.

    Reads a JSON list of objects with string fields ``instruction``, ``output`` and
    optionally ``input`` (the course copy and the public download; extra fields,
    such as the preference data's ``chosen``/``rejected``, are ignored). JSON Lines
    (one object per line) works too. ``path`` defaults to
    ``minigpt.data.path("instruction-data")``.

    Raises:
        DataFormatError: invalid JSON or a record without the needed string
            fields, naming the file and the line where the record starts.
    """
    file = Path(path) if path is not None else data.path("instruction-data")
    records = read_string_records(file, ("instruction", "input", "output"), optional=("input",))
    return [InstructionExample(**fields) for _, fields in records]


def read_string_records(
    path: str | os.PathLike[str], fields: Sequence[str], optional: Sequence[str] = ()
) -> list[tuple[int, dict[str, str]]]:
    """``(line, {field: text})`` for each record of a JSON list or JSON Lines file.

    Every record must be an object whose ``fields`` are strings (an ``optional``
    one may be absent: it reads as ""), with a non-empty ``"instruction"`` when
    that is one of them; other keys are ignored. ``line`` is where the record starts.

    Raises:
        DataFormatError: invalid JSON, a record that breaks these rules, or a file
            with no records, naming the file and the line.
    """
    file = Path(path)
    needed = [repr(k) for k in fields if k not in optional]
    need = ", ".join(needed[:-1]) + " and " + needed[-1] if len(needed) > 1 else needed[0]
    out = []
    for lineno, rec in read_json_records(file):
        if not isinstance(rec, dict):
            raise DataFormatError(
                f"{file}, line {lineno}: expected an object with {need}, got {type(rec).__name__}"
            )
        values = {}
        for key in fields:
            value = rec.get(key, "" if key in optional else None)
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"is a {type(value).__name__}"
                raise DataFormatError(
                    f"{file}, line {lineno}: field {key!r} {problem}; expected a string"
                )
            values[key] = value
        if "instruction" in values and not values["instruction"].strip():
            raise DataFormatError(f"{file}, line {lineno}: 'instruction' is empty")
        out.append((lineno, values))
    if not out:
        raise DataFormatError(f"{file} has no examples")
    return out


PROMPT_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_prompt(example: InstructionExample, intro: str = PROMPT_INTRO) -> str:
    """The Alpaca-style prompt for ``example``, ending where the response begins.

    The "### Input:" section is left out when the example has no input. ``intro``
    is the preamble; ``intro=""`` drops it (105 characters matter to a model
    with a short context; the ### headings still carry the structure).
    """
    prompt = f"{intro}\n\n" if intro else ""
    prompt += f"### Instruction:\n{example.instruction}"
    if example.input:
        prompt += f"\n\n### Input:\n{example.input}"
    return prompt + "\n\n### Response:\n"


def tokenize_instruction(
    example: InstructionExample, encode: Encode, intro: str = PROMPT_INTRO
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` for one example (see ``format_prompt`` for ``intro``)."""
    return list(encode(format_prompt(example, intro))), list(encode(example.output))


class InstructionCollator:
    """Turn (prompt_ids, response_ids) pairs into a padded training batch.

    Each example becomes ``prompt + response (+ eos)``; inputs are all but the
    last token and targets all but the first (the next token at each position).
    Targets that predict a prompt token (when ``mask_prompt``) and every padding
    position are set to ``ignore_index`` (-100), so the loss only scores the
    response: the model learns to answer, not to reproduce the template.

    Args:
        pad_id: token id used to pad inputs (any id: its targets are masked).
        eos_id: appended to every response when given, so the model learns to stop.
        max_length: longest input kept (sequences are cut at the end), usually the
            model's block_size.
        mask_prompt: mask the prompt's targets (True) or train on them too.
        ignore_index: the target value the loss ignores.

    Calling it on a list of pairs returns ``(inputs, targets)``, both (B, T) long.
    """

    def __init__(
        self,
        pad_id: int,
        eos_id: int | None = None,
        max_length: int | None = None,
        mask_prompt: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_length = max_length
        self.mask_prompt = mask_prompt
        self.ignore_index = ignore_index

    def __call__(
        self, batch: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> tuple[Tensor, Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        rows = []
        for prompt, response in batch:
            seq = [*prompt, *response] + ([] if self.eos_id is None else [self.eos_id])
            if len(seq) < 2:
                raise ValueError("each example needs at least two tokens (prompt + response)")
            if self.max_length is not None:
                seq = seq[: self.max_length + 1]
            inputs, targets = seq[:-1], seq[1:]
            if self.mask_prompt:
                # target j is token j+1: it belongs to the prompt while j+1 < len(prompt)
                n = min(max(len(prompt) - 1, 0), len(targets))
                targets[:n] = [self.ignore_index] * n
            rows.append((inputs, targets))
        return pad_rows(rows, self.pad_id, self.ignore_index)


def pad_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` rows of any lengths, right-padded into two (B, T) long
    tensors: inputs with ``pad_id``, targets with ``ignore_index`` (skipped by the loss)."""
    T = max(len(i) for i, _ in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), ignore_index, dtype=torch.long)
    for b, (i, t) in enumerate(rows):
        inputs[b, : len(i)] = torch.tensor(list(i), dtype=torch.long)
        targets[b, : len(t)] = torch.tensor(list(t), dtype=torch.long)
    return inputs, targets


def instruction_loss(model: GPT, inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the unmasked targets of a collated batch.

    A batch whose targets are all masked (every response cut off by max_length)
    has nothing to learn from; its loss is 0, not NaN.
    """
    if bool((targets == IGNORE_INDEX).all()):
        return torch.zeros((), device=inputs.device, requires_grad=True)
    _, loss = model(inputs, targets)
    return loss
