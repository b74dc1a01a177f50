"""Int8 generation benchmark: minigpt with int8 weights against float32 and `transformers`.

    python benchmarks/quantize.py              # GPT-2 124M random + the course char model (about 2 minutes)
    python benchmarks/quantize.py --quick      # a 2-layer, 128-wide GPT-2-shaped model, 32 tokens
    python benchmarks/quantize.py --threads 1  # one intra-op thread (less noise on a busy machine)

1. A GPT-2 124M-sized model with random weights, where the weights dominate a token's
   time: `transformers` (float32, KV cache, SDPA, the same weights), minigpt float32
   and minigpt after ``minigpt.quantize.quantize``, batch 1, a 16-token prompt,
   greedy decoding of 128 new tokens, interleaved and repeated (the best time of each
   counts). Goal: int8 at least 2x the tokens/s of `transformers` float32 (without
   `transformers` installed, the line compares with minigpt float32 instead).
2. The cached course model (``minigpt.pretrained.shakespeare_char_model``): its
   tokens/s in float32 and int8 (for information: its 3 MB of weights sit in the
   CPU's caches, so int8 has nothing to save there), how many greedy tokens of 200
   agree, how often the two pick the same next token on held-out text, and the
   validation loss on the whole held-out text. Goal: int8's loss
   within 1% of float32's.
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings

import torch
from timing import best_time  # benchmarks/timing.py

from minigpt import GPT, GPTConfig
from minigpt.generate import generate
from minigpt.pretrained import shakespeare_char_data, shakespeare_char_model
from minigpt.quantize import KERNEL_MAX_ROWS, int8_kernel_available, model_size_bytes, quantize
from minigpt.train import validation_loss


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    """How many new tokens two greedy runs share, and where they first differ."""
    same = (a == b).tolist()
    first = same.index(False) if False in same else None
    where = "never" if first is None else f"at new token {first}"
    return f"{sum(same)}/{len(same)} identical, first divergence {where}"


def bench_gpt2(n_layer: int, n_embd: int, n_head: int, new_tokens: int, repeats: int) -> bool:
    has_hf = importlib.util.find_spec("transformers") is not None
    if has_hf:
        from generate import hf_gpt2, to_minigpt  # benchmarks/generate.py

        hf = hf_gpt2(n_layer, n_embd, n_head)
        fp32 = to_minigpt(hf)
    else:
        torch.manual_seed(0)
        fp32 = GPT(GPTConfig.preset("gpt2", n_layer=n_layer, n_embd=n_embd, n_head=n_head))
    int8 = quantize(fp32.eval())
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    print(
        f"GPT-2 configuration, {n_layer} layers, width {n_embd}, "
        f"{fp32.num_parameters() / 1e6:.0f}M parameters, random weights; batch 1, 16-token "
        f"prompt, {new_tokens} new tokens, greedy, CPU with {torch.get_num_threads()} threads"
    )
    print(
        f"model size: float32 {model_size_bytes(fp32) / 1e6:.0f} MB, "
        f"int8 {model_size_bytes(int8) / 1e6:.0f} MB"
    )

    def run_hf():
        with torch.inference_mode():
            return hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=50256,
            )

    runs = {
        "fp32": lambda: generate(fp32, prompt, new_tokens, temperature=0),
        "int8": lambda: generate(int8, prompt, new_tokens, temperature=0),
    }
    if has_hf:
        runs = {"hf": run_hf, **runs}
    for run in runs.values():  # warm up: first calls allocate and pick kernels
        run()
    best, out = dict.fromkeys(runs, float("inf")), {}
    for _ in range(repeats):
        for name, run in runs.items():
            t, out[name] = best_time(run, 1)
            best[name] = min(best[name], t)
    rate = {k: new_tokens / t for k, t in best.items()}
    if has_hf:
        print(f"transformers generate (float32):  {rate['hf']:8.1f} tokens/s")
    print(f"minigpt generate (float32):       {rate['fp32']:8.1f} tokens/s")
    print(f"minigpt generate (int8 weights):  {rate['int8']:8.1f} tokens/s")
    print(f"greedy tokens int8 vs float32: {agreement(out['fp32'][0, 16:], out['int8'][0, 16:])}")
    if has_hf:
        print(f"minigpt float32 == transformers tokens: {torch.equal(out['hf'], out['fp32'])}")
    peer = "hf" if has_hf else "fp32"
    ratio = rate["int8"] / rate[peer]
    print(f"minigpt int8 / minigpt float32: {rate['int8'] / rate['fp32']:.2f}x")
    name = "transformers float32" if has_hf else "minigpt float32 (no transformers installed)"
    ok = ratio >= 2.0
    print(f"minigpt int8 / {name}: {ratio:.2f}x (goal >= 2x) {'PASS' if ok else 'FAIL'}")
    return ok


def bench_char_model(new_tokens: int, repeats: int) -> bool:
    fp32, tokenizer = shakespeare_char_model()
    int8 = quantize(fp32)
    print(
        f"\ncourse char model ({fp32.num_parameters() / 1e6:.2f}M parameters): float32 "
        f"{model_size_bytes(fp32) / 1e6:.2f} MB, int8 {model_size_bytes(int8) / 1e6:.2f} MB"
    )
    prompt = torch.tensor([tokenizer.encode("ROMEO:\n")])
    runs = {
        "fp32": lambda: generate(fp32, prompt, new_tokens, temperature=0),
        "int8": lambda: generate(int8, prompt, new_tokens, temperature=0),
    }
    best, out = dict.fromkeys(runs, float("inf")), {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, run in runs.items():
            t, out[name] = best_time(run, 1)
            best[name] = min(best[name], t)
    rate = {k: new_tokens / t for k, t in best.items()}
    n = prompt.shape[1]
    print(
        f"generate, batch 1, {new_tokens} new tokens: float32 {rate['fp32']:.0f} tokens/s, "
        f"int8 {rate['int8']:.0f} tokens/s ({rate['int8'] / rate['fp32']:.2f}x; no goal: "
        "the weights fit in the CPU's caches)"
    )
    print(
        f"greedy tokens int8 vs float32: {agreement(out['fp32'][0, n:], out['int8'][0, n:])} "
        "(greedy decoding follows near-ties, which any rounding can flip)"
    )
    _, _, val_ids = shakespeare_char_data()
    T = fp32.config.block_size
    windows = torch.as_tensor(val_ids[: 64 * T].astype("int64")).view(64, T)
    with torch.inference_mode():
        top32, top8 = fp32(windows)[0].argmax(-1), int8(windows)[0].argmax(-1)
    print(
        f"next-token argmax int8 == float32 on {windows.numel():,} held-out positions: "
        f"{(top32 == top8).float().mean():.2%}"
    )
    loss32, loss8 = validation_loss(fp32, val_ids), validation_loss(int8, val_ids)
    change = (loss8 - loss32) / loss32
    ok = abs(change) <= 0.01
    print(
        f"validation loss (all {len(val_ids):,} held-out characters): float32 {loss32:.4f}, "
        f"int8 {loss8:.4f}, change {change:+.3%} (goal within 1%) {'PASS' if ok else 'FAIL'}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and fewer tokens")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # transformers' generation-config chatter
    shape = (2, 128, 4) if args.quick else (12, 768, 12)
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or 3
    kernel = (
        f"torch._weight_int8pack_mm for up to {KERNEL_MAX_ROWS} rows, float32 matmul above"
        if int8_kernel_available()
        else "no int8 kernel in this PyTorch: the plain float32 matmul"
    )
    print(f"int8 path: {kernel}")
    bench_gpt2(*shape, new_tokens, repeats)
    bench_char_model(200, repeats)
    if args.quick:
        print("(--quick: a small model; the speed goal is for the full GPT-2 124M run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
