"""Where training memory goes, and activation checkpointing to spend less of it.

Training a model holds four kinds of tensors at the peak of a step:

- the weights (4 bytes per float32 parameter);
- their gradients (as many bytes again, for every trainable parameter);
- the optimizer's state: AdamW keeps two moments per parameter (8 bytes per float32
  parameter) and a step counter per tensor; SGD with momentum keeps one buffer;
- the activations: every tensor the forward pass saves so that backward can compute
  the gradients (layer inputs, attention weights, normalisation statistics). They
  grow with batch size x context x depth, and for long contexts they dominate.

``training_memory(model)`` counts the first three from the parameters;
``activation_bytes(fn)`` counts the fourth exactly: it runs ``fn`` (a forward pass)
under ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd
saves for backward, and adds up the bytes of the distinct storages (a tensor saved by
two operations is held once; views of parameters are weights, not activations).

Activation checkpointing trades compute for memory: a checkpointed block saves only
its input, and backward runs the block's forward again to get what it needs.
``checkpoint_blocks(model)`` does this for every transformer block of a ``GPT``,
about one extra forward pass per step, and ``uncheckpoint_blocks`` undoes it. The
blocks stay the plain modules a reader studies: only their ``forward`` is wrapped,
with ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, which replays
dropout with the same random numbers, so the gradients are those of the plain model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minigpt.model import GPT, Block

__all__ = [
    "OPTIMIZERS",
    "TrainingMemory",
    "activation_bytes",
    "checkpoint_blocks",
    "is_checkpointed",
    "training_memory",
    "uncheckpoint_blocks",
]

# optimizer -> (state tensors the size of each parameter, float32 scalars per tensor)
OPTIMIZERS = {"adamw": (2, 1), "adam": (2, 1), "sgd": (0, 0), "sgd_momentum": (1, 0)}


# --------------------------------------------------------------------------- checkpointing


def _checkpointed_forward(block: Block) -> Callable[..., Tensor]:
    plain = type(block).forward.__get__(block)  # the class's forward, bound to this block

    def forward(x: Tensor, kv_cache: Any = None) -> Tensor:
        if kv_cache is not None or not torch.is_grad_enabled():
            return plain(x, kv_cache)  # generation and evaluation save nothing anyway
        return checkpoint(plain, x, use_reentrant=False)

    forward.minigpt_checkpointed = True  # type: ignore[attr-defined]
    return forward


def _blocks(model: nn.Module) -> list[Block]:
    if not isinstance(model, GPT):
        raise TypeError(
            f"checkpointing wraps the blocks of a minigpt GPT, got {type(model).__name__}"
        )
    return list(model.h)


def checkpoint_blocks(model: GPT) -> GPT:
    """Recompute each transformer block in backward instead of saving its activations.

    Wraps the ``forward`` of every block of ``model`` in place (calling it twice is
    harmless) and returns ``model``. Forward outputs and gradients are unchanged up to
    float rounding; a step costs about one more forward pass.
    """
    for block in _blocks(model):
        if not is_checkpointed(block):
            block.forward = _checkpointed_forward(block)  # an instance attribute over the class's
    return model


def uncheckpoint_blocks(model: GPT) -> GPT:
    """Undo ``checkpoint_blocks``: every block uses its class's ``forward`` again."""
    for block in _blocks(model):
        if is_checkpointed(block):
            del block.forward
    return model


def is_checkpointed(block: nn.Module) -> bool:
    """Whether ``checkpoint_blocks`` wrapped this block's forward."""
    return getattr(block.__dict__.get("forward"), "minigpt_checkpointed", False)


# --------------------------------------------------------------------------- measuring


def activation_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` and count the bytes autograd saves for backward while it runs.

    ``fn`` is typically a forward pass, ``lambda: model(x, y)[1]``. Each distinct
    storage counts once, at its full size; storages of parameters (and views of
    them) are weights and do not count. Returns ``(bytes, fn())``; keep the result
    alive until the backward pass if you need one (the saved tensors belong to it).
    """
    saved: dict[int, int] = {}
    keep: list[Tensor] = []  # hold every saved tensor, so no address is reused while counting

    def pack(t: Tensor) -> Tensor:
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter):
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes a training step holds besides the activations (see ``training_memory``)."""

    weights: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state


def training_memory(model: nn.Module, optimizer_name: str = "adamw") -> TrainingMemory:
    """The bytes of ``model``'s weights, their gradients and the optimizer's state.

    Counts each parameter once (tied weights are one tensor) at its own dtype;
    gradients and optimizer state only for parameters with ``requires_grad``.
    ``optimizer_name`` is one of ``OPTIMIZERS``: "adamw" and "adam" keep two
    moments per parameter plus a float32 step counter per tensor, "sgd" nothing,
    "sgd_momentum" one buffer. Buffers (such as rotary tables) are not counted.
    """
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(
            f"optimizer_name must be one of {', '.join(OPTIMIZERS)}, got {optimizer_name!r}"
        )
    per_param, scalars = OPTIMIZERS[optimizer_name]
    params = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    state = per_param * gradients + scalars * 4 * len(trainable)
    return TrainingMemory(weights, gradients, state)
