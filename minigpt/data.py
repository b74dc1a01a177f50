"""Datasets the course uses, found offline first and downloaded safely otherwise.

Every dataset is known by a short name (``minigpt.data.DATASETS``) with the public
URL it comes from and the size and SHA-256 of the file we expect. ``path(name)``
returns a local file, looking in this order:

1. ``$MINIGPT_DATA_DIR/<relpath>`` when the environment variable is set (tests and
   CI point it at a read-only copy of every file);
2. the cache directory (``$MINIGPT_CACHE_DIR``, else ``~/.cache/minigpt``);
3. a download into the cache: streamed to a temporary file with a progress bar,
   checked against the size and SHA-256, then renamed into place. A failed,
   interrupted or corrupt download never leaves a file behind under the final name.

Whichever copy is used is verified first (size, then SHA-256), once per process for
each version of the file (its path, size, inode and modification times), so a
second lookup costs one ``stat``. A damaged copy is never used:

- in ``MINIGPT_DATA_DIR`` it is an error that names the file and says where a good
  copy comes from; minigpt never deletes or writes anything there (it may be a
  shared, read-only folder), and does not fall back to the cache behind your back;
- in the cache, which is minigpt's own, it is downloaded again with a warning (the
  new copy replaces the bad one only once it has been verified); with
  ``download=False``, or when that download fails, it is an error that says to
  delete the file or replace it.

Temporary files of a process that was killed (``.NAME.<random>.part`` next to a
download, ``.NAME.<random>.tmp`` among the token files) are removed the next time
their folder is used, once nothing has written to them for ten minutes and, where
the system has file locks, no process holds a lock on them (a download locks its
temp files while it writes them, so even a paused download keeps its files).

Offline with no copy, you get one error that names the file and where to put it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; temp files are judged by age alone
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DATASETS",
    "DataError",
    "DataFormatError",
    "Dataset",
    "TokenDataset",
    "cache_dir",
    "cached_tokens",
    "encode_to_file",
    "load_text",
    "load_tokens",
    "path",
    "sha256_file",
    "token_dtype",
    "train_val_split",
]


class DataError(RuntimeError):
    """A dataset could not be found, downloaded or verified."""


class DataFormatError(ValueError):
    """A data file has a row that cannot be parsed; the message names file and line."""


@dataclass(frozen=True)
class Dataset:
    """One file the course needs.

    Attributes:
        name: the short name used in code (``"tinyshakespeare"``).
        relpath: where the file lives inside a data directory (``"gpt2/vocab.bpe"``).
        url: the public URL to download from.
        sha256: hex SHA-256 of the file (of the unpacked member for zip sources).
        member: for zip sources, the path of the file inside the archive.
        description: one line for humans.
        size: the file's size in bytes (of the unpacked member for zip sources),
            checked before the SHA-256; every registered dataset has one.
        lines: keep only the member's first ``lines`` lines (a subset of a big export).
    """

    name: str
    relpath: str
    url: str
    sha256: str
    member: str | None = None
    description: str = ""
    size: int | None = None
    lines: int | None = None


_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07"

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset(
            "tinyshakespeare",
            "tinyshakespeare.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            description="Tiny Shakespeare, 1,115,394 characters of plays",
            size=1_115_394,
        ),
        Dataset(
            "gpt2-encoder",
            "gpt2/encoder.json",
            f"{_GPT2}/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            description="GPT-2's vocabulary: 50,257 token strings and their ids",
            size=1_042_301,
        ),
        Dataset(
            "gpt2-vocab",
            "gpt2/vocab.bpe",
            f"{_GPT2}/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            description="GPT-2's 50,000 BPE merges, in priority order",
            size=456_318,
        ),
        Dataset(
            "sms-spam",
            "SMSSpamCollection",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            member="SMSSpamCollection",
            description="UCI SMS Spam Collection: 5,574 lines 'label<TAB>text'",
            size=477_907,
        ),
        Dataset(
            "sst2-train",
            "sst2/train.tsv",
            "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
            "82c18cac2c19d7d59301f6c468c7a84a2b7ab0aa9b7de7a974ceb9d5d64c61db",
            member="SST-2/train.tsv",
            description="SST-2 (GLUE) training sentences, 'sentence<TAB>label'",
            size=3_806_080,
        ),
        Dataset(
            "sst2-dev",
            "sst2/dev.tsv",
            "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
            "f7271f7a919ea884ca8563e13ed03028aa44296d1f738c003af3142b9a2188f8",
            member="SST-2/dev.tsv",
            description="SST-2 (GLUE) dev sentences, 'sentence<TAB>label'",
            size=94_415,
        ),
        Dataset(
            "instruction-data",
            "instruction-data.json",
            f"{_RASBT}/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            description="1,100 {instruction, input, output} examples",
            size=203_524,
        ),
        Dataset(
            "preference-data",
            "instruction-data-with-preference.json",
            f"{_RASBT}/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            description="the instruction data with 'chosen' and 'rejected' responses",
            size=386_968,
        ),
        Dataset(
            "tatoeba-eng-fra",
            "tatoeba-eng-fra.txt",
            "https://www.manythings.org/anki/fra-eng.zip",
            "d952b56a181da5270b7bb4ded3f3bbe61e67a9b1de0e0fbc1d46438c71fb55a7",
            member="fra.txt",
            description="5,000 English-French pairs from Tatoeba, 'english<TAB>french<TAB>credit'",
            size=562_864,
            lines=5_000,
        ),
    ]
}


def cache_dir() -> Path:
    """The directory downloads go to: ``$MINIGPT_CACHE_DIR`` or ``~/.cache/minigpt``."""
    env = os.environ.get("MINIGPT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "minigpt"


def sha256_file(file: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lookup(name: str) -> Dataset:
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise KeyError(f"unknown dataset {name!r}; known datasets: {known}")
    return DATASETS[name]


def path(name: str, *, download: bool = True, progress: bool = True) -> Path:
    """Return the local path of dataset ``name``, verified, downloading it once if needed.

    Args:
        name: a key of ``DATASETS``, e.g. ``"tinyshakespeare"``.
        download: when False, never touch the network (raise instead).
        progress: show a tqdm progress bar while downloading.

    Raises:
        KeyError: ``name`` is not a known dataset.
        DataError: the file is not available offline and could not be downloaded,
            the download did not match its size and SHA-256, or the copy in
            ``MINIGPT_DATA_DIR`` (or a cached copy that cannot be downloaded again)
            is corrupt.
    """
    ds = _lookup(name)
    data_dir = os.environ.get("MINIGPT_DATA_DIR")
    if data_dir:
        candidate = Path(data_dir).expanduser() / ds.relpath
        if candidate.is_file():
            problem = _mismatch(candidate, ds)
            if problem:
                raise DataError(
                    f"{candidate} (dataset {ds.name!r}, found through MINIGPT_DATA_DIR) is "
                    f"corrupt: {problem}; replace it with a good copy from {_source(ds)}, "
                    "or unset MINIGPT_DATA_DIR to use the cache"
                )
            return candidate
    cached = cache_dir() / ds.relpath
    _remove_stale_temps(cached.parent)
    if cached.is_file():
        problem = _mismatch(cached, ds)
        if not problem:
            return cached
        bad = f"{cached} (dataset {ds.name!r}, in the cache) is corrupt: {problem}"
        fix = f"delete it to download it again, or replace it with a good copy from {_source(ds)}"
        if not download:
            raise DataError(f"{bad}; {fix}")
        warnings.warn(f"{bad}; downloading it again", stacklevel=2)
        try:
            _download(ds, cached, progress=progress)
        except (*_DOWNLOAD_ERRORS, DataError) as e:
            raise DataError(f"{bad}, and downloading it again failed ({e}); {fix}") from e
        return cached
    if not download:
        raise DataError(_missing_message(ds, cached, data_dir, reason="downloads are disabled"))
    try:
        _download(ds, cached, progress=progress)
    except _DOWNLOAD_ERRORS as e:
        raise DataError(_missing_message(ds, cached, data_dir, reason=str(e))) from e
    return cached


def load_text(name: str, *, encoding: str = "utf-8") -> str:
    """Read dataset ``name`` as text (see ``path`` for where it comes from)."""
    file = path(name)
    try:
        return file.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{file} (dataset {name!r}) is not {encoding} text: byte {e.start} is "
            f"{e.object[e.start : e.start + 1]!r}; pass the file's encoding, "
            "e.g. encoding='utf-8'"
        ) from e


Seq = TypeVar("Seq")


def train_val_split(data: Seq, val_fraction: float = 0.1) -> tuple[Seq, Seq]:
    """Split a sequence into its first ``1 - val_fraction`` and its last ``val_fraction``.

    The split is by position, not random: the validation piece is the *end* of the
    text, so the model is judged on passages it never saw (a random split would
    put neighbouring, nearly identical characters on both sides).

    Args:
        data: anything sliceable with a length: a ``str``, a ``list``, a 1-D numpy
            array, or a 1-D torch tensor of token ids, shape ``(N,)``.
        val_fraction: the share that goes to validation, strictly between 0 and 1.
            The cut is at ``n_train = int(len(data) * (1 - val_fraction))``.

    Returns:
        ``(train, val)``: slices of ``data`` of the same type, shapes ``(n_train,)``
        and ``(N - n_train,)``. For tensors and arrays they are views, not copies.

    Raises:
        ValueError: ``val_fraction`` is not in (0, 1), ``data`` is not 1-D, or one
            of the pieces would be empty (the data is too short for this fraction).
        TypeError: ``data`` cannot be measured with ``len`` and sliced.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(f"val_fraction must be a number, got {type(val_fraction).__name__}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be strictly between 0 and 1, got {val_fraction}; "
            "0.1 keeps the last 10% for validation"
        )
    ndim = getattr(data, "ndim", 1)
    if ndim != 1:
        shape = tuple(getattr(data, "shape", ()))
        raise ValueError(
            f"expected 1-D data (a sequence of characters or token ids), got shape {shape}; "
            "flatten it first, e.g. data.reshape(-1)"
        )
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError as e:
        raise TypeError(
            f"expected a str, list, numpy array or 1-D tensor, got {type(data).__name__}"
        ) from e
    n_train = int(n * (1.0 - val_fraction))
    if n_train == 0 or n_train == n:
        raise ValueError(
            f"splitting {n} items with val_fraction={val_fraction} leaves "
            f"{n_train} for training and {n - n_train} for validation; both need at "
            "least one item, so use more data or a different val_fraction"
        )
    return data[:n_train], data[n_train:]  # type: ignore[index]


def _missing_message(ds: Dataset, cached: Path, data_dir: str | None, reason: str) -> str:
    where = [f"  {cached}"]
    if data_dir:
        where.insert(0, f"  {Path(data_dir).expanduser() / ds.relpath}  (MINIGPT_DATA_DIR)")
    else:
        where.append(f"  or set MINIGPT_DATA_DIR to a folder that holds {ds.relpath}")
    return (
        f"dataset {ds.name!r} ({ds.relpath}) is not available offline and could not be "
        f"downloaded: {reason}\nDownload it from {_source(ds)}\nand put it at:\n" + "\n".join(where)
    )


def _source(ds: Dataset) -> str:
    return ds.url + (f" (the file {ds.member} inside the zip)" if ds.member else "")


# What a failed download raises: refused or broken connections, HTTP errors, a broken
# reply (http.client.HTTPException is not an OSError), a disk that is full or read-only.
_DOWNLOAD_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError)

# Versions of files already verified in this process: (resolved path, size, mtime_ns,
# ctime_ns, inode, expected sha256). Kept in memory only: a record on disk would trust a
# file whose bytes rotted without a change of mtime, and hashing costs milliseconds.
_VERIFIED: set[tuple[str, int, int, int, int, str]] = set()


def _version(file: Path, ds: Dataset, st: os.stat_result) -> tuple[str, int, int, int, int, str]:
    """The key under which a verified file is remembered (see ``_VERIFIED``)."""
    resolved = str(file.resolve())
    return (resolved, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, ds.sha256)


def _mismatch(file: Path, ds: Dataset, *, remember: bool = True) -> str | None:
    """What is wrong with ``file`` as a copy of ``ds`` (size, then SHA-256), or None.

    A version of a file found good is remembered (``remember``) and not hashed again.
    """
    try:
        st = file.stat()
        if _version(file, ds, st) in _VERIFIED:
            return None
        if ds.size is not None and st.st_size != ds.size:
            empty = " (an empty file)" if st.st_size == 0 else ""
            return (
                f"expected {ds.size:,} bytes with sha256 {ds.sha256}, "
                f"found {st.st_size:,} bytes{empty}"
            )
        got = sha256_file(file)
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror or e}; check its permissions") from e
    if got != ds.sha256:
        empty = " (an empty file)" if st.st_size == 0 else ""
        return f"expected sha256 {ds.sha256}, found sha256 {got} ({st.st_size:,} bytes{empty})"
    if remember:
        _VERIFIED.add(_version(file, ds, st))
    return None


# Temp files we write: mkstemp names, a dot, the final name, 8 random characters.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.(part|tmp)$")
_STALE_AFTER_S = 600.0  # a live writer touches its file far more often than this


def _hold_lock(fd: int) -> None:
    """Take an exclusive lock on a temp file being written; it ends when the file closes."""
    if fcntl is not None:
        # On a filesystem without locks this fails, and the age rule alone protects the file.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove_stale_temps(folder: Path) -> None:
    """Delete temp files that a killed process left in ``folder`` (one of our caches).

    A temp file is stale when it has not been written for ``_STALE_AFTER_S`` and no
    process holds its lock; on Windows, where there is no lock, a file still open
    elsewhere cannot be deleted, and the error is ignored.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # no such folder yet: nothing to clean
    now = time.time()
    for entry in entries:
        if not _TEMP_NAME.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False) or now - st.st_mtime < _STALE_AFTER_S:
                continue
            if fcntl is None:
                os.unlink(entry.path)
                continue
            with open(entry.path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
                os.unlink(entry.path)
        except OSError:
            continue  # gone already, or in use: leave it


def _download(ds: Dataset, dest: Path, *, progress: bool) -> None:
    """Download ``ds`` to ``dest`` atomically, verifying its size and SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Temporary files live next to the destination so the final rename is atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    _hold_lock(fd)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(ds.url, out, desc=ds.name, progress=progress)
        if ds.member is not None:
            tmp = _extract_member(tmp, ds.member, dest.parent, lines=ds.lines)
        problem = _mismatch(tmp, ds, remember=False)
        if problem:
            raise DataError(
                f"checksum mismatch for {ds.name!r} downloaded from {_source(ds)}: {problem}. "
                f"The file was discarded; try again, or put a good copy at {dest}"
            )
        os.replace(tmp, dest)
    finally:
        for leftover in {Path(tmp_name), tmp}:
            leftover.unlink(missing_ok=True)
    _VERIFIED.add(_version(dest, ds, dest.stat()))  # verified above, under its temp name


def _fetch(url: str, out, *, desc: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "minigpt"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        total = resp.headers.get("Content-Length")
        expected = int(total) if total else None
        with tqdm(
            total=expected, unit="B", unit_scale=True, desc=desc, disable=not progress
        ) as bar:
            received = 0
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise DataError(f"download of {url} was interrupted: got {received} of {expected} bytes")


def _extract_member(archive: Path, member: str, where: Path, lines: int | None = None) -> Path:
    """Copy ``member`` (its first ``lines`` lines, when given) out of the zip ``archive``
    into a new temp file; drop the zip."""
    fd, out_name = tempfile.mkstemp(prefix=f".{Path(member).name}.", suffix=".part", dir=where)
    _hold_lock(fd)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(archive) as zf:
            try:
                src = zf.open(member)
            except KeyError as e:
                raise DataError(f"{member!r} is not inside the archive {archive.name}") from e
            with src:
                if lines is None:
                    shutil.copyfileobj(src, out)
                else:
                    for _, line in zip(range(lines), src, strict=False):
                        out.write(line)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        Path(out_name).unlink(missing_ok=True)
        raise DataError(f"the download is not a valid zip archive ({e}); it was discarded") from e
    except BaseException:
        Path(out_name).unlink(missing_ok=True)
        raise
    finally:
        archive.unlink(missing_ok=True)
    return Path(out_name)


# --------------------------------------------------------------------------- token datasets
#
# A language model trains on one long stream of token ids. We encode the text once
# into a ``.npy`` file (uint16 when the vocabulary fits, else uint32) and memory-map it,
# so a corpus larger than RAM costs nothing to open and every run after the first
# skips tokenization. A batch is B random windows of T + 1 consecutive tokens:
# inputs are the first T, targets the last T (the same window shifted by one).


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

    from minigpt.tokenizer import safe_cuts

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
    _remove_stale_temps(folder)
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
