"""Pretraining: the training loop, evaluation and the loss history.

The pieces, in the order a step uses them:

- a batch of random windows from a ``TokenDataset`` (``minigpt.data``). The windows
  of step ``s`` come from a generator seeded with ``(seed, s)``, so the data of any
  step can be recomputed and a resumed run needs no data state;
- the forward pass and the cross-entropy loss, split into ``grad_accum_steps``
  micro-batches whose gradients add up (a large batch on a small machine);
- gradient clipping and AdamW with its learning-rate schedule (``minigpt.optim``);
- every ``eval_interval`` steps, the mean loss on a fixed set of validation batches,
  and checkpoints: ``<out_dir>/last`` and ``<out_dir>/best`` (``minigpt.checkpoint``
  owns the folder format, the atomic swap and recovery after a crash).

Resuming restores everything that influences the next step, so a run stopped and
resumed produces the same losses as one that never stopped. Ctrl-C and SIGTERM
finish the current step and save before stopping. Multi-process training with
``torchrun`` (DDP, ``minigpt.distributed``) is picked up from the environment
variables torchrun sets; rank 0 logs and writes checkpoints. ``parallel="fsdp"`` shards
the weights, gradients and optimizer state across the processes instead, and
``activation_checkpointing`` recomputes each block in backward (``minigpt.memory``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minigpt.checkpoint import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    load_training_state,
    open_run_folder,
    read_trainer_state,
    save_training_state,
    write_checkpoint_folder,
)
from minigpt.distributed import (
    DTYPES,
    PARALLEL,
    StopSignals,
    autocast,
    check_device,
    gather_model,
    pick_device,
    pick_dtype,
    plain_copy,
    scatter_model,
    setup_distributed,
    skip_gradient_sync,
    wrap_model,
)
from minigpt.files import check_bool, check_int, config_from_dict
from minigpt.model import GPT, GPTConfig
from minigpt.optim import OptimConfig, clip_grad_norm, configure_optimizer, set_lr
from minigpt.tokens import TokenDataset, check_token_dataset

__all__ = [
    "LossHistory",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "evaluate",
    "train",
    "validation_loss",
]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig(OptimConfig):
    """Everything about a pretraining run except the model and the data.

    The optimisation settings (``max_steps``, ``batch_size``, ``lr``, ``min_lr``,
    ``warmup_steps``, ``decay_steps``, ``weight_decay``, ``beta1``, ``beta2``, ``eps``,
    ``grad_clip``, ``eval_interval``, ``time_limit``, ``seed``) are ``OptimConfig``'s,
    shared with fine-tuning. With ``eval_interval`` 0 the run evaluates only at the end.

    Attributes:
        grad_accum_steps: micro-batches whose gradients are summed before one step;
            the global batch is ``batch_size * grad_accum_steps * world_size`` sequences.
        eval_iters: validation batches per evaluation (always the same batches).
        checkpoint_interval: save ``last`` every this many steps (None = eval_interval).
        out_dir: the run folder for checkpoints (None = no checkpoints).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", "mps".
        dtype: "auto" (bfloat16 autocast on CUDA when supported, else float32),
            "float32", "bfloat16" or "float16" (with a gradient scaler).
        compile: wrap the model in ``torch.compile``.
        activation_checkpointing: recompute each block's activations in backward
            instead of storing them (``minigpt.memory.checkpoint_blocks``).
        parallel: with several processes, "ddp" (each holds all weights) or "fsdp"
            (``fully_shard``: weights, gradients and optimizer state sharded).
        fused: use the fused AdamW kernel (None = when available).
        progress: show a tqdm progress bar (rank 0 only).
    """

    grad_accum_steps: int = 1
    eval_iters: int = 20
    checkpoint_interval: int | None = None
    out_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "ddp"
    fused: bool | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "grad_accum_steps", 1)
        check_int(self, "eval_iters", 1)
        check_int(self, "checkpoint_interval", 1, optional=True)
        if self.out_dir is not None and not isinstance(self.out_dir, (str, os.PathLike)):
            raise ValueError(
                f"TrainConfig.out_dir must be a folder path or None, got {self.out_dir!r}"
            )
        if self.out_dir is not None:
            self.out_dir = os.fspath(self.out_dir)
        check_device(self.device)
        for name, allowed in (("dtype", DTYPES), ("parallel", PARALLEL)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        check_bool(self, "compile")
        check_bool(self, "activation_checkpointing")
        check_bool(self, "progress")
        check_bool(self, "fused", optional=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys (a typo should not pass silently)."""
        return config_from_dict(cls, d)


# --------------------------------------------------------------------------- evaluation


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


@torch.no_grad()
def validation_loss(model: nn.Module, ids: Any, batch_size: int = 64) -> float:
    """Mean cross-entropy over every non-overlapping window of the token ids ``ids``.

    Unlike ``evaluate`` (a sample of random windows), this reads all of a held-out
    text once: the figure the course model and the time-to-quality benchmark report.
    ``ids`` is a 1-D array or tensor of token ids, at least one window plus one long.
    """
    T = model.config.block_size
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = (len(ids) - 1) // T
    if n < 1:
        raise ValueError(f"need at least {T + 1} tokens for one window, got {len(ids)}")
    device = next(model.parameters()).device
    x = ids[: n * T].view(n, T)
    y = ids[1 : n * T + 1].view(n, T)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
        total += loss.item() * len(x[i : i + batch_size])
    model.train(was_training)
    return total / n


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
        check_token_dataset(train_data, "train_data", model.config.block_size)
        if val_data is not None:
            check_token_dataset(val_data, "val_data", model.config.block_size)
        self.train_data, self.val_data = train_data, val_data
        self.tokenizer, self.metadata, self.on_step = tokenizer, dict(metadata or {}), on_step
        self.ddp = setup_distributed(config.device)
        self.device = pick_device(config.device, self.ddp)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.model = model.to(self.device)  # save/load/sample use this one (FSDP shards it)
        # the module that runs forward/backward: maybe checkpointed, sharded, compiled, DDP
        self._runner = wrap_model(self.model, self.ddp, self.device, config)
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
        self._start_time: float | None = None  # set by train(): the clock the schedule may follow
        # the dropout RNG: seeded per rank so that ranks drop different units
        torch.manual_seed(_mix(config.seed, self.ddp.rank, salt=2))

    # ------------------------------------------------------------ helpers

    @property
    def out_dir(self) -> Path | None:
        return None if self.config.out_dir is None else Path(self.config.out_dir)

    def lr(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): ``minigpt.optim.lr_at`` under this
        config, following the clock too when ``time_limit`` is set."""
        fraction = None
        if self.config.time_limit is not None and self._start_time is not None:
            fraction = (time.perf_counter() - self._start_time) / self.config.time_limit
        return self.config.lr_at(step, fraction)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

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
        set_lr(self.optimizer, lr)
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
            # gradients are averaged across ranks on backward; only on the last micro-step
            with skip_gradient_sync(self._runner, self.model, m < A - 1):
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

        Ctrl-C or SIGTERM finishes the current step, saves ``last`` and raises
        KeyboardInterrupt.
        A NaN or infinite loss raises ``TrainingDivergedError`` without saving.
        """
        c = self.config
        from tqdm.auto import tqdm

        ckpt_every = c.checkpoint_interval or c.eval_interval
        start = self._start_time = time.perf_counter()
        bar = tqdm(
            total=c.max_steps,
            initial=self.step,
            desc="training",
            disable=not (c.progress and self.ddp.is_main),
            dynamic_ncols=True,
        )
        folder = open_run_folder(self.out_dir) if self.out_dir and self.ddp.is_main else None
        with bar, folder or contextlib.nullcontext(), StopSignals(self.ddp.is_main) as stop:
            while self.step < c.max_steps:
                loss = self.train_step()
                bar.update(1)
                postfix = {"loss": f"{loss:.4f}"}
                out_of_time = (
                    c.time_limit is not None and time.perf_counter() - start > c.time_limit
                )
                last = self.step == c.max_steps or out_of_time
                due = c.eval_interval > 0 and self.step % c.eval_interval == 0
                if self.val_data is not None and (due or last):
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
                if (ckpt_every > 0 and self.step % ckpt_every == 0) or last:
                    self.save_checkpoint("last")
                if self.on_step is not None:
                    self.on_step(self)
                if stop.agreed(self.ddp, self.device):
                    where = self.save_checkpoint("last")
                    note = f"; checkpoint saved to {where}" if where else ""
                    raise KeyboardInterrupt(f"training interrupted at step {self.step}{note}")
                if out_of_time:
                    break
        return self.history

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, name: str = "last") -> Path | None:
        """Write checkpoint ``<out_dir>/<name>`` atomically (rank 0 only); returns its path."""
        if self.out_dir is None:
            return None
        final = self.out_dir / name
        # sharded: every rank sends its shards and rank 0 writes the whole (else: unchanged)
        model, optimizer = gather_model(self.model, self.optimizer)
        if self.ddp.is_main:
            write_checkpoint_folder(final, lambda d: self._write_checkpoint(d, model, optimizer))
        if self.ddp.enabled:
            dist.barrier()
        if name == "last":
            self._last_saved = (final, self.step)
        return final

    def _write_checkpoint(self, directory: Path, model: GPT, optimizer: Any) -> None:
        state = {
            "step": self.step,
            "train_config": self.config.to_dict(),
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "history": self.history.to_dict(),
            # batches are a function of (seed, step): the next step's data is fixed by these
            "data": {"seed": self.config.seed, "next_step": self.step},
            "world_size": self.ddp.world_size,
            "metadata": self.metadata,
        }
        save_training_state(
            directory, model, optimizer, self.scaler, state, tokenizer=self.tokenizer
        )

    def load_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Restore model, optimizer, step, history and RNG states from a checkpoint.

        ``path`` is a checkpoint folder or a run folder (then its ``last`` is used).
        Raises ``CheckpointError`` naming the file that is missing or corrupt.
        """
        directory = find_checkpoint(path)
        model, optimizer = plain_copy(self.model, self.optimizer)  # unless sharded: the same
        state = load_training_state(directory, model, optimizer, self.scaler)
        scatter_model(model, optimizer, self.model, self.optimizer)  # each rank takes its shards
        self.step = int(state["step"])
        best = state.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)
        self.history = LossHistory.from_dict(state["history"])
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
        # built from config.json only: load_checkpoint verifies and loads the weights, once
        model = GPT(GPTConfig.from_json(directory / "config.json"))
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
    if resume and trainer.out_dir is not None:
        found = latest_checkpoint(trainer.out_dir)  # also where a kill mid-save left it
        if found is not None:
            trainer.load_checkpoint(found)  # a corrupt checkpoint raises, never ignored
    return trainer.train()
