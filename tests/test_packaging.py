"""The package on its own: build the wheel, install it into a fresh virtual environment
without the dev extras, and run it from there.

This is what a user gets from ``pip install minigpt-course``: the modules under
``minigpt/`` and the runtime ``dependencies`` of pyproject.toml, nothing else. A
module that imports a dev-only package (matplotlib, transformers, ...) when it is
imported, a runtime dependency missing from ``dependencies``, or a file the wheel
leaves out fails here and nowhere else: every other test runs in the dev
environment, where all of those are present.

Unpacking torch again for every run is most of what a plain install costs, so the
runtime dependencies are linked rather than reinstalled: each distribution the wheel
needs (its ``Requires-Dist``, followed through their own requirements) is symlinked
from the environment running pytest, and nothing else is, provided its installed
version satisfies the requirement and is the one ``constraints.txt`` pins. pip then
installs the wheel into the new environment and resolves its dependencies there, as it
would for a user; one it does not find is installed from the package index. Set
``MINIGPT_PACKAGING_FULL_INSTALL=1`` to link nothing and install every dependency
with pip, exactly as a user would.
"""

from __future__ import annotations

import email
import email.message
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections import defaultdict
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
# Entries at the repository root that are build outputs or local state, never source
# (see .gitignore); the copy of the checkout that the wheel is built from leaves them out.
NOT_SOURCE = {".git", ".venv", "build", "dist", "runs", "checkpoints", "data", ".cache", ".whl"}
# Modules that only the dev extras provide; importing minigpt must not load any of them.
DEV_ONLY_MODULES = [
    "IPython",
    "huggingface_hub",
    "hypothesis",
    "ipykernel",
    "ipywidgets",
    "jupyter_client",
    "jupyter_core",
    "jupyterlab",
    "matplotlib",
    "nbval",
    "pytest",
    "sacrebleu",
    "tokenizers",
    "transformers",
]
TEXT = "\n".join(f"Line {i}: to be, or not to be, that is the question." for i in range(100))


def _run(*args: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command; on failure, fail the test with its output."""
    args = [str(a) for a in args]
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        command = " ".join("<script>" if "\n" in a else a for a in args)
        pytest.fail(
            f"{command} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    return result.stdout


def _ignore_non_source(directory: str, names: list[str]) -> set[str]:
    at_root = Path(directory) == REPO
    return {
        n
        for n in names
        if n in ("__pycache__", ".ipynb_checkpoints")
        or n.endswith((".egg-info", "_cache"))  # .pytest_cache, .ruff_cache, ...
        or (at_root and (n in NOT_SOURCE or n.startswith(".hypothesis")))
    }


def _build_wheel(workdir: Path) -> Path:
    """Build the wheel from a copy of the checkout, so that no stale ``build/`` leaks in."""
    source = workdir / "source"
    shutil.copytree(REPO, source, ignore=_ignore_non_source, symlinks=True)
    wheels = workdir / "wheels"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        wheels,
        source,
        cwd=workdir,
    )
    (wheel,) = wheels.glob("*.whl")
    return wheel


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_string(zf.read(name).decode())


def _pins() -> dict[str, str]:
    """``constraints.txt`` as {canonical name: version}."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _installed() -> dict[str, importlib.metadata.Distribution]:
    """The distributions in the site-packages of the interpreter running the tests."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {
        canonicalize_name(d.metadata["Name"]): d
        for d in importlib.metadata.distributions(path=paths)
    }


def _runtime_closure(
    requires: list[str], installed: dict[str, importlib.metadata.Distribution]
) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that ``requires`` needs, followed through their requirements.

    A requirement whose installed version does not satisfy it, or is not the one
    ``constraints.txt`` pins, is left out: pip installs it in the new environment. So pip
    never has to replace a linked distribution, which would write the new files through
    the link into this environment.
    """
    pins = _pins()
    needed: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [("", r) for r in requires]  # (the extra the requirement was listed under, requirement)
    while todo:
        extra, text = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist = installed.get(name)
        if dist is None or dist.files is None:
            continue
        version = dist.version.split("+")[0]  # 2.13.0+cpu satisfies ==2.13.0
        if not req.specifier.contains(version, prereleases=True) or pins.get(name) != version:
            continue
        needed[name] = dist
        for e in ("", *sorted(req.extras)):
            if (name, e) not in seen:
                seen.add((name, e))
                todo += [(e, r) for r in dist.requires or ()]
    return needed


def _link(
    needed: dict[str, importlib.metadata.Distribution],
    installed: dict[str, importlib.metadata.Distribution],
    site: Path,
) -> None:
    """Symlink the files of ``needed`` into ``site``: a whole folder when only they own files in it."""
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for name, dist in installed.items():
        for file in dist.files or ():
            parts = PurePosixPath(file).parts
            for i in range(1, len(parts) + 1):
                owners[parts[:i]].add(name)
    linked: set[tuple[str, ...]] = set()
    for dist in needed.values():
        root = Path(dist.locate_file(""))
        for file in dist.files:
            parts = PurePosixPath(file).parts
            if parts[0] == "..":  # console scripts in bin/; nothing here runs them
                continue
            for i in range(1, len(parts) + 1):
                prefix = parts[:i]
                if prefix in linked:
                    break
                if owners[prefix] <= needed.keys():  # e.g. torch/, but not __pycache__/
                    link = site.joinpath(*prefix)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(root.joinpath(*prefix), target_is_directory=len(parts) > i)
                    linked.add(prefix)
                    break


def _link_runtime_dependencies(python: Path, metadata: email.message.Message, cwd: Path) -> None:
    """Link the distributions the wheel needs into the environment of ``python``."""
    script = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run(python, "-c", script, cwd=cwd).strip())
    installed = _installed()
    installed.pop(canonicalize_name(metadata["Name"]), None)  # the dev install of minigpt itself
    needed = _runtime_closure(metadata.get_all("Requires-Dist") or [], installed)
    _link(needed, installed, site)


# The check that runs inside the new environment: where minigpt comes from, what importing
# every one of its modules loads, and which dev-only distributions are installed at all.
PROBE = """
import importlib, importlib.metadata, json, pkgutil, sys, sysconfig
import minigpt
for module in pkgutil.walk_packages(minigpt.__path__, "minigpt."):
    if not module.name.endswith(".__main__"):  # __main__ runs the command
        importlib.import_module(module.name)
dev_modules, dev_dists = json.loads(sys.argv[1])
installed = []
for name in dev_dists:
    try:
        importlib.metadata.distribution(name)
        installed.append(name)
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps({
    "file": minigpt.__file__,
    "site": sysconfig.get_paths()["purelib"],
    "loaded": sorted(m for m in dev_modules if m in sys.modules),
    "installed": installed,
}))
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """A fresh virtual environment with the wheel and its runtime dependencies only."""
    workdir = tmp_path_factory.mktemp("packaging")
    wheel = _build_wheel(workdir)
    metadata = _wheel_metadata(wheel)
    env_dir = workdir / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", env_dir, cwd=workdir)
    python = env_dir / "bin" / "python"
    if os.environ.get("MINIGPT_PACKAGING_FULL_INSTALL") != "1":
        _link_runtime_dependencies(python, metadata, cwd=workdir)
    pip = [sys.executable, "-m", "pip", "--python", python]
    _run(*pip, "install", "--quiet", "-c", CONSTRAINTS, wheel, cwd=workdir)
    _run(*pip, "check", cwd=workdir)
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env |= {"PYTHONNOUSERSITE": "1", "MINIGPT_CACHE_DIR": str(workdir / "cache")}
    cwd = workdir / "cwd"  # not the repository, whose minigpt/ would shadow the installed one
    cwd.mkdir()
    return {"wheel": wheel, "metadata": metadata, "dir": env_dir, "env": env, "cwd": cwd}


def test_wheel_holds_only_the_package(venv):
    assert venv["metadata"]["Name"] == "minigpt-course"  # `minigpt` on PyPI is another project
    with zipfile.ZipFile(venv["wheel"]) as zf:
        names = zf.namelist()
    assert "minigpt/__init__.py" in names and "minigpt/cli.py" in names
    dist_info = f"minigpt_course-{venv['metadata']['Version']}.dist-info/"
    strays = [n for n in names if not n.startswith(("minigpt/", dist_info))]
    assert strays == [], f"the wheel holds files from outside minigpt/: {strays}"
    assert [n for n in names if n.endswith((".ipynb", ".pyc", ".npy", ".safetensors"))] == []
    entry_points = zipfile.Path(venv["wheel"], dist_info + "entry_points.txt").read_text()
    assert "minigpt = minigpt.cli:main" in entry_points


def test_imports_from_the_venv_without_dev_extras(venv):
    requires = [Requirement(r) for r in venv["metadata"].get_all("Requires-Dist")]
    runtime = {r.name for r in requires if r.marker is None or r.marker.evaluate({"extra": ""})}
    dev_only = [
        r.name
        for r in requires
        if r.name not in runtime and r.marker is not None and r.marker.evaluate({"extra": "dev"})
    ]
    assert "matplotlib" in dev_only  # the dev extras are read from the wheel's metadata
    python = venv["dir"] / "bin" / "python"
    out = _run(
        python, "-I", "-c", PROBE, json.dumps([DEV_ONLY_MODULES, dev_only]),
        cwd=venv["cwd"], env=venv["env"],
    )  # fmt: skip
    probe = json.loads(out)
    assert Path(probe["file"]).is_relative_to(probe["site"]), probe["file"]
    assert probe["installed"] == [], (
        f"dev-only packages in the new environment: {probe['installed']}"
    )
    assert probe["loaded"] == [], f"importing minigpt loads dev-only packages: {probe['loaded']}"


def test_command_help(venv):
    out = _run(venv["dir"] / "bin" / "minigpt", "--help", cwd=venv["cwd"], env=venv["env"])
    assert "train" in out and "sample" in out and "eval" in out


def test_command_trains_a_tiny_model(venv):
    cwd = venv["cwd"]
    (cwd / "text.txt").write_text(TEXT, encoding="utf-8")
    config = {
        "model": {"preset": None, "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16},
        "train": {"batch_size": 4, "eval_iters": 2, "warmup_steps": 1, "progress": False},
        "data": {"text_file": "text.txt", "tokenizer": "char"},
    }
    (cwd / "tiny.json").write_text(json.dumps(config))
    out = _run(
        venv["dir"] / "bin" / "minigpt", "train", "tiny.json",
        "--train.max_steps=5", "--eval_interval=5", "--train.device=cpu", "--out_dir=run",
        cwd=cwd, env=venv["env"],
    )  # fmt: skip
    assert "done: step 5" in out
    last = cwd / "run" / "last"
    assert (last / "model.safetensors").is_file() and (last / "trainer.json").is_file()
