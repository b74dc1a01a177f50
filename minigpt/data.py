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

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from minigpt.files import hold_lock, remove_stale_temporaries, sha256_file

__all__ = [
    "DATASETS",
    "DataError",
    "DataFormatError",
    "Dataset",
    "cache_dir",
    "load_text",
    "path",
    "sha256_file",
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
    remove_stale_temporaries(cached.parent)
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


def _download(ds: Dataset, dest: Path, *, progress: bool) -> None:
    """Download ``ds`` to ``dest`` atomically, verifying its size and SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Temporary files live next to the destination so the final rename is atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    hold_lock(fd)
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
    hold_lock(fd)
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
