"""Instruction-tuning benchmark: held-out task accuracy and translation, before and after.

Starts from the course's assistant base model (``minigpt.pretrained.assistant_base_model``:
pretrained on Tiny Shakespeare only, cached; its pretraining is not part of the
budget), prepared by ``minigpt.assistant.tuning_start``, and reports:

- tasks (``minigpt.assistant.ASSISTANT``, the suite of ``minigpt.tasks``): held-out
  exact-match accuracy per family, before and after (goal: mean at least 80%, every
  family at least 50%), on words and numbers never seen in training, and the
  training time (goal: at most 300 s on this machine's CPU, default threads);
- translation (``minigpt.assistant.TRANSLATOR``, a separate fine-tune of the same
  start on the Tatoeba training pairs, both ways, in the short prompt of
  ``minigpt.translation.language_prompt``): exact match against any reference and
  chrF on the test sentences (no English sentence of them was trained on), next
  to the nearest-neighbour baseline (the translation of the closest English
  training sentence by edit distance) measured in the same run (goal: both above).

    python benchmarks/instruct.py               # the full run (about 13 minutes)
    python benchmarks/instruct.py --threads 1
    python benchmarks/instruct.py --steps 200   # a smoke run (goals will fail)
    python benchmarks/instruct.py --families reverse,add,subtract,sort,reverse_upper
    python benchmarks/instruct.py --seed 1 --lr 1e-3   # another order of examples, rate

    python benchmarks/instruct.py --translation-trials   # two other translators (8 min)

``--translation-trials`` trains only two translators that try to beat the baseline
another way, both from the course's assistant (its copying skills) at lr 1e-3, one
way and in the course template, 1,500 steps: the plain prompt (the control), and
the prompt with the nearest *other* training pair
in it, whose French the model may copy and edit (retrieval-augmented translation,
"neural fuzzy repair", Bulte and Tezcan 2019; at test time, the baseline's own pair).

``--seed`` and ``--lr`` change the task tuning only (``FinetuneConfig.seed`` orders the
training examples): the recipe's result moves by tens of points from seed to seed, so
compare recipes over a few seeds.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from minigpt.assistant import (
    ASSISTANT,
    PROMPT_INTRO_USED,
    TRANSLATOR,
    assistant_model,
    evaluate_tasks,
    evaluate_translation,
    instruction_data,
    respond,
    translation_data,
    tune_assistant,
    tuning_start,
)
from minigpt.finetune import FinetuneConfig
from minigpt.instruct import InstructionExample, format_prompt
from minigpt.tasks import format_report
from minigpt.translation import (
    chrf,
    exact_match,
    language_prompt,
    nearest_neighbour_translations,
    nearest_sources,
    references,
    translation_example,
)

TIME_GOAL = 300.0
TRIAL_STEPS = 1500  # the trials' length (the translator's before it went both ways)
MEAN_GOAL, FAMILY_GOAL = 0.80, 0.50


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def tune(
    recipe: dict, train: list, steps: int | None, begin=tuning_start, prompt=None, **overrides
):
    """Fine-tune a fresh ``begin()`` with ``recipe`` (its ``FinetuneConfig`` settings changed
    by ``overrides``, None meaning the recipe's) on prompts written by ``prompt`` (None:
    the course template); returns (model, tokenizer, history, seconds)."""
    model, tokenizer, _ = begin()
    settings = dict(recipe["finetune"])
    settings |= {k: v for k, v in overrides.items() if v is not None}
    if steps:
        settings["max_steps"] = steps
    start = time.perf_counter()
    history = tune_assistant(model, tokenizer, train, FinetuneConfig(**settings), prompt)
    return model, tokenizer, history, time.perf_counter() - start


def with_neighbour(source: str, near: str, table: dict, target: str = "") -> InstructionExample:
    """The translation example of ``source`` with the training pair of ``near`` in its input."""
    plain = translation_example(source, target)
    return InstructionExample(
        plain.instruction, f"{source}\n\nLike: {near}\nIn French: {table[near][0]}", target
    )


def translation_trials(steps: int | None) -> bool:
    """``--translation-trials``: the plain and the retrieval prompt, from the assistant."""
    tdata = translation_data()
    train_pairs, refs = tdata["train_pairs"], references(tdata["test_pairs"])
    table, sources, targets = references(train_pairs), list(refs), list(refs.values())
    baseline = nearest_neighbour_translations(train_pairs, sources)
    nn_exact, nn_chrf = exact_match(baseline, targets), chrf(baseline, targets)
    print(f"nearest neighbour: exact match {nn_exact:.1%}, chrF {nn_chrf:.1f}")
    near_train = dict(
        zip(table, nearest_sources(train_pairs, list(table), leave_out_self=True), strict=True)
    )
    near_test = nearest_sources(train_pairs, sources)
    retrieval = [
        with_neighbour(p.source, near_train[p.source], table, p.target) for p in train_pairs
    ]
    test_prompts = {
        "plain": [format_prompt(translation_example(s), PROMPT_INTRO_USED) for s in sources],
        "retrieval": [
            format_prompt(with_neighbour(s, n, table), PROMPT_INTRO_USED)
            for s, n in zip(sources, near_test, strict=True)
        ],
    }
    ok = True
    for name, train in (("plain", tdata["train"]), ("retrieval", retrieval)):
        model, tokenizer, _, seconds = tune(
            TRANSLATOR, train, steps or TRIAL_STEPS, assistant_model, lr=1e-3
        )
        out = respond(model, tokenizer, test_prompts[name])
        em, cf = exact_match(out, targets), chrf(out, targets)
        for s, t in list(zip(sources, out, strict=True))[:3]:
            print(f"  {name}: {s!r} -> {t!r} (references {refs[s]})")
        print(
            f"translate trial {name} prompt, from the assistant at lr 1e-3 ({seconds:.0f} s): "
            f"exact match {em:.1%}, chrF {cf:.1f} vs nearest neighbour {nn_exact:.1%}, "
            f"{nn_chrf:.1f}: {verdict(em > nn_exact and cf > nn_chrf)}"
        )
        ok = ok and em > nn_exact and cf > nn_chrf
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (recipe's)")
    ap.add_argument("--families", default=None, help="comma-separated task families")
    ap.add_argument("--seed", type=int, default=None, help="task tuning's seed (recipe's)")
    ap.add_argument("--lr", type=float, default=None, help="task tuning's peak lr (recipe's)")
    ap.add_argument(
        "--translation-trials", action="store_true", help="only the two other translators"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.translation_trials:
        return 0 if translation_trials(args.steps) else 1
    recipe = ASSISTANT
    if args.families:
        recipe = {
            **ASSISTANT,
            "tasks": {**ASSISTANT["tasks"], "families": args.families.split(",")},
        }
    data = instruction_data(recipe)
    held_out = data["held_out"]
    start_model, tokenizer, _ = tuning_start()
    before, _ = evaluate_tasks(start_model, tokenizer, held_out)
    print(
        f"fine-tuning {start_model.num_parameters():,} parameters on {len(data['train']):,} task "
        f"examples, {torch.get_num_threads()} CPU thread(s)"
    )
    model, tokenizer, history, seconds = tune(
        recipe, data["train"], args.steps, seed=args.seed, lr=args.lr
    )
    after, responses = evaluate_tasks(model, tokenizer, held_out)
    print(format_report(after, before, title="after"))
    print(f"final training loss {sum(history['loss'][-50:]) / 50:.3f}")
    for family in after:  # one wrong answer per family, if any
        rows = zip(held_out, responses, strict=True)
        wrong = [(e, r) for e, r in rows if e.family == family and r != e.answer][:1]
        for e, r in wrong:
            print(f"  {family}: {e.instruction!r} -> {r!r} (wanted {e.answer!r})")

    tdata = translation_data()
    test = tdata["test_pairs"]
    base_translation, _ = evaluate_translation(start_model, tokenizer, test)
    translator, tokenizer, _, t_seconds = tune(
        TRANSLATOR, tdata["train"], args.steps, prompt=language_prompt
    )
    translation, translations = evaluate_translation(translator, tokenizer, test)
    # the same score on 300 training sentences: what it memorised, next to what it learned
    seen = set(random.Random(0).sample(sorted(references(tdata["train_pairs"])), 300))
    memorised, _ = evaluate_translation(
        translator, tokenizer, [p for p in tdata["train_pairs"] if p.source in seen]
    )
    refs = references(test)
    baseline = nearest_neighbour_translations(tdata["train_pairs"], list(refs))
    targets = list(refs.values())
    nn_exact, nn_chrf = exact_match(baseline, targets), chrf(baseline, targets)
    print(
        f"translation: {len(tdata['train_pairs']):,} training pairs ({len(tdata['train']):,} "
        f"examples: both ways), {len(refs)} test sentences, {t_seconds:.0f} s of training; on "
        f"300 training sentences exact match {memorised['exact_match']:.1%}, chrF "
        f"{memorised['chrf']:.1f}"
    )
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
