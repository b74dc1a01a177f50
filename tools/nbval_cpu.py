"""A pytest plugin for nbval: cells whose outputs depend on the CPU.

A notebook's stored outputs were computed on one kind of CPU, recorded in its
metadata (``minigpt.cpu``, written by tools/execute_notebooks.py; a notebook without
the record was executed on an Intel Xeon with AMX). On another kind, MKL's matrix
products round their last bits differently (it picks its kernels by vendor and
instruction set, and only its slow SSE2 branch is reproducible across vendors), and
training amplifies those bits: on an AMD EPYC the same seeds give other trained
models (an earlier recipe of chapter 07's tuned assistant answered 57.7% of the
held-out tasks there instead of the Intel Xeon's 74.5%).

So a code cell tagged ``cpu-dependent`` (cell metadata, invisible in the lesson) is
compared in full on the kind of CPU its notebook was executed on, like every other
cell, and elsewhere only by the kinds of output it makes: the same streams (stdout,
stderr) and the same display types, with their text not compared. It still has to
run without an error, and a new warning or a missing figure still fails it. Every
untagged cell is compared in full everywhere. ``MINIGPT_REFERENCE_CPU=1`` (or ``0``)
says that this CPU is (or is not) the notebooks' kind, for example to see on another
CPU everything that would differ.

The root conftest.py loads this plugin; ``pytest -p nbval_cpu`` (with ``tools`` on
``PYTHONPATH``) loads it anywhere else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nbformat import NotebookNode

TAG = "cpu-dependent"
# the kind of CPU of a notebook that does not record one (they all came from there)
DEFAULT_KIND = "intel-amx"
_CPUINFO = Path("/proc/cpuinfo")
_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}
_ISA = (("amx_tile", "amx"), ("avx512f", "avx512"), ("avx2", "avx2"))  # widest first


def _cpuinfo() -> str:
    return _CPUINFO.read_text(errors="replace") if _CPUINFO.is_file() else ""


def cpu_kind(cpuinfo: str | None = None) -> str:
    """The kind of CPU, as far as the bits of MKL's and PyTorch's kernels go: vendor and
    widest matrix instructions, e.g. ``"intel-amx"`` or ``"amd-avx512"`` (``"other"``
    without an x86 ``/proc/cpuinfo``, such as on a Mac). ``cpuinfo`` is the text of
    ``/proc/cpuinfo``, read when None."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    if vendor is None or flags is None or vendor.group(1) not in _VENDORS:
        return "other"
    have = set(flags.group(1).split())
    isa = next((isa for flag, isa in _ISA if flag in have), "sse")
    return f"{_VENDORS[vendor.group(1)]}-{isa}"


def stored_kind(notebook_metadata: Any) -> str:
    """The kind of CPU a notebook's stored outputs were computed on."""
    return str(notebook_metadata.get("minigpt", {}).get("cpu", DEFAULT_KIND))


def same_kind(notebook_metadata: Any, here: str | None = None) -> bool:
    """Whether this CPU (of kind ``here``; detected when None) computes the notebook's
    stored outputs bit for bit."""
    override = os.environ.get("MINIGPT_REFERENCE_CPU", "").strip()
    if override in ("0", "1"):
        return override == "1"
    return (cpu_kind() if here is None else here) == stored_kind(notebook_metadata)


def output_kinds(outputs: list[Any]) -> list[Any]:
    """``outputs`` with their content replaced by a placeholder, their kinds kept: a
    stream keeps its name (stdout or stderr), a display or result keeps its types."""
    kinds: list[Any] = []
    for out in outputs:
        out = NotebookNode(out)  # a copy; nbval reads its keys as attributes
        if "text" in out:
            out["text"] = "<depends on the CPU>"
        if "data" in out:
            out["data"] = {mime: "<depends on the CPU>" for mime in out["data"]}
        kinds.append(out)
    return kinds


def pytest_report_header(config: Any) -> str:
    name = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return (
        f"notebook cells tagged {TAG!r}: compared in full where the notebook was executed on "
        f"this kind of CPU ({cpu_kind()}: {name.group(1).strip() if name else 'unknown'}), "
        "by the kinds of their outputs elsewhere"
    )


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    here = cpu_kind()
    for item in items:
        cell = getattr(item, "cell", None)  # nbval's IPyNbCell
        if cell is None or TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        if same_kind(item.parent.nb.metadata, here):
            continue
        compare = item.compare_outputs  # the bound method of nbval

        def by_kind(test, ref, skip_compare=None, _compare=compare):
            return _compare(output_kinds(test), output_kinds(ref), skip_compare)

        item.compare_outputs = by_kind
