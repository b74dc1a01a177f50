"""A pytest plugin for nbval: cells whose outputs depend on the CPU.

The stored outputs of the lessons were computed on one kind of CPU (the reference:
an Intel Xeon with AMX, Sapphire Rapids or later). On another CPU, MKL's matrix
products round their last bits differently (it picks its kernels by vendor and
instruction set, and only its slow SSE2 branch is reproducible across vendors), and
training amplifies those bits: on an AMD EPYC the same seeds give other trained
models, and the fine-tuned assistant of chapters 07-08 answers 53.9% of the held-out
tasks instead of 76.7%.

So a code cell tagged ``cpu-dependent`` (cell metadata, invisible in the lesson) is
compared in full on the reference CPU, like every other cell, and elsewhere only by
the kinds of output it makes: the same streams (stdout, stderr) and the same
display types, with their text not compared. It still has to run without an error,
and a new warning or a missing figure still fails it. Every untagged cell is
compared in full everywhere. ``MINIGPT_REFERENCE_CPU=1`` (or ``0``) overrides the
detection, for example to see on another CPU what would differ.

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
REFERENCE = "an Intel Xeon with AMX (Sapphire Rapids or later)"
_CPUINFO = Path("/proc/cpuinfo")


def is_reference_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes the lessons' stored outputs bit for bit.

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when None; a machine without
    one, such as a Mac, is not the reference). ``MINIGPT_REFERENCE_CPU`` set to ``1`` or
    ``0`` decides instead.
    """
    override = os.environ.get("MINIGPT_REFERENCE_CPU", "").strip()
    if override in ("0", "1"):
        return override == "1"
    if cpuinfo is None:
        cpuinfo = _CPUINFO.read_text(errors="replace") if _CPUINFO.is_file() else ""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    return (
        vendor is not None
        and vendor.group(1) == "GenuineIntel"
        and flags is not None
        and "amx_tile" in flags.group(1).split()
    )


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


def _cpu_label() -> str:
    text = _CPUINFO.read_text(errors="replace") if _CPUINFO.is_file() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return name.group(1).strip() if name else "unknown CPU"


def pytest_report_header(config: Any) -> str:
    if is_reference_cpu():
        return f"notebook outputs: all compared in full ({_cpu_label()} is {REFERENCE})"
    return (
        f"notebook outputs: cells tagged {TAG!r} compared by kind only "
        f"({_cpu_label()} is not {REFERENCE}, where the stored outputs were made)"
    )


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if is_reference_cpu():
        return
    for item in items:
        cell = getattr(item, "cell", None)  # nbval's IPyNbCell
        if cell is None or TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        compare = item.compare_outputs  # the bound method of nbval

        def by_kind(test, ref, skip_compare=None, _compare=compare):
            return _compare(output_kinds(test), output_kinds(ref), skip_compare)

        item.compare_outputs = by_kind
