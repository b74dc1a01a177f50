"""The ``minigpt`` command: train, sample from, evaluate and chat with models.

    minigpt train [CONFIG] [--key=value ...] [--resume | --overwrite]   # e.g. configs/shakespeare_char.json
    minigpt sample CHECKPOINT --prompt "ROMEO:" [--max-new-tokens 200] [--temperature 0.8] [--int8]
    minigpt eval CHECKPOINT [--iters 50] [--int8]   # --int8: int8 weights (minigpt.quantize)
    minigpt chat CHECKPOINT [--system TEXT] [--max-new-tokens 64]   # /reset, /exit; Ctrl-C: 130

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

A run folder that holds a checkpoint is continued only with ``--resume`` (which
refuses a different model or tokenizer: the checkpoint's tokenizer is kept and
must encode the text) or started again with ``--overwrite``. Every value is
checked for type, finiteness and range, and a model or batch too big for this
machine is refused with an estimate of its memory, before any work. Every error
is one line on stderr with exit status 2 (``minigpt --debug ...`` shows the
traceback); a run stopped by Ctrl-C or SIGTERM saves ``last`` and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minigpt.config import (
    DEFAULT_CONFIG,
    check_device,
    check_memory,
    check_training_memory,
    check_types,
    load_config,
    num_parameters,
    option_names,
)

__all__ = ["build_tokenizer", "load_config", "load_tokenizer", "main"]

# --------------------------------------------------------------------------- tokenizers and data


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a tokenizer file saved by ``CharTokenizer.save`` or ``BPETokenizer.save``."""
    from minigpt.checkpoint import CheckpointError
    from minigpt.files import load_json
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
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(
                f"data.text_file {file} is not UTF-8 text (byte {e.start} is "
                f"{e.object[e.start : e.start + 1]!r}): convert it, e.g. iconv -t utf-8"
            ) from e
        except OSError as e:
            raise SystemExit(f"cannot read data.text_file {file}: {e.strerror or e}") from e
        if not text:
            raise SystemExit(f"data.text_file {file} is empty: give a file with text to train on")
        return text
    return load_text(data.get("dataset") or "tinyshakespeare")


def _datasets(data: dict[str, Any], tokenizer: Any, text: str, block_size: int, progress: bool):
    import hashlib

    from minigpt.data import train_val_split
    from minigpt.tokens import TokenDataset, cached_tokens

    if hasattr(tokenizer, "itos"):  # a char vocabulary: two texts' vocabularies differ
        key = "char-" + hashlib.sha256("\0".join(tokenizer.itos).encode()).hexdigest()[:12]
    else:
        key = Path(str(data["tokenizer"])).stem
    ids = cached_tokens(
        text, _fast_encode(tokenizer), vocab_size=tokenizer.vocab_size, key=key, progress=progress
    )
    train_ids, val_ids = train_val_split(ids, float(data.get("val_fraction", 0.1)))
    if len(train_ids) <= block_size:
        raise SystemExit(
            f"the training text is {len(train_ids)} tokens, not longer than one context window "
            f"(model.block_size={block_size}): give more text or a smaller block_size"
        )
    val = TokenDataset(val_ids, block_size) if len(val_ids) > block_size else None
    return TokenDataset(train_ids, block_size), val


def _tokenizer_json(tokenizer: Any) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp) / "tokenizer.json")
        return json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))


_NEW_RUN = "to start a new run instead, choose another train.out_dir or pass --overwrite"


def _resume_tokenizer(directory: Path, spec: str, text: str) -> Any:
    """The checkpoint's own tokenizer, after checking that the config asks for the same
    one and that it can encode ``text`` (a resumed model must see the ids it learned)."""
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise SystemExit(f"{directory} has no tokenizer.json, so it cannot be resumed; {_NEW_RUN}")
    saved = load_tokenizer(file)
    if spec == "char":
        if not hasattr(saved, "itos"):
            raise SystemExit(
                f"data.tokenizer='char' but {file} is a {type(saved).__name__}; resume with the "
                f"run's tokenizer, or {_NEW_RUN}"
            )
        unknown = sorted(set(text) - set(saved.stoi))
        if unknown and saved.unk_token is None:
            shown = "".join(unknown[:20])
            raise SystemExit(
                f"the text has {len(unknown)} characters that the checkpoint's tokenizer ({file}) "
                f"cannot encode ({shown!r}); resume on text made of its characters, or {_NEW_RUN}"
            )
    elif _tokenizer_json(build_tokenizer(spec, text)) != _tokenizer_json(saved):
        raise SystemExit(
            f"data.tokenizer={spec!r} is not the tokenizer of the checkpoint ({file}); resume "
            f"with the run's tokenizer, or {_NEW_RUN}"
        )
    return saved


def _check_same_model(directory: Path, config: Any) -> None:
    from minigpt.model import GPTConfig

    saved = GPTConfig.from_json(directory / "config.json")
    if saved != config:
        old, new = saved.to_dict(), config.to_dict()
        diffs = ", ".join(f"model.{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k])
        raise SystemExit(
            f"--resume: the config describes a different model than the checkpoint "
            f"{directory} ({diffs}); resume with the run's model settings, or {_NEW_RUN}"
        )


# --------------------------------------------------------------------------- commands


def _prepare_run_folder(out: str, resume: bool, overwrite: bool) -> Path | None:
    """Fail fast on a folder another run holds or that cannot be written, finish a save a
    kill interrupted, and refuse to start a fresh run over an existing checkpoint.
    Returns the checkpoint to resume from, if any."""
    import shutil

    from minigpt.checkpoint import RunLock, check_writable, latest_checkpoint, read_trainer_state

    with RunLock(out):  # released at once: Trainer.train() takes it again for the run
        check_writable(out)
        found = latest_checkpoint(out)  # also renames back what a kill mid-save left
        if found is not None and overwrite:
            for name in ("last", "best", ".last.old", ".best.old"):
                shutil.rmtree(Path(out) / name, ignore_errors=True)
            return None
        if found is not None and not resume:
            step = read_trainer_state(found)["step"]
            raise SystemExit(
                f"{out} already holds a checkpoint ({found}, step {step}): pass --resume to "
                "continue it, --overwrite to start again from step 0, or choose another "
                "train.out_dir"
            )
    return found


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from minigpt.checkpoint import latest_checkpoint
    from minigpt.distributed import teardown_distributed
    from minigpt.model import GPT, GPTConfig
    from minigpt.train import Trainer

    if args.resume and args.overwrite:
        raise SystemExit("--resume continues a run and --overwrite starts it again: pass one")
    config = load_config(args.config, args.overrides)
    train_config = check_types(config)
    check_device(train_config.device)
    is_main = int(os.environ.get("RANK", "0")) == 0
    out = train_config.out_dir
    found = None
    if out and is_main:
        found = _prepare_run_folder(out, args.resume, args.overwrite)
    elif out and args.resume:
        found = latest_checkpoint(out)
    text = _read_text(config["data"])
    spec = str(config["data"]["tokenizer"])
    if found is not None:
        tokenizer = _resume_tokenizer(found, spec, text)
    else:
        tokenizer = build_tokenizer(spec, text)
    model_cfg = dict(config["model"])
    preset = model_cfg.pop("preset", None)
    asked = model_cfg.get("vocab_size")
    if asked is not None and asked < tokenizer.vocab_size:
        raise SystemExit(
            f"model.vocab_size={asked} is smaller than the tokenizer's {tokenizer.vocab_size} "
            "ids: leave it out (it is taken from the tokenizer) or pad it to a larger size"
        )
    model_cfg["vocab_size"] = asked or tokenizer.vocab_size
    try:
        gpt_config = (
            GPTConfig.preset(preset, **model_cfg) if preset else GPTConfig.from_dict(model_cfg)
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(option_names(str(e.args[0] if e.args else e))) from e
    check_training_memory(gpt_config, train_config)
    if found is not None:
        _check_same_model(found, gpt_config)
    train_data, val_data = _datasets(
        config["data"], tokenizer, text, gpt_config.block_size, train_config.progress and is_main
    )
    metadata = {"data": config["data"]}
    if found is not None:
        trainer = Trainer.from_checkpoint(
            found, train_data, val_data, overrides=config["train"], tokenizer=tokenizer
        )
        trainer.metadata = metadata
    else:
        if args.resume and is_main:
            print(f"--resume: no checkpoint in {out} yet; starting a new run")
        torch.manual_seed(train_config.seed)
        model = GPT(gpt_config)
        trainer = Trainer(
            model, train_data, val_data, train_config, tokenizer=tokenizer, metadata=metadata
        )
    if trainer.ddp.is_main:
        world = trainer.ddp.world_size
        how = f" ({train_config.parallel})" if world > 1 else ""
        print(
            f"model: {trainer.model.num_parameters():,} parameters; world size {world}{how}; "
            f"device {trainer.device}, {str(trainer.dtype).removeprefix('torch.')}; "
            f"steps {trainer.step} -> {train_config.max_steps}"
        )
    finished = False
    try:
        history = trainer.train()
        finished = True
    except KeyboardInterrupt as e:
        print(f"minigpt: {e or 'interrupted'}", file=sys.stderr)
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


def _load_checkpoint(path: str, need_bytes: Callable[[Any], int] = lambda c: 0):
    """The checkpoint folder, its model and tokenizer. The model's size (plus
    ``need_bytes(config)``) is checked against the memory before it is built, and
    NaN or infinite weights are refused."""
    import torch

    from minigpt.checkpoint import CheckpointError, find_checkpoint
    from minigpt.files import verify_files
    from minigpt.model import GPT, GPTConfig

    directory = find_checkpoint(path)
    verify_files(directory, ["config.json"])
    config = GPTConfig.from_json(directory / "config.json")
    params = num_parameters(config)
    check_memory(
        4 * params + need_bytes(config),
        f"the model in {directory / 'config.json'} ({params:,} parameters)",
        "is this config.json the one the run wrote?",
    )
    model = GPT.load(directory).eval()
    bad = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{directory / 'model.safetensors'} holds NaN or infinite weights ({', '.join(bad[:3])}): "
            "the run diverged before this save; use another checkpoint (best/) or retrain"
        )
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        raise SystemExit(f"{directory} has no tokenizer.json; it cannot turn text into ids")
    return directory, model, load_tokenizer(tok_file)


def _int8(model: Any) -> Any:
    from minigpt.quantize import quantize

    return quantize(model)


def _cmd_sample(args: argparse.Namespace) -> int:
    tokens = len(args.prompt.encode("utf-8")) + args.max_new_tokens
    _, model, tokenizer = _load_checkpoint(
        args.checkpoint,
        # the token ids, and the key/value cache of one context window
        lambda c: 16 * tokens + 8 * c.n_layer * c.block_size * c.n_embd,
    )
    from minigpt.generate import generate_text  # lazily: only this command needs it

    model = _int8(model) if args.int8 else model
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

    directory, model, tokenizer = _load_checkpoint(
        args.checkpoint,
        lambda c: 4 * args.batch_size * c.block_size * (16 * c.n_layer * c.n_embd + c.vocab_size),
    )
    model = _int8(model) if args.int8 else model
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
        f"val loss {loss:.4f}  perplexity {math.exp(min(loss, 700)):.2f}  (step {state['step']}, {directory})"
    )
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    directory, model, tokenizer = _load_checkpoint(
        args.checkpoint,
        lambda c: 8 * c.n_layer * c.block_size * c.n_embd,  # the KV cache
    )
    from minigpt.chat import ChatSession, ChatTemplate, run_repl
    from minigpt.sampling import SamplingConfig

    try:
        template = ChatTemplate(tokenizer)
    except ValueError as e:
        raise SystemExit(f"{directory / 'tokenizer.json'}: {e}") from e
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    session = ChatSession(model, template, args.system, args.max_new_tokens, sampling)
    return run_repl(session, sys.stdin, sys.stdout, sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``main`` prints it) instead of the usage text."""

    def error(self, message: str):
        raise SystemExit(f"{message} (see {self.prog} --help)")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``minigpt`` and ``python -m minigpt``.

    Every error is one line on stderr and exit status 2 (``--debug`` shows the
    traceback instead); an interrupted run exits with 130.
    """
    parser = _Parser(prog="minigpt", description="Train, sample and evaluate minigpt models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (a config file plus --key=value overrides)")
    p.add_argument("config", nargs="?", help="JSON or TOML config file (default: built-in)")
    p.add_argument(
        "--resume", action="store_true", help="continue from <out_dir>/last if it exists"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete the checkpoints in out_dir and start again"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (uses its last/)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=_int_at_least(0), default=200)
    p.add_argument("--temperature", type=_finite_float, default=0.8)
    p.add_argument("--top-k", type=_int_at_least(1), default=None)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--int8", action="store_true", help="int8 weights (minigpt.quantize)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (uses its last/)")
    p.add_argument("--iters", type=_int_at_least(1), default=50)
    p.add_argument("--batch-size", type=_int_at_least(1), default=16)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument(
        "--text-file", default=None, help="evaluate on this text instead of the run's data"
    )
    p.add_argument("--int8", action="store_true", help="int8 weights (minigpt.quantize)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("chat", help="chat with a checkpoint tuned for chat (lines from stdin)")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (uses its last/)")
    p.add_argument("--system", default=None, help="a system message for the whole chat")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    p.add_argument("--temperature", type=_finite_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_int_at_least(1), default=None)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.set_defaults(func=_cmd_chat)

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the command
    from minigpt.checkpoint import CheckpointError
    from minigpt.data import DataError
    from minigpt.train import TrainingDivergedError

    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "train":
            args.overrides = extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except SystemExit as e:
        if debug or not isinstance(e.code, str):
            raise  # --help and the like exit 0 on their own
        message = e.code
    except KeyboardInterrupt:  # Ctrl-C while a checkpoint loads, before a command's own handling
        if debug:
            raise
        print("minigpt: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, DataError, TrainingDivergedError) as e:
        if debug:
            raise
        message = str(e)
    except OSError as e:  # a full disk or a folder that vanished mid-run
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}; check the folder's free space and permissions"
    except (KeyError, TypeError, ValueError, MemoryError) as e:  # minigpt's own checks
        if debug:
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    print(f"minigpt: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
