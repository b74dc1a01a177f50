"""Checkpoints: safe files for weights and metadata, and the folders a run saves.

Files. Nothing here unpickles: a checkpoint cannot run code when it is loaded.
Every write goes to a temporary file in the same folder, is flushed to disk, then
renamed over the destination, so a crash or Ctrl-C mid-write leaves either the
old file or the new one, never half of one. Reading a missing, truncated or
corrupt file raises ``CheckpointError`` naming the file.

Folders. A checkpoint is a folder: ``model.safetensors`` + ``config.json`` (as
``GPT.save`` writes them), ``optimizer.safetensors`` (AdamW's moments),
``trainer.json`` (the training config, step, loss history, RNG states), the
tokenizer when there is one, and ``manifest.json``: each file's size and SHA-256,
so a flipped bit is caught on load with an error naming the file.
``write_checkpoint_folder`` fills a temporary folder and swaps it in by two
renames; ``recover_checkpoint`` finishes a swap that a kill interrupted, so some
complete checkpoint survives a crash at any instant. ``RunLock`` stops two runs
from writing one folder, and ``clean_stale_temporaries`` removes what killed runs
left behind.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

T = TypeVar("T")

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "RunLock",
    "atomic_write",
    "check_float_tensors",
    "check_writable",
    "clean_stale_temporaries",
    "config_from_dict",
    "find_checkpoint",
    "latest_checkpoint",
    "load_json",
    "load_optimizer",
    "load_tensors",
    "read_trainer_state",
    "recover_checkpoint",
    "rng_state",
    "save_json",
    "save_optimizer",
    "save_tensors",
    "set_rng_state",
    "sha256_file",
    "verify_files",
    "write_checkpoint_folder",
    "write_manifest",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build the dataclass ``cls`` from ``d``, rejecting unknown keys (a typo in a
    config file should fail loudly, not be ignored)."""
    if not isinstance(d, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**d)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:  # make sure the bytes are on disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def save_tensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a dict of tensors as safetensors, atomically. Tensors are made contiguous."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def load_tensors(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file (truncated or corrupt?): {e}"
        ) from e


def save_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_json(path: str | os.PathLike[str]) -> Any:
    """Read JSON; a missing or malformed file raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e


# --------------------------------------------------------------------------- manifests

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "minigpt-manifest"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike[str]) -> Path:
    """Record the size and SHA-256 of every file in ``directory`` in ``manifest.json``.

    Written last into a checkpoint folder: ``verify_files`` then catches a file that
    was truncated, replaced or had a bit flipped after it was saved.
    """
    directory = Path(directory)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    return save_json(
        {"format": MANIFEST_FORMAT, "version": 1, "files": files}, directory / MANIFEST
    )


def verify_files(directory: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Check the files ``names`` of ``directory`` against its manifest.

    A folder without ``manifest.json`` (written by minigpt before manifests existed)
    is not checked. Raises ``CheckpointError`` naming the first file that is missing
    from the manifest or differs from it in size or SHA-256.
    """
    directory = Path(directory)
    file = directory / MANIFEST
    if not file.is_file():
        return
    manifest = load_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{file} is not a minigpt manifest (format {MANIFEST_FORMAT!r})")
    listed = manifest.get("files", {})
    for name in names:
        path = directory / name
        entry = listed.get(name)
        if entry is None:
            raise CheckpointError(
                f"{path} is not listed in {file}: the folder was changed after it was saved"
            )
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        size = path.stat().st_size
        if size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(
                f"{path} does not match its checksum in {file} (expected {entry.get('size')} "
                f"bytes, sha256 {str(entry.get('sha256'))[:12]}..., found {size} bytes): the file "
                "is corrupt; use another checkpoint (best/ or last/) or retrain"
            )


def check_float_tensors(tensors: dict[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    """Refuse tensors that are not floating point where weights or moments belong."""
    bad = [f"{k}: {v.dtype}" for k, v in tensors.items() if not v.dtype.is_floating_point]
    if bad:
        raise CheckpointError(
            f"{source} holds non-floating-point tensors where weights belong ({', '.join(bad[:3])}): "
            "it was not written by minigpt, or it is corrupt"
        )


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


def clean_stale_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` folders and files a killed run left in ``run_dir``.

    Call it only while holding the run's lock (``RunLock``): then no other process
    is writing them. Returns what was deleted.
    """
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for p in run_dir.glob(".*.tmp"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class RunLock:
    """An exclusive lock on a run folder, so two runs never write one folder.

    ``with RunLock(out_dir):`` takes ``<out_dir>/.lock`` (``fcntl.flock``; the lock
    goes away with the process, so a kill -9 leaves nothing to clean up) or raises
    ``CheckpointError`` naming the folder when another process holds it.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(
                f"cannot create the run folder {self.run_dir} ({e.strerror}): choose a folder "
                "you can write to (train.out_dir)"
            ) from e
        path = self.run_dir / LOCK_FILE
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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
