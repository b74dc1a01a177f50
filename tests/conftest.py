"""Shared fixtures for the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder with the course data; the test is skipped when there is none."""
    d = os.environ.get("MINIGPT_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.skip("MINIGPT_DATA_DIR is not set to a folder with the course data")
    return Path(d)


@pytest.fixture
def shakespeare(data_dir: Path) -> str:
    return (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def _data() -> Path:
    """The course data folder, with GPT-2's tokenizer files; skips the test without them."""
    d = os.environ.get("MINIGPT_DATA_DIR")
    if not d or not (Path(d) / "gpt2" / "encoder.json").is_file():
        pytest.skip("MINIGPT_DATA_DIR does not hold GPT-2's tokenizer files")
    return Path(d)


@pytest.fixture(scope="session")
def gpt2(_data):
    """minigpt's BPETokenizer with GPT-2's merges."""
    from minigpt.tokenizer import BPETokenizer

    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="session")
def reference(_data):
    """tiktoken's own gpt2 encoding, built from the same files: the peer to match."""
    from minigpt.tokenizer import tiktoken_gpt2_reference

    return tiktoken_gpt2_reference()


@pytest.fixture(autouse=True)
def _no_leaked_data_settings():
    """A test that changes where data or models live must undo it (use monkeypatch):
    notebook kernels that the same worker starts later inherit the environment."""
    keys = ("MINIGPT_CACHE_DIR", "MINIGPT_DATA_DIR")
    before = {k: os.environ.get(k) for k in keys}
    yield
    after = {k: os.environ.get(k) for k in keys}
    assert after == before, f"the test left the environment changed: {before} -> {after}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a busy machine):
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` in a test module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
