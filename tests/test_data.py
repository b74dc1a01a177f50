"""minigpt.data: lookup order, downloads over a local HTTP server, bad input."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from minigpt import data


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No MINIGPT_DATA_DIR and an empty cache: every lookup must download."""
    monkeypatch.delenv("MINIGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    truncate: set[str] = set()

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.truncate:  # promise the whole file, send half of it
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    """A file server on 127.0.0.1; yields (base_url, files dict, truncate set)."""
    files: dict[str, bytes] = {}
    truncate: set[str] = set()
    handler = type("H", (_Handler,), {"files": files, "truncate": truncate})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files, truncate
    finally:
        httpd.shutdown()
        httpd.server_close()


def _register(monkeypatch, ds: data.Dataset) -> None:
    monkeypatch.setitem(data.DATASETS, ds.name, ds)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_registry_covers_every_shared_file(data_dir: Path):
    sums = {}
    for line in (data_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name.removeprefix("./")] = digest
    registered = {ds.relpath: ds.sha256 for ds in data.DATASETS.values()}
    assert registered == sums
    for ds in data.DATASETS.values():
        assert ds.url.startswith("https://"), ds.name


def test_data_dir_is_read_first(data_dir: Path, isolated: Path):
    import os

    os.environ["MINIGPT_DATA_DIR"] = str(data_dir)
    try:
        p = data.path("tinyshakespeare")
        assert p == data_dir / "tinyshakespeare.txt"
        text = data.load_text("tinyshakespeare")
        assert len(text) == 1_115_394 and len(set(text)) == 65
    finally:
        del os.environ["MINIGPT_DATA_DIR"]
    assert not isolated.exists(), "nothing may be downloaded when the data dir has the file"


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="unknown dataset 'shakespear'.*tinyshakespeare"):
        data.path("shakespear")


def test_download_once_and_verify(server, isolated, monkeypatch):
    base, files, _ = server
    body = b"to be or not to be\n" * 100
    files["/t.txt"] = body
    _register(monkeypatch, data.Dataset("toy", "sub/t.txt", base + "/t.txt", _sha(body)))
    p = data.path("toy", progress=False)
    assert p == isolated / "sub" / "t.txt" and p.read_bytes() == body
    del files["/t.txt"]  # a second lookup must not touch the network
    assert data.path("toy", progress=False) == p
    assert sorted(x.name for x in p.parent.iterdir()) == ["t.txt"]


def test_checksum_mismatch_keeps_nothing(server, isolated, monkeypatch):
    base, files, _ = server
    files["/t.txt"] = b"tampered"
    _register(monkeypatch, data.Dataset("toy", "t.txt", base + "/t.txt", _sha(b"original")))
    with pytest.raises(data.DataError, match="checksum mismatch for 'toy'.*discarded"):
        data.path("toy", progress=False)
    assert list(isolated.iterdir()) == []


def test_interrupted_download_keeps_nothing(server, isolated, monkeypatch):
    base, files, truncate = server
    body = b"x" * 100_000
    files["/big.txt"] = body
    truncate.add("/big.txt")
    _register(monkeypatch, data.Dataset("toy", "big.txt", base + "/big.txt", _sha(body)))
    with pytest.raises(data.DataError):
        data.path("toy", progress=False)
    assert list(isolated.iterdir()) == []


def test_offline_error_names_file_and_place(isolated, monkeypatch):
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    ds = data.Dataset("toy", "gpt2/vocab.bpe", "http://127.0.0.1:9/vocab.bpe", "0" * 64)
    _register(monkeypatch, ds)
    with pytest.raises(data.DataError) as err:
        data.path("toy", progress=False)
    msg = str(err.value)
    assert "http://127.0.0.1:9/vocab.bpe" in msg
    assert str(isolated / "gpt2" / "vocab.bpe") in msg
    assert "MINIGPT_DATA_DIR" in msg
    assert not (isolated / "gpt2" / "vocab.bpe").exists()


def test_download_disabled(isolated, monkeypatch):
    _register(monkeypatch, data.Dataset("toy", "t.txt", "http://127.0.0.1:9/t", "0" * 64))
    with pytest.raises(data.DataError, match="downloads are disabled"):
        data.path("toy", download=False)


def test_zip_member_is_unpacked(server, isolated, monkeypatch):
    base, files, _ = server
    member = b"ham\tHello there\nspam\tWIN a prize\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "not this one")
        zf.writestr("SMSSpamCollection", member)
    files["/sms.zip"] = buf.getvalue()
    ds = data.Dataset(
        "toy", "SMSSpamCollection", base + "/sms.zip", _sha(member), "SMSSpamCollection"
    )
    _register(monkeypatch, ds)
    p = data.path("toy", progress=False)
    assert p.read_bytes() == member
    assert sorted(x.name for x in isolated.iterdir()) == ["SMSSpamCollection"]


def test_zip_without_member_or_corrupt(server, isolated, monkeypatch):
    base, files, _ = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("other.txt", "x")
    files["/a.zip"] = buf.getvalue()
    files["/bad.zip"] = b"this is not a zip"
    ds = data.Dataset("toy", "f.txt", base + "/a.zip", "0" * 64, member="f.txt")
    _register(monkeypatch, ds)
    with pytest.raises(data.DataError, match="'f.txt' is not inside the archive"):
        data.path("toy", progress=False)
    _register(monkeypatch, replace(ds, url=base + "/bad.zip"))
    with pytest.raises(data.DataError, match="not a valid zip"):
        data.path("toy", progress=False)
    assert list(isolated.iterdir()) == []


def test_stale_partial_file_is_ignored(server, isolated, monkeypatch):
    """A leftover temp file from a killed process is never mistaken for the data."""
    base, files, _ = server
    body = b"complete file"
    files["/t.txt"] = body
    isolated.mkdir(parents=True)
    (isolated / ".t.txt.abc.part").write_bytes(b"comp")
    _register(monkeypatch, data.Dataset("toy", "t.txt", base + "/t.txt", _sha(body)))
    assert data.path("toy", progress=False).read_bytes() == body


def test_train_val_split_keeps_order_and_type():
    import numpy as np
    import torch

    text = "abcdefghij"
    train, val = data.train_val_split(text)
    assert (train, val) == ("abcdefghi", "j")
    assert data.train_val_split(list(text), 0.3) == (list("abcdefg"), list("hij"))
    arr = np.arange(10)
    a_train, a_val = data.train_val_split(arr, 0.2)
    assert isinstance(a_train, np.ndarray) and a_train.tolist() == list(range(8))
    assert a_val.tolist() == [8, 9]
    ids = torch.arange(1000)
    t_train, t_val = data.train_val_split(ids)
    assert isinstance(t_val, torch.Tensor) and t_train.shape == (900,) and t_val.shape == (100,)
    assert torch.equal(torch.cat([t_train, t_val]), ids)
    assert t_train.data_ptr() == ids.data_ptr(), "tensor pieces are views, not copies"


def test_train_val_split_matches_the_hand_made_split(shakespeare: str):
    n = int(0.9 * len(shakespeare))
    assert data.train_val_split(shakespeare) == (shakespeare[:n], shakespeare[n:])


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, 0.0, 1.0])
def test_train_val_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        data.train_val_split("abcdefghij", fraction)


def test_train_val_split_rejects_bad_input():
    import torch

    with pytest.raises(ValueError, match="both need at least one item"):
        data.train_val_split("a", 0.5)  # nothing left to train on
    with pytest.raises(ValueError, match="both need at least one item"):
        data.train_val_split("abcdefghij", 1e-17)  # nothing left to validate on
    with pytest.raises(ValueError, match="both need at least one item"):
        data.train_val_split("", 0.5)
    with pytest.raises(ValueError, match="expected 1-D data"):
        data.train_val_split(torch.zeros(4, 5))
    with pytest.raises(TypeError, match="expected a str, list"):
        data.train_val_split(x for x in "abc")
    with pytest.raises(TypeError, match="val_fraction must be a number"):
        data.train_val_split("abcdefghij", "0.1")
