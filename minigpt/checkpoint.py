"""Checkpoint folders: what a training run saves, and how it survives a crash.

A checkpoint is a folder: ``model.safetensors`` + ``config.json`` (as ``GPT.save``
writes them), ``optimizer.safetensors`` (AdamW's moments), ``trainer.json`` (the
training config, step, loss history, RNG states), the tokenizer when there is one,
and ``manifest.json`` (``minigpt.files``): each file's size and SHA-256, so a
flipped bit is caught on load with an error naming the file.

``write_checkpoint_folder`` fills a temporary folder and swaps it in by two
renames; ``recover_checkpoint`` finishes a swap that a kill interrupted, so some
complete checkpoint survives a crash at any instant. ``RunLock`` stops two runs
from writing one folder, ``check_writable`` finds a bad output folder before the
first step, and ``open_run_folder`` removes what killed runs left behind.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from minigpt.files import (
    CheckpointError,
    check_float_tensors,
    load_json,
    load_tensors,
    remove_stale_temporaries,
    save_json,
    save_tensors,
    verify_files,
    write_manifest,
)
from minigpt.model import GPT, GPTConfig

__all__ = [
    "TRAINER_FORMAT",
    "TRAINER_VERSION",
    "CheckpointError",
    "RunLock",
    "check_writable",
    "find_checkpoint",
    "latest_checkpoint",
    "load_optimizer",
    "load_training_state",
    "open_run_folder",
    "read_trainer_state",
    "recover_checkpoint",
    "rng_state",
    "save_optimizer",
    "save_training_state",
    "set_rng_state",
    "write_checkpoint_folder",
]


# --------------------------------------------------------------------------- checkpoint folders

TRAINER_FORMAT = "minigpt-trainer"
TRAINER_VERSION = 1
LOCK_FILE = ".lock"


def _complete(folder: Path) -> bool:
    """A checkpoint folder whose last file (trainer.json or config.json) was written."""
    return (folder / "trainer.json").is_file() or (
        (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    )


def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_checkpoint(final: str | os.PathLike[str]) -> Path | None:
    """Finish a folder swap that a kill interrupted; returns ``final`` if a checkpoint is there.

    ``write_checkpoint_folder`` renames ``final`` to ``.final.old``, the new folder to
    ``final``, then deletes ``.final.old``. A kill between the two renames leaves
    only ``.final.old``: it is renamed back. A kill after both leaves both: the old
    one is deleted.
    """
    final = Path(final)
    old = _old(final)
    if old.exists():
        if _complete(final):
            shutil.rmtree(old, ignore_errors=True)
        elif _complete(old):
            if final.exists():
                shutil.rmtree(final)
            os.replace(old, final)
    return final if _complete(final) else None


def write_checkpoint_folder(final: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a checkpoint folder atomically: ``write(tmp)`` fills a temporary folder,
    a manifest of its files is added, then it replaces ``final`` by two renames.

    At every instant either the old ``final``, or ``.final.old``, or the new
    ``final`` is a complete checkpoint (``recover_checkpoint`` finds it), so a crash
    at any point never loses the last good copy.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(final)  # never start a swap while the only good copy is .old
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        write(tmp)
        write_manifest(tmp)
        old = _old(final)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class RunLock:
    """An exclusive lock on a run folder, so two runs never write one folder.

    ``with RunLock(out_dir):`` takes ``<out_dir>/.lock`` (``fcntl.flock``; the lock
    goes away with the process, so a kill -9 leaves nothing to clean up) or raises
    ``CheckpointError`` naming the folder when another process holds it. With
    ``wait=True`` it waits for the other process instead (the course model's cache:
    one notebook trains it, the others wait and then load it); ``name`` is the lock
    file's name inside the folder.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], *, wait: bool = False, name: str = LOCK_FILE
    ) -> None:
        self.run_dir = Path(run_dir)
        self.wait, self.name = wait, name
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(
                f"cannot create the run folder {self.run_dir} ({e.strerror}): choose a folder "
                "you can write to (train.out_dir)"
            ) from e
        path = self.run_dir / self.name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(
                f"cannot write in the run folder {self.run_dir} ({e.strerror}): choose a folder "
                "you can write to (train.out_dir)"
            ) from e
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; a second run is not detected
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise CheckpointError(
                f"another training run is writing {self.run_dir} (it holds {path}); wait for it "
                "to finish or choose another out_dir"
            ) from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_writable(run_dir: str | os.PathLike[str]) -> None:
    """Fail now, not at the first save, if checkpoints cannot be written into ``run_dir``.

    Creates the folder, then writes, syncs and deletes a small probe file.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=run_dir)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoints into {run_dir} ({e.strerror or e}): choose a folder you "
            "can write to with free space (train.out_dir)"
        ) from e


@contextlib.contextmanager
def open_run_folder(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``run_dir``'s ``RunLock`` for a training run, after checking that checkpoints
    can be written there, finishing any save a kill interrupted and removing its
    temporary files: all before the first step."""
    run_dir = Path(run_dir)
    with RunLock(run_dir):
        check_writable(run_dir)
        for name in ("last", "best"):
            latest_checkpoint(run_dir, name)  # renames a .NAME.old back if needed
        remove_stale_temporaries(run_dir, older_than=0)  # the lock: no one else writes here
        yield run_dir


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder for ``path``: the folder itself, or ``<run>/last`` for a run folder.

    A run whose last save was cut short between two renames still has its
    checkpoint in ``<run>/.last.old``; it is found (and renamed back) too.
    """
    path = Path(path)
    if (path / "trainer.json").is_file() or (path / "model.safetensors").is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(
        f"{path} holds no checkpoint: expected trainer.json and model.safetensors in it or in {path / 'last'}"
    )


def latest_checkpoint(run_dir: str | os.PathLike[str], name: str = "last") -> Path | None:
    """``<run_dir>/<name>`` if a complete checkpoint is there (after ``recover_checkpoint``).

    When the folder cannot be renamed (read-only), ``.<name>.old`` is returned as it is.
    """
    final = Path(run_dir) / name
    try:
        found = recover_checkpoint(final)
    except OSError:
        found = None
    if found is not None and (found / "trainer.json").is_file():
        return found
    old = _old(final)
    return old if (old / "trainer.json").is_file() else None


def read_trainer_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``trainer.json`` of a checkpoint folder."""
    file = Path(directory) / "trainer.json"
    verify_files(directory, ["trainer.json"])
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


def rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA random states, as JSON-ready base64 strings."""
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (CUDA states only onto as many GPUs)."""
    torch.set_rng_state(_unb64(state["torch"]))
    if torch.cuda.is_available() and state.get("cuda"):
        cuda_states = [_unb64(s) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def save_optimizer(optimizer: torch.optim.Optimizer, directory: str | os.PathLike[str]) -> list:
    """Write the optimizer's tensors to ``optimizer.safetensors``; returns its param_groups
    (JSON-ready: the caller stores them in ``trainer.json``)."""
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items()}
    save_tensors(tensors, Path(directory) / "optimizer.safetensors", metadata={"format": "minigpt"})
    return [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in opt["param_groups"]
    ]


def load_optimizer(
    optimizer: torch.optim.Optimizer,
    directory: str | os.PathLike[str],
    param_groups: list,
    device: str | torch.device = "cpu",
) -> None:
    """Restore ``optimizer`` from ``optimizer.safetensors`` and the saved ``param_groups``.

    JSON has no tuples: a value that is a tuple in the optimizer's own groups
    (AdamW's ``betas``) comes back as one, so the state round-trips exactly.
    """
    file = Path(directory) / "optimizer.safetensors"
    verify_files(directory, ["optimizer.safetensors"])
    tensors = load_tensors(file, device=device)
    check_float_tensors(tensors, file)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, _, name = key.partition(".")
        state.setdefault(int(i), {})[name] = value
    try:
        current = optimizer.param_groups
        if not isinstance(param_groups, list) or len(param_groups) != len(current):
            raise ValueError(f"{len(current)} parameter groups expected")
        groups = [
            {k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in g.items()}
            for g, cur in zip(param_groups, current, strict=True)
        ]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{file} does not fit this model's optimizer: {e}") from e
    _match_layouts(optimizer)


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded state tensor its parameter's memory layout.

    safetensors stores tensors contiguous, while GPT keeps its linear weights
    column-major (``minigpt.model``). The fused AdamW kernel walks a parameter, its
    gradient and its moments as flat memory, so a row-major moment beside a
    column-major weight would update the wrong numbers, silently.
    """
    for param, tensors in optimizer.state.items():
        for name, value in tensors.items():
            if (
                isinstance(value, torch.Tensor)
                and value.shape == param.shape
                and value.stride() != param.stride()
            ):
                tensors[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# --------------------------------------------------------------------------- a training run's state


def save_training_state(
    directory: str | os.PathLike[str],
    model: GPT,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
    tokenizer: Any = None,
) -> None:
    """Fill a (temporary) checkpoint folder: the model (``GPT.save``), the optimizer,
    the tokenizer when it has ``save``, and ``trainer.json``, written last.

    ``state`` holds the trainer's JSON-ready facts (step, train_config, history, ...);
    the optimizer's groups, the gradient scaler and torch's RNG states are added here.
    """
    directory = Path(directory)
    model.save(directory)
    groups = save_optimizer(optimizer, directory)
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(directory / "tokenizer.json")
    record = {
        "format": TRAINER_FORMAT,
        "version": TRAINER_VERSION,
        **state,
        "optimizer_param_groups": groups,
        "grad_scaler": scaler.state_dict(),
        "rng": rng_state(),
    }
    save_json(record, directory / "trainer.json")


def load_training_state(
    directory: str | os.PathLike[str],
    model: GPT,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Restore ``model``'s weights, the optimizer, the scaler and torch's RNG states from
    a checkpoint folder (``save_training_state``); returns ``trainer.json``'s state.

    Every file is checked against the manifest first, and a checkpoint of another
    model is refused. Raises ``CheckpointError`` naming the file at fault.
    """
    directory = Path(directory)
    state = read_trainer_state(directory)
    verify_files(directory, ["config.json", "model.safetensors"])
    config = GPTConfig.from_json(directory / "config.json")
    if config != model.config:
        raise CheckpointError(
            f"{directory / 'config.json'} describes a different model than the one being "
            f"trained: {config} vs {model.config}"
        )
    device = next(model.parameters()).device
    weights = directory / "model.safetensors"
    model.load_weights(load_tensors(weights, device=device), source=weights)
    load_optimizer(optimizer, directory, state["optimizer_param_groups"], device=device)
    scaler.load_state_dict(state.get("grad_scaler") or {})
    set_rng_state(state["rng"])
    return state
