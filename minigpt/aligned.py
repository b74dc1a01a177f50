"""The course's aligned models: the assistant tuned by a reward model, by RL and by DPO.

Chapter 08 compares four ways to change the instruction-tuned assistant (the SFT
model, ``minigpt.assistant.assistant_model``) on the task suite of ``minigpt.tasks``:

- a reward model on the real preference data (``run_reward_model``: Bradley-Terry
  on polite vs impolite responses, next to the bag-of-words baseline);
- RLHF (``run_rlhf``): a reward model trained on task pairs (right vs wrong answer),
  then ``minigpt.align.rl_loop`` with its score as the reward and a KL penalty to
  the SFT model, and the same loop without the penalty, to see reward hacking;
- RLVR (``run_rlvr``): the same loop with the task checker as the reward;
- DPO (``run_dpo``): ``minigpt.align.train_dpo`` on polite-over-bare task pairs, from
  the assistant tuned a little further on answers in mixed tones (``mixed_tones``).

Each ``run_*`` tunes a copy of the model it is given with its recipe (``RECIPES``)
and returns ``(model, record)``: the training history, the seconds it took and the
held-out scores of ``evaluate_style`` (task accuracy, polite-style rate, KL to the
SFT model). ``aligned_model(name)`` runs one on the course's assistant once and
caches the result by recipe hash, like the course's other models (and
``course_reward_model()`` the reward model, from the model its recipe names:
``reward_start``), so the chapter's notebook reads the big runs instead of waiting
for them.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minigpt.align import (
    RLConfig,
    kl_estimate,
    response_logprobs,
    rl_loop,
    task_reward,
    train_dpo,
)
from minigpt.assistant import (
    ASSISTANT,
    assistant_model,
    evaluate_tasks,
    task_prompt,
    tune_assistant,
    tuning_start,
)
from minigpt.finetune import FinetuneConfig
from minigpt.generate import Tokenizer
from minigpt.instruct import InstructionExample
from minigpt.model import GPT
from minigpt.preference import (
    RewardModel,
    bag_of_words_rewards,
    fit_bag_of_words,
    is_polite,
    load_preferences,
    pairwise_accuracy,
    reward_accuracy,
    split_by_instruction,
    task_preferences,
    train_reward_model,
)
from minigpt.pretrained import cached_model, recipe_folder
from minigpt.tasks import STYLES, TaskExample, make_tasks
from minigpt.tokenizer import CharTokenizer

__all__ = [
    "RECIPES",
    "aligned_model",
    "course_reward_model",
    "evaluate_style",
    "held_out_tasks",
    "kl_to_reference",
    "mixed_tones",
    "reward_start",
    "run_dpo",
    "run_reward_model",
    "run_rlhf",
    "run_rlvr",
]

_RL = {"batch_size": 4, "group_size": 8, "max_new_tokens": 24, "seed": 0}
RECIPES: dict[str, dict[str, Any]] = {
    # the real preference data: a fifth of the instructions held out; started from the
    # pretrained base model, not the SFT model, and read at the mean of the real tokens,
    # not the last one (benchmarks/align.py --reward-seeds 4, seeds 0-3: 92.3, 95.5, 93.7,
    # 93.2%, mean 93.7%; from the SFT model 91.9, 91.9, 91.0, 89.6%, mean 91.1%; at the
    # last token 88.3, 89.6, 87.4, 80.6%, mean 86.5%, and from the SFT model at the last
    # token 83.8, 79.7, 82.9, 82.4%, mean 82.2%, no better with dropout, weight decay, EMA,
    # batch 16, lr 5e-4 x 600 or 2e-3; AMD EPYC, 1 thread)
    "reward": {
        "start": "base",
        "pool": "mean",
        "split": {"test_fraction": 0.2, "seed": 0},
        "finetune": {"max_steps": 300, "batch_size": 8, "lr": 1e-3, "warmup_steps": 10, "seed": 0},
    },
    # DPO chooses among answers its SFT model can write, and the assistant only writes
    # bare ones (a polite answer is about 150 nats below its own). So, as human-written
    # SFT data mixes tones, DPO starts from the assistant tuned 200 more steps on task
    # answers 40% polite, 20% rude and 40% bare ("sft"), then prefers polite over bare.
    # (From the assistant itself: polite over rude at lr 1e-4 kept it bare, 0%; polite
    # over bare at 3e-4 broke it, 41% right, still bare. From the mixed-tone SFT, 24%
    # polite and 83.3% right: polite over bare at lr 5e-6 x 100 steps 68% polite, 82.8%
    # right; at 1e-5 87%, 80.0%; at 3e-5 99%, 75.6%; polite over rude 3e-5 25%, 81.1%;
    # the SFT stage at lr 1e-3 84% right and 26% polite, then 48%; AMD EPYC, 1 thread.
    # With the polite words before the answer, chapter 08, section 6, it got most
    # tasks wrong.)
    "dpo": {
        "sft": {
            "tasks": {"n_per_family": 400, "seed": 0},
            "tones": {"polite": 0.4, "rude": 0.2},
            "finetune": {"max_steps": 200, "batch_size": 16, "lr": 3e-4, "warmup_steps": 10}
            | {"weight_decay": 0.0, "beta2": 0.99, "grad_clip": 1.0, "seed": 0},
        },
        "tasks": {"n_per_family": 40, "seed": 0, "kind": "polite_plain"},
        "beta": 0.1,
        "nll_weight": 0.0,
        "finetune": {"max_steps": 100, "batch_size": 8, "lr": 5e-6, "warmup_steps": 5, "seed": 0},
    },
    # the families whose sampled answers differ (pass@8 well above pass@1)
    # (lr 5e-4, 40 steps: held-out mean 86.7% -> 78.3%; lr 2e-4, 80 steps: 84.4%; lr 1e-4,
    # 120 steps: 87.2%, 160 steps: 86.1%, on count, compare, spell and repeat: 85.6%; group
    # 16: 86.7%; lr 5e-5, 300 steps: 87.8%, count still 50%, in 221 s; temperature 0.7:
    # 86.1%, on count, repeat, spell and compare 87.2%; AMD EPYC)
    "rlvr": {
        "tasks": {"n_per_family": 100, "seed": 0, "families": ["compare", "count", "convert"]},
        "rl": {**_RL, "max_steps": 120, "lr": 1e-4, "kl_coef": 0.05},
    },
    # a reward model of right over wrong task answers, then RL on its score
    # (lr 1e-3, 40 steps: the leashed run lost most task skill too, KL 10.3 nats, 31% right;
    # kl_coef 0.5, 1.0, 2.0 at that lr: KL 14.0, 7.0, 12.1. lr 3e-4, 120 steps: KL 0.6 and
    # 78% right with the penalty, 8.4 and 47% without, reward up in both; since every
    # style puts the answer first, 0.77 and 74%, 8.05 and 38%; AMD EPYC, 1 thread)
    "rlhf": {
        "tasks": {"n_per_family": 40, "seed": 0, "kind": "correct"},
        "reward": {"max_steps": 80, "batch_size": 8, "lr": 3e-4, "warmup_steps": 5, "seed": 0},
        "rl": {**_RL, "max_steps": 120, "lr": 3e-4, "kl_coef": 0.2},
    },
    "rlhf_no_kl": {"base": "rlhf", "rl": {"kl_coef": 0.0}},
}


def held_out_tasks(n_per_family: int = 20) -> list[TaskExample]:
    """The held-out prompts every run is scored on (``make_tasks``, seed 1)."""
    return make_tasks("held_out", n_per_family, seed=1)


@torch.no_grad()
def kl_to_reference(
    model: GPT,
    ref: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    responses: Sequence[str],
) -> float:
    """Mean over responses of the summed k3 estimate of KL(model || ref) at the model's
    own (greedy) responses, each ended by its newline: how far a run moved."""
    prompts = [tokenizer.encode(task_prompt(e)) for e in examples]
    answers = [tokenizer.encode(r + "\n") for r in responses]
    logp, mask = response_logprobs(model, prompts, answers)
    ref_logp, _ = response_logprobs(ref, prompts, answers)
    return (kl_estimate(logp, ref_logp, "k3") * mask).sum(dim=1).mean().item()


def evaluate_style(
    model: GPT, tokenizer: Tokenizer, examples: Sequence[TaskExample], ref: GPT | None = None
) -> dict[str, Any]:
    """Held-out scores of a policy: ``accuracy`` (mean over families), ``polite`` (the
    fraction of responses in the polite style, ``minigpt.preference.is_polite``),
    ``kl`` to ``ref`` (``kl_to_reference``; 0.0 without one), and the ``responses``."""
    by_family, responses = evaluate_tasks(model, tokenizer, examples)
    kl = 0.0 if ref is None else kl_to_reference(model, ref, tokenizer, examples, responses)
    return {
        "accuracy": sum(by_family.values()) / len(by_family),
        "by_family": by_family,
        "polite": sum(map(is_polite, responses)) / len(responses),
        "kl": kl,
        "responses": responses,
    }


def _recipe(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise ValueError(f"unknown run {name!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[name]
    if "base" in recipe:
        base = RECIPES[recipe["base"]]
        recipe = {**base, "rl": {**base["rl"], **recipe["rl"]}}
    return recipe


def _train_tasks(t: dict[str, Any]) -> list[TaskExample]:
    return make_tasks("train", t["n_per_family"], seed=t["seed"], families=t.get("families"))


def run_reward_model(
    model: GPT, tokenizer: CharTokenizer, seed: int | None = None, pool: str | None = None
) -> tuple[RewardModel, dict[str, Any]]:
    """A reward model on a copy of ``model``, trained on the real preference data with
    the ``"reward"`` recipe (``seed``, if given, replaces its fine-tuning seed: the
    order of the batches; ``pool``, its reading of the hidden states: ``RewardModel``);
    the record has the held-out pairwise ``accuracy`` before and after, the
    bag-of-words baseline's (``bag_of_words``), the ``pool`` and the ``seconds``."""
    r = RECIPES["reward"]
    finetune = r["finetune"] if seed is None else {**r["finetune"], "seed": seed}
    pool = r["pool"] if pool is None else pool
    train, test = split_by_instruction(load_preferences(), **r["split"])
    bow = fit_bag_of_words(train)
    bow_acc = pairwise_accuracy(
        bag_of_words_rewards(bow, [e.chosen for e in test]),
        bag_of_words_rewards(bow, [e.rejected for e in test]),
    )
    rm = RewardModel.from_gpt(model, pool)
    before = reward_accuracy(rm, test, tokenizer.encode)
    start = time.perf_counter()
    history = train_reward_model(rm, train, tokenizer.encode, FinetuneConfig(**finetune))
    seconds = time.perf_counter() - start
    after = reward_accuracy(rm, test, tokenizer.encode)
    record = {"history": history, "seconds": seconds, "accuracy_before": before}
    record |= {"accuracy": after, "bag_of_words": bow_acc, "pairs": [len(train), len(test)]}
    return rm, record | {"pool": pool}


def mixed_tones(
    examples: Sequence[TaskExample], tones: dict[str, float], seed: int = 0
) -> list[InstructionExample]:
    """``examples`` as instructions whose answers are in mixed tones: each, in order,
    draws a number in [0, 1) (``seed``) and is written in the first style of
    ``sorted(tones)`` whose cumulative share exceeds it, else ``"plain"``
    (``tones={"polite": 0.4, "rude": 0.2}``: 40% polite, 20% rude, 40% bare)."""
    if not isinstance(tones, dict):
        raise TypeError(f"tones must be a dict of style -> share, got {type(tones).__name__}")
    bad = any(t not in STYLES or t == "plain" or not v >= 0 for t, v in tones.items())
    if bad or not sum(tones.values()) <= 1:
        raise ValueError(
            f"tones maps styles other than plain to shares >= 0 summing to <= 1, got {tones}"
        )
    rng, out = random.Random(seed), []
    for ex in examples:
        u, style, total = rng.random(), "plain", 0.0
        for name in sorted(tones):
            total += tones[name]
            if u < total:
                style = name
                break
        out.append(ex.to_instruction(style))
    return out


def run_dpo(model: GPT, tokenizer: CharTokenizer) -> tuple[GPT, dict[str, Any]]:
    """DPO (``train_dpo``) with the ``"dpo"`` recipe, from a copy of ``model`` tuned on
    answers in mixed tones (``mixed_tones``, the recipe's ``"sft"``), the reference.
    The record's scores are the DPO model's (KL to its reference); ``record["sft"]``
    holds the reference's (KL to ``model``) and the seconds of its tuning."""
    r = RECIPES["dpo"]
    s, t = r["sft"], r["tasks"]
    ref = copy.deepcopy(model)
    start = time.perf_counter()
    toned = mixed_tones(_train_tasks(s["tasks"]), s["tones"], s["tasks"]["seed"])
    tune_assistant(ref, tokenizer, toned, FinetuneConfig(**s["finetune"]))
    sft = {"seconds": time.perf_counter() - start}
    sft |= evaluate_style(ref, tokenizer, held_out_tasks(), model)
    pairs = task_preferences(_train_tasks(t), seed=t["seed"], kind=t["kind"])
    policy = copy.deepcopy(ref)
    start = time.perf_counter()
    history = train_dpo(
        policy, tokenizer, pairs, FinetuneConfig(**r["finetune"]), r["beta"], ref,
        nll_weight=r["nll_weight"],
    )  # fmt: skip
    scored = _scored(policy, ref, tokenizer, history, time.perf_counter() - start)
    return policy, scored | {"sft": sft}


def run_rlvr(model: GPT, tokenizer: CharTokenizer) -> tuple[GPT, dict[str, Any]]:
    """RL from the task checker (``task_reward``) on a copy of ``model``, ``"rlvr"`` recipe."""
    r = RECIPES["rlvr"]
    policy = copy.deepcopy(model)
    start = time.perf_counter()
    history = rl_loop(
        policy, tokenizer, _train_tasks(r["tasks"]), task_reward, RLConfig(**r["rl"]), model
    )
    return policy, _scored(policy, model, tokenizer, history, time.perf_counter() - start)


def run_rlhf(
    model: GPT, tokenizer: CharTokenizer, name: str = "rlhf"
) -> tuple[GPT, dict[str, Any]]:
    """RLHF on a copy of ``model``: a reward model trained on right-over-wrong task pairs,
    then ``rl_loop`` on its score (``name``: ``"rlhf"``, or ``"rlhf_no_kl"`` without the
    KL penalty). The record adds the reward model's held-out pair accuracy (``rm``)."""
    r = _recipe(name)
    t = r["tasks"]
    train = _train_tasks(t)
    held = task_preferences(held_out_tasks(), seed=t["seed"], kind=t["kind"])
    start = time.perf_counter()
    rm = RewardModel.from_gpt(model)
    train_reward_model(
        rm, task_preferences(train, seed=t["seed"], kind=t["kind"]), tokenizer.encode,
        FinetuneConfig(**r["reward"]),
    )  # fmt: skip
    rm.eval().requires_grad_(False)

    def reward(example: TaskExample, text: str) -> float:
        return rm.score(tokenizer.encode, [task_prompt(example) + text]).item()

    policy = copy.deepcopy(model)
    history = rl_loop(policy, tokenizer, train, reward, RLConfig(**r["rl"]), model)
    record = _scored(policy, model, tokenizer, history, time.perf_counter() - start)
    record["rm"] = reward_accuracy(rm, held, tokenizer.encode)
    return policy, record


def _scored(
    policy: GPT, ref: GPT, tokenizer: CharTokenizer, history: Any, seconds: float
) -> dict[str, Any]:
    return {
        "history": history,
        "seconds": seconds,
        **evaluate_style(policy, tokenizer, held_out_tasks(), ref),
    }


_RUNS = {"dpo": run_dpo, "rlvr": run_rlvr, "rlhf": run_rlhf, "rlhf_no_kl": run_rlhf}


def aligned_model(
    name: str, cache: str | os.PathLike[str] | None = None
) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """The course's assistant tuned by run ``name`` (``"dpo"``, ``"rlvr"``, ``"rlhf"``,
    ``"rlhf_no_kl"``), trained once and cached under ``<cache>/models/<name>-<hash>/``
    (the hash of the recipe and of the assistant's). Returns the model (eval mode,
    CPU), its tokenizer and the run's record (``run_*``)."""
    recipe = _recipe(name)
    if name not in _RUNS:
        raise ValueError(f"aligned_model makes {sorted(_RUNS)}, not {name!r}")
    folder = _folder(cache, name, recipe)

    def build() -> tuple[GPT, CharTokenizer, dict[str, Any]]:
        sft, tokenizer, _ = assistant_model(cache)
        run = _RUNS[name]
        policy, record = (
            run(sft, tokenizer, name) if name.startswith("rlhf") else run(sft, tokenizer)
        )
        return policy, tokenizer, record

    return cached_model(folder, build)


def _folder(cache: str | os.PathLike[str] | None, name: str, recipe: dict[str, Any]) -> Path:
    return recipe_folder(cache, name.replace("_", "-"), {"recipe": recipe, "assistant": ASSISTANT})


def reward_start(
    where: str, cache: str | os.PathLike[str] | None = None
) -> tuple[GPT, CharTokenizer]:
    """The model a reward model starts from, and its tokenizer: ``"base"``, the
    pretrained model as instruction tuning starts from it
    (``minigpt.assistant.tuning_start``), or ``"sft"``, the course's assistant."""
    starts = {"base": tuning_start, "sft": assistant_model}
    if where not in starts:
        raise ValueError(f'the reward model\'s start must be "base" or "sft", got {where!r}')
    model, tokenizer, _ = starts[where](cache)
    return model, tokenizer


def course_reward_model(
    cache: str | os.PathLike[str] | None = None,
) -> tuple[RewardModel, CharTokenizer, dict[str, Any]]:
    """``run_reward_model`` on the model the ``"reward"`` recipe starts from
    (``reward_start`` of its ``"start"``), trained once and cached like
    ``aligned_model`` (the head's weights and its ``pool`` ride in the record).
    Returns the reward model (eval mode, CPU), its tokenizer and the record."""

    def build() -> tuple[GPT, CharTokenizer, dict[str, Any]]:
        start, tokenizer = reward_start(RECIPES["reward"]["start"], cache)
        rm, record = run_reward_model(start, tokenizer)
        head = {"weight": rm.head.weight.detach().flatten().tolist(), "bias": rm.head.bias.item()}
        return rm.gpt, tokenizer, {**record, "head": head}

    gpt, tokenizer, record = cached_model(_folder(cache, "reward", RECIPES["reward"]), build)
    rm = RewardModel(gpt, record["pool"])
    with torch.no_grad():
        rm.head.weight.copy_(torch.tensor(record["head"]["weight"]).view_as(rm.head.weight))
        rm.head.bias.fill_(record["head"]["bias"])
    return rm.eval(), tokenizer, record
