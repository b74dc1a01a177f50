"""minigpt.data under damage: corrupt copies, temp files left by a kill, bad input.

Every error here must be one line that names the file and says how to fix it.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest

from minigpt import data, tokens

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

GOOD = b"to be or not to be, that is the question\n" * 50
HOUR_AGO = time.time() - 3600


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hold: dict[str, threading.Event] = {}  # send half, then wait for the event
    bad_chunks: set[str] = set()

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.path in self.bad_chunks:  # a chunked reply whose chunk size is not hex
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"zz\r\n")
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.hold:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.hold[self.path].wait(30)
            self.wfile.write(body[len(body) // 2 :])
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A file server on 127.0.0.1; yields (base_url, handler class with its knobs)."""
    handler = type("H", (_Handler,), {"files": {}, "hold": {}, "bad_chunks": set()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        for event in handler.hold.values():
            event.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache and no MINIGPT_DATA_DIR."""
    monkeypatch.delenv("MINIGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def shared(tmp_path, monkeypatch) -> Path:
    """A MINIGPT_DATA_DIR of our own, and an empty cache."""
    d = tmp_path / "shared"
    d.mkdir()
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(d))
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    return d


def _register(monkeypatch, name="toy", relpath="t.txt", url="http://127.0.0.1:9/t", **kw):
    ds = data.Dataset(name, relpath, url, kw.pop("sha256", _sha(GOOD)), **kw)
    monkeypatch.setitem(data.DATASETS, name, ds)
    return ds


# --------------------------------------------------------------------------- corrupt copies


def test_corrupt_copy_in_data_dir_is_refused_and_kept(shared, monkeypatch):
    ds = _register(monkeypatch)
    bad = GOOD.replace(b"question", b"answer!!")  # same size, other bytes
    (shared / "t.txt").write_bytes(bad)
    with pytest.raises(data.DataError) as err:
        data.path("toy", download=False)
    msg = _one_line(err)
    assert str(shared / "t.txt") in msg and "MINIGPT_DATA_DIR" in msg
    assert ds.sha256 in msg and _sha(bad) in msg
    assert ds.url in msg and "replace it" in msg
    with pytest.raises(data.DataError):
        data.load_text("toy")
    assert (shared / "t.txt").read_bytes() == bad, "a file in MINIGPT_DATA_DIR is never touched"


def test_wrong_size_in_data_dir_is_refused(shared, monkeypatch):
    _register(monkeypatch, size=len(GOOD))
    (shared / "t.txt").write_bytes(GOOD[:100])
    with pytest.raises(data.DataError) as err:
        data.path("toy", download=False)
    msg = _one_line(err)
    assert f"{len(GOOD):,} bytes" in msg and "100 bytes" in msg


def test_empty_file_in_data_dir_is_refused(shared, monkeypatch):
    _register(monkeypatch)
    (shared / "t.txt").write_bytes(b"")
    with pytest.raises(data.DataError) as err:
        data.load_text("toy")
    assert "empty" in _one_line(err)


def test_corrupt_cache_offline_says_delete_and_keeps_the_file(cache, monkeypatch):
    ds = _register(monkeypatch)
    cache.mkdir(parents=True)
    (cache / "t.txt").write_bytes(b"garbage")
    with pytest.raises(data.DataError) as err:
        data.path("toy", download=False)
    msg = _one_line(err)
    assert str(cache / "t.txt") in msg and "delete it" in msg and ds.url in msg
    assert ds.sha256 in msg and _sha(b"garbage") in msg
    assert (cache / "t.txt").read_bytes() == b"garbage"


def test_corrupt_cache_is_downloaded_again(server, cache, monkeypatch):
    base, h = server
    h.files["/t.txt"] = GOOD
    _register(monkeypatch, url=base + "/t.txt", size=len(GOOD))
    cache.mkdir(parents=True)
    (cache / "t.txt").write_bytes(GOOD[:-1])  # truncated
    with pytest.warns(UserWarning, match="corrupt.*downloading it again"):
        p = data.path("toy", progress=False)
    assert p == cache / "t.txt" and p.read_bytes() == GOOD
    assert sorted(x.name for x in cache.iterdir()) == ["t.txt"]


def test_corrupt_cache_and_failed_download(cache, monkeypatch):
    _register(monkeypatch)  # its URL refuses connections
    cache.mkdir(parents=True)
    (cache / "t.txt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(data.DataError) as err:
        data.path("toy", progress=False)
    msg = _one_line(err)
    assert "corrupt" in msg and "delete it" in msg and str(cache / "t.txt") in msg
    assert (cache / "t.txt").read_bytes() == b"garbage", "kept until a good copy arrives"


def test_corrupt_zip_member_in_cache_is_extracted_again(server, cache, monkeypatch):
    base, h = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", "not this one")
        zf.writestr("data/t.txt", GOOD)
    h.files["/a.zip"] = buf.getvalue()
    _register(monkeypatch, relpath="sub/t.txt", url=base + "/a.zip", member="data/t.txt")
    (cache / "sub").mkdir(parents=True)
    (cache / "sub" / "t.txt").write_bytes(b"")
    with pytest.warns(UserWarning, match="empty"):
        p = data.path("toy", progress=False)
    assert p.read_bytes() == GOOD
    assert sorted(x.name for x in p.parent.iterdir()) == ["t.txt"]


def test_zip_member_of_the_wrong_size_is_discarded(server, cache, monkeypatch):
    base, h = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("t.txt", GOOD)
    h.files["/a.zip"] = buf.getvalue()
    _register(monkeypatch, url=base + "/a.zip", member="t.txt", size=len(GOOD) + 1)
    with pytest.raises(data.DataError) as err:
        data.path("toy", progress=False)
    msg = _one_line(err)
    assert f"{len(GOOD) + 1:,} bytes" in msg and f"{len(GOOD):,} bytes" in msg
    assert list(cache.iterdir()) == []


def test_damaged_zip_data_is_one_error(server, cache, monkeypatch):
    base, h = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("t.txt", b"hello world " * 5000)
    raw = bytearray(buf.getvalue())
    for i in range(45, 60):  # inside the deflate stream, past the local header
        raw[i] ^= 0x55
    h.files["/a.zip"] = bytes(raw)
    _register(monkeypatch, url=base + "/a.zip", member="t.txt")
    with pytest.raises(data.DataError, match="not a valid zip"):
        data.path("toy", progress=False)
    assert list(cache.iterdir()) == []


def test_verified_once_per_file_version(shared, monkeypatch):
    _register(monkeypatch)
    f = shared / "t.txt"
    f.write_bytes(GOOD)
    calls = []
    real = data.sha256_file
    monkeypatch.setattr(data, "sha256_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        assert data.path("toy", download=False) == f
    assert len(calls) == 1, "a file already verified is not hashed again"
    f.write_bytes(GOOD.replace(b"be", b"BE"))  # same size, new contents
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(data.DataError, match="corrupt"):
        data.path("toy", download=False)
    assert len(calls) == 2


def test_every_dataset_has_a_size():
    for ds in data.DATASETS.values():
        assert isinstance(ds.size, int) and ds.size > 0, ds.name


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_every_shared_file_passes_verification(name, data_dir: Path, tmp_path, monkeypatch):
    ds = data.DATASETS[name]
    if not (data_dir / ds.relpath).is_file():
        pytest.skip(f"{ds.relpath} is not in MINIGPT_DATA_DIR")
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert data.path(name, download=False) == data_dir / ds.relpath
    assert (data_dir / ds.relpath).stat().st_size == ds.size


# --------------------------------------------------------------------------- temp files


def _leftover(folder: Path, name: str, *, age: float = 3600) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / name
    f.write_bytes(b"half a file")
    os.utime(f, (time.time() - age, time.time() - age))
    return f


def test_stale_temp_files_are_removed_on_next_use(cache, monkeypatch):
    _register(monkeypatch)
    (cache / "t.txt").parent.mkdir(parents=True)
    (cache / "t.txt").write_bytes(GOOD)
    stale = [
        _leftover(cache, ".t.txt.k2j_x9qa.part"),  # a killed download
        _leftover(cache, ".t.txt.a1b2c3d4.part"),  # a killed unzip
    ]
    fresh = _leftover(cache, ".t.txt.zz99zz99.part", age=5)  # may be someone's download
    other = _leftover(cache, "notes.part")  # not a name we make: not ours
    assert data.path("toy", download=False) == cache / "t.txt"
    assert not any(f.exists() for f in stale)
    assert fresh.exists() and other.exists()


def test_temp_files_in_data_dir_are_never_touched(shared, monkeypatch):
    _register(monkeypatch)
    (shared / "t.txt").write_bytes(GOOD)
    left = _leftover(shared, ".t.txt.k2j_x9qa.part")
    data.path("toy", download=False)
    assert left.exists()


@pytest.mark.skipif(fcntl is None, reason="file locks are POSIX-only")
def test_a_locked_temp_file_is_kept_however_old(cache, monkeypatch):
    _register(monkeypatch)
    cache.mkdir(parents=True)
    (cache / "t.txt").write_bytes(GOOD)
    live = _leftover(cache, ".t.txt.k2j_x9qa.part")
    with open(live, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live writer does
        data.path("toy", download=False)
        assert live.exists()
    data.path("toy", download=False)
    assert not live.exists(), "once its writer is gone, it is stale"


@pytest.mark.skipif(fcntl is None, reason="file locks are POSIX-only")
def test_a_download_in_progress_survives_a_cleanup(server, cache, monkeypatch):
    base, h = server
    h.files["/t.txt"] = GOOD
    h.hold["/t.txt"] = threading.Event()
    _register(monkeypatch, url=base + "/t.txt")
    _register(monkeypatch, name="other", relpath="o.txt")
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(p=data.path("toy", progress=False)), daemon=True
    )
    thread.start()
    deadline = time.time() + 10
    while not (parts := list(cache.glob(".t.txt.*.part"))) and time.time() < deadline:
        time.sleep(0.01)
    assert parts, "the download never started"
    os.utime(parts[0], (HOUR_AGO, HOUR_AGO))  # it looks abandoned...
    (cache / "o.txt").write_bytes(GOOD)
    data.path("other", download=False)  # ...and another lookup cleans the folder
    assert parts[0].exists(), "a file being written is never deleted"
    h.hold["/t.txt"].set()
    thread.join(10)
    assert result["p"] == cache / "t.txt" and (cache / "t.txt").read_bytes() == GOOD


def test_stale_token_temp_files_are_removed(tmp_path):
    folder = tmp_path / "tokens"
    stale = _leftover(folder, ".char-0123456789abcdef.npy.k2j_x9qa.tmp")
    fresh = _leftover(folder, ".char-0123456789abcdef.npy.zz99zz99.tmp", age=5)
    ids = tokens.cached_tokens(
        "abcabc",
        lambda s: [ord(c) - 97 for c in s],
        vocab_size=3,
        key="t",
        directory=tmp_path,
        progress=False,
    )
    assert ids.tolist() == [0, 1, 2, 0, 1, 2]
    assert not stale.exists() and fresh.exists()


# --------------------------------------------------------------------------- bad input


def test_load_text_with_the_wrong_encoding(shared, monkeypatch):
    body = "naïve café\n".encode()
    _register(monkeypatch, sha256=_sha(body))
    (shared / "t.txt").write_bytes(body)
    with pytest.raises(data.DataError) as err:
        data.load_text("toy", encoding="ascii")
    msg = _one_line(err)
    assert str(shared / "t.txt") in msg and "ascii" in msg and "encoding=" in msg


def test_empty_token_file(tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(data.DataError) as err:
        tokens.load_tokens(tmp_path / "e.npy")
    assert str(tmp_path / "e.npy") in _one_line(err)


def test_damaged_token_cache_is_encoded_again(tmp_path):
    def encode(s):
        return [ord(c) - 97 for c in s]

    ids = tokens.cached_tokens(
        "abcabc", encode, vocab_size=3, key="t", directory=tmp_path, progress=False
    ).tolist()  # a list: the memory map would see the truncation below
    (file,) = (tmp_path / "tokens").glob("*.npy")
    file.write_bytes(file.read_bytes()[:-4])  # truncated by a full disk, say
    with pytest.warns(UserWarning, match="encoding the text again"):
        again = tokens.cached_tokens(
            "abcabc", encode, vocab_size=3, key="t", directory=tmp_path, progress=False
        )
    assert again.tolist() == ids == [0, 1, 2, 0, 1, 2]


def test_token_cache_that_cannot_be_written(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(data.DataError) as err:
        tokens.cached_tokens(
            "abc",
            lambda s: [0, 1, 2],
            vocab_size=3,
            key="t",
            directory=tmp_path / "a-file",
            progress=False,
        )
    msg = _one_line(err)
    assert "a-file" in msg and "directory=" in msg


def test_broken_http_reply_is_one_error(server, cache, monkeypatch):
    base, h = server
    h.files["/t.txt"] = GOOD
    h.bad_chunks.add("/t.txt")
    _register(monkeypatch, url=base + "/t.txt")
    with pytest.raises(data.DataError) as err:
        data.path("toy", progress=False)
    assert base + "/t.txt" in str(err.value)
    assert list(cache.iterdir()) == []
