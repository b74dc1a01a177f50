"""The ``minigpt`` command: train, sample from and evaluate models.

    minigpt train [CONFIG] [--key=value ...] [--resume]     # e.g. configs/shakespeare_char.json
    minigpt sample CHECKPOINT --prompt "ROMEO:" [--max-new-tokens 200] [--temperature 0.8]
    minigpt eval CHECKPOINT [--iters 50]

``CONFIG`` is a JSON (or TOML) file with up to three sections, every key optional::

    {
      "model": {"preset": "cpu-small", "n_layer": 4},        # GPTConfig (+ a preset)
      "train": {"max_steps": 2000, "out_dir": "runs/char"},   # TrainConfig
      "data":  {"dataset": "tinyshakespeare", "tokenizer": "char", "val_fraction": 0.1}
    }

``data.dataset`` names a ``minigpt.data`` dataset, ``data.text_file`` a text file
instead; ``data.tokenizer`` is ``"char"`` (fit on the text), ``"gpt2"`` or the
path of a saved tokenizer. Overrides name a key with its section
(``--train.lr=3e-3``, ``--model.n_layer=6``) or alone when only one section has
it (``--lr=3e-3``); values are read as JSON (numbers, true/false, null) and
otherwise taken as strings. Multi-process training: ``torchrun
--nproc_per_node=N -m minigpt train CONFIG``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

__all__ = ["build_tokenizer", "load_config", "load_tokenizer", "main"]

DEFAULT_CONFIG: dict[str, dict[str, Any]] = {
    "model": {"preset": "cpu-small", "dropout": 0.0},
    "train": {"out_dir": "runs/minigpt"},
    "data": {"dataset": "tinyshakespeare", "tokenizer": "char", "val_fraction": 0.1},
}
_DATA_KEYS = ("dataset", "text_file", "tokenizer", "val_fraction")


# --------------------------------------------------------------------------- configuration


def _section_keys() -> dict[str, set[str]]:
    from minigpt.model import GPTConfig
    from minigpt.train import TrainConfig

    return {
        "model": {f.name for f in fields(GPTConfig)} | {"preset"},
        "train": {f.name for f in fields(TrainConfig)},
        "data": set(_DATA_KEYS),
    }


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] = ()) -> dict[str, dict]:
    """Read a config file (JSON or TOML) over the defaults and apply ``--key=value`` overrides."""
    config = {k: dict(v) for k, v in DEFAULT_CONFIG.items()}
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
        unknown = sorted(set(loaded) - set(config))
        if unknown:
            raise SystemExit(f"{path}: unknown sections {unknown}; use model, train and data")
        for section, values in loaded.items():
            config[section].update(values)
    keys = _section_keys()
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
        config[section][key] = _parse_value(raw)
    return config


# --------------------------------------------------------------------------- tokenizers and data


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a tokenizer file saved by ``CharTokenizer.save`` or ``BPETokenizer.save``."""
    from minigpt.checkpoint import CheckpointError, load_json
    from minigpt.tokenizer import BPETokenizer, CharTokenizer

    fmt = load_json(path).get("format")
    loaders = {"minigpt-char": CharTokenizer.load, "minigpt-bpe": BPETokenizer.load}
    if fmt not in loaders:
        raise CheckpointError(f"{path} is not a minigpt tokenizer file (format {fmt!r})")
    try:
        return loaders[fmt](path)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid tokenizer file: {e}") from e


def build_tokenizer(spec: str, text: str) -> Any:
    """``"char"`` (fit on ``text``), ``"gpt2"``, or the path of a saved tokenizer."""
    from minigpt.tokenizer import BPETokenizer, CharTokenizer

    if spec == "char":
        return CharTokenizer.fit(text)
    if spec == "gpt2":
        return BPETokenizer.from_gpt2()
    if Path(spec).is_file():
        return load_tokenizer(spec)
    raise SystemExit(f"data.tokenizer must be 'char', 'gpt2' or a tokenizer file, got {spec!r}")


def _fast_encode(tokenizer: Any):
    """The tokenizer's fastest ordinary encoder (tiktoken for BPE when it can)."""
    to_tiktoken = getattr(tokenizer, "to_tiktoken", None)
    if to_tiktoken is not None:
        try:
            return to_tiktoken().encode_ordinary
        except ValueError:
            pass
    return tokenizer.encode


def _read_text(data: dict[str, Any]) -> str:
    from minigpt.data import load_text

    if data.get("text_file"):
        file = Path(data["text_file"])
        if not file.is_file():
            raise SystemExit(f"data.text_file not found: {file}")
        return file.read_text(encoding="utf-8")
    return load_text(data.get("dataset") or "tinyshakespeare")


def _datasets(data: dict[str, Any], tokenizer: Any, text: str, block_size: int, progress: bool):
    from minigpt.data import TokenDataset, cached_tokens, train_val_split

    key = "char" if data["tokenizer"] == "char" else Path(str(data["tokenizer"])).stem
    ids = cached_tokens(
        text, _fast_encode(tokenizer), vocab_size=tokenizer.vocab_size, key=key, progress=progress
    )
    train_ids, val_ids = train_val_split(ids, float(data.get("val_fraction", 0.1)))
    val = TokenDataset(val_ids, block_size) if len(val_ids) > block_size else None
    return TokenDataset(train_ids, block_size), val


# --------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from minigpt.checkpoint import latest_checkpoint
    from minigpt.distributed import teardown_distributed
    from minigpt.model import GPT, GPTConfig
    from minigpt.train import TrainConfig, Trainer

    config = load_config(args.config, args.overrides)
    text = _read_text(config["data"])
    model_cfg = dict(config["model"])
    preset = model_cfg.pop("preset", None)
    tokenizer = build_tokenizer(str(config["data"]["tokenizer"]), text)
    model_cfg["vocab_size"] = tokenizer.vocab_size
    try:
        gpt_config = (
            GPTConfig.preset(preset, **model_cfg) if preset else GPTConfig.from_dict(model_cfg)
        )
        train_config = TrainConfig.from_dict(config["train"])
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"bad config: {e}") from e
    is_main = int(os.environ.get("RANK", "0")) == 0
    train_data, val_data = _datasets(
        config["data"], tokenizer, text, gpt_config.block_size, train_config.progress and is_main
    )
    metadata = {"data": config["data"]}
    out = train_config.out_dir
    found = latest_checkpoint(out) if args.resume and out else None
    if found is not None:
        trainer = Trainer.from_checkpoint(
            found, train_data, val_data, overrides=config["train"], tokenizer=tokenizer
        )
        trainer.metadata = metadata
    else:
        torch.manual_seed(train_config.seed)
        model = GPT(gpt_config)
        trainer = Trainer(
            model, train_data, val_data, train_config, tokenizer=tokenizer, metadata=metadata
        )
    if trainer.ddp.is_main:
        print(
            f"model: {trainer.model.num_parameters():,} parameters; world size {trainer.ddp.world_size}; "
            f"device {trainer.device}; steps {trainer.step} -> {train_config.max_steps}"
        )
    finished = False
    try:
        history = trainer.train()
        finished = True
    except KeyboardInterrupt as e:
        print(e or "interrupted", file=sys.stderr)
        return 130
    finally:
        teardown_distributed(trainer.ddp, wait=finished)
    if trainer.ddp.is_main:
        val = history.val_loss[-1] if history.val_loss else float("nan")
        print(
            f"done: step {trainer.step}, train loss {history.train_loss[-1]:.4f}, val loss {val:.4f}"
        )
        if out:
            print(f"checkpoints: {Path(out) / 'last'}, {Path(out) / 'best'}")
    return 0


def _load_checkpoint(path: str):
    from minigpt.checkpoint import find_checkpoint
    from minigpt.model import GPT

    directory = find_checkpoint(path)
    model = GPT.load(directory).eval()
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        raise SystemExit(f"{directory} has no tokenizer.json; it cannot turn text into ids")
    return directory, model, load_tokenizer(tok_file)


def _cmd_sample(args: argparse.Namespace) -> int:
    _, model, tokenizer = _load_checkpoint(args.checkpoint)
    from minigpt.generate import generate_text  # lazily: only this command needs it

    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(args.prompt + text)  # generate_text returns only the continuation
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from minigpt.checkpoint import read_trainer_state
    from minigpt.train import evaluate

    directory, model, tokenizer = _load_checkpoint(args.checkpoint)
    state = read_trainer_state(directory)
    data = {**DEFAULT_CONFIG["data"], **(state.get("metadata") or {}).get("data", {})}
    if args.text_file:
        data = {**data, "text_file": args.text_file, "dataset": None}
    text = _read_text(data)
    _, val_data = _datasets(data, tokenizer, text, model.config.block_size, progress=False)
    if val_data is None:
        raise SystemExit("the validation split is shorter than one context window")
    loss = evaluate(model, val_data, batch_size=args.batch_size, iters=args.iters, seed=args.seed)
    print(
        f"val loss {loss:.4f}  perplexity {math.exp(loss):.2f}  (step {state['step']}, {directory})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``minigpt`` and ``python -m minigpt``."""
    parser = argparse.ArgumentParser(
        prog="minigpt", description="Train, sample and evaluate minigpt models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (a config file plus --key=value overrides)")
    p.add_argument("config", nargs="?", help="JSON or TOML config file (default: built-in)")
    p.add_argument(
        "--resume", action="store_true", help="continue from <out_dir>/last if it exists"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (uses its last/)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (uses its last/)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--text-file", default=None, help="evaluate on this text instead of the run's data"
    )
    p.set_defaults(func=_cmd_eval)

    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from minigpt.checkpoint import CheckpointError

    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
