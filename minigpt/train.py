"""Pretraining: the training loop, its schedule, and checkpoints you can resume exactly.

The pieces, in the order a step uses them:

- a batch of random windows from a ``TokenDataset`` (``minigpt.data``). The windows
  of step ``s`` come from a generator seeded with ``(seed, s)``, so the data of any
  step can be recomputed and a resumed run needs no data state;
- the forward pass and the cross-entropy loss, split into ``grad_accum_steps``
  micro-batches whose gradients add up (a large batch on a small machine);
- gradient clipping to a maximum global norm;
- AdamW with weight decay on the matrices only, its learning rate following a
  linear warmup then a cosine decay (``lr_at``);
- every ``eval_interval`` steps, the mean loss on a fixed set of validation batches,
  and checkpoints: ``<out_dir>/last`` and ``<out_dir>/best``.

A checkpoint is a folder: ``model.safetensors`` + ``config.json`` (as ``GPT.save``
writes them), ``optimizer.safetensors`` (AdamW's moments), ``trainer.json`` (the
training config, step, best validation loss, loss history and RNG states) and the
tokenizer when one was given. It is written into a temporary folder and swapped in
by renames, so a crash leaves the previous checkpoint intact. Resuming restores
everything that influences the next step, so a run stopped and resumed produces
the same losses as one that never stopped.

Multi-process training with ``torchrun`` (DDP) is picked up from the environment
variables torchrun sets; rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minigpt.checkpoint import (
    CheckpointError,
    config_from_dict,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
)
from minigpt.data import TokenDataset
from minigpt.model import GPT, GPTConfig

__all__ = [
    "LossHistory",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "adamw_update",
    "clip_grad_norm",
    "configure_optimizer",
    "evaluate",
    "find_checkpoint",
    "lr_at",
    "shakespeare_char_history",
    "shakespeare_char_model",
    "train",
]

TRAINER_FORMAT = "minigpt-trainer"
TRAINER_VERSION = 1


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything about a training run except the model and the data.

    Attributes:
        max_steps: optimizer steps to take.
        batch_size: sequences per micro-batch on each process.
        grad_accum_steps: micro-batches whose gradients are summed before one step;
            the global batch is ``batch_size * grad_accum_steps * world_size`` sequences.
        lr: the peak learning rate, reached after ``warmup_steps``.
        min_lr: the learning rate at the end of the cosine decay (None = lr / 10).
        warmup_steps: steps of linear warmup from ~0 to ``lr``.
        decay_steps: the step where the cosine reaches ``min_lr`` (None = max_steps).
        weight_decay: AdamW's decoupled weight decay, applied to matrices only.
        beta1, beta2, eps: AdamW's moment decay rates and epsilon.
        grad_clip: clip the global gradient norm to this (0 = no clipping).
        eval_interval: evaluate (and save ``best``) every this many steps, and at the end.
        eval_iters: validation batches per evaluation (always the same batches).
        checkpoint_interval: save ``last`` every this many steps (None = eval_interval).
        out_dir: the run folder for checkpoints (None = no checkpoints).
        seed: seeds the model's dropout and the choice of batches.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", "mps".
        dtype: "auto" (bfloat16 autocast on CUDA when supported, else float32),
            "float32", "bfloat16" or "float16" (with a gradient scaler).
        compile: wrap the model in ``torch.compile``.
        fused: use the fused AdamW kernel (None = when available).
        time_limit: stop after this many seconds (evaluating and saving first), or None.
        progress: show a tqdm progress bar (rank 0 only).
    """

    max_steps: int = 1000
    batch_size: int = 12
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int = 100
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 20
    checkpoint_interval: int | None = None
    out_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    fused: bool | None = None
    time_limit: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        for name in ("decay_steps", "checkpoint_interval"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"TrainConfig.{name} must be a positive integer or None, got {value!r}"
                )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig.weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"TrainConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(
                f"TrainConfig.time_limit must be positive or None, got {self.time_limit}"
            )

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys (a typo should not pass silently)."""
        return config_from_dict(cls, d)


# --------------------------------------------------------------------------- the pieces


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """The learning rate for step ``step`` (0-based): linear warmup, then cosine decay.

    Steps 0 .. warmup_steps-1 rise linearly to ``lr`` ((step + 1) / warmup_steps of it),
    then the rate follows half a cosine down to ``min_lr`` at ``decay_steps`` and
    stays there.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping. Same result as ``torch.nn.utils.clip_grad_norm_``:
    the norm of all gradients seen as one long vector, and a scale of
    ``max_norm / (norm + 1e-6)`` applied only when it is below 1.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads)  # one norm per tensor, in one fused call
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total


@torch.no_grad()
def adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """One AdamW update of ``param`` in place, written out (what ``torch.optim.AdamW`` does).

    ``step`` counts from 1. The moments ``exp_avg`` (m) and ``exp_avg_sq`` (v) are
    updated in place too:

        param *= 1 - lr * weight_decay                  # decoupled weight decay
        m = beta1 * m + (1 - beta1) * grad              # running mean of gradients
        v = beta2 * v + (1 - beta2) * grad²             # running mean of squares
        param -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
    """
    param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = exp_avg / (1 - beta1**step)
    v_hat = exp_avg_sq / (1 - beta2**step)
    param.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)


def configure_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with two parameter groups: matrices (embeddings, linear weights) decay,
    vectors (biases, norm gains) do not; shrinking a gain or a bias toward zero does
    not regularise anything useful. ``fused`` defaults to True when the parameters'
    device supports the fused kernel.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        device = params[0].device.type if params else "cpu"
        fused = device in ("cuda", "cpu") and all(p.dtype.is_floating_point for p in params)
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TokenDataset,
    *,
    batch_size: int = 12,
    iters: int = 20,
    seed: int = 0,
    device: str | torch.device = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean cross-entropy of ``model`` on ``iters`` batches of ``data``.

    The batches come from a generator seeded with ``seed``, so two evaluations of
    the same model give the same number. With ``world_size`` > 1 each process
    evaluates its share of every batch and the losses are averaged across processes.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(_mix(seed, 0, salt=1))
    total = torch.zeros((), device=device)
    for _ in range(iters):
        offsets = data.offsets(batch_size * world_size, gen)
        x, y = data.windows(offsets[rank * batch_size : (rank + 1) * batch_size])
        with autocast or contextlib.nullcontext():
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total /= world_size
    model.train(was_training)
    return total.item() / iters


def _mix(seed: int, step: int, salt: int = 0) -> int:
    """A 63-bit seed from (seed, step, salt), different for every combination."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) % (
        1 << 64
    )
    x ^= x >> 31
    return x % (1 << 63)


# --------------------------------------------------------------------------- loss history


@dataclass
class LossHistory:
    """Losses recorded during training, ready to plot.

    ``steps``, ``train_loss`` and ``lr`` have one entry per optimizer step (the
    training loss averaged over the step's micro-batches and processes);
    ``eval_steps``, ``val_loss`` and ``eval_train_loss`` one entry per evaluation.
    """

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    eval_train_loss: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> LossHistory:
        return cls(**{f.name: list(d.get(f.name, [])) for f in fields(cls)})

    def plot(self, ax: Any = None, *, smooth: int = 20, title: str | None = None) -> Any:
        """Plot the training loss (raw and a moving average) and the evaluations."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3), dpi=80)
        if self.steps:
            ax.plot(self.steps, self.train_loss, color="C0", alpha=0.25, lw=0.8)
            k = max(1, min(smooth, len(self.train_loss)))
            avg = torch.tensor(self.train_loss).unfold(0, k, 1).mean(1).tolist()
            ax.plot(self.steps[k - 1 :], avg, color="C0", label="train (batch, smoothed)")
        if self.eval_steps:
            ax.plot(
                self.eval_steps, self.eval_train_loss, "o-", color="C2", ms=3, label="train (eval)"
            )
            ax.plot(self.eval_steps, self.val_loss, "o-", color="C1", ms=3, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss")
        if title:
            ax.set_title(title)
        ax.legend()
        return ax


# --------------------------------------------------------------------------- the trainer


@dataclass
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    created_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_pref: str) -> _Dist:
    """Join the process group torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    created = False
    if not dist.is_initialized():
        use_cuda = device_pref.startswith("cuda") or (
            device_pref == "auto" and torch.cuda.is_available()
        )
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return _Dist(
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=dist.get_world_size(),
        created_group=created,
    )


def _pick_device(pref: str, ddp: _Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and ddp.enabled:
        pref = f"cuda:{ddp.local_rank}"
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "TrainConfig.device asks for CUDA but no GPU is available; use 'cpu'"
            )
        torch.cuda.set_device(device)
    return device


def _pick_dtype(pref: str, device: torch.device) -> torch.dtype:
    if pref == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[pref]


class Trainer:
    """Trains a ``GPT`` on a ``TokenDataset``, with evaluation and checkpoints.

    Args:
        model: the model to train (moved to the configured device).
        train_data: training windows (its ``block_size`` must fit the model's context).
        val_data: validation windows, or None to skip evaluation.
        config: the ``TrainConfig``.
        tokenizer: saved into checkpoints when it has a ``save(path)`` method.
        metadata: JSON-serialisable facts about the run (dataset, tokenizer kind)
            stored in ``trainer.json`` for tools such as ``minigpt eval``.
        on_step: called as ``on_step(trainer)`` after every optimizer step.

    ``train()`` runs until ``config.max_steps`` and returns the ``LossHistory``.
    ``Trainer.from_checkpoint(...)`` rebuilds a trainer from a checkpoint to resume.
    Creating a trainer seeds torch's global RNG (which drives dropout) from
    ``config.seed`` and the process rank, so a run does not depend on what ran before.
    """

    def __init__(
        self,
        model: GPT,
        train_data: TokenDataset,
        val_data: TokenDataset | None = None,
        config: TrainConfig | None = None,
        *,
        tokenizer: Any = None,
        metadata: dict[str, Any] | None = None,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        self.config = config = config or TrainConfig()
        if not isinstance(model, GPT):
            raise TypeError(f"Trainer trains a minigpt GPT, got {type(model).__name__}")
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            if data is None and name == "val_data":
                continue
            if not isinstance(data, TokenDataset):
                raise TypeError(
                    f"{name} must be a minigpt.data.TokenDataset, got {type(data).__name__}"
                )
            if data.block_size > model.config.block_size:
                raise ValueError(
                    f"{name}.block_size ({data.block_size}) is longer than the model's context "
                    f"(block_size={model.config.block_size})"
                )
        self.train_data, self.val_data = train_data, val_data
        self.tokenizer, self.metadata, self.on_step = tokenizer, dict(metadata or {}), on_step
        self.ddp = _setup_distributed(config.device)
        self.device = _pick_device(config.device, self.ddp)
        self.dtype = _pick_dtype(config.dtype, self.device)
        self.model = model.to(self.device)  # the plain model: save/load/sample use this one
        self.optimizer = configure_optimizer(
            self.model,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            fused=config.fused,
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.dtype == torch.float16 and self.device.type == "cuda"
        )
        self.step = 0  # optimizer steps done
        self.best_val_loss = math.inf
        self.history = LossHistory()
        self._last_saved: tuple[Path, int] | None = None
        self._stop_requested = False
        # the module that runs forward/backward: maybe compiled, maybe DDP-wrapped
        self._runner: nn.Module = self.model
        if config.compile:
            self._runner = torch.compile(self._runner)
        if self.ddp.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._runner = DDP(self._runner, device_ids=ids)
        # the dropout RNG: seeded per rank so that ranks drop different units
        torch.manual_seed(_mix(config.seed, self.ddp.rank, salt=2))

    # ------------------------------------------------------------ helpers

    @property
    def out_dir(self) -> Path | None:
        return None if self.config.out_dir is None else Path(self.config.out_dir)

    def lr(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based) under this config."""
        c = self.config
        return lr_at(
            step,
            lr=c.lr,
            min_lr=c.final_lr,
            warmup_steps=c.warmup_steps,
            decay_steps=c.decay_steps or c.max_steps,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def evaluate(self, data: TokenDataset | None = None) -> float:
        """Mean loss on ``eval_iters`` fixed batches of ``data`` (default: the validation data)."""
        data = data or self.val_data
        if data is None:
            raise ValueError("no validation data: pass val_data to the Trainer or a dataset here")
        return evaluate(
            self.model,
            data,
            batch_size=self.config.batch_size,
            iters=self.config.eval_iters,
            seed=self.config.seed,
            device=self.device,
            autocast=self._autocast(),
            rank=self.ddp.rank,
            world_size=self.ddp.world_size,
        )

    # ------------------------------------------------------------ one step

    def train_step(self) -> float:
        """Take one optimizer step; returns its training loss (mean over the global batch)."""
        c, s = self.config, self.step
        lr = self.lr(s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        B, A, W = c.batch_size, c.grad_accum_steps, self.ddp.world_size
        # Every rank draws the same global batch and takes its own rows: the data of
        # a step depends only on (seed, step), whatever the number of processes.
        gen = torch.Generator().manual_seed(_mix(c.seed, s))
        offsets = self.train_data.offsets(B * A * W, gen)
        mine = offsets[self.ddp.rank * B * A : (self.ddp.rank + 1) * B * A]
        loss_sum = torch.zeros((), device=self.device)
        self._runner.train()
        for m in range(A):
            x, y = self.train_data.windows(mine[m * B : (m + 1) * B])
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # DDP averages gradients across ranks on backward; only on the last micro-step
            sync = contextlib.nullcontext()
            if self.ddp.enabled and m < A - 1:
                sync = self._runner.no_sync()
            with sync:
                with self._autocast():
                    _, loss = self._runner(x, y)
                loss_sum += loss.detach().float()
                self.scaler.scale(loss / A).backward()
        if self.ddp.enabled:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum /= W
        loss_value = loss_sum.item() / A
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(self._diverged_message(loss_value))
        if c.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm(self.model.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.history.steps.append(self.step)
        self.history.train_loss.append(loss_value)
        self.history.lr.append(lr)
        return loss_value

    def _diverged_message(self, loss: float) -> str:
        msg = f"the training loss is {loss} at step {self.step + 1}; training stopped. "
        if self._last_saved is not None:
            path, step = self._last_saved
            msg += f"The last good checkpoint is {path} (step {step}). "
        else:
            msg += "No checkpoint was saved (set out_dir to keep one). "
        return msg + "Try a lower learning rate, more warmup, or gradient clipping."

    # ------------------------------------------------------------ the loop

    def train(self) -> LossHistory:
        """Train until ``config.max_steps`` (or ``time_limit``); returns the loss history.

        Ctrl-C finishes the current step, saves ``last`` and raises KeyboardInterrupt.
        A NaN or infinite loss raises ``TrainingDivergedError`` without saving.
        """
        c = self.config
        from tqdm.auto import tqdm

        ckpt_every = c.checkpoint_interval or c.eval_interval
        start = time.perf_counter()
        bar = tqdm(
            total=c.max_steps,
            initial=self.step,
            desc="training",
            disable=not (c.progress and self.ddp.is_main),
            dynamic_ncols=True,
        )
        with bar, self._catch_ctrl_c():
            while self.step < c.max_steps:
                loss = self.train_step()
                bar.update(1)
                postfix = {"loss": f"{loss:.4f}"}
                out_of_time = (
                    c.time_limit is not None and time.perf_counter() - start > c.time_limit
                )
                last = self.step == c.max_steps or out_of_time
                if self.val_data is not None and (self.step % c.eval_interval == 0 or last):
                    val = self.evaluate()
                    train_eval = self.evaluate(self.train_data)
                    self.history.eval_steps.append(self.step)
                    self.history.val_loss.append(val)
                    self.history.eval_train_loss.append(train_eval)
                    if val < self.best_val_loss:
                        self.best_val_loss = val
                        self.save_checkpoint("best")
                if self.history.val_loss:
                    postfix["val"] = f"{self.history.val_loss[-1]:.4f}"
                bar.set_postfix(postfix, refresh=False)
                if self.step % ckpt_every == 0 or last:
                    self.save_checkpoint("last")
                if self.on_step is not None:
                    self.on_step(self)
                if self._should_stop():
                    where = self.save_checkpoint("last")
                    note = f"; checkpoint saved to {where}" if where else ""
                    raise KeyboardInterrupt(f"training interrupted at step {self.step}{note}")
                if out_of_time:
                    break
        return self.history

    @contextlib.contextmanager
    def _catch_ctrl_c(self):
        """Turn the first Ctrl-C into a request to stop after the current step."""
        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:  # a second Ctrl-C: stop right now
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.ddp.is_main:
                print(
                    "\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort)"
                )

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _should_stop(self) -> bool:
        if not self.ddp.enabled:
            return self._stop_requested
        flag = torch.tensor(float(self._stop_requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # stop together or deadlock
        return bool(flag.item())

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, name: str = "last") -> Path | None:
        """Write checkpoint ``<out_dir>/<name>`` atomically (rank 0 only); returns its path."""
        if self.out_dir is None:
            return None
        final = self.out_dir / name
        if self.ddp.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.out_dir))
            try:
                self._write_checkpoint(tmp)
                _swap_in(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.ddp.enabled:
            dist.barrier()
        if name == "last":
            self._last_saved = (final, self.step)
        return final

    def _write_checkpoint(self, directory: Path) -> None:
        self.model.save(directory)
        opt = self.optimizer.state_dict()
        tensors = {f"{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items()}
        save_tensors(tensors, directory / "optimizer.safetensors", metadata={"format": "minigpt"})
        groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
        if self.tokenizer is not None and hasattr(self.tokenizer, "save"):
            self.tokenizer.save(directory / "tokenizer.json")
        state = {
            "format": TRAINER_FORMAT,
            "version": TRAINER_VERSION,
            "step": self.step,
            "train_config": self.config.to_dict(),
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "history": self.history.to_dict(),
            "optimizer_param_groups": groups,
            "grad_scaler": self.scaler.state_dict(),
            "rng": {
                "torch": _b64(torch.get_rng_state()),
                "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()]
                if torch.cuda.is_available()
                else [],
            },
            # batches are a function of (seed, step): the next step's data is fixed by these
            "data": {"seed": self.config.seed, "next_step": self.step},
            "world_size": self.ddp.world_size,
            "metadata": self.metadata,
        }
        save_json(state, directory / "trainer.json")  # written last: marks the folder complete

    def load_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Restore model, optimizer, step, history and RNG states from a checkpoint.

        ``path`` is a checkpoint folder or a run folder (then its ``last`` is used).
        Raises ``CheckpointError`` naming the file that is missing or corrupt.
        """
        directory = find_checkpoint(path)
        state = read_trainer_state(directory)
        config = GPTConfig.from_json(directory / "config.json")
        if config != self.model.config:
            raise CheckpointError(
                f"{directory / 'config.json'} describes a different model than the one being "
                f"trained: {config} vs {self.model.config}"
            )
        weights = load_tensors(directory / "model.safetensors", device=self.device)
        self.model.load_weights(weights, source=directory / "model.safetensors")
        tensors = load_tensors(directory / "optimizer.safetensors", device=self.device)
        opt_state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            i, _, name = key.partition(".")
            opt_state.setdefault(int(i), {})[name] = value
        try:
            groups = state["optimizer_param_groups"]
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"{directory / 'optimizer.safetensors'} does not fit this model's optimizer: {e}"
            ) from e
        self.scaler.load_state_dict(state.get("grad_scaler") or {})
        self.step = int(state["step"])
        best = state.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)
        self.history = LossHistory.from_dict(state["history"])
        torch.set_rng_state(_unb64(state["rng"]["torch"]))
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            cuda_states = [_unb64(s) for s in state["rng"]["cuda"]]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
        self._last_saved = (directory, self.step)
        return directory

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        train_data: TokenDataset,
        val_data: TokenDataset | None = None,
        *,
        overrides: dict[str, Any] | None = None,
        tokenizer: Any = None,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> Trainer:
        """A trainer that continues the run saved at ``path`` (a checkpoint or run folder).

        ``overrides`` change training settings (e.g. ``{"max_steps": 5000}`` to train
        longer); leave the rest alone for an exact resume.
        """
        directory = find_checkpoint(path)
        state = read_trainer_state(directory)
        try:
            config = TrainConfig.from_dict({**state["train_config"], **(overrides or {})})
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{directory / 'trainer.json'} has an invalid train_config: {e}"
            ) from e
        model = GPT.load(directory)
        trainer = cls(
            model,
            train_data,
            val_data,
            config,
            tokenizer=tokenizer,
            metadata=state.get("metadata"),
            on_step=on_step,
        )
        trainer.load_checkpoint(directory)
        return trainer


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by ``tmp`` with renames; the old one survives until the new is in."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder for ``path``: the folder itself, or ``<run>/last`` for a run folder."""
    path = Path(path)
    if (path / "trainer.json").is_file() or (path / "model.safetensors").is_file():
        return path
    for candidate in (path / "last", path / ".last.old"):  # .old: a crash mid-swap
        if (candidate / "trainer.json").is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(
        f"{path} holds no checkpoint: expected trainer.json and model.safetensors in it or in {path / 'last'}"
    )


def read_trainer_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``trainer.json`` of a checkpoint folder."""
    file = Path(directory) / "trainer.json"
    state = load_json(file)
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"{file} is not a minigpt trainer state (format {TRAINER_FORMAT!r})")
    if state.get("version") != TRAINER_VERSION:
        raise CheckpointError(
            f"{file} has trainer state version {state.get('version')}; this minigpt reads {TRAINER_VERSION}"
        )
    missing = [
        k
        for k in ("step", "train_config", "history", "rng", "optimizer_param_groups")
        if k not in state
    ]
    if missing:
        raise CheckpointError(f"{file} is missing {missing} (truncated or corrupt?)")
    return state


def train(
    model: GPT,
    train_data: TokenDataset,
    val_data: TokenDataset | None = None,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
) -> LossHistory:
    """Train ``model`` in place and return its loss history (see ``Trainer``).

    With ``resume=True`` and a checkpoint in ``config.out_dir``, training continues
    from it (the model's weights are replaced by the checkpoint's).
    """
    trainer = Trainer(model, train_data, val_data, config, tokenizer=tokenizer, metadata=metadata)
    if resume and trainer.out_dir is not None and (trainer.out_dir / "last").exists():
        trainer.load_checkpoint(trainer.out_dir)  # a corrupt checkpoint raises, never ignored
    return trainer.train()


# --------------------------------------------------------------------------- a pretrained model

# A small character-level GPT on Tiny Shakespeare: about two minutes on two CPU cores.
# Later chapters (sampling, fine-tuning) start from it instead of training their own.
# Many small steps beat few large ones at this budget: 1600 steps of 12 x 64 tokens
# reach a validation loss of about 1.87, 600 steps of 16 x 128 (more tokens) only 2.04.
# Context 128, not 64: chapter 07 fine-tunes this model on SMS messages and short
# instructions, which need the longer window. 6 x 128 = the same tokens per step.
SHAKESPEARE_CHAR_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0)
SHAKESPEARE_CHAR_TRAIN = dict(
    batch_size=6,
    lr=2e-3,
    min_lr=2e-4,
    warmup_steps=100,
    weight_decay=0.1,
    beta2=0.99,
    grad_clip=1.0,
    eval_iters=10,
)


def _shakespeare_char_dir(cache_dir: str | os.PathLike[str] | None, steps: int, seed: int) -> Path:
    import hashlib
    import json

    from minigpt.data import cache_dir as default_cache_dir

    recipe = json.dumps(
        {
            "model": SHAKESPEARE_CHAR_MODEL,
            "train": SHAKESPEARE_CHAR_TRAIN,
            "steps": steps,
            "seed": seed,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / "models" / f"shakespeare-char-{digest}"


def shakespeare_char_model(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    steps: int = 1600,
    seed: int = 0,
    progress: bool = False,
) -> tuple[GPT, Any]:
    """A character-level GPT pretrained on Tiny Shakespeare, and its ``CharTokenizer``.

    The first call trains it (4 layers, 128 wide, context 128, ``steps`` steps of 6
    sequences: about three minutes on one CPU core, validation loss about 1.9 on
    the last 10% of the text) and saves it under
    ``<cache_dir>/models/shakespeare-char-<recipe hash>/``; later calls load it.
    ``cache_dir`` defaults to ``minigpt.data.cache_dir()``. Training is seeded, so a
    given recipe gives the same model on the same machine. The model is returned
    in eval mode on the CPU. ``shakespeare_char_history`` gives its loss curves.
    """
    from minigpt.tokenizer import CharTokenizer

    folder = _shakespeare_char_dir(cache_dir, steps, seed)
    if not (folder / "history.json").is_file():
        _train_shakespeare_char(folder, steps=steps, seed=seed, progress=progress)
    model = GPT.load(folder)
    try:
        tokenizer = CharTokenizer.load(folder / "tokenizer.json")
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / 'tokenizer.json'} is not a valid tokenizer: {e}") from e
    return model.eval(), tokenizer


def shakespeare_char_history(
    cache_dir: str | os.PathLike[str] | None = None, *, steps: int = 1600, seed: int = 0
) -> LossHistory:
    """The loss history of ``shakespeare_char_model`` (training it first if needed)."""
    folder = _shakespeare_char_dir(cache_dir, steps, seed)
    if not (folder / "history.json").is_file():
        shakespeare_char_model(cache_dir, steps=steps, seed=seed)
    return LossHistory.from_dict(load_json(folder / "history.json"))


def _train_shakespeare_char(folder: Path, *, steps: int, seed: int, progress: bool) -> None:
    from minigpt.data import cached_tokens, load_text, train_val_split
    from minigpt.tokenizer import CharTokenizer

    text = load_text("tinyshakespeare")
    tokenizer = CharTokenizer.fit(text)
    ids = cached_tokens(
        text,
        tokenizer.encode,
        vocab_size=tokenizer.vocab_size,
        key="char",
        directory=folder.parent.parent,
        progress=progress,
    )
    train_ids, val_ids = train_val_split(ids, 0.1)
    mc = GPTConfig(vocab_size=tokenizer.vocab_size, **SHAKESPEARE_CHAR_MODEL)
    tc = TrainConfig(
        max_steps=steps,
        eval_interval=max(1, steps // 6),
        seed=seed,
        device="cpu",
        progress=progress,
        **SHAKESPEARE_CHAR_TRAIN,
    )
    torch.manual_seed(seed)
    model = GPT(mc)
    trainer = Trainer(
        model,
        TokenDataset(train_ids, mc.block_size),
        TokenDataset(val_ids, mc.block_size),
        tc,
    )
    history = trainer.train()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        model.save(tmp)
        tokenizer.save(tmp / "tokenizer.json")
        save_json(history.to_dict(), tmp / "history.json")  # written last: marks it complete
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "history.json").is_file():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
