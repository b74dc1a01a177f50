"""Run configs for ``minigpt train``: files, overrides, checks, memory estimates.

A config has three sections, ``model`` (``GPTConfig``, or a ``preset`` plus
changes), ``train`` (``TrainConfig``) and ``data``; without a file it is the
course's Shakespeare recipe (``default_config``). ``load_config`` reads a JSON or
TOML file over the defaults and applies ``--section.key=value`` overrides;
``check_types`` has the config dataclasses check every value (types, finiteness,
ranges) before any work, naming the option as the command line writes it, and ``check_training_memory``
refuses a model or batch too big for this machine with an estimate of what it
would need. Errors are ``SystemExit`` with a one-line message naming the option.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CONFIG",
    "check_device",
    "check_memory",
    "check_training_memory",
    "check_types",
    "default_config",
    "gib",
    "load_config",
    "num_parameters",
    "option_names",
    "parse_value",
    "section_keys",
]

# Without a config file: the course's Shakespeare recipe (minigpt.pretrained.SHAKESPEARE_CHAR,
# filled in by default_config; configs/shakespeare_char.json spells it out).
DEFAULT_CONFIG: dict[str, dict[str, Any]] = {
    "train": {"out_dir": "runs/minigpt"},
    "data": {"dataset": "tinyshakespeare", "tokenizer": "char", "val_fraction": 0.1},
}


def default_config() -> dict[str, dict[str, Any]]:
    """The built-in config: the course recipe, written to ``runs/minigpt``."""
    from minigpt.pretrained import SHAKESPEARE_CHAR

    steps = SHAKESPEARE_CHAR["steps"]
    return {
        "model": dict(SHAKESPEARE_CHAR["model"]),
        "train": {
            **SHAKESPEARE_CHAR["train"],
            "max_steps": steps,
            "eval_interval": max(1, steps // 10),
            **DEFAULT_CONFIG["train"],
        },
        "data": dict(DEFAULT_CONFIG["data"]),
    }


_DATA_KEYS = ("dataset", "text_file", "tokenizer", "val_fraction")


# --------------------------------------------------------------------------- configuration


def section_keys() -> dict[str, set[str]]:
    from minigpt.model import GPTConfig
    from minigpt.train import TrainConfig

    return {
        "model": {f.name for f in fields(GPTConfig)} | {"preset"},
        "train": {f.name for f in fields(TrainConfig)},
        "data": set(_DATA_KEYS),
    }


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] = ()) -> dict[str, dict]:
    """Read a config file (JSON or TOML) over the defaults and apply ``--key=value`` overrides."""
    config = default_config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"config file not found: {path}")
        try:
            if path.suffix == ".toml":
                import tomllib

                loaded = tomllib.loads(path.read_text(encoding="utf-8"))
            else:
                loaded = json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:
            raise SystemExit(f"{path} is not a valid config file: {e}") from e
        if not isinstance(loaded, dict):
            raise SystemExit(f"{path}: a config file is one JSON object with model, train and data")
        unknown = sorted(set(loaded) - set(config))
        if unknown:
            raise SystemExit(f"{path}: unknown sections {unknown}; use model, train and data")
        for section, values in loaded.items():
            if not isinstance(values, dict):
                raise SystemExit(
                    f"{path}: the {section!r} section must be an object of key: value pairs, "
                    f"got {type(values).__name__}"
                )
            if section == "model" and "preset" in values:
                config["model"] = dict(values)  # a preset names a whole model: no defaults
            else:
                config[section].update(values)
    keys = section_keys()
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(
                f"overrides look like --key=value or --section.key=value, got {item!r}"
            )
        name, _, raw = item[2:].partition("=")
        section, _, key = name.rpartition(".")
        if not section:
            owners = [s for s, known in keys.items() if key in known]
            if len(owners) != 1:
                where = f"in sections {owners}" if owners else "in no section"
                raise SystemExit(f"--{key}: the key is {where}; write --section.{key}=...")
            section = owners[0]
        if section not in keys or key not in keys[section]:
            raise SystemExit(
                f"--{name}: unknown key; known {section} keys: {sorted(keys.get(section, []))}"
            )
        config[section][key] = parse_value(raw)
    return config


def option_names(message: str) -> str:
    """A dataclass's error in the names the command line uses (``TrainConfig.lr`` -> ``train.lr``)."""
    return message.replace("TrainConfig.", "train.").replace("GPTConfig.", "model.")


def check_types(config: dict[str, dict]) -> Any:
    """Check every value before any work; returns the ``TrainConfig``.

    The dataclasses check their own fields (types, finiteness, ranges); the model is
    checked here with a stand-in vocabulary size, since the real one comes from the
    tokenizer, which is built later. Errors name the option as it is written.
    """
    from minigpt.model import GPTConfig
    from minigpt.train import TrainConfig

    data = config["data"]
    for key in ("dataset", "text_file", "tokenizer"):
        value = data.get(key)
        if not (isinstance(value, str) or (value is None and key != "tokenizer")):
            raise SystemExit(f"data.{key} must be a string, got {json.dumps(value)}")
    fraction = data.get("val_fraction", 0.1)
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
    if not (ok and 0 < fraction < 1):
        raise SystemExit(
            f"data.val_fraction must be between 0 and 1 (e.g. 0.1), got {json.dumps(fraction)}"
        )
    try:
        train = TrainConfig.from_dict(config["train"])
        model = dict(config["model"])
        preset = model.pop("preset", None)
        model.setdefault("vocab_size", 1)  # a stand-in: the tokenizer decides
        if preset is not None and not isinstance(preset, str):
            raise ValueError(f"GPTConfig.preset must be a string, got {preset!r}")
        GPTConfig.preset(preset, **model) if preset else GPTConfig.from_dict(model)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(option_names(str(e.args[0] if e.args else e))) from e
    return train


# --------------------------------------------------------------------------- memory estimates


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _memory_limit() -> int:
    """This machine's physical memory (or its largest GPU's, when that is bigger)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    import torch

    gpu = max(
        (
            torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())
        ),
        default=0,
    )
    return max(ram, gpu) or 1 << 62


def num_parameters(c: Any) -> int:
    """How many parameters ``GPT(c)`` has, counted from the config without building it
    (``tests/test_model_core.py`` checks it against the model)."""
    C, L, H = c.n_embd, c.n_layer, c.hidden_dim
    kv_dim = C // c.n_head * (c.n_kv_head or c.n_head)
    gated = c.mlp == "swiglu"
    attention = 2 * C * C + 2 * C * kv_dim + (2 * C + 2 * kv_dim) * c.bias
    mlp = (3 if gated else 2) * C * H + ((2 if gated else 1) * H + C) * c.bias
    norm = C * (2 if c.norm == "layernorm" and c.bias else 1)
    embeddings = c.vocab_size * C * (1 if c.tie_weights else 2)
    positions = c.block_size * C if c.positions == "learned" else 0
    return embeddings + positions + L * (attention + mlp + 2 * norm) + norm


def check_memory(need: int, what: str, fix: str) -> None:
    """Refuse a resource bomb with an estimate instead of a failure in the allocator."""
    limit = _memory_limit()
    if need > limit:
        raise SystemExit(
            f"{what} would need about {gib(need)} of memory; this machine has {gib(limit)}: {fix}"
        )


def check_training_memory(model: Any, train: Any) -> None:
    params = num_parameters(model)
    # float32 weights, gradients and AdamW's two moments, plus the activations of a batch:
    # with checkpointing, each block's input plus one block's internals during its recompute
    layers = model.n_layer + 16 if train.activation_checkpointing else 16 * model.n_layer
    activations = train.batch_size * model.block_size * layers * model.n_embd
    logits = 2 * train.batch_size * model.block_size * model.vocab_size
    check_memory(
        16 * params + 4 * (activations + logits),
        f"training a model of {params:,} parameters with batch_size {train.batch_size}",
        "make the model (model.n_layer, n_embd, block_size) or train.batch_size smaller",
    )


def check_device(device: str) -> None:
    from minigpt.distributed import DistInfo, pick_device

    # as this process's Trainer will pick it (under torchrun, "cuda" is cuda:LOCAL_RANK)
    env = {k: int(os.environ.get(k.upper(), d)) for k, d in (("local_rank", 0), ("world_size", 1))}
    try:
        pick_device(device, DistInfo(**env))
    except RuntimeError as e:
        raise SystemExit(f"train.device={device}: {e}") from e
