"""Where a run computes: the device, the number format, and the processes of a run.

- ``pick_device("auto")`` is CUDA when a GPU is there, else the CPU; ``pick_dtype``
  chooses bfloat16 autocast on GPUs that support it (float16 with a gradient scaler
  on older ones) and float32 on the CPU; ``autocast(device, dtype)`` is the context.
- ``setup_distributed`` joins the process group that ``torchrun`` describes in its
  environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ...) and returns a
  ``DistInfo``; ``teardown_distributed`` waits for every rank and leaves the group.
  One process (``world_size == 1``) needs neither and gets a ``DistInfo()``.
- ``wrap_model`` makes the module a training step runs: the model itself, compiled,
  wrapped in DDP (``parallel="ddp"``: every process holds all the weights, gradients
  are averaged by an all-reduce) or sharded with FSDP (``parallel="fsdp"``,
  ``torch.distributed.fsdp.fully_shard``: each process holds 1/world_size of the
  weights, gradients and optimizer state, and gathers a block's weights just before
  using it). ``skip_gradient_sync`` lets accumulation micro-batches skip the reduction;
  ``gather_model`` / ``plain_copy`` + ``scatter_model`` move a sharded run's state to
  and from a plain model and optimizer, which is what checkpoints store.
- ``StopSignals`` turns the first Ctrl-C or SIGTERM into a request to stop after the
  current step; in a DDP run the ranks agree on it, so they stop together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minigpt.memory import checkpoint_blocks
from minigpt.model import GPT
from minigpt.optim import configure_optimizer

__all__ = [
    "DEVICES",
    "DTYPES",
    "PARALLEL",
    "DistInfo",
    "StopSignals",
    "autocast",
    "check_device",
    "gather_model",
    "is_sharded",
    "pick_device",
    "pick_dtype",
    "plain_copy",
    "scatter_model",
    "setup_distributed",
    "skip_gradient_sync",
    "teardown_distributed",
    "wrap_model",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" too
PARALLEL = ("ddp", "fsdp")  # how several processes share the work (one process: neither)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a run: its rank, its GPU index and the number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    created_group: bool = False  # this process created the group, so it destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(pref: str) -> None:
    """Raise a ValueError unless ``pref`` names a device kind minigpt can train on."""
    kind, _, index = str(pref).partition(":")
    if not isinstance(pref, str) or kind not in DEVICES or (index and not index.isdigit()):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} or 'cuda:N', got {pref!r}")


def setup_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    created = False
    if not dist.is_initialized():
        use_cuda = device_pref.startswith("cuda") or (
            device_pref == "auto" and torch.cuda.is_available()
        )
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return DistInfo(
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=dist.get_world_size(),
        created_group=created,
    )


def teardown_distributed(info: DistInfo, *, wait: bool = True) -> None:
    """Leave the process group that ``setup_distributed`` created.

    With ``wait``, every rank first meets at a barrier: a rank that leaves early can
    make gloo abort its peer during ``destroy_process_group``.
    """
    if not (info.enabled and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    if info.created_group:
        dist.destroy_process_group()


def pick_device(pref: str, info: DistInfo | None = None) -> torch.device:
    """The ``torch.device`` for ``pref`` ("auto", "cpu", "cuda", "cuda:1", "mps").

    In a DDP run "cuda" means this process's GPU, ``cuda:<local_rank>``.
    """
    check_device(pref)
    info = info or DistInfo()
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and info.enabled:
        pref = f"cuda:{info.local_rank}"
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "the config asks for device 'cuda' but no GPU is available; use 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"the config asks for device {pref!r} but this machine has "
                f"{torch.cuda.device_count()} GPU(s): use 'cuda' or 'cuda:0'"
            )
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("the config asks for device 'mps' but MPS is not available; use 'cpu'")
    return device


def pick_dtype(pref: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``pref`` on ``device`` ("auto": bfloat16 or float16 on CUDA)."""
    if pref not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {pref!r}")
    if pref == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[pref]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for ``dtype`` on ``device``; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------- DDP and FSDP


def wrap_model(model: GPT, info: DistInfo, device: torch.device, config: Any) -> nn.Module:
    """The module a training step calls: ``model``, maybe checkpointed, sharded,
    compiled and DDP-wrapped, as ``config`` (a checked ``TrainConfig``) says.

    ``config.activation_checkpointing`` wraps the blocks' forward in place
    (``minigpt.memory.checkpoint_blocks``). With one process ``config.parallel``
    changes nothing. FSDP shards ``model`` itself, in place (each block is one unit,
    gathered whole for its forward and backward; its parameters become ``DTensor``
    shards): build the optimizer after this call.
    """
    parallel = config.parallel
    if config.activation_checkpointing:
        checkpoint_blocks(model)
    if info.enabled and parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for param in model.parameters():  # FSDP shards contiguous tensors only
            param.data = param.data.contiguous()  # (GPT stores linear weights column-major)
        for block in model.h:
            fully_shard(block)
        fully_shard(model)  # the embeddings, the final norm and the (tied) head
    runner: nn.Module = torch.compile(model) if config.compile else model
    if info.enabled and parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(runner, device_ids=[device.index] if device.type == "cuda" else None)
    return runner


def skip_gradient_sync(
    runner: nn.Module, model: nn.Module, skip: bool
) -> contextlib.AbstractContextManager:
    """A context for one micro-batch's backward: with ``skip``, gradients stay local
    (DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync(False)``) and are reduced
    with the last micro-batch's. One process: nothing to skip."""
    if hasattr(runner, "no_sync"):  # DDP
        return runner.no_sync() if skip else contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):  # sharded by fully_shard
        model.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``wrap_model`` sharded ``model`` with FSDP."""
    return hasattr(model, "set_requires_gradient_sync")


def plain_copy(model: GPT, optimizer: torch.optim.Optimizer) -> tuple[GPT, torch.optim.Optimizer]:
    """A sharded model's unsharded twin: a plain ``GPT`` and AdamW on the CPU, ready for a
    checkpoint's state. For a model that is not sharded: ``(model, optimizer)`` itself."""
    if not is_sharded(model):
        return model, optimizer
    plain = GPT(model.config)
    return plain, configure_optimizer(plain, lr=0.0, weight_decay=0.0, fused=False)


def gather_model(
    model: GPT, optimizer: torch.optim.Optimizer
) -> tuple[GPT | None, torch.optim.Optimizer | None]:
    """A sharded model's full weights and optimizer state, as a plain ``GPT`` and AdamW
    on rank 0 and ``(None, None)`` on the other ranks; every rank must call it. For a
    model that is not sharded: ``(model, optimizer)`` itself."""
    if not is_sharded(model):
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
    weights, optim = get_state_dict(model, optimizer, options=full)
    if dist.get_rank() != 0:
        return None, None
    plain, plain_optimizer = plain_copy(model, optimizer)
    set_state_dict(
        plain,
        plain_optimizer,
        model_state_dict=weights,
        optim_state_dict=optim,
        options=StateDictOptions(full_state_dict=True),
    )
    return plain, plain_optimizer


def scatter_model(
    plain: GPT,
    plain_optimizer: torch.optim.Optimizer,
    model: GPT,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Load a plain model and optimizer (the same on every rank) into a sharded pair;
    nothing when ``model`` is ``plain`` (not sharded). Every rank must call it."""
    if plain is model:
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    weights, optim = get_state_dict(plain, plain_optimizer)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=optim,
        options=StateDictOptions(full_state_dict=True),
    )


# --------------------------------------------------------------------------- stop signals


class StopSignals:
    """Within ``with StopSignals() as stop:`` the first Ctrl-C (SIGINT) or SIGTERM only
    sets ``stop.requested``; a second one raises ``KeyboardInterrupt`` at once.

    A training loop polls ``stop.agreed(info, device)`` after each step, saves, and
    stops. Signals can only be caught in the main thread; elsewhere nothing changes.
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.requested:  # a second signal: stop right now
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{what}: finishing this step and saving a checkpoint (again to abort)")

    def __enter__(self) -> StopSignals:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def agreed(self, info: DistInfo, device: torch.device) -> bool:
        """Whether to stop now: this process's request, or any rank's in a DDP run."""
        if not info.enabled:
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # stop together or deadlock
        return bool(flag.item())
