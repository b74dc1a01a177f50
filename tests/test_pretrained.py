"""The course model's recipe: one recipe for the cached model, the CLI config and the benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from minigpt.model import GPTConfig
from minigpt.pretrained import SHAKESPEARE_CHAR
from minigpt.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_the_cli_example_config_is_the_course_recipe():
    cfg = json.loads((REPO / "configs" / "shakespeare_char.json").read_text())
    assert cfg["model"] == SHAKESPEARE_CHAR["model"]
    train = dict(cfg["train"])
    assert train.pop("max_steps") == SHAKESPEARE_CHAR["steps"]
    for key in ("eval_interval", "out_dir"):  # how the run is watched and stored, not the recipe
        train.pop(key)
    assert train == SHAKESPEARE_CHAR["train"]
    assert cfg["data"]["val_fraction"] == SHAKESPEARE_CHAR["val_fraction"]
    GPTConfig(vocab_size=65, **cfg["model"])
    TrainConfig.from_dict(cfg["train"])


def test_the_time_to_quality_benchmark_trains_the_course_recipe():
    spec = importlib.util.spec_from_file_location(
        "time_to_quality", REPO / "benchmarks" / "time_to_quality.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.RECIPE["model"] == SHAKESPEARE_CHAR["model"]
    assert bench.RECIPE["train"] == SHAKESPEARE_CHAR["train"]
    # --short: the same model, only the batch, the learning rate and the precision differ
    assert bench.SHORT["model"] == SHAKESPEARE_CHAR["model"]
    changed = {k for k, v in bench.SHORT["train"].items() if SHAKESPEARE_CHAR["train"].get(k) != v}
    assert changed == {"batch_size", "lr"} and bench.SHORT["dtype"] == "bfloat16"
