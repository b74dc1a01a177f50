"""Alignment benchmark: reward model, DPO, RLVR and RLHF from the course's assistant.

Every run but the reward model's starts from the instruction-tuned assistant (the
SFT model, ``minigpt.assistant.assistant_model``) with a recipe of
``minigpt.aligned.RECIPES``, and is scored on the same held-out tasks
(``minigpt.aligned.held_out_tasks``, words and numbers never trained on); the reward
model starts from the model its recipe names (``minigpt.aligned.reward_start``):

- reward model: held-out pairwise accuracy on the real preference data (goal: at
  least 90%), next to the bag-of-words baseline fit in the same run;
- DPO: the polite-style rate (``minigpt.preference.is_polite``) at least 20 points
  above its SFT model's, and task accuracy at most 2 points below (DPO's SFT model,
  its reference, is the assistant tuned a little further on answers in mixed tones:
  ``minigpt.aligned.run_dpo``; it is printed next to the assistant);
- RLVR: held-out task accuracy at least 5 points above the SFT model's;
- RLHF: the mean reward of the last steps above the first steps' with the KL to the
  SFT model bounded (goal: at most 5 nats per response), and the run without the KL
  penalty showing the hacking (goal: at least twice the KL and more than 2 points of
  task accuracy lost against the run with the penalty);
- each training run at most 180 s.

The runs are the cached ones of ``minigpt.aligned.aligned_model`` and
``course_reward_model`` (the chapter's notebook reads the same): the first call
trains them (one thread, as the notebooks do), later calls read them, and the times
printed are those of the training run, as it was recorded.

    python benchmarks/align.py
    python benchmarks/align.py --reward-seeds 3   # also: the reward model's variants
    python benchmarks/align.py --group-signal     # also: where RLVR has a signal

``--group-signal`` samples 8 answers at the RLVR recipe's temperature to 40 training
prompts per family and to the held-out prompts, and prints per family the sampled
accuracy and the share of groups holding both a right and a wrong answer (the only
groups a group baseline learns from): the measurement behind chapter 08's account of
RLVR.

``--reward-seeds N`` trains the reward-model recipe N more times, and N times each
with its other start (``"sft"`` or ``"base"``) and with its other pool (``"last"``
or ``"mean"``: ``minigpt.preference.RewardModel``), at fine-tuning seeds 0 to N-1
(about 110 s a run on one thread), and prints each held-out accuracy and the means:
the measurement behind the recipe's ``"start"`` and ``"pool"``.
"""

from __future__ import annotations

import argparse
import time

import torch

from minigpt.align import RLConfig, sample_responses, task_reward
from minigpt.aligned import (
    RECIPES,
    aligned_model,
    course_reward_model,
    evaluate_style,
    held_out_tasks,
    reward_start,
    run_reward_model,
)
from minigpt.assistant import assistant_model, task_prompt
from minigpt.model import GPT
from minigpt.tasks import FAMILIES, make_tasks
from minigpt.tokenizer import CharTokenizer

TIME_GOAL = 180.0
RM_GOAL, DPO_STYLE_GOAL, DPO_ACC_DROP, RLVR_GOAL, KL_BOUND = 0.90, 0.20, 0.02, 0.05, 5.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def compare_reward_variants(n_seeds: int) -> None:
    """The reward-model recipe, and the recipe with its other start and with its other
    pool, each at fine-tuning seeds 0..n_seeds-1."""
    r = RECIPES["reward"]
    other_start = {"base": "sft", "sft": "base"}[r["start"]]
    other_pool = {"mean": "last", "last": "mean"}[r["pool"]]
    variants = {
        "recipe": (r["start"], r["pool"]),
        "other start": (other_start, r["pool"]),
        "other pool": (r["start"], other_pool),
    }
    means = {}
    for name, (where, pool) in variants.items():
        model, tokenizer = reward_start(where)
        accs = [
            run_reward_model(model, tokenizer, seed=s, pool=pool)[1]["accuracy"]
            for s in range(n_seeds)
        ]
        means[name] = mean(accs)
        shown = ", ".join(f"{a:.1%}" for a in accs)
        print(
            f"align: reward model from {where}, pool {pool!r}, seeds 0-{n_seeds - 1}: {shown}; "
            f"mean {mean(accs):.1%}"
        )
    for name in ("other start", "other pool"):
        print(
            f"align: reward model's recipe {variants['recipe']}: mean {means['recipe']:.1%} vs "
            f"{name} {variants[name]} {means[name]:.1%}: {verdict(means['recipe'] >= means[name])}"
        )


def group_signal(model: GPT, tokenizer: CharTokenizer, n: int = 40, group: int = 8) -> None:
    """Where RLVR can learn: per family, the SFT model's sampled accuracy and the share
    of groups (``group`` samples at the RLVR recipe's temperature) that hold both a
    right and a wrong answer, the only groups whose advantages are not all zero, on
    ``n`` training prompts and on the held-out prompts."""
    rl = RLConfig(**RECIPES["rlvr"]["rl"])
    for split, examples in (("train", make_tasks("train", n, seed=0)), ("held", held_out_tasks())):
        rollouts = sample_responses(
            model, tokenizer, [task_prompt(e) for e in examples], n=group,
            temperature=rl.temperature, max_new_tokens=rl.max_new_tokens, seed=0,
        )  # fmt: skip
        for family in FAMILIES:
            groups = [
                [task_reward(e, text) for text in texts]
                for e, texts in zip(examples, rollouts.texts, strict=True)
                if e.family == family
            ]
            right = mean([mean(g) for g in groups])
            mixed = mean([float(0 < sum(g) < group) for g in groups])
            print(
                f"align: rlvr signal, {split} prompts, {family}: sampled accuracy {right:.0%}, "
                f"groups with right and wrong answers {mixed:.0%}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--group-signal",
        action="store_true",
        help="also print, per task family, how many sampled groups hold a learning signal",
    )
    parser.add_argument(
        "--reward-seeds",
        type=int,
        default=0,
        metavar="N",
        help="also train the reward model's recipe and two variants N times each",
    )
    args = parser.parse_args()
    if args.reward_seeds < 0:
        parser.error(f"--reward-seeds must be >= 0, got {args.reward_seeds}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    sft, tokenizer, _ = assistant_model()
    base = evaluate_style(sft, tokenizer, held_out_tasks())
    times = {}

    _, _, rm = course_reward_model()
    times["reward model"] = rm["seconds"]
    print(
        f"align: reward model held-out pairwise accuracy {rm['accuracy']:.1%} (before "
        f"{rm['accuracy_before']:.1%}) vs bag of words {rm['bag_of_words']:.1%} "
        f"(goal >= {RM_GOAL:.0%}): {verdict(rm['accuracy'] >= RM_GOAL)}"
    )

    _, _, dpo = aligned_model("dpo")
    ref = dpo["sft"]  # DPO's SFT model: the assistant tuned on answers in mixed tones
    times["dpo's sft (mixed tones)"], times["dpo"] = ref["seconds"], dpo["seconds"]
    print(
        f"align: dpo's sft (the assistant tuned on mixed tones) preferred rate "
        f"{ref['polite']:.1%}, task accuracy {ref['accuracy']:.1%} (the assistant "
        f"{base['polite']:.1%}, {base['accuracy']:.1%})"
    )
    gain = dpo["polite"] - ref["polite"]
    print(
        f"align: dpo preferred rate {dpo['polite']:.1%} vs sft {ref['polite']:.1%} "
        f"({100 * gain:+.1f} points, goal >= +{100 * DPO_STYLE_GOAL:.0f}): "
        f"{verdict(gain >= DPO_STYLE_GOAL)}"
    )
    drop = ref["accuracy"] - dpo["accuracy"]
    print(
        f"align: dpo task accuracy {dpo['accuracy']:.1%} vs sft {ref['accuracy']:.1%} "
        f"({-100 * drop:+.1f} points, goal >= -{100 * DPO_ACC_DROP:.0f}): "
        f"{verdict(drop <= DPO_ACC_DROP)}"
    )

    _, _, rlvr = aligned_model("rlvr")
    times["rlvr"] = rlvr["seconds"]
    gain = rlvr["accuracy"] - base["accuracy"]
    print(
        f"align: rlvr task accuracy {rlvr['accuracy']:.1%} vs sft {base['accuracy']:.1%} "
        f"({100 * gain:+.1f} points, goal >= +{100 * RLVR_GOAL:.0f}): {verdict(gain >= RLVR_GOAL)}"
    )

    _, _, rlhf = aligned_model("rlhf")
    _, _, loose = aligned_model("rlhf_no_kl")
    times["rlhf"], times["rlhf without kl"] = rlhf["seconds"], loose["seconds"]
    for name, run in (("rlhf", rlhf), ("rlhf without kl", loose)):
        rewards = run["history"]["reward"]
        k = max(1, len(rewards) // 5)
        first, last = mean(rewards[:k]), mean(rewards[-k:])
        run["up"] = last > first
        print(
            f"align: {name} mean reward {first:.2f} -> {last:.2f} (first and last {k} steps), "
            f"kl to sft {run['kl']:.2f} nats, task accuracy {run['accuracy']:.1%} "
            f"(reward model's pair accuracy {run['rm']:.1%})"
        )
    ok = rlhf["up"] and rlhf["kl"] <= KL_BOUND
    print(f"align: rlhf reward up with kl {rlhf['kl']:.2f} <= {KL_BOUND:.0f} nats: {verdict(ok)}")
    # hacking: the unleashed policy drifts at least twice as far and loses accuracy
    shows = loose["kl"] >= 2 * rlhf["kl"] and loose["accuracy"] < rlhf["accuracy"] - 0.02
    print(
        f"align: rlhf without kl drifts further (kl {loose['kl']:.2f} vs {rlhf['kl']:.2f}, "
        f"goal >= 2x) and loses accuracy ({loose['accuracy']:.1%} vs {rlhf['accuracy']:.1%}, "
        f"goal > 2 points): {verdict(shows)}"
    )
    for name, seconds in times.items():
        print(
            f"align: {name} training time {seconds:.0f} s (goal <= {TIME_GOAL:.0f} s): "
            f"{verdict(seconds <= TIME_GOAL)}"
        )
    if args.reward_seeds:
        compare_reward_variants(args.reward_seeds)
    if args.group_signal:
        group_signal(sft, tokenizer)
    print(f"align: total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
