"""The reliability issue, replayed: a kill at any instant of a checkpoint save, corrupt
checkpoints, resuming into a different model or text, bad output folders, SIGTERM, two
runs on one folder, and a fuzz of the CLI's options (every input ends in exit 0 or a
one-line error, never a traceback).

The fuzz also runs on its own and prints its counts::

    python tests/test_robustness.py 300      # N random inputs; prints how many ended how
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = "\n".join(f"Line {i}: to be, or not to be, that is the question." for i in range(300))


def _config(tmp_path: Path, model: dict | None = None, **train) -> Path:
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    cfg = {
        "model": model
        or {"preset": None, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "eval_interval": 2,
            "eval_iters": 2,
            "warmup_steps": 1,
            "out_dir": str(tmp_path / "run"),
            "progress": False,
            "device": "cpu",
            **train,
        },
        "data": {"text_file": str(tmp_path / "text.txt"), "tokenizer": "char"},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _cli(*argv: str) -> tuple[int | str, str, str]:
    """Run ``minigpt`` in this process: (exit status, stdout, stderr).

    The status is the int ``main`` returned or the code of the SystemExit it raised,
    or ``"traceback"`` when any other exception escaped (stderr then holds it).
    """
    from minigpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status: int | str = main(list(argv))
        except SystemExit as e:  # what a real process would print and exit with
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
                status = 1
            else:
                status = e.code or 0
        except BaseException:  # a traceback is exactly what we count
            traceback.print_exc()
            status = "traceback"
    return status, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- the fuzz

_NUMBERS = [0, 1, 2, 3, 4, 8, 16, -1, -3, 0.5, 1e-3, -0.5, 2.5]
_SPECIAL = ["NaN", "Infinity", "-Infinity", "1e308", "1e999", str(10**9), str(10**12), str(2**63)]
_OTHER = ['"abc"', "abc", "true", "false", "null", "[]", "[1, 2]", '{"a": 1}', "", '""', "cpu"]


def _random_value(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:
        return json.dumps(rng.choice(_NUMBERS))
    if kind < 0.65:
        return rng.choice(_SPECIAL)
    return rng.choice(_OTHER)


def fuzz_cli(n: int, seed: int = 0, workdir: Path | None = None) -> dict[str, list]:
    """Run ``minigpt train`` on ``n`` random sets of 1-3 ``--section.key=value`` overrides.

    Training itself is replaced by a no-op (the fuzz is about what happens before the
    first step), so each input costs milliseconds. Returns the inputs grouped by
    outcome: "ok" (exit 0), "error" (exit 2 with a one-line message), "unclear" (any
    other exit status or a message of several lines) and "traceback".
    """
    import tempfile

    import torch

    import minigpt.train as mt
    from minigpt.config import section_keys as _section_keys

    torch.set_num_threads(1)
    rng = random.Random(seed)
    keys = sorted(f"{s}.{k}" for s, ks in _section_keys().items() for k in ks if k != "out_dir")
    results: dict[str, list] = {"ok": [], "error": [], "unclear": [], "traceback": []}
    real_train = mt.Trainer.train
    mt.Trainer.train = lambda self: mt.LossHistory(train_loss=[0.0])  # no steps: milliseconds
    saved_cache = os.environ.get("MINIGPT_CACHE_DIR")
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            tmp = Path(tmp)
            os.environ["MINIGPT_CACHE_DIR"] = str(tmp / "cache")
            cfg = _config(tmp)
            for i in range(n):
                overrides = [
                    f"--{key}={_random_value(rng)}" for key in rng.sample(keys, rng.randint(1, 3))
                ]
                argv = ["train", str(cfg), f"--train.out_dir={tmp / f'run{i}'}", *overrides]
                status, _, err = _cli(*argv)
                lines = [line for line in err.splitlines() if line.strip()]
                if status == "traceback" or "Traceback" in err:
                    results["traceback"].append((overrides, lines[-1] if lines else ""))
                elif status == 0:
                    results["ok"].append((overrides, ""))
                elif status == 2 and len(lines) == 1:
                    results["error"].append((overrides, lines[0]))
                else:
                    results["unclear"].append((overrides, f"exit {status}: " + " | ".join(lines)))
    finally:
        mt.Trainer.train = real_train
        # never leak the setting: notebook kernels started later by this process inherit it
        if saved_cache is None:
            os.environ.pop("MINIGPT_CACHE_DIR", None)
        else:
            os.environ["MINIGPT_CACHE_DIR"] = saved_cache
    return results


def test_fuzz_cli_options_never_end_in_a_traceback(tmp_path):
    results = fuzz_cli(120, seed=1, workdir=tmp_path)
    bad = results["traceback"] + results["unclear"]
    assert not bad, "\n".join(f"{args}: {msg}" for args, msg in bad[:10])
    assert results["ok"] and results["error"]  # both kinds of input were drawn


if __name__ == "__main__":
    import resource

    # an allocation beyond 8 GB fails at once instead of swapping the machine to death
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    found = fuzz_cli(n, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    for outcome in ("traceback", "unclear"):
        for args, msg in found[outcome]:
            print(f"{outcome}: {' '.join(args)}\n    {msg[:200]}")
    print(", ".join(f"{k}: {len(v)}" for k, v in found.items()), f"(of {n} inputs)")


# ----------------------------------------------------------------------------- helpers for the rest

import errno  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _one_line_error(status, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _step(run: Path) -> int:
    return json.loads((run / "last" / "trainer.json").read_text())["step"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A config and a run folder trained for 2 steps (copy it before changing it)."""
    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:  # undone after: later notebook kernels inherit env
        mp.setenv("MINIGPT_CACHE_DIR", str(tmp / "cache"))
        cfg = _config(tmp, max_steps=2)
        status, _, err = _cli("train", str(cfg))
    assert status == 0, err
    return tmp


@pytest.fixture
def run(trained, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(config, run folder): a private copy of the trained run, with a config that points at it."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(trained / "run", tmp_path / "run")
    cfg = json.loads((trained / "config.json").read_text())
    cfg["train"]["out_dir"] = str(tmp_path / "run")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "config.json", tmp_path / "run"


# ----------------------------------------------------------------------------- 1. checkpoint saves


def test_a_kill_at_any_point_of_a_save_loses_no_completed_step(tmp_path, monkeypatch):
    """Copy the run folder just before every rename, fsync, temp folder and delete of a run
    (what a kill -9 at that instant leaves on disk), then check every copy: the last
    completed save is always found, loads with matching checksums, and resumes."""
    import tempfile

    from minigpt.checkpoint import latest_checkpoint, read_trainer_state
    from minigpt.files import verify_files
    from minigpt.model import GPT
    from minigpt.train import Trainer

    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(tmp_path, max_steps=3, checkpoint_interval=1, eval_interval=2)
    run, snaps = tmp_path / "run", tmp_path / "snapshots"
    completed = [0]  # the step of the last save of `last` that returned
    taken: list[tuple[Path, int, str]] = []
    busy = [False]

    def snapshot(what: str):
        if busy[0] or not run.exists():
            return
        busy[0] = True
        try:
            dest = snaps / f"{len(taken):03d}"
            shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
            taken.append((dest, completed[0], what))
        finally:
            busy[0] = False

    def before(name, real):
        def wrapper(*args, **kwargs):
            snapshot(f"{name}{args[:2]}")
            return real(*args, **kwargs)

        return wrapper

    real_save = Trainer.save_checkpoint

    def save_checkpoint(self, name="last"):
        path = real_save(self, name)
        if name == "last":
            completed[0] = self.step
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(os, "replace", before("os.replace", os.replace))
    monkeypatch.setattr(os, "fsync", before("os.fsync", os.fsync))
    monkeypatch.setattr(shutil, "rmtree", before("shutil.rmtree", shutil.rmtree))
    monkeypatch.setattr(tempfile, "mkdtemp", before("tempfile.mkdtemp", tempfile.mkdtemp))
    status, _, err = _cli("train", str(cfg))
    monkeypatch.undo()
    assert status == 0, err
    assert len(taken) > 30 and completed[0] == 3
    between = []  # the copies where only .last.old holds the last checkpoint
    for snap, done, what in taken:
        if (snap / ".last.old").exists() and not (snap / "last").exists():
            between.append((snap, done))
        found = latest_checkpoint(snap)  # finishes an interrupted swap
        if done == 0:
            continue
        assert found is not None, f"the checkpoint of step {done} was lost (kill before {what})"
        state = read_trainer_state(found)
        assert state["step"] >= done, what
        verify_files(found, ["optimizer.safetensors", "tokenizer.json"])
        GPT.load(found)  # verifies config.json and model.safetensors
    assert between, "no copy was taken between the two renames of a swap"
    # the finding: `train --resume` after a kill between the renames continues the run
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))  # undone above
    for snap, done in between[:2]:
        status, out, err = _cli("train", str(cfg), f"--train.out_dir={snap}", "--resume")
        assert status == 0, err
        assert f"steps {done} -> 3" in out or f"steps {done + 1} -> 3" in out, out
        assert json.loads((snap / "last" / "trainer.json").read_text())["history"]["steps"] == [
            1,
            2,
            3,
        ]


def test_stale_temporaries_are_removed_on_the_next_start(run):
    cfg, folder = run
    (folder / ".last.k3j4x9qa.tmp").mkdir()
    (folder / ".last.k3j4x9qa.tmp" / "model.safetensors").write_bytes(b"half")
    (folder / ".trainer.json.x1b2c3d4.tmp").write_text("{")
    status, _, err = _cli("train", str(cfg), "--resume", "--train.max_steps=3")
    assert status == 0, err
    assert not list(folder.glob(".*.tmp")) and _step(folder) == 3


def test_a_flipped_bit_in_the_weights_is_caught_on_load(run):
    from minigpt.checkpoint import CheckpointError
    from minigpt.model import GPT

    _, folder = run
    weights = folder / "last" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the tensor data, not the header
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT.load(folder / "last")
    for command in ("sample", "eval"):
        _one_line_error(*_cli(command, str(folder))[::2], "model.safetensors", "corrupt")


def _rewrite_first_tensor(checkpoint: Path, change) -> None:
    """Replace the first tensor of ``model.safetensors`` by ``change(tensor)`` and rewrite
    the manifest, so the checksums are fine and only the content is wrong."""
    from safetensors.torch import load_file, save_file

    from minigpt.files import write_manifest

    weights = checkpoint / "model.safetensors"
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = change(state[name])
    save_file(state, str(weights), metadata={"format": "minigpt"})
    write_manifest(checkpoint)


def test_an_integer_tensor_in_the_weights_is_refused(run):
    from minigpt.checkpoint import CheckpointError
    from minigpt.model import GPT

    _, folder = run
    _rewrite_first_tensor(folder / "last", lambda t: t.to(torch.int64))
    with pytest.raises(CheckpointError, match="non-floating-point"):
        GPT.load(folder / "last")
    _one_line_error(*_cli("eval", str(folder))[::2], "model.safetensors", "int64")


def test_a_resumed_optimizer_has_the_same_param_groups(run):
    from minigpt.tokens import TokenDataset
    from minigpt.train import Trainer

    _, folder = run
    data = TokenDataset(torch.randint(0, 10, (400,)), 16)
    first = Trainer.from_checkpoint(
        folder, data, overrides={"device": "cpu", "out_dir": str(folder)}
    )
    first.train_step()
    first.save_checkpoint("last")
    again = Trainer.from_checkpoint(
        folder, data, overrides={"device": "cpu", "out_dir": str(folder)}
    )

    def groups(t):
        return [{k: v for k, v in g.items() if k != "params"} for g in t.optimizer.param_groups]

    a, b = groups(first), groups(again)
    assert a == b
    for ga, gb in zip(a, b, strict=True):
        assert {k: type(v) for k, v in ga.items()} == {k: type(v) for k, v in gb.items()}
    assert all(isinstance(g["betas"], tuple) for g in b)
    for pa, pb in zip(first.optimizer.state.values(), again.optimizer.state.values(), strict=True):
        for key in pa:
            torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------- 2. resume


def test_resume_refuses_a_different_model(run):
    cfg, folder = run
    before = (folder / "last" / "model.safetensors").read_bytes()
    status, _, err = _cli("train", str(cfg), "--resume", "--model.n_layer=3")
    _one_line_error(status, err, "model.n_layer: 1 -> 3", "--overwrite", "out_dir")
    assert (folder / "last" / "model.safetensors").read_bytes() == before


def test_resume_never_replaces_the_checkpoints_tokenizer(run, tmp_path):
    cfg, folder = run
    tokenizer = (folder / "last" / "tokenizer.json").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("question", "QUESTION!"), encoding="utf-8")
    status, _, err = _cli("train", str(cfg), "--resume", f"--data.text_file={other}")
    _one_line_error(status, err, "cannot encode", "tokenizer")
    assert (folder / "last" / "tokenizer.json").read_bytes() == tokenizer
    # a text of the checkpoint's characters (fewer of them) resumes with its tokenizer
    other.write_text(TEXT.replace("question", "to be"), encoding="utf-8")
    status, _, err = _cli(
        "train", str(cfg), "--resume", f"--data.text_file={other}", "--train.max_steps=3"
    )
    assert status == 0, err
    assert (folder / "last" / "tokenizer.json").read_bytes() == tokenizer
    assert _step(folder) == 3


def test_a_fresh_run_refuses_a_folder_with_a_checkpoint(run):
    cfg, folder = run
    _one_line_error(*_cli("train", str(cfg))[::2], "--resume", "--overwrite", "out_dir")
    assert _step(folder) == 2
    status, _, err = _cli("train", str(cfg), "--overwrite", "--train.max_steps=1")
    assert status == 0, err
    assert json.loads((folder / "last" / "trainer.json").read_text())["history"]["steps"] == [1]


# ----------------------------------------------------------------------------- 3. output folders


def test_an_output_folder_under_a_file_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "file").write_text("not a folder")
    cfg = _config(tmp_path)
    status, _, err = _cli("train", str(cfg), f"--train.out_dir={tmp_path / 'file' / 'run'}")
    _one_line_error(status, err, str(tmp_path / "file" / "run"), "out_dir")


def test_a_full_disk_is_found_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    status, out, err = _cli("train", str(cfg))
    _one_line_error(status, err, "No space left on device", "out_dir")
    assert "model:" not in out  # refused before the model was built


def test_a_disk_that_fills_up_during_training_is_a_one_line_error(run, monkeypatch):
    import minigpt.files as files

    cfg, folder = run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")

    monkeypatch.setattr(files, "save_file", full)
    status, _, err = _cli("train", str(cfg), "--resume", "--train.max_steps=4")
    _one_line_error(status, err, "No space left on device")
    assert _step(folder) == 2  # the last good checkpoint is still there


# ----------------------------------------------------------------------------- 4. bad inputs


def _non_utf8(tmp: Path) -> list[str]:
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    return [f"--data.text_file={tmp / 'latin1.txt'}"]


def _empty(tmp: Path) -> list[str]:
    (tmp / "empty.txt").write_text("")
    return [f"--data.text_file={tmp / 'empty.txt'}"]


def _model_list(tmp: Path) -> list[str]:
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["model"] = [1, 2]
    (tmp / "config.json").write_text(json.dumps(cfg))
    return []


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["--train.lr=abc"], "train.lr"),
        (["--train.eps=NaN"], "train.eps"),
        (["--train.device=banana"], "device"),
        (["--train.progress=maybe"], "train.progress"),
        (["--train.weight_decay=NaN"], "train.weight_decay"),
        (["--model.n_layer=1000000000"], "GiB"),
        (["--model.n_embd=1000000000", "--model.n_head=1"], "GiB"),
        (["--train.batch_size=1000000000000"], "GiB"),
        (["--model.vocab_size=3"], "vocab_size"),
        (["--data.val_fraction=2"], "val_fraction"),
        (["--data.text_file=[1]"], "text_file"),
        (["--model.dropout=abc"], "model.dropout"),
        (["--model.preset=huge"], "preset"),
        (["--train.nope=1"], "unknown key"),
        (["--lr"], "--key=value"),
        (_non_utf8, "UTF-8"),
        (_empty, "empty"),
        (_model_list, "'model' section"),
    ],
)
def test_bad_train_inputs_are_one_line_errors(tmp_path, monkeypatch, overrides, needle):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(tmp_path)
    if callable(overrides):
        overrides = overrides(tmp_path)
    status, _, err = _cli("train", str(cfg), *overrides)
    _one_line_error(status, err, needle)
    assert not (tmp_path / "run" / "last").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "{run}", "--iters", "-1"], "--iters"),
        (["eval", "{run}", "--iters", "0"], "--iters"),
        (["eval", "{run}", "--batch-size", "1000000000000"], "GiB"),
        (["sample", "{run}", "--max-new-tokens", "1000000000000"], "GiB"),
        (["sample", "{run}", "--temperature", "nan"], "--temperature"),
        (["sample", "{run}", "--top-k", "0"], "--top-k"),
        (["sample", "{run}/nothing"], "not found"),
        (["eval", "{run}", "--bogus"], "unrecognized"),
    ],
)
def test_bad_sample_and_eval_inputs_are_one_line_errors(run, args, needle):
    _, folder = run
    status, _, err = _cli(*[a.format(run=folder) for a in args])
    _one_line_error(status, err, needle)


def test_an_absurd_config_json_is_refused_before_allocating(run):
    _, folder = run
    config = json.loads((folder / "last" / "config.json").read_text())
    config["vocab_size"] = 10**9
    (folder / "last" / "config.json").write_text(json.dumps(config))
    (folder / "last" / "manifest.json").unlink()  # a folder without checksums still loads
    for command in ("sample", "eval"):
        _one_line_error(*_cli(command, str(folder))[::2], "config.json", "GiB")


def test_nan_weights_are_refused_by_sample_and_eval(run):
    _, folder = run
    _rewrite_first_tensor(
        folder / "last", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))
    )
    for command in ("sample", "eval"):
        _one_line_error(*_cli(command, str(folder))[::2], "NaN", "model.safetensors")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    status, _, err = _cli("--debug", "train", str(_config(tmp_path)), "--train.lr=abc")
    assert status == 1 and "train.lr" in err  # SystemExit unhandled: Python prints it


def test_a_second_run_on_a_locked_folder_fails_fast(tmp_path, monkeypatch):
    from minigpt.checkpoint import RunLock

    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(tmp_path)
    with RunLock(tmp_path / "run"):  # another run holds the folder
        start = time.monotonic()
        status, out, err = _cli("train", str(cfg))
    _one_line_error(status, err, "another training run", "out_dir")
    assert "model:" not in out and time.monotonic() - start < 10


def test_sigterm_saves_the_checkpoint_and_exits_non_zero(tmp_path):
    cfg = _config(tmp_path, max_steps=100000, checkpoint_interval=50, eval_interval=0)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MINIGPT_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigpt", "train", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = tmp_path / "run" / "last" / "trainer.json"
    deadline = time.monotonic() + 120
    while not marker.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.is_file(), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode not in (0, -signal.SIGTERM), (proc.returncode, err)
    assert "SIGTERM" in out and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "interrupted at step" in line]
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert _step(tmp_path / "run") == step > 0


_KILL_BETWEEN_RENAMES = """
import os, sys
real, seen = os.replace, []
def replace(src, dst, *a, **k):
    # the second rename of a swap of `last` (tmp -> last), on its second save: die first
    if os.path.basename(str(dst)) == "last" and ".last." in str(src):
        seen.append(dst)
        if len(seen) == 2:
            os._exit(9)  # kill -9: no finally, no cleanup
    return real(src, dst, *a, **k)
os.replace = replace
from minigpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_between_the_two_renames_then_resume_continues(tmp_path, monkeypatch):
    """The finding: only .last.old is left; `train --resume` must continue from it."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(tmp_path, max_steps=3, checkpoint_interval=1, eval_interval=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_BETWEEN_RENAMES, "train", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == 9, killed.stderr[-2000:]
    folder = tmp_path / "run"
    assert not (folder / "last").exists() and (folder / ".last.old" / "trainer.json").is_file()
    assert list(folder.glob(".last.*.tmp"))  # the new copy, never swapped in
    status, out, err = _cli("train", str(cfg), "--resume")
    assert status == 0, err
    assert "steps 1 -> 3" in out  # the step-1 save survived; only step 2 is done again
    assert json.loads((folder / "last" / "trainer.json").read_text())["history"]["steps"] == [
        1,
        2,
        3,
    ]
    assert not (folder / ".last.old").exists() and not list(folder.glob(".*.tmp"))
