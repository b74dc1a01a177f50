"""Fine-tuning benchmark: SMS spam, SST-2 and LoRA from a Tiny Shakespeare model.

Starts from the character-level model pretrained only on Tiny Shakespeare
(chapter 05) and reports, all on the CPU, with both of chapter 07's classifiers:
``GenerativeClassifier`` (the language model scores the text after each label
token) and ``GPTClassifier`` (a new head reads the last token):

- SMS spam (balanced split) test accuracy after fine-tuning every layer within a
  time budget (default 180 s; goal: at least 95%), plus the head classifier's
  cheaper choices (head only, last blocks) under the same budget. Every run
  evaluates on its validation split every 50 steps (inside the budget) and ends
  with the weights that scored best there; test and dev sentences only report;
- SST-2 dev accuracy of the fine-tuned model next to a bag-of-words logistic
  regression trained in the same run on the same sentences;
- LoRA on SMS spam under the same budget (adapters on every block's linear layers,
  plus the token embeddings, which hold the new label tokens and the characters
  Shakespeare never used): accuracy next to full fine-tuning (goal: within 1
  point) and the fraction of trainable parameters (goal: < 5%).

    python benchmarks/finetune.py              # the full run (about 20 minutes)
    python benchmarks/finetune.py --quick      # a smoke run (about 2 minutes)
    python benchmarks/finetune.py --checkpoint DIR   # a model saved by GPT.save
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from minigpt import GPT
from minigpt.classify import (
    BagOfWords,
    GenerativeClassifier,
    GPTClassifier,
    balanced_split,
    evaluate_classifier,
    load_sms_spam,
    load_sst2,
)
from minigpt.finetune import FinetuneConfig, train_classifier
from minigpt.lora import apply_lora, count_parameters
from minigpt.tokenizer import CharTokenizer


def load_pretrained(checkpoint: str | None) -> tuple[GPT, list[str]]:
    """The Tiny Shakespeare character model and its vocabulary (one string per id)."""
    if checkpoint is not None:
        model = GPT.load(checkpoint)
        tokenizer = CharTokenizer.load(Path(checkpoint) / "tokenizer.json")
    else:
        from minigpt.pretrained import shakespeare_char_model  # the cached course model

        model, tokenizer = shakespeare_char_model()
    return model, [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short budgets, a smoke run")
    ap.add_argument("--budget", type=float, default=None, help="seconds of training per run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--checkpoint", default=None, help="a GPT.save folder with a CharTokenizer tokenizer.json"
    )
    ap.add_argument("--max-length", type=int, default=128, help="characters per message")
    ap.add_argument("--rank", type=int, default=2, help="LoRA rank")
    ap.add_argument("--lora-lr", type=float, default=5e-3, help="LoRA learning rate")
    ap.add_argument(
        "--lr", type=float, default=1e-3, help="generative classifier: full fine-tuning lr"
    )
    ap.add_argument("--head-lr", type=float, default=2e-3, help="head classifier: learning rate")
    ap.add_argument("--dropout", type=float, default=0.1, help="dropout while fine-tuning")
    ap.add_argument(
        "--discriminative", type=float, default=1.0, help="GenerativeClassifier's class-loss weight"
    )
    ap.add_argument(
        "--ema", type=float, default=None, help="weight average decay per step (None = off)"
    )
    ap.add_argument(
        "--eval-every", type=int, default=50, help="steps between validation evaluations"
    )
    ap.add_argument("--seed", type=int, default=0, help="seeds the new weights and batch order")
    ap.add_argument(
        "--split-seed", type=int, default=0, help="seeds the SMS spam train/val/test split"
    )
    ap.add_argument(
        "--tasks",
        default="spam,head,layers,lora,sst",
        help="comma-separated subset of spam,head,layers,lora,sst (lora also runs spam)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget or (20.0 if args.quick else 180.0)
    max_steps = 10_000  # the time budget is what stops training

    base, vocab = load_pretrained(args.checkpoint)
    spam = load_sms_spam()
    sst_train, sst_dev = load_sst2("train"), load_sst2("dev")
    if args.quick:
        sst_train = sst_train[:5000]
    texts = [t for t, _ in spam + sst_train + sst_dev]
    vocab = vocab + sorted(set("".join(texts)) - set(vocab))
    stoi = {c: i for i, c in enumerate(vocab)}
    base.resize_vocab(len(vocab))

    def encode(text: str) -> list[int]:
        return [stoi[c] for c in text]

    max_len = min(args.max_length, base.config.block_size)
    print(
        f"model: {base.num_parameters():,} parameters, {base.config.n_layer} layers, "
        f"block_size {base.config.block_size}; messages cut to {max_len} characters; "
        f"{budget:.0f} s of training per run on {torch.get_num_threads()} CPU thread(s)"
    )
    train, val, test = balanced_split(spam, (0.7, 0.1, 0.2), seed=args.split_seed)

    def run(data, val_data, eval_data, *, generative=True, blocks="all", lora_rank=None, lr=None):
        torch.manual_seed(args.seed)
        if generative:
            clf = GenerativeClassifier(copy.deepcopy(base), 2, discriminative=args.discriminative)
            lr = lr or args.lr
        else:
            clf = GPTClassifier(copy.deepcopy(base), 2)
            clf.train_only(blocks)
            lr = lr or args.head_lr
        if lora_rank:
            # the embeddings stay trainable: they hold the new label tokens (and the
            # output head, tied to them) and the characters Shakespeare never used
            keep = ("gpt.wte",) if generative else ("head",)
            apply_lora(clf, ("c_attn", "c_proj", "c_fc"), lora_rank, 2 * lora_rank, trainable=keep)
        trainable, total = count_parameters(clf)
        # evaluations on the validation split count in the budget; training ends with
        # the weights that scored best there (early stopping chosen after the fact)
        cfg = FinetuneConfig(
            max_steps=max_steps,
            batch_size=16,
            lr=lr,
            max_length=max_len,
            time_limit=budget,
            eval_interval=args.eval_every,
            keep_best=True,
            dropout=args.dropout,
            seed=args.seed,
            ema=args.ema,
        )
        t0 = time.perf_counter()
        history = train_classifier(clf, data, encode, cfg, val=val_data)
        seconds = time.perf_counter() - t0
        acc, _ = evaluate_classifier(clf, eval_data, encode, max_length=max_len)
        return acc, len(history["loss"]), seconds, trainable / total

    tasks = set(args.tasks.split(","))
    rows = []
    full = lora = sst = None
    bow_acc = 0.0
    print(f"\nSMS spam: {len(train)} train / {len(val)} val / {len(test)} test (balanced)")
    if tasks & {"spam", "lora"}:
        full = run(train, val, test)
        rows.append(("SMS spam test", "generative, all layers", *full))
    if "head" in tasks:
        rows.append(("SMS spam test", "head, all layers", *run(train, val, test, generative=False)))
    if "layers" in tasks:
        for blocks in (2, 0):
            label = "head only" if blocks == 0 else f"head + last {blocks} blocks"
            rows.append(
                ("SMS spam test", label, *run(train, val, test, generative=False, blocks=blocks))
            )
    if "lora" in tasks:
        lora = run(train, val, test, lora_rank=args.rank, lr=args.lora_lr)
        rows.append(("SMS spam test", f"generative, LoRA r={args.rank} + embeddings", *lora))
    if "sst" in tasks:
        print(
            f"SST-2: {len(sst_train):,} train ({len(sst_dev)} held out to validate) / {len(sst_dev)} dev"
        )
        # model selection on sentences held out of train: dev only reports
        order = torch.randperm(len(sst_train), generator=torch.Generator().manual_seed(0)).tolist()
        sst_val = [sst_train[i] for i in order[: len(sst_dev)]]
        sst_fit = [sst_train[i] for i in order[len(sst_dev) :]]
        sst = run(sst_fit, sst_val, sst_dev)
        rows.append(("SST-2 dev", "generative, all layers", *sst))
        t0 = time.perf_counter()
        bow = BagOfWords.fit(sst_train)
        bow_seconds = time.perf_counter() - t0
        labels = torch.tensor([y for _, y in sst_dev])
        bow_acc = (bow.predict([t for t, _ in sst_dev]) == labels).float().mean().item()
        rows.append(("SST-2 dev", "bag-of-words logistic regression", bow_acc, 3, bow_seconds, 1.0))

    print(
        f"\n{'task':<14} {'method':<34} {'accuracy':>8} {'steps':>6} {'seconds':>8} {'trainable':>9}"
    )
    for task, method, acc, steps, seconds, frac in rows:
        steps_text = f"{steps} ep" if method.startswith("bag") else str(steps)
        print(f"{task:<14} {method:<34} {acc:>8.1%} {steps_text:>6} {seconds:>8.0f} {frac:>9.1%}")
    print()

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    if full is not None:
        print(
            f"SMS spam, generative classifier, all layers in {full[2]:.0f} s: {full[0]:.1%} "
            f"(goal >= 95%): {verdict(full[0] >= 0.95)}"
        )
    if sst is not None:
        print(f"SST-2: fine-tuned {sst[0]:.1%} vs bag of words {bow_acc:.1%}")
    if lora is not None and full is not None:
        # "within 1 point": at most 1 point below full fine-tuning (above is fine)
        ok = lora[0] >= full[0] - 0.01 - 1e-9 and lora[3] < 0.05
        print(
            f"LoRA: {lora[0]:.1%} vs full fine-tuning {full[0]:.1%} "
            f"(difference {100 * (lora[0] - full[0]):+.1f} points, goal: at most 1 below) "
            f"with {lora[3]:.1%} of the parameters trainable (goal < 5%): {verdict(ok)}"
        )
    print(
        f"(one split of {len(test)} test messages: one standard error is about "
        f"{100 * (0.95 * 0.05 / len(test)) ** 0.5:.1f} points; --split-seed and --seed vary it)"
    )


if __name__ == "__main__":
    main()
