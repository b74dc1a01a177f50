"""Generation benchmark: minigpt.generate against Hugging Face `transformers` generate.

    python benchmarks/generate.py            # GPT-2 124M, 128 new tokens (a few minutes on 2 cores)
    python benchmarks/generate.py --quick    # a 2-layer, 128-wide GPT-2-shaped model, 32 tokens
    python benchmarks/generate.py --threads 1  # one intra-op thread for both (less noise on a busy machine)
    python benchmarks/generate.py --row-major  # also minigpt with nn.Linear's default weight order

Both models are the GPT-2 124M configuration with the same random weights (the
Hugging Face model's weights are copied into minigpt's GPT), batch 1, a 16-token
prompt, greedy decoding of 128 new tokens, on the CPU under
``torch.inference_mode``. Everything is measured in one run, interleaved and
repeated (the best time of each counts, the one least disturbed by other load),
so the ratios are what matter. Prints tokens/s and:

1. minigpt (KV cache) against `transformers` ``generate`` with its KV cache and
   SDPA attention (goal: at least 1.2x its tokens/s).
2. minigpt with against without its KV cache (goal: at least 4x).

Both produce the same 128 tokens (checked), so the comparison is like for like.

At batch 1 each new token multiplies one vector by every weight matrix, so the time is
how fast the weights stream from memory. GPT-2's Conv1D keeps its matrices (in, out),
and minigpt's ``GPT`` keeps its ``nn.Linear`` weights column-major, the same memory
order (``minigpt.model``): on a 2-core AMD EPYC, MKL streams that order 1.36x
faster at one thread than the (out, in) rows of a default ``nn.Linear``.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from timing import best_time  # benchmarks/timing.py

from minigpt import GPT, GPTConfig
from minigpt.generate import generate
from minigpt.model import _store_column_major


def hf_gpt2(n_layer: int, n_embd: int, n_head: int, seed: int = 0):
    """A random-weight GPT-2 from `transformers` with its fastest CPU attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        bos_token_id=50256,
        eos_token_id=50256,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def to_minigpt(hf) -> GPT:
    """The same weights in minigpt's GPT: drop the attention-mask buffers, transpose
    the Conv1D weights (stored (in, out) in GPT-2) into nn.Linear's (out, in)."""
    c = hf.config
    model = GPT(
        GPTConfig.preset(
            "gpt2",
            n_layer=c.n_layer,
            n_embd=c.n_embd,
            n_head=c.n_head,
            vocab_size=c.vocab_size,
            block_size=c.n_positions,
        )
    )
    state = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        k = k.removeprefix("transformer.")
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        state[k] = v.contiguous()
    model.load_weights(state)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and fewer tokens")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--no-cache-once", action="store_true", help="time the slow uncached run only once"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--row-major",
        action="store_true",
        help="also time minigpt with row-major weights (what its column-major order gains)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_layer, n_embd, n_head = (2, 128, 4) if args.quick else (12, 768, 12)
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or 3
    warnings.filterwarnings("ignore")  # transformers' generation-config chatter

    hf = hf_gpt2(n_layer, n_embd, n_head)
    mini = to_minigpt(hf)
    row = None
    if args.row_major:  # the same weights in nn.Linear's default order
        row = to_minigpt(hf)
        _store_column_major(row, column_major=False)
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    print(
        f"GPT-2 configuration, {n_layer} layers, width {n_embd}, {mini.num_parameters() / 1e6:.0f}M parameters, "
        f"random weights; batch 1, 16-token prompt, {new_tokens} new tokens, greedy, "
        f"CPU with {torch.get_num_threads()} threads"
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

    def run_mini(use_cache: bool = True):
        return generate(mini, prompt, new_tokens, temperature=0, use_cache=use_cache)

    # warm up (first calls allocate and pick kernels), then interleave the runs
    run_hf(), run_mini()
    t_hf = t_mini = t_nocache = t_row = float("inf")
    for i in range(repeats):
        t, out_hf = best_time(run_hf, 1)
        t_hf = min(t_hf, t)
        t, out_mini = best_time(run_mini, 1)
        t_mini = min(t_mini, t)
        if row is not None:
            t, out_row = best_time(lambda: generate(row, prompt, new_tokens, temperature=0), 1)
            t_row = min(t_row, t)
        if i == 0 or not args.no_cache_once:
            t, out_nocache = best_time(lambda: run_mini(False), 1)
            t_nocache = min(t_nocache, t)
    same = torch.equal(out_hf, out_mini) and torch.equal(out_mini, out_nocache)
    if row is not None:
        same = same and torch.equal(out_mini, out_row)
    print(f"same tokens from every run: {same}")

    rate = {k: new_tokens / t for k, t in [("hf", t_hf), ("mini", t_mini), ("none", t_nocache)]}
    print(f"transformers generate (KV cache, sdpa): {rate['hf']:8.1f} tokens/s")
    print(f"minigpt generate (KV cache):            {rate['mini']:8.1f} tokens/s")
    print(f"minigpt generate (no cache):            {rate['none']:8.1f} tokens/s")
    if row is not None:
        r_row = new_tokens / t_row
        print(f"minigpt generate (row-major weights):   {r_row:8.1f} tokens/s")
        print(
            f"column-major / row-major weights: {rate['mini'] / r_row:.2f}x; "
            f"row-major / transformers: {r_row / rate['hf']:.2f}x"
        )
    r1, r2 = rate["mini"] / rate["hf"], rate["mini"] / rate["none"]
    ok1, ok2 = r1 >= 1.2, r2 >= 4.0
    print(f"minigpt / transformers: {r1:.2f}x (goal >= 1.2x) {'PASS' if ok1 else 'FAIL'}")
    print(f"minigpt cache / no cache: {r2:.2f}x (goal >= 4x) {'PASS' if ok2 else 'FAIL'}")
    if args.quick:
        print("(--quick: a small model; the goals are for the full GPT-2 124M run)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
