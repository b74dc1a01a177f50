"""Safe files: atomic writes, safetensors and JSON, checksums, manifests, temp files.

Nothing here unpickles: a file cannot run code when it is loaded. Every write goes
to a temporary file in the same folder, is flushed to disk, then renamed over the
destination, so a crash or Ctrl-C mid-write leaves either the old file or the new
one, never half of one. Reading a missing, truncated or corrupt file raises
``CheckpointError`` naming the file.

A folder of such files (a saved model, a checkpoint) carries ``manifest.json``:
each file's size and SHA-256, written last, so ``verify_files`` catches a flipped
bit on load. Temporary files a killed process left behind are removed by
``remove_stale_temporaries`` once nothing is writing them (``hold_lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; temp files are judged by age alone
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "atomic_write",
    "check_bool",
    "check_float_tensors",
    "check_int",
    "check_number",
    "config_from_dict",
    "hold_lock",
    "load_json",
    "load_tensors",
    "remove_stale_temporaries",
    "save_json",
    "save_tensors",
    "sha256_file",
    "verify_files",
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(config: Any, name: str, minimum: int, *, optional: bool = False) -> None:
    """Raise a ValueError unless ``config.<name>`` is an integer >= ``minimum``
    (or None when ``optional``); the message names the setting."""
    value = getattr(config, name)
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        what += " or None" if optional else ""
        raise ValueError(f"{type(config).__name__}.{name} must be {what}, got {value!r}")


def check_number(
    config: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
    optional: bool = False,
) -> None:
    """Raise a ValueError unless ``config.<name>`` is a finite number in the range
    (``low`` <= value, or < with ``above``; value <= ``high``, or < with ``below``)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    ok = _is_real(value)
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value < high if below else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if above else '>='} {low}"
        hi = "" if high is None else f"{'<' if below else '<='} {high}"
        what = (
            "a finite number"
            + (f" {lo}" if lo else "")
            + (f" and {hi}" if lo and hi else f" {hi}" if hi else "")
        )
        what += " or None" if optional else ""
        raise ValueError(f"{type(config).__name__}.{name} must be {what}, got {value!r}")


def check_bool(config: Any, name: str, *, optional: bool = False) -> None:
    """Raise a ValueError unless ``config.<name>`` is True or False (or None when ``optional``)."""
    value = getattr(config, name)
    if not (isinstance(value, bool) or (optional and value is None)):
        what = "true, false or null" if optional else "true or false"
        raise ValueError(f"{type(config).__name__}.{name} must be {what}, got {value!r}")


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


# --------------------------------------------------------------------------- temporary files

# Temp files we write: mkstemp names, a dot, the final name, 8 random characters.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.(part|tmp)$")
_STALE_AFTER_S = 600.0  # a live writer touches its file far more often than this


def hold_lock(fd: int) -> None:
    """Take an exclusive lock on a temp file being written; it ends when the file closes."""
    if fcntl is not None:
        # On a filesystem without locks this fails, and the age rule alone protects the file.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temporaries(
    folder: str | os.PathLike[str], older_than: float = _STALE_AFTER_S
) -> list[Path]:
    """Delete the temp files and folders a killed process left in ``folder``; returns them.

    A temp file is stale when it has not been written for ``older_than`` seconds and no
    process holds its lock; on Windows, where there is no lock, a file still open
    elsewhere cannot be deleted, and the error is ignored. A caller that holds a lock
    on the whole folder (a training run's ``RunLock``) knows no one else writes there
    and passes ``older_than=0``.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed  # no such folder yet: nothing to clean
    now = time.time()
    for entry in entries:
        if not _TEMP_NAME.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if now - st.st_mtime < older_than:
                continue
            if entry.is_dir(follow_symlinks=False):  # a checkpoint folder being filled
                shutil.rmtree(entry.path)
            elif not entry.is_file(follow_symlinks=False):
                continue
            elif fcntl is None:
                os.unlink(entry.path)
            else:
                with open(entry.path, "rb") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # its writer is alive
                    os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue  # gone already, or in use: leave it
    return removed
