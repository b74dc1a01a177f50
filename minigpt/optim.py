"""Optimisation: the settings every training loop shares, AdamW, the schedule, clipping.

Pretraining (``minigpt.train``) and fine-tuning (``minigpt.finetune``) take the same
optimizer steps, so they share one vocabulary and one implementation of each piece:

- ``OptimConfig``: the settings both loops understand (``max_steps``, ``batch_size``,
  ``lr``, ``warmup_steps``, ``eval_interval``, ``time_limit``, ...), validated once.
  ``TrainConfig`` and ``FinetuneConfig`` extend it;
- ``configure_optimizer``: AdamW with weight decay on matrices only;
- ``lr_at``: the one learning-rate schedule, a linear warmup then a cosine decay,
  whose progress follows the steps or, with a time limit, the clock;
- ``clip_grad_norm``: scale all gradients so their global norm is at most a bound;
- ``adamw_update``: one AdamW update written out, what chapter 05 builds by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from minigpt.files import check_int, check_number

__all__ = [
    "OptimConfig",
    "adamw_update",
    "clip_grad_norm",
    "configure_optimizer",
    "lr_at",
    "set_lr",
]


@dataclass
class OptimConfig:
    """The settings of an optimisation run, shared by pretraining and fine-tuning.

    Attributes:
        max_steps: optimizer steps to take.
        batch_size: sequences (or examples) per micro-batch on each process.
        lr: the peak learning rate, reached after ``warmup_steps``.
        min_lr: the learning rate at the end of the cosine decay (None = lr / 10).
        warmup_steps: steps of linear warmup from ~0 to ``lr``.
        decay_steps: the step where the cosine reaches ``min_lr`` (None = max_steps).
        weight_decay: AdamW's decoupled weight decay, applied to matrices only.
        beta1, beta2, eps: AdamW's moment decay rates and epsilon.
        grad_clip: clip the global gradient norm to this (0 = no clipping).
        eval_interval: evaluate every this many steps (0 = only at the end).
        time_limit: stop after this many seconds; the cosine then follows the
            fraction of the time used (or of the steps, whichever is further), so
            the learning rate reaches ``min_lr`` when time runs out. None = no limit.
        seed: seeds the choice of batches and dropout.
    """

    max_steps: int = 1000
    batch_size: int = 12
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
    time_limit: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size"):
            check_int(self, key, 1)
        for key in ("warmup_steps", "eval_interval", "seed"):
            check_int(self, key, 0)
        check_int(self, "decay_steps", 1, optional=True)
        check_number(self, "lr", 0, above=True)
        check_number(self, "min_lr", 0, self.lr, optional=True)
        check_number(self, "weight_decay", 0)
        check_number(self, "grad_clip", 0)
        check_number(self, "beta1", 0, 1, below=True)
        check_number(self, "beta2", 0, 1, below=True)
        check_number(self, "eps", 0, above=True)
        check_number(self, "time_limit", 0, above=True, optional=True)

    @property
    def final_lr(self) -> float:
        """The learning rate at the end of the decay (``min_lr``, or lr / 10)."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def lr_at(self, step: int, time_fraction: float | None = None) -> float:
        """The learning rate of step ``step`` (0-based) under these settings (see ``lr_at``)."""
        return lr_at(
            step,
            lr=self.lr,
            min_lr=self.final_lr,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps or self.max_steps,
            time_fraction=time_fraction if self.time_limit is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# --------------------------------------------------------------------------- the schedule


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
    time_fraction: float | None = None,
) -> float:
    """The learning rate for step ``step`` (0-based): linear warmup, then cosine decay.

    Steps 0 .. warmup_steps-1 rise linearly to ``lr`` ((step + 1) / warmup_steps of it),
    then the rate follows half a cosine down to ``min_lr`` at ``decay_steps`` and
    stays there. ``time_fraction`` (the fraction of a time budget used, 0 -> 1) moves
    the cosine at least that far: a run that stops on the clock still ends at ``min_lr``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)  # 0 -> 1
    if time_fraction is not None:
        progress = max(progress, time_fraction)
    if progress >= 1:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- the optimizer


def configure_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in two groups: matrices (embeddings,
    linear weights) decay, vectors (biases, norm gains) do not; shrinking a gain or
    a bias toward zero does not regularise anything useful. ``fused`` defaults to
    True when the parameters' device supports the fused kernel.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: unfreeze something first")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        device = params[0].device.type
        fused = device in ("cuda", "cpu") and all(p.dtype.is_floating_point for p in params)
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping. Same result as ``torch.nn.utils.clip_grad_norm_``:
    the norm of all gradients seen as one long vector, and a scale of
    ``max_norm / (norm + 1e-6)`` applied only when it is below 1.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # one norm per tensor, in one fused call, each summed in row-major order: GPT keeps
    # its linear weights column-major (minigpt.model), so their gradients are too, and a
    # sum in memory order would round differently. The copies cost little next to the
    # step and keep training bit for bit the same whatever the weights' memory order.
    norms = torch._foreach_norm([g if g.is_contiguous() else g.contiguous() for g in grads])
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
