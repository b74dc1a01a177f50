"""Training-step throughput: minigpt.GPT vs Hugging Face GPT2LMHeadModel.

One forward + backward + AdamW step, in tokens per second, for both models built
with the same configuration, fed the same batches, stepped by the same optimizer
settings, measured in the same process. Steps of the two models alternate, so a
burst of load on a shared machine slows both rather than one; the figure is the
median over the timed steps after a few warm-up steps.

    python benchmarks/train_step.py            # both sizes, prints a table and PASS/FAIL
    python benchmarks/train_step.py --quick    # a few steps, to check that it runs
    python benchmarks/train_step.py --threads 1   # on a busy shared machine (see below)

Goal: minigpt at least 1.2x the tokens/s of transformers at each size. The two
sizes are nanoGPT's character-level Tiny Shakespeare configurations (its "laptop
CPU" one and its default one), hence the default vocabulary of 65 characters;
``--vocab-size 50257`` measures with GPT-2's tokenizer, where the output layer
dominates the small size.

Most of a step is matrix products. minigpt's model is plain ``nn.Linear`` layers;
``minigpt.cpu.accelerated`` (the CPU fast path, on unless
``MINIGPT_CPU_FASTPATH=0``) sends their float32 products to oneDNN instead of
PyTorch's BLAS. The header line says whether it is on, and ``--compare-fastpath``
also times a third model, minigpt with the fast path off, in the same run (the
last column is minigpt with it on over minigpt with it off).

On a machine whose cores are shared with other busy processes, PyTorch's worker
threads wait on each other at every operation and both models slow down many times
over; ``--threads 1`` gives steadier figures there.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import minigpt
from minigpt import GPT, GPTConfig, cpu

GOAL = 1.2


@dataclass
class Size:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int


SIZES = [
    Size("4L/4H/128, ctx 64, batch 12", 4, 4, 128, 64, 12),
    Size("6L/6H/384, ctx 256, batch 8", 6, 6, 384, 256, 8),
]


def adamw(model: nn.Module, lr: float = 3e-4) -> torch.optim.AdamW:
    """The optimizer both models get: weight decay on matrices only, fused when available."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):  # fused AdamW not available for this device/build
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=True)


def build_pair(size: Size, vocab_size: int) -> tuple[nn.Module, nn.Module, str]:
    """minigpt and transformers GPT-2 models with identical shapes, dropout off."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    ours = GPT(
        GPTConfig(
            vocab_size=vocab_size,
            block_size=size.block_size,
            n_layer=size.n_layer,
            n_head=size.n_head,
            n_embd=size.n_embd,
            dropout=0.0,
        )
    )
    hf_config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=size.block_size,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    # SDPA is transformers' fastest attention on CPU (flash-attention kernels need CUDA)
    peer = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    attn = peer.config._attn_implementation
    assert ours.num_parameters() == peer.num_parameters(), "the two models must be the same size"
    return ours.train(), peer.train(), attn


def minigpt_step(model: nn.Module):
    """A training-step function for a minigpt model; it takes a (B, T + 1) batch of ids."""
    opt = adamw(model)

    def step(batch: torch.Tensor) -> float:
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def peer_step(peer: nn.Module):
    """A training-step function for the transformers model."""
    opt_peer = adamw(peer)

    def step_peer(batch: torch.Tensor) -> float:
        # the idiomatic transformers call: labels = inputs, shifted inside the model
        loss = peer(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)
        return loss.item()

    return step_peer


def measure(
    size: Size, vocab_size: int, warmup: int, steps: int, compare_fastpath: bool
) -> dict[str, float | str]:
    ours, peer, attn = build_pair(size, vocab_size)
    runs = {"minigpt": minigpt_step(ours), "transformers": peer_step(peer)}
    if compare_fastpath:
        plain = copy.deepcopy(ours)  # the same weights, never accelerated
        runs["minigpt, fast path off"] = minigpt_step(plain)
    g = torch.Generator().manual_seed(0)
    shape = (size.batch_size, size.block_size + 1)
    batches = [torch.randint(0, vocab_size, shape, generator=g) for _ in range(warmup + steps)]
    times: dict[str, list[float]] = {name: [] for name in runs}
    # the fast path (when on) for the first minigpt model only, for the whole run
    with cpu.accelerated(ours):
        for i, batch in enumerate(batches):
            # rotate which model goes first, so none always runs on a warmer cache
            order = list(runs.items())
            order = order[i % len(order) :] + order[: i % len(order)]
            for name, step in order:
                t0 = time.perf_counter()
                loss = step(batch)
                elapsed = time.perf_counter() - t0
                if not torch.isfinite(torch.tensor(loss)):
                    raise RuntimeError(f"{name} produced a non-finite loss at step {i}")
                if i >= warmup:
                    times[name].append(elapsed)
    tokens = size.batch_size * size.block_size
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    result: dict[str, float | str] = {
        **tps,
        "ratio": tps["minigpt"] / tps["transformers"],
        "attn": attn,
    }
    if compare_fastpath:
        result["on/off"] = tps["minigpt"] / tps["minigpt, fast path off"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 warm-up + 3 timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model")
    parser.add_argument(
        "--vocab-size", type=int, default=65, help="default: Tiny Shakespeare's characters"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--compare-fastpath",
        action="store_true",
        help="also time minigpt with minigpt.cpu's fast path off, in the same run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 2, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"minigpt {minigpt.__version__}; {torch.get_num_threads()} threads, float32 on CPU "
        f"({torch.backends.cpu.get_cpu_capability()}); minigpt.cpu fast path: "
        f"{'on' if cpu.fastpath_enabled() else 'off'}"
    )
    print(
        f"vocab {args.vocab_size}, AdamW (fused if available) for both; "
        f"{args.warmup} warm-up + {args.steps} timed steps each, median tokens/s\n"
    )
    header = (
        f"{'size':<30} {'minigpt tok/s':>14} {'transformers tok/s':>19} {'ratio':>7}  goal {GOAL}x"
    )
    if args.compare_fastpath:
        header += f"  {'fast path off tok/s':>19} {'on/off':>7}"
    print(header)
    print("-" * len(header))
    ok = True
    for size in SIZES:
        r = measure(size, args.vocab_size, args.warmup, args.steps, args.compare_fastpath)
        passed = r["ratio"] >= GOAL
        ok &= passed
        line = (
            f"{size.name:<30} {r['minigpt']:>14,.0f} {r['transformers']:>19,.0f} "
            f"{r['ratio']:>6.2f}x  {'PASS' if passed else 'FAIL'}"
        )
        if args.compare_fastpath:
            line += f"  {r['minigpt, fast path off']:>19,.0f} {r['on/off']:>6.2f}x"
        print(line, flush=True)
    print(f"\n(transformers attention implementation: {r['attn']})")
    print("overall:", "PASS" if ok else "FAIL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
