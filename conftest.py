"""Repository-wide pytest setup (applies to unit tests and to notebooks under nbval).

Tests never use the network: datasets come from MINIGPT_DATA_DIR (CI points it at
../shared/data). When it is unset and ../shared/data exists beside the checkout, it
is used; the variable is inherited by the notebook kernels nbval starts.

Each test process (and each notebook kernel it starts) uses one CPU thread:
`make test` runs two worker processes on a 2-core machine, and two
multi-threaded PyTorch processes fighting over two cores run many times slower
than two single-threaded ones. Notebooks are stored by tools/execute_notebooks.py
with the same setting, so their numbers are computed the same way.

Cells tagged ``cpu-dependent`` are compared in full only on the CPU the stored
outputs were made on, and by the kinds of their outputs elsewhere: see
tools/nbval_cpu.py, loaded here as a plugin.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tools"))
pytest_plugins = ["nbval_cpu"]

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

_shared = REPO.parent / "shared" / "data"
if "MINIGPT_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["MINIGPT_DATA_DIR"] = str(_shared)
