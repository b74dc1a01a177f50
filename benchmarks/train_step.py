"""Training-step throughput: minigpt.GPT vs Hugging Face GPT2LMHeadModel.

One forward + backward + AdamW step, in tokens per second, for both models built
with the same configuration, fed the same batches, stepped by the same optimizer
settings, measured in the same process. Steps of the two models alternate, so a
burst of load on a shared machine slows both rather than one; the figure is the
median over the timed steps after a few warm-up steps.

    python benchmarks/train_step.py            # both sizes, prints a table and PASS/FAIL
    python benchmarks/train_step.py --quick    # a few steps, to check that it runs
    python benchmarks/train_step.py --threads 1   # on a busy shared machine (see below)
    python benchmarks/train_step.py --precision   # bfloat16 autocast vs float32, 6L/384

Goal: minigpt at least 1.2x the tokens/s of transformers at each size. The two
sizes are nanoGPT's character-level Tiny Shakespeare configurations (its "laptop
CPU" one and its default one), hence the default vocabulary of 65 characters;
``--vocab-size 50257`` measures with GPT-2's tokenizer, where the output layer
dominates the small size.

Both models are plain ``nn.Linear`` layers computed by PyTorch's BLAS; the header
line names the CPU's instruction set and its bfloat16 instructions (``avx512_bf16``,
Intel AMX), as ``lscpu`` lists them (the README's benchmark notes say which
CPU-specific paths were measured and why none is kept).

``--precision`` measures minigpt's ``Trainer`` with ``dtype="bfloat16"`` (autocast:
matrix products in bfloat16, weights, norms and the loss in float32) against
``dtype="float32"`` at 6L/6H/384, context 256, batch 8, on Tiny Shakespeare
(characters): the same initial weights and batches, steps of the two runs
alternating, median step time after a few warm-up steps, and then the validation
loss of both models (in float32, on the first 64 windows of the held-out text)
after ``--precision-steps`` steps. Goals: bfloat16 at least 1.3x the tokens/s of
float32 on a CPU with bfloat16 instructions, and its loss within 1% of float32's.

On a machine whose cores are shared with other busy processes, PyTorch's worker
threads wait on each other at every operation and both models slow down many times
over; ``--threads 1`` gives steadier figures there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import minigpt
from minigpt import GPT, GPTConfig

GOAL = 1.2
BF16_GOAL, BF16_LOSS_GOAL = 1.3, 0.01  # speed-up over float32; relative loss difference
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


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


def make_steps(ours: nn.Module, peer: nn.Module):
    """One training-step function per model; each takes a (B, T + 1) batch of ids."""
    opt_ours, opt_peer = adamw(ours), adamw(peer)

    def step_ours(batch: torch.Tensor) -> float:
        _, loss = ours(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_peer(batch: torch.Tensor) -> float:
        # the idiomatic transformers call: labels = inputs, shifted inside the model
        loss = peer(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)
        return loss.item()

    return step_ours, step_peer


def measure(size: Size, vocab_size: int, warmup: int, steps: int) -> dict[str, float | str]:
    ours, peer, attn = build_pair(size, vocab_size)
    step_ours, step_peer = make_steps(ours, peer)
    g = torch.Generator().manual_seed(0)
    shape = (size.batch_size, size.block_size + 1)
    batches = [torch.randint(0, vocab_size, shape, generator=g) for _ in range(warmup + steps)]
    times: dict[str, list[float]] = {"minigpt": [], "transformers": []}
    for i, batch in enumerate(batches):
        # alternate which model goes first, so neither always runs on a warmer cache
        order = [("minigpt", step_ours), ("transformers", step_peer)]
        for name, step in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            loss = step(batch)
            elapsed = time.perf_counter() - t0
            if not torch.isfinite(torch.tensor(loss)):
                raise RuntimeError(f"{name} produced a non-finite loss at step {i}")
            if i >= warmup:
                times[name].append(elapsed)
    tokens = size.batch_size * size.block_size
    ours_tps = tokens / statistics.median(times["minigpt"])
    peer_tps = tokens / statistics.median(times["transformers"])
    return {
        "minigpt": ours_tps,
        "transformers": peer_tps,
        "ratio": ours_tps / peer_tps,
        "attn": attn,
    }


def cpu_bf16_flags() -> str:
    """The CPU's bfloat16 instructions, from the flags ``lscpu`` shows (Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    found = [name for name in BF16_FLAGS if name in flags]
    return ", ".join(found) if found else "none"


def measure_precision(steps: int, warmup: int) -> dict[str, float]:
    """bfloat16 autocast vs float32 training with minigpt's Trainer at 6L/384."""
    from minigpt.pretrained import shakespeare_char_data
    from minigpt.tokens import TokenDataset
    from minigpt.train import TrainConfig, Trainer, validation_loss

    size = SIZES[1]
    tok, train_ids, val_ids = shakespeare_char_data()
    trainers = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)  # the same initial weights for both
        model = GPT(
            GPTConfig(
                vocab_size=tok.vocab_size,
                block_size=size.block_size,
                n_layer=size.n_layer,
                n_head=size.n_head,
                n_embd=size.n_embd,
                dropout=0.0,
            )
        )
        config = TrainConfig(
            max_steps=steps,
            batch_size=size.batch_size,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=20,
            eval_interval=0,
            device="cpu",
            dtype=dtype,
            progress=False,
        )
        trainers[dtype] = Trainer(model, TokenDataset(train_ids, size.block_size), None, config)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    losses: dict[str, float] = {}
    for i in range(steps):
        order = list(trainers.items())
        for name, trainer in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            losses[name] = trainer.train_step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = size.batch_size * size.block_size
    held_out = val_ids[: 64 * size.block_size + 1]
    r: dict[str, float] = {}
    for name, trainer in trainers.items():
        r[f"{name} tok/s"] = tokens / statistics.median(times[name])
        r[f"{name} train loss"] = losses[name]
        r[f"{name} val loss"] = validation_loss(trainer.model, held_out)
    return r


def main_precision(args: argparse.Namespace) -> int:
    steps, warmup = (10, 3) if args.quick else (args.precision_steps, 5)
    size = SIZES[1]
    print(
        f"bfloat16 autocast vs float32, minigpt Trainer, {size.name}, Tiny Shakespeare "
        f"characters; {steps} steps each ({warmup} warm-up), median tokens/s; "
        f"validation loss in float32 on 64 held-out windows\n"
    )
    r = measure_precision(steps, warmup)
    for name in ("float32", "bfloat16"):
        print(
            f"{name:<9} {r[f'{name} tok/s']:>8,.0f} tok/s   train loss {r[f'{name} train loss']:.4f}"
            f"   val loss {r[f'{name} val loss']:.4f}"
        )
    speed = r["bfloat16 tok/s"] / r["float32 tok/s"]
    gap = abs(r["bfloat16 val loss"] - r["float32 val loss"]) / r["float32 val loss"]
    fast, close = speed >= BF16_GOAL, gap <= BF16_LOSS_GOAL
    print(
        f"\nbf16 speed-up over fp32 at 6L/384: {speed:.2f}x (goal >= {BF16_GOAL}x): "
        f"{'PASS' if fast else 'FAIL'}"
    )
    print(
        f"bf16 val loss vs fp32 after {steps} steps: {100 * gap:.2f}% apart "
        f"(goal within {100 * BF16_LOSS_GOAL:.0f}%): {'PASS' if close else 'FAIL'}"
    )
    return 0


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
        "--precision", action="store_true", help="bfloat16 autocast vs float32 (6L/384)"
    )
    parser.add_argument("--precision-steps", type=int, default=200, help="steps per precision")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision:
        print(
            f"torch {torch.__version__}, minigpt {minigpt.__version__}; "
            f"{torch.get_num_threads()} threads on CPU ({torch.backends.cpu.get_cpu_capability()}; "
            f"bf16 instructions: {cpu_bf16_flags()}); {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        return main_precision(args)
    if args.quick:
        args.warmup, args.steps = 2, 3

    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"minigpt {minigpt.__version__}; {torch.get_num_threads()} threads, float32 on CPU "
        f"({torch.backends.cpu.get_cpu_capability()}; bf16 instructions: {cpu_bf16_flags()}); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"vocab {args.vocab_size}, AdamW (fused if available) for both; "
        f"{args.warmup} warm-up + {args.steps} timed steps each, median tokens/s\n"
    )
    header = (
        f"{'size':<30} {'minigpt tok/s':>14} {'transformers tok/s':>19} {'ratio':>7}  goal {GOAL}x"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for size in SIZES:
        r = measure(size, args.vocab_size, args.warmup, args.steps)
        passed = r["ratio"] >= GOAL
        ok &= passed
        print(
            f"{size.name:<30} {r['minigpt']:>14,.0f} {r['transformers']:>19,.0f} "
            f"{r['ratio']:>6.2f}x  {'PASS' if passed else 'FAIL'}",
            flush=True,
        )
    print(f"\n(transformers attention implementation: {r['attn']})")
    print("overall:", "PASS" if ok else "FAIL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
