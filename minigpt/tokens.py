"""Token files and training windows: a text encoded once, then read as batches.

A language model trains on one long stream of token ids. ``cached_tokens`` encodes
a text once into a ``.npy`` file (uint16 when the vocabulary fits, else uint32,
``token_dtype``) and memory-maps it, so a corpus larger than RAM costs nothing to
open and every run after the first skips tokenization. ``encode_to_file`` encodes in
pieces cut where the tokenizer's pre-splitting cannot change
(``minigpt.tokenizer.safe_cuts``), so the ids are exactly ``encode``'s.

``TokenDataset`` serves batches: B random windows of T + 1 consecutive tokens,
inputs the first T, targets the last T (the same window shifted by one).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from minigpt.data import DataError, cache_dir
from minigpt.files import remove_stale_temporaries
from minigpt.tokenizer import safe_cuts

__all__ = [
    "TokenDataset",
    "cached_tokens",
    "check_token_dataset",
    "encode_to_file",
    "load_tokens",
    "token_dtype",
]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids below ``vocab_size``: uint16 or uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in 32 bits")


def encode_to_file(
    text: str,
    encode: Callable[[str], Sequence[int]],
    file: str | os.PathLike[str],
    *,
    vocab_size: int,
    chunk_chars: int = 1 << 19,
    progress: bool = True,
) -> Path:
    """Encode ``text`` with ``encode`` into a ``.npy`` file of token ids, atomically.

    The text is encoded in chunks of at most ``chunk_chars`` characters where it can
    be, with a progress bar. A chunk ends only where ``minigpt.tokenizer.safe_cuts``
    allows, so the file holds exactly ``encode(text)`` for a character tokenizer or a
    BPE with GPT-2's pattern (cutting anywhere else, even after a newline, can change
    a BPE's ids). A chunk with no such place (one huge word or whitespace run) runs on
    to the first one after it. ``encode`` must treat special tokens as ordinary text
    or refuse them, as ``encode_ordinary`` and ``BPETokenizer.encode`` do. Returns the
    path.

    The default ``chunk_chars`` stays well under the million-character whitespace run
    that tiktoken's regex engine cannot take unless the run ends the text: a run that
    long is then always cut at its end, so ``to_tiktoken()`` encoders get through it.
    """
    file = Path(file)
    dtype = token_dtype(vocab_size)
    pieces: list[np.ndarray] = []
    from tqdm.auto import tqdm

    with tqdm(
        total=len(text), unit="char", unit_scale=True, desc="tokenizing", disable=not progress
    ) as bar:
        start = 0
        while start < len(text):
            end = min(len(text), start + chunk_chars)
            if end < len(text):  # the last safe cut in (start, end], else the first after
                cut = next(safe_cuts(text, start, end + 1), None)
                if cut is None:
                    cut = next(safe_cuts(text, end - 1, last_first=False), len(text))
                end = cut
            ids = np.asarray(encode(text[start:end]), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(
                    f"the tokenizer produced ids outside [0, {vocab_size}): "
                    f"[{ids.min()}, {ids.max()}]; pass the tokenizer's vocab_size"
                )
            pieces.append(ids.astype(dtype))
            bar.update(end - start)
            start = end
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return file


def load_tokens(file: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a token file written by ``encode_to_file`` (read-only, 1-D)."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"token file not found: {file}")
    try:
        ids = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        raise DataError(
            f"{file} is not a valid token file (truncated or corrupt?): {e}; delete it and "
            "encode the text again (cached_tokens does both)"
        ) from e
    if ids.ndim != 1 or ids.dtype not in (np.uint16, np.uint32):
        raise DataError(
            f"{file} should hold a 1-D uint16/uint32 array, got {ids.dtype} {ids.shape}"
        )
    return ids


def cached_tokens(
    text: str,
    encode: Callable[[str], Sequence[int]],
    *,
    vocab_size: int,
    key: str,
    directory: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Token ids of ``text``, encoded once and cached as ``<directory>/tokens/<key>-<hash>.npy``.

    ``key`` names the tokenizer (e.g. ``"char"`` or ``"gpt2"``); the file name also
    holds a hash of the text and the key, so a changed text or tokenizer gets a new
    file instead of stale ids. A damaged file (truncated by a full disk, say) is
    encoded again with a warning; temp files of a killed run are cleaned up.

    Raises:
        DataError: the token file cannot be written under ``directory``.
    """
    digest = hashlib.sha256(f"{key}\0{vocab_size}\0".encode() + text.encode()).hexdigest()[:16]
    folder = Path(directory or cache_dir()) / "tokens"
    file = folder / f"{key}-{digest}.npy"
    remove_stale_temporaries(folder)
    if file.is_file():
        try:
            return load_tokens(file)
        except DataError as e:
            warnings.warn(f"{e}; encoding the text again", stacklevel=2)
    try:
        encode_to_file(text, encode, file, vocab_size=vocab_size, progress=progress)
    except OSError as e:
        raise DataError(
            f"cannot write the token cache {file}: {e.strerror or e}; pass directory= a "
            "writable folder, or set MINIGPT_CACHE_DIR to one"
        ) from e
    return load_tokens(file)


class TokenDataset:
    """A 1-D stream of token ids and random windows drawn from it.

    Args:
        tokens: 1-D token ids (a numpy array or memmap, a list, or a tensor).
        block_size: the window length T the model sees.

    ``batch(batch_size, generator)`` returns inputs and targets of shape (B, T).
    Batches depend only on the generator, so seeding it makes a run reproducible.
    """

    def __init__(self, tokens: np.ndarray | Sequence[int] | torch.Tensor, block_size: int) -> None:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"need at least block_size + 1 = {block_size + 1} tokens for one window, got "
                f"{len(tokens)}; use a smaller block_size or more text"
            )
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        """Number of distinct windows (start positions)."""
        return len(self.tokens) - self.block_size

    def offsets(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) random window starts drawn from ``generator``."""
        return torch.randint(len(self), (batch_size,), generator=generator)

    def windows(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) int64 for the windows starting at ``offsets`` (B,)."""
        T = self.block_size
        rows = np.stack([np.asarray(self.tokens[i : i + T + 1]) for i in offsets.tolist()])
        rows = torch.from_numpy(rows.astype(np.int64))  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]

    def batch(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch: inputs x (B, T) and targets y (B, T), with y[:, t] = x[:, t + 1]."""
        return self.windows(self.offsets(batch_size, generator))


def check_token_dataset(data: object, name: str, block_size: int) -> None:
    """Raise unless ``data`` is a ``TokenDataset`` whose windows fit a model context of
    ``block_size`` tokens (``name`` is the argument's name, for the message)."""
    if not isinstance(data, TokenDataset):
        raise TypeError(f"{name} must be a minigpt.tokens.TokenDataset, got {type(data).__name__}")
    if data.block_size > block_size:
        raise ValueError(
            f"{name}.block_size ({data.block_size}) is longer than the model's context "
            f"(block_size={block_size})"
        )
