"""Shared fixtures for the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def data_dir() -> Path:
    """The folder with the course data; the test is skipped when there is none."""
    d = os.environ.get("MINIGPT_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.skip("MINIGPT_DATA_DIR is not set to a folder with the course data")
    return Path(d)


@pytest.fixture
def shakespeare(data_dir: Path) -> str:
    return (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")
