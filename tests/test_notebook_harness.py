"""The notebook harness itself: stored notebooks are well formed, and nbval really
compares outputs (a changed stored output fails; sanitized timings do not)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("notebooks", "exercises", "solutions")
NOTEBOOKS = sorted(p for folder in FOLDERS for p in (REPO / folder).glob("*.ipynb"))


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def test_chapters_are_numbered_alike():
    lessons = {p.name for p in (REPO / "notebooks").glob("*.ipynb")}
    exercises = {p.name for p in (REPO / "exercises").glob("*.ipynb")}
    solutions = {p.name for p in (REPO / "solutions").glob("*.ipynb")}
    assert lessons, "no lesson notebooks"
    assert exercises == solutions, "every exercise notebook has a solved twin of the same name"
    assert exercises <= lessons, "exercise notebooks are named after their chapter"
    for name in lessons:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", name), name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_rel)
def test_stored_executed_in_order(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    counts = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or not "".join(cell["source"]).strip():
            continue
        assert cell["execution_count"] is not None, "a code cell was never executed"
        counts.append(cell["execution_count"])
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"stored error output: {out.get('ename')}"
    assert counts == list(range(1, len(counts) + 1)), "re-run top to bottom in a fresh kernel"
    assert path.stat().st_size < 1_500_000, "keep notebooks small"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("*.ipynb")), ids=_rel)
def test_lesson_ends_with_graduation(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    headings = [
        line
        for cell in nb["cells"]
        if cell["cell_type"] == "markdown"
        for line in "".join(cell["source"]).splitlines()
        if line.startswith("#")
    ]
    assert any("graduation" in h.lower() for h in headings), "a lesson needs a Graduation section"


def _run_nbval(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """nbval on ``path`` as ``make test`` runs it (the sanitize file, the cpu-dependent
    plugin), in its own folder and environment (``env``: this process's by default)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tools"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "nbval_cpu",
            "--nbval",
            "--nbval-current-env",
            "--nbval-sanitize-with",
            str(REPO / "tests" / "sanitize.cfg"),
            "-o",
            "addopts=",
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=path.parent,
        env=env,
        timeout=300,
    )


def _notebook(tmp_path: Path, cells: list[tuple[str, str]]) -> Path:
    """A notebook whose code cells have the given (source, stored stdout) pairs."""
    nb = nbformat.v4.new_notebook()
    for i, (source, stdout) in enumerate(cells, start=1):
        cell = nbformat.v4.new_code_cell(source, execution_count=i)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stdout)]
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    return path


def test_nbval_fails_when_a_stored_output_changes(tmp_path: Path):
    good = _notebook(tmp_path, [("print(6 * 7)", "42\n"), ("print('took 12.5 ms')", "took 3 ms\n")])
    result = _run_nbval(good)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = _notebook(tmp_path, [("print(6 * 7)", "43\n"), ("print('took 12.5 ms')", "took 3 ms\n")])
    result = _run_nbval(bad)
    assert result.returncode != 0, "nbval accepted a changed output"
    assert "43" in result.stdout


# --------------------------------------------------------------------------- cells whose outputs depend on the CPU

import nbval_cpu  # noqa: E402  (tools/, on sys.path by the root conftest.py)

INTEL_AMX = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n"
INTEL_OLD = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f\n"
AMD = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


def test_cpu_kind_is_vendor_and_widest_matrix_instructions(monkeypatch):
    assert nbval_cpu.cpu_kind(INTEL_AMX) == "intel-amx"
    assert nbval_cpu.cpu_kind(INTEL_OLD) == "intel-avx512"
    assert nbval_cpu.cpu_kind(AMD) == "amd-avx512"
    assert nbval_cpu.cpu_kind("") == "other"  # no /proc/cpuinfo (a Mac)
    monkeypatch.delenv("MINIGPT_REFERENCE_CPU", raising=False)
    here = nbval_cpu.cpu_kind()
    assert nbval_cpu.same_kind({"minigpt": {"cpu": here}})
    assert not nbval_cpu.same_kind({"minigpt": {"cpu": "elsewhere"}})
    assert nbval_cpu.stored_kind({}) == nbval_cpu.DEFAULT_KIND  # the notebooks before the record
    monkeypatch.setenv("MINIGPT_REFERENCE_CPU", "1")
    assert nbval_cpu.same_kind({"minigpt": {"cpu": "elsewhere"}})
    monkeypatch.setenv("MINIGPT_REFERENCE_CPU", "0")
    assert not nbval_cpu.same_kind({"minigpt": {"cpu": here}})


def _tagged(path: Path, index: int, cpu: str) -> Path:
    nb = nbformat.read(path, as_version=4)
    nb.cells[index].metadata["tags"] = [nbval_cpu.TAG]
    nb.metadata["minigpt"] = {"cpu": cpu}
    nbformat.write(nb, path)
    return path


def _run_nbval_cpu(path: Path) -> subprocess.CompletedProcess[str]:
    """``_run_nbval`` with the CPU detected, not overridden."""
    return _run_nbval(path, {k: v for k, v in os.environ.items() if k != "MINIGPT_REFERENCE_CPU"})


def test_a_cpu_dependent_cell_is_compared_in_full_on_its_kind_of_cpu_only(tmp_path: Path):
    # the stored text differs from what the cell prints: a fail where the notebook was
    # executed on this kind of CPU, a pass elsewhere (same kind of output: one stdout)
    here = nbval_cpu.cpu_kind()
    path = _tagged(_notebook(tmp_path, [("print(6 * 7)", "43\n")]), 0, here)
    result = _run_nbval_cpu(path)
    assert result.returncode != 0, "a changed output was accepted on the notebook's CPU"
    assert "Cell outputs differ" in result.stdout, result.stdout  # not some other failure
    assert f"this kind of CPU ({here}" in result.stdout
    path = _tagged(path, 0, "elsewhere")
    result = _run_nbval_cpu(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_cpu_dependent_cell_still_fails_on_another_kind_of_output(tmp_path: Path):
    # the cell now also warns on stderr (a stream the stored output lacks)
    src = "import sys; print(6 * 7); print('a new warning', file=sys.stderr)"
    path = _tagged(_notebook(tmp_path, [(src, "42\n")]), 0, "elsewhere")
    result = _run_nbval_cpu(path)
    assert result.returncode != 0, "a new stderr stream was accepted"
    assert "Cell outputs differ" in result.stdout, result.stdout  # not some other failure
    # an untagged cell is compared in full on any CPU
    path = _notebook(tmp_path, [("print(6 * 7)", "43\n")])
    result = _run_nbval_cpu(path)
    assert result.returncode != 0, "an untagged cell was compared by kind"
    assert "Cell outputs differ" in result.stdout, result.stdout


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_rel)
def test_cpu_dependent_tags_mark_lesson_cells_with_outputs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if nbval_cpu.TAG not in tags:
            continue
        where = f"{_rel(path)} cell {cell.get('id')}"
        assert path.parent.name == "notebooks", f"{where}: exercises run the same on every CPU"
        assert cell["cell_type"] == "code" and cell["outputs"], f"{where}: nothing to compare"
        assert "nbval-ignore-output" not in tags, f"{where}: ignored already"
