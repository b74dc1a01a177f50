"""Repository-wide pytest setup (applies to unit tests and to notebooks under nbval).

Tests never use the network: datasets come from MINIGPT_DATA_DIR (CI points it at
../shared/data). When it is unset and ../shared/data exists beside the checkout, it
is used; the variable is inherited by the notebook kernels nbval starts.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent

_shared = REPO.parent / "shared" / "data"
if "MINIGPT_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["MINIGPT_DATA_DIR"] = str(_shared)
