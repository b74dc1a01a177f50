"""Tokenizer benchmark: minigpt.tokenizer against Hugging Face `tokenizers` and tiktoken.

    python benchmarks/tokenizer.py            # the full run (a few minutes: tracemalloc is slow)
    python benchmarks/tokenizer.py --quick    # a smaller run (under a minute)

Everything is measured in one run on the same machine; the ratios are what matter
(absolute times move with the machine's load). Prints:

1. BPE training time at vocab 10,000 on Tiny Shakespeare, pure Python, against
   `tokenizers`' ByteLevel BPE trainer (goal: at most 5x its time).
2. Encode throughput on Tiny Shakespeare: the pure-Python encoder, the
   `to_tiktoken()` fast path and tiktoken's own `get_encoding("gpt2")` (goal: the
   fast path at least 0.9x tiktoken).
3. Peak Python memory of `encode_iterable` over a file ten times Tiny Shakespeare
   (written to a temporary file), next to the peak over a file of one copy: memory
   that does not grow with the file.

Data comes from minigpt.data (set MINIGPT_DATA_DIR to use a local copy offline).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from timing import best_time  # benchmarks/timing.py

from minigpt import data
from minigpt.tokenizer import BPETokenizer, tiktoken_gpt2_reference


def verdict(ok: bool) -> str:
    return "meets the goal" if ok else "MISSES the goal"


def train_hf(text: str, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok


def bench_training(text: str, vocab_size: int, repeats: int) -> bool:
    print(f"\n1. BPE training, vocab {vocab_size:,}, on {len(text):,} characters")
    ours, tok = best_time(lambda: BPETokenizer.train(text, vocab_size), repeats)
    theirs, hf = best_time(lambda: train_hf(text, vocab_size), repeats)
    assert len(tok) == vocab_size and hf.get_vocab_size() == vocab_size
    ratio = ours / theirs
    print(f"   minigpt BPETokenizer.train (pure Python)   {ours:8.2f} s")
    print(f"   HF tokenizers ByteLevel BPE (Rust)         {theirs:8.2f} s")
    print(f"   ratio minigpt / HF = {ratio:.2f}x  (goal <= 5x: {verdict(ratio <= 5)})")
    return ratio <= 5


def bench_encode(text: str, repeats: int) -> bool:
    mb = len(text.encode("utf-8")) / 1e6
    print(f"\n2. Encoding {mb:.2f} MB of text with GPT-2's tokenizer")
    ours = BPETokenizer.from_gpt2()
    fast = ours.to_tiktoken()
    reference = tiktoken_gpt2_reference()

    def pure_cold():
        ours._cache.clear()  # measure the cold-cache encoder, as on new text
        return ours.encode(text)

    t_pure, ids = best_time(pure_cold, max(1, repeats // 2))
    # the two Rust encoders are compared in alternation, so that a burst of load from
    # elsewhere on the machine hits both alike
    t_fast = t_ref = float("inf")
    for _ in range(repeats):
        t, fast_ids = best_time(lambda: fast.encode(text), 1)
        t_fast = min(t_fast, t)
        t, ref_ids = best_time(lambda: reference.encode(text), 1)
        t_ref = min(t_ref, t)
    assert ids == fast_ids == ref_ids, "the three encoders disagree"
    n = len(ids)
    for name, t in [
        ("minigpt encode (pure Python)", t_pure),
        ("minigpt to_tiktoken() fast path", t_fast),
        ('tiktoken.get_encoding("gpt2")', t_ref),
    ]:
        print(f"   {name:34s} {mb / t:8.2f} MB/s  {n / t / 1e6:6.2f} M tokens/s")
    ratio = t_ref / t_fast  # throughput of the fast path relative to tiktoken
    print(f"   pure Python / tiktoken throughput = {t_ref / t_pure:.3f}x  (no goal)")
    print(
        f"   fast path / tiktoken throughput = {ratio:.2f}x  (goal >= 0.9x: {verdict(ratio >= 0.9)})"
    )
    return ratio >= 0.9


def peak_memory_of_encode_iterable(tok: BPETokenizer, text: str, copies: int):
    """Write ``copies`` x ``text`` to a temporary file, encode it lazily, return
    (file size in MB, number of tokens, seconds, peak traced Python memory in MB)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(copies):
                f.write(text)
        size = path.stat().st_size / 1e6
        gc.collect()
        tracemalloc.start()
        start = time.perf_counter()
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in tok.encode_iterable(f))
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return size, n, seconds, peak / 1e6


def bench_memory(text: str, copies: int) -> None:
    print(f"\n3. Peak Python memory of encode_iterable over a file {copies}x Tiny Shakespeare")
    gpt2 = BPETokenizer.from_gpt2()
    rows = []
    for c in (1, copies):
        # a fresh tokenizer each time, so that both runs start with an empty chunk cache
        tok = BPETokenizer(gpt2.vocab, gpt2.merges, gpt2.special_tokens)
        rows.append(peak_memory_of_encode_iterable(tok, text, c))
    for size, n, seconds, peak in rows:
        print(
            f"   {size:5.1f} MB file: {n:>10,} tokens, peak {peak:5.1f} MB "
            f"({seconds:.1f} s, slowed down by tracemalloc)"
        )
    (_, _, _, peak1), (size, n, _, peak) = rows
    print(f"   peak at {copies}x / peak at 1x = {peak / peak1:.2f}  (bounded memory: about 1)")
    print(f"   (the {n:,} ids as one Python list would take about {n * 36 / 1e6:.0f} MB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a goal is missed"
    )
    args = parser.parse_args(argv)

    text = data.load_text("tinyshakespeare")
    if args.quick:
        train_text, vocab_size, encode_text, copies, repeats = text[:200_000], 2_000, text, 2, 1
    else:
        train_text, vocab_size, encode_text, copies, repeats = text, 10_000, text, 10, 3

    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs" + (" (--quick)" * args.quick))
    print("Timings are best-of-N wall clock; on a shared machine compare the ratios.")
    ok = bench_training(train_text, vocab_size, repeats)
    ok &= bench_encode(encode_text, 3 * repeats + 1)
    bench_memory(text, copies)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
