"""Re-execute notebooks top to bottom in a fresh kernel and store their outputs.

    python tools/execute_notebooks.py notebooks/00_*.ipynb exercises/00_*.ipynb

Each notebook is formatted with ruff first, then run with its own folder as the
working directory (as JupyterLab and nbval do), and written back only if every
cell succeeded. Widget state is stored, so a static viewer shows each widget as it
was left (a widget's first picture), and so is the kind of CPU that computed the
outputs (see tools/nbval_cpu.py). This is the only
way notebooks should be stored: nbval compares the tests' run with these outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbval_cpu import cpu_kind


def execute(path: Path, timeout: int = 1200) -> float:
    bin_dir = Path(sys.executable).parent
    ruff = bin_dir / "ruff"
    if ruff.exists():
        subprocess.run([str(ruff), "check", "--fix", "--quiet", str(path)], check=False)
        subprocess.run([str(ruff), "format", "--quiet", str(path)], check=True)
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # the same thread setting as the tests (see conftest.py)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    nb.metadata["language_info"] = {"name": "python"}
    # outputs of cells tagged cpu-dependent are compared in full on this kind of CPU only
    nb.metadata["minigpt"] = {"cpu": cpu_kind()}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for arg in argv:
        path = Path(arg)
        print(f"executing {path} ...", flush=True)
        seconds = execute(path)
        size = path.stat().st_size / 1e3
        print(f"  ok in {seconds:.1f} s, {size:.0f} kB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
