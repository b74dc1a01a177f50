"""Pretrained models: GPT-2 from Hugging Face files, and the course's own models.

- ``from_pretrained("gpt2")`` (or a local folder) loads OpenAI's GPT-2 weights in
  Hugging Face's safetensors format into a ``GPT``: a rename and a transpose.
- ``shakespeare_char_model()`` is the course model: a character-level GPT trained
  on Tiny Shakespeare with the best recipe measured (``SHAKESPEARE_CHAR``), trained
  once and cached by a hash of its recipe, so every chapter that needs a model that
  does something loads the same one in a second instead of training its own. The
  same recipe drives ``configs/shakespeare_char.json`` and
  ``benchmarks/time_to_quality.py`` (which trains it for a time budget instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minigpt.checkpoint import CheckpointError, RunLock, write_checkpoint_folder
from minigpt.data import cache_dir, load_text, train_val_split
from minigpt.files import load_json, load_tensors, save_json
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from minigpt.tokens import TokenDataset, cached_tokens
from minigpt.train import LossHistory, TrainConfig, Trainer, validation_loss

__all__ = [
    "ASSISTANT_BASE",
    "SHAKESPEARE_CHAR",
    "assistant_base_history",
    "assistant_base_model",
    "cached_model",
    "from_pretrained",
    "recipe_folder",
    "shakespeare_char_data",
    "shakespeare_char_history",
    "shakespeare_char_model",
]


def from_pretrained(
    name_or_path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> GPT:
    """Load a GPT-2 checkpoint in Hugging Face format (safetensors only, never pickles).

    ``name_or_path`` is either a local directory holding ``config.json`` and
    ``model.safetensors`` (what ``GPT2LMHeadModel.save_pretrained`` writes), or
    a hub name such as ``"gpt2"`` / ``"openai-community/gpt2-medium"``, of which
    only those two files are downloaded (needs ``huggingface_hub`` and a network).

    OpenAI trained GPT-2 with a ``Conv1D`` layer that stores its weight as
    (in, out), the transpose of ``nn.Linear``'s (out, in); those four matrices
    per block are transposed on the way in. Returns the model in eval mode.
    """
    directory = _resolve_pretrained(name_or_path)
    config = _config_from_hf(load_json(directory / "config.json"), directory / "config.json")
    weights = directory / "model.safetensors"
    state = _state_from_hf(load_tensors(weights), config, weights)
    model = GPT(config)
    model.load_weights(state, source=weights)
    return model.to(device).eval()


# --------------------------------------------------------------------------- GPT-2 from Hugging Face files

# Conv1D layers whose (in, out) weights must be transposed into nn.Linear's (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers that older checkpoints saved next to the weights (not parameters;
# careful: "h.0.attn.c_attn.bias" is a real parameter and must not match)
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# activations that are GPT-2's tanh-approximated GELU under another name
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _resolve_pretrained(name_or_path: str | os.PathLike[str]) -> Path:
    """A local checkpoint directory, downloading ``name_or_path`` from the hub if it is a name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            if any(path.glob("pytorch_model*.bin")) or any(path.glob("*.pt")):
                raise CheckpointError(
                    f"{path} holds only pickled PyTorch weights (pytorch_model.bin), which can run "
                    "arbitrary code when loaded and are refused here. Convert them once in a "
                    "trusted environment: GPT2LMHeadModel.from_pretrained(path)"
                    ".save_pretrained(path, safe_serialization=True) writes model.safetensors"
                )
            raise CheckpointError(f"{path} has no model.safetensors (a GPT-2 checkpoint needs it)")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json (a GPT-2 checkpoint needs it)")
        return path
    name = str(name_or_path)
    looks_like_path = (
        path.exists() or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    )
    if looks_like_path:
        raise CheckpointError(f"no checkpoint directory at {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(
            f"{name!r} is not a local directory and huggingface_hub is not installed to download "
            "it: pip install huggingface_hub, or pass a directory with config.json and "
            "model.safetensors"
        ) from e
    try:
        local = snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise CheckpointError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Download config.json and model.safetensors on a connected machine "
            "and pass their directory instead"
        ) from e
    return _resolve_pretrained(local)


def _config_from_hf(hf: dict[str, Any], source: Path) -> GPTConfig:
    """Translate a Hugging Face GPT-2 ``config.json`` into a GPTConfig, refusing what differs."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(
            f"{source}: model_type is {hf.get('model_type')!r}; only GPT-2 checkpoints "
            "(model_type 'gpt2') can be loaded with from_pretrained"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise CheckpointError(
            f"{source}: activation_function {act!r} is not supported; minigpt's GPT-2 MLP uses "
            f"the tanh-approximated GELU (one of {_TANH_GELU})"
        )
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(flag, ok) != ok:
            raise CheckpointError(f"{source}: {flag}={hf[flag]} is not supported (needs {ok})")
    missing = [
        k for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size") if k not in hf
    ]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}: is it a GPT-2 config.json?")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            mlp_hidden=hf.get("n_inner"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_weights=hf.get("tie_word_embeddings", True),
        )
    except ValueError as e:
        raise CheckpointError(f"{source} does not describe a valid model: {e}") from e


def _state_from_hf(hf: dict[str, Tensor], config: GPTConfig, source: Path) -> dict[str, Tensor]:
    """Rename a Hugging Face GPT-2 state dict to minigpt's names and transpose Conv1D weights."""
    state = {}
    for key, value in hf.items():
        key = key.removeprefix("transformer.")
        if _MASK_BUFFER.match(key):
            continue
        if key.endswith(_CONV1D):
            value = value.t()
        state[key] = value.contiguous()
    if config.tie_weights and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        if "wte.weight" in state and not torch.equal(head, state["wte.weight"]):
            raise CheckpointError(
                f"{source}: lm_head.weight differs from wte.weight although config.json says "
                "tie_word_embeddings=true"
            )
    if not config.tie_weights and "lm_head.weight" not in state and "wte.weight" in state:
        raise CheckpointError(f"{source}: tie_word_embeddings=false but there is no lm_head.weight")
    return state


# --------------------------------------------------------------------------- the course model

# The one Shakespeare recipe: the course model, configs/shakespeare_char.json and
# benchmarks/time_to_quality.py all use it. Many small steps beat few large ones on
# a CPU budget, so the model is small and the batches short (6 x 128 tokens). The
# Llama-style layers (rotary positions, RMSNorm, SwiGLU, no biases) were the biggest
# single gain measured over GPT-2-style ones at equal time. Context 128, not 64:
# chapter 07 fine-tunes this model on SMS messages and instructions.
SHAKESPEARE_CHAR: dict[str, Any] = {
    "model": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=128,
        dropout=0.0,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
    ),
    "train": dict(
        batch_size=6,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=100,
        weight_decay=0.1,
        beta2=0.99,
        grad_clip=1.0,
        eval_iters=10,
    ),
    "steps": 6000,
    "val_fraction": 0.1,
}


# The base model of chapter 07 onwards (instruction tuning, chat, alignment): the
# same recipe with a 256-character context, which fits the prompt template and a
# few turns of chat, and batches of 3 x 256 tokens (the same tokens per step), for
# 4,000 steps to stay near five CPU minutes. Its alphabet covers what fine-tuning
# will show it (digits, symbols, French) besides Shakespeare's 65 characters; the
# characters pretraining never saw start as untrained rows that fine-tuning fills.
ASSISTANT_BASE: dict[str, Any] = {
    "model": {**SHAKESPEARE_CHAR["model"], "block_size": 256},
    "train": {**SHAKESPEARE_CHAR["train"], "batch_size": 3},
    "steps": 4000,
    "val_fraction": SHAKESPEARE_CHAR["val_fraction"],
    "alphabet": "\n" + "".join(map(chr, range(32, 127))) + "àâæçéèêëîïôœùûüÿÀÂÆÇÉÈÊËÎÏÔŒÙÛÜŸ«»’",
    "unk_token": "\ufffd",
}


def shakespeare_char_data(
    directory: str | os.PathLike[str] | None = None,
    tokenizer: CharTokenizer | None = None,
) -> tuple[CharTokenizer, Any, Any]:
    """Tiny Shakespeare as characters: the tokenizer and the train / validation ids
    (the last 10% of the text), token files cached in ``directory`` (default: the cache).

    The tokenizer is fitted to the text (its 65 characters) unless one is given."""
    text = load_text("tinyshakespeare")
    key = "char"
    if tokenizer is None:
        tokenizer = CharTokenizer.fit(text)
    else:  # token files named by the vocabulary they were encoded with
        key += "-" + hashlib.sha256("\0".join(tokenizer.itos).encode()).hexdigest()[:8]
    ids = cached_tokens(
        text, tokenizer.encode, vocab_size=tokenizer.vocab_size, key=key, directory=directory
    )
    train_ids, val_ids = train_val_split(ids, SHAKESPEARE_CHAR["val_fraction"])
    return tokenizer, train_ids, val_ids


def _recipe_tokenizer(recipe: dict[str, Any]) -> CharTokenizer | None:
    if "alphabet" not in recipe:
        return None  # fitted to Tiny Shakespeare
    return CharTokenizer(recipe["alphabet"], unk_token=recipe["unk_token"])


def recipe_folder(cache: str | os.PathLike[str] | None, name: str, recipe: Any) -> Path:
    """``<cache>/models/<name>-<hash>``: the folder of a model trained by ``recipe`` (any
    JSON-able description of everything that decides the weights), for ``cached_model``."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache or cache_dir()) / "models" / f"{name}-{digest}"


def cached_model(
    folder: str | os.PathLike[str],
    build: Callable[[], tuple[GPT, CharTokenizer, dict[str, Any]]],
    record: str = "record.json",
) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """Load the model cached in ``folder``, building it first if it is not there.

    ``build()`` returns ``(model, tokenizer, record)``; it runs once, under a lock on
    the parent folder, so parallel processes (notebooks under test) wait for the one
    that builds instead of building too. The folder is written atomically
    (``write_checkpoint_folder``), with the JSON ``record`` file, which marks it
    complete. Returns the model (eval mode, CPU), its tokenizer and the record.
    """
    folder = Path(folder)
    if not (folder / record).is_file():
        with RunLock(folder.parent, wait=True, name=f".{folder.name}.lock"):
            if not (folder / record).is_file():
                model, tokenizer, data = build()

                def write(tmp: Path) -> None:
                    model.save(tmp)
                    tokenizer.save(tmp / "tokenizer.json")
                    save_json(data, tmp / record)

                write_checkpoint_folder(folder, write)
    model = GPT.load(folder)
    try:
        tokenizer = CharTokenizer.load(folder / "tokenizer.json")
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / 'tokenizer.json'} is not a valid tokenizer: {e}") from e
    return model.eval(), tokenizer, load_json(folder / record)


def _cached_model(
    cache: str | os.PathLike[str] | None,
    name: str,
    recipe: dict[str, Any],
    steps: int | None,
    seed: int,
    progress: bool,
) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """Train ``recipe`` once into the cache and load it, with its history record."""
    steps = recipe["steps"] if steps is None else steps
    folder = recipe_folder(cache, name, {**recipe, "steps": steps, "seed": seed})
    return cached_model(
        folder,
        lambda: _train(folder, recipe, steps=steps, seed=seed, progress=progress),
        record="history.json",
    )


def _cached_history(record: dict[str, Any]) -> tuple[LossHistory, float]:
    return LossHistory.from_dict(record["history"]), float(record["full_val_loss"])


def shakespeare_char_model(
    cache: str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[GPT, CharTokenizer]:
    """The course model: a character-level GPT pretrained on Tiny Shakespeare, and its
    ``CharTokenizer``.

    The first call trains it with ``SHAKESPEARE_CHAR`` (``steps`` defaults to the
    recipe's; a few CPU minutes) and saves it under
    ``<cache>/models/shakespeare-char-<recipe hash>/``; later calls load it. ``cache``
    defaults to ``minigpt.data.cache_dir()``. Training is seeded, so a recipe gives
    the same model on the same machine. The model is returned in eval mode on the
    CPU; ``shakespeare_char_history`` gives its loss curves and its validation loss
    on every window of the held-out text (``history.json``'s ``full_val_loss``).
    """
    model, tokenizer, _ = _cached_model(
        cache, "shakespeare-char", SHAKESPEARE_CHAR, steps, seed, progress
    )
    return model, tokenizer


def shakespeare_char_history(
    cache: str | os.PathLike[str] | None = None, *, steps: int | None = None, seed: int = 0
) -> tuple[LossHistory, float]:
    """The loss history of ``shakespeare_char_model`` (training it first if needed) and
    its loss on every window of the validation text."""
    _, _, record = _cached_model(cache, "shakespeare-char", SHAKESPEARE_CHAR, steps, seed, False)
    return _cached_history(record)


def assistant_base_model(
    cache: str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[GPT, CharTokenizer]:
    """The base model of the assistant chapters, and its ``CharTokenizer``.

    Like ``shakespeare_char_model`` (pretrained on Tiny Shakespeare, trained once and
    cached by recipe hash under ``<cache>/models/assistant-base-<hash>/``), with the
    ``ASSISTANT_BASE`` recipe: a 256-character context and an alphabet with digits,
    symbols and French letters (other characters encode to its unknown token).
    ``minigpt.assistant`` instruction-tunes it.
    """
    model, tokenizer, _ = _cached_model(
        cache, "assistant-base", ASSISTANT_BASE, steps, seed, progress
    )
    return model, tokenizer


def assistant_base_history(
    cache: str | os.PathLike[str] | None = None, *, steps: int | None = None, seed: int = 0
) -> tuple[LossHistory, float]:
    """The loss history and full validation loss of ``assistant_base_model``."""
    _, _, record = _cached_model(cache, "assistant-base", ASSISTANT_BASE, steps, seed, False)
    return _cached_history(record)


def _train(
    folder: Path, recipe: dict[str, Any], *, steps: int, seed: int, progress: bool
) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    tokenizer, train_ids, val_ids = shakespeare_char_data(
        folder.parent.parent, _recipe_tokenizer(recipe)
    )
    mc = GPTConfig(vocab_size=tokenizer.vocab_size, **recipe["model"])
    tc = TrainConfig(
        max_steps=steps,
        eval_interval=max(1, steps // 10),
        seed=seed,
        device="cpu",
        progress=progress,
        **recipe["train"],
    )
    torch.manual_seed(seed)
    model = GPT(mc)
    trainer = Trainer(
        model,
        TokenDataset(train_ids, mc.block_size),
        TokenDataset(val_ids, mc.block_size),
        tc,
    )
    history = trainer.train()
    record = {"history": history.to_dict(), "full_val_loss": validation_loss(model, val_ids)}
    return model, tokenizer, record
