"""The course's assistant: the base model instruction-tuned on tasks and translation.

- ``task_prompt`` and ``translation_prompt`` write the prompts the assistant answers
  (the course template without Alpaca's preamble; see ``PROMPT_INTRO_USED``).
- ``respond`` answers a list of prompts by greedy decoding, batched, stopping at the
  end of the first line (the assistant learns to end its response with a newline).
- ``evaluate_tasks`` and ``evaluate_translation`` score it on held-out tasks
  (``minigpt.tasks``) and test sentences (``minigpt.translation``).
- ``instruction_data`` is the training mixture of ``ASSISTANT``, the recipe;
  ``tune_assistant`` fine-tunes a base model on it, and ``assistant_model()`` is that
  model trained once from ``minigpt.pretrained.assistant_base_model`` and cached by
  recipe hash, like the course's other models, for chapters 07 and 08.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minigpt.checkpoint import CheckpointError, RunLock, write_checkpoint_folder
from minigpt.data import cache_dir
from minigpt.files import load_json, save_json
from minigpt.finetune import FinetuneConfig, History, train_instructions
from minigpt.generate import Tokenizer, generate
from minigpt.instruct import InstructionCollator, InstructionExample, format_prompt
from minigpt.model import GPT
from minigpt.pretrained import ASSISTANT_BASE, assistant_base_model
from minigpt.tasks import TaskExample, accuracy_by_family, make_tasks
from minigpt.tokenizer import CharTokenizer
from minigpt.translation import (
    TranslationPair,
    chrf,
    exact_match,
    load_translation_pairs,
    references,
    split_by_source,
    translation_example,
)

__all__ = [
    "ASSISTANT",
    "PROMPT_INTRO_USED",
    "assistant_model",
    "evaluate_tasks",
    "evaluate_translation",
    "instruction_data",
    "respond",
    "task_prompt",
    "translation_prompt",
    "tune_assistant",
]

# Alpaca's one-sentence preamble is 105 characters the model reads before every
# request and never learns from; the ### headings carry the structure without it,
# and every step then costs half as much.
PROMPT_INTRO_USED = ""

ASSISTANT: dict[str, Any] = {
    "base": {k: ASSISTANT_BASE[k] for k in ("model", "train", "steps", "alphabet")},
    "tasks": {"n_per_family": 2000, "seed": 0},
    "translation": {"test_fraction": 0.2, "seed": 0, "repeat": 2},
    "finetune": {
        "max_steps": 3000,
        "batch_size": 32,
        "lr": 2e-3,
        "warmup_steps": 50,
        "weight_decay": 0.0,
        "seed": 0,
    },
}


def task_prompt(example: TaskExample) -> str:
    """The prompt for a task: its instruction in the course template."""
    return format_prompt(InstructionExample(example.instruction, "", ""), PROMPT_INTRO_USED)


def translation_prompt(english: str) -> str:
    """The prompt that asks for the French of ``english``."""
    return format_prompt(translation_example(english), PROMPT_INTRO_USED)


@torch.no_grad()
def respond(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 60,
    batch_size: int = 64,
) -> list[str]:
    """Greedy responses to ``prompts``: the first line each continuation writes.

    Prompts of the same length in tokens are decoded together (``generate`` takes
    rows of one length), ``batch_size`` at a time; a row stops at its first newline.
    A response is the text before that newline (all ``max_new_tokens`` if none).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; wrap a single prompt in a list")
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ValueError("the tokenizer must encode a newline as one token (the stop token)")
    encoded = [tokenizer.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out = [""] * len(prompts)
    for length, rows in by_length.items():
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            idx = torch.tensor([encoded[i] for i in chunk])
            ids = generate(model, idx, max_new_tokens, temperature=0.0, stop_tokens=newline)
            for r, i in enumerate(chunk):
                out[i] = tokenizer.decode(ids[r, length:].tolist()).split("\n")[0]
    return out


def evaluate_tasks(
    model: GPT, tokenizer: Tokenizer, examples: Sequence[TaskExample]
) -> tuple[dict[str, float], list[str]]:
    """Held-out accuracy per family (``minigpt.tasks.check``) and the responses."""
    responses = respond(model, tokenizer, [task_prompt(e) for e in examples])
    return accuracy_by_family(examples, responses), responses


def evaluate_translation(
    model: GPT, tokenizer: Tokenizer, test: Sequence[TranslationPair]
) -> tuple[dict[str, float], list[str]]:
    """``{"exact_match": 0..1, "chrf": 0..100}`` on the distinct English sentences of
    ``test`` (each against all its references), and the translations."""
    refs = references(test)
    sources = list(refs)
    translations = respond(model, tokenizer, [translation_prompt(s) for s in sources])
    targets = list(refs.values())
    scores = {
        "exact_match": exact_match(translations, targets),
        "chrf": chrf(translations, targets),
    }
    return scores, translations


def instruction_data(recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data of ``recipe`` (default ``ASSISTANT``): ``train`` (shuffled
    ``InstructionExample`` list: tasks and translation pairs), ``held_out`` tasks
    (50 per family, another seed) and the translation ``test`` pairs."""
    recipe = recipe or ASSISTANT
    tasks = make_tasks("train", recipe["tasks"]["n_per_family"], seed=recipe["tasks"]["seed"])
    held_out = make_tasks("held_out", 50, seed=recipe["tasks"]["seed"] + 1)
    t = recipe["translation"]
    train_pairs, test_pairs = split_by_source(
        load_translation_pairs(), test_fraction=t["test_fraction"], seed=t["seed"]
    )
    train = [e.to_instruction() for e in tasks]
    train += [translation_example(p.source, p.target) for p in train_pairs] * t["repeat"]
    random.Random(recipe["finetune"]["seed"]).shuffle(train)
    return {"train": train, "held_out": held_out, "test": test_pairs, "train_pairs": train_pairs}


def tune_assistant(
    model: GPT,
    tokenizer: CharTokenizer,
    train: Sequence[InstructionExample],
    config: FinetuneConfig,
) -> History:
    """Instruction-tune ``model`` on ``train``: the loss on the responses only, each
    response ended with a newline (the stop token ``respond`` uses)."""
    collator = InstructionCollator(
        pad_id=0, eos_id=tokenizer.encode("\n")[0], max_length=model.config.block_size
    )
    return train_instructions(
        model, train, tokenizer.encode, config, collator=collator, intro=PROMPT_INTRO_USED
    )


def _model_dir(cache: str | os.PathLike[str] | None) -> Path:
    digest = hashlib.sha256(json.dumps(ASSISTANT, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache or cache_dir()) / "models" / f"assistant-{digest}"


def assistant_model(
    cache: str | os.PathLike[str] | None = None,
) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """The course's assistant: ``assistant_base_model`` tuned with ``ASSISTANT``.

    The first call fine-tunes it (a few CPU minutes, after the base model's own)
    and saves it under ``<cache>/models/assistant-<recipe hash>/``; later calls load
    it. Returns the model (eval mode, CPU), its tokenizer, and the training record:
    ``{"history": {"step", "loss"}, "seconds": training time}``.
    """
    folder = _model_dir(cache)
    if not (folder / "record.json").is_file():
        with RunLock(folder.parent, wait=True, name=f".{folder.name}.lock"):
            if not (folder / "record.json").is_file():
                _tune(folder, cache)
    model = GPT.load(folder)
    try:
        tokenizer = CharTokenizer.load(folder / "tokenizer.json")
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / 'tokenizer.json'} is not a valid tokenizer: {e}") from e
    return model.eval(), tokenizer, load_json(folder / "record.json")


def _tune(folder: Path, cache: str | os.PathLike[str] | None) -> None:
    model, tokenizer = assistant_base_model(cache)
    data = instruction_data()
    start = time.perf_counter()
    history = tune_assistant(
        model, tokenizer, data["train"], FinetuneConfig(**ASSISTANT["finetune"])
    )
    record = {"history": history, "seconds": time.perf_counter() - start}

    def write(tmp: Path) -> None:
        model.save(tmp)
        tokenizer.save(tmp / "tokenizer.json")
        save_json(record, tmp / "record.json")

    write_checkpoint_folder(folder, write)
