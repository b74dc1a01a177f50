"""Safe files for weights and metadata: safetensors + JSON, written atomically.

Nothing here unpickles: a checkpoint cannot run code when it is loaded. Every
write goes to a temporary file in the same folder, is flushed to disk, then
renamed over the destination, so a crash or Ctrl-C mid-write leaves either the
old file or the new one, never half of one. Reading a missing, truncated or
corrupt file raises ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

T = TypeVar("T")

__all__ = [
    "CheckpointError",
    "atomic_write",
    "config_from_dict",
    "load_json",
    "load_tensors",
    "save_json",
    "save_tensors",
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
