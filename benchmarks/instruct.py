"""Instruction-tuning benchmark: held-out task accuracy and translation, before and after.

Starts from the course's assistant base model (``minigpt.pretrained.assistant_base_model``:
pretrained on Tiny Shakespeare only, cached; its pretraining is not part of the
budget) and fine-tunes it with the ``minigpt.assistant.ASSISTANT`` recipe on the
task suite (``minigpt.tasks``) and the Tatoeba English-French training sentences
(``minigpt.translation``), then reports:

- held-out exact-match accuracy per task family, before and after (goal: mean at
  least 80%, every family at least 50%), on words and numbers never seen in training;
- the training time (goal: at most 300 s on this machine's CPU, default threads);
- translation of the test sentences (no English sentence of them was trained on):
  exact match against any reference and chrF, next to the nearest-neighbour
  baseline (the translation of the closest English training sentence by edit
  distance) measured in the same run (goal: both above it).

    python benchmarks/instruct.py               # the full run (about 6 minutes)
    python benchmarks/instruct.py --threads 1
    python benchmarks/instruct.py --steps 200   # a smoke run (goals will fail)
"""

from __future__ import annotations

import argparse
import time

import torch

from minigpt.assistant import (
    ASSISTANT,
    evaluate_tasks,
    evaluate_translation,
    instruction_data,
    tune_assistant,
)
from minigpt.finetune import FinetuneConfig
from minigpt.pretrained import assistant_base_model
from minigpt.tasks import format_report
from minigpt.translation import chrf, exact_match, nearest_neighbour_translations, references

TIME_GOAL = 300.0
MEAN_GOAL, FAMILY_GOAL = 0.80, 0.50


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (recipe's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = assistant_base_model(progress=True)
    data = instruction_data()
    held_out, test = data["held_out"], data["test"]
    before, _ = evaluate_tasks(model, tokenizer, held_out)
    base_translation, _ = evaluate_translation(model, tokenizer, test)

    settings = dict(ASSISTANT["finetune"])
    if args.steps:
        settings["max_steps"] = args.steps
    print(
        f"fine-tuning {model.num_parameters():,} parameters for {settings['max_steps']} steps "
        f"on {len(data['train']):,} examples, {torch.get_num_threads()} CPU thread(s)"
    )
    start = time.perf_counter()
    history = tune_assistant(model, tokenizer, data["train"], FinetuneConfig(**settings))
    seconds = time.perf_counter() - start
    after, responses = evaluate_tasks(model, tokenizer, held_out)
    translation, translations = evaluate_translation(model, tokenizer, test)

    refs = references(test)
    baseline = nearest_neighbour_translations(data["train_pairs"], list(refs))
    targets = list(refs.values())
    nn_exact, nn_chrf = exact_match(baseline, targets), chrf(baseline, targets)

    print(format_report(after, before, title="after"))
    print(f"final training loss {sum(history['loss'][-50:]) / 50:.3f}")
    for family in after:  # one wrong answer per family, if any
        wrong = [(e, r) for e, r in zip(held_out, responses, strict=True) if e.family == family]
        wrong = [(e, r) for e, r in wrong if r != e.answer][:1]
        for e, r in wrong:
            print(f"  {family}: {e.instruction!r} -> {r!r} (wanted {e.answer!r})")
    for s, t in list(zip(refs, translations, strict=True))[:5]:
        print(f"  translate {s!r} -> {t!r} (references {refs[s]})")

    mean = sum(after.values()) / len(after)
    print(
        f"instruct: mean held-out accuracy {mean:.1%} (goal >= {MEAN_GOAL:.0%}, before "
        f"{sum(before.values()) / len(before):.1%}): {verdict(mean >= MEAN_GOAL)}"
    )
    for family, acc in after.items():
        print(
            f"instruct: {family} {acc:.1%} (goal >= {FAMILY_GOAL:.0%}, before "
            f"{before[family]:.1%}): {verdict(acc >= FAMILY_GOAL)}"
        )
    print(
        f"instruct: training time {seconds:.0f} s for {len(history['step'])} steps "
        f"(goal <= {TIME_GOAL:.0f} s): {verdict(seconds <= TIME_GOAL)}"
    )
    em, cf = translation["exact_match"], translation["chrf"]
    print(
        f"translate: exact match {em:.1%} vs nearest neighbour {nn_exact:.1%} (before "
        f"tuning {base_translation['exact_match']:.1%}): {verdict(em > nn_exact)}"
    )
    print(
        f"translate: chrF {cf:.1f} vs nearest neighbour {nn_chrf:.1f} (before tuning "
        f"{base_translation['chrf']:.1f}): {verdict(cf > nn_chrf)}"
    )
    ok = (
        mean >= MEAN_GOAL
        and min(after.values()) >= FAMILY_GOAL
        and seconds <= TIME_GOAL
        and em > nn_exact
        and cf > nn_chrf
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
