"""Trainer options for scale: gradient accumulation, bfloat16 autocast on the CPU,
activation checkpointing, and FSDP with 2 CPU processes (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt.cli import load_config, main
from minigpt.config import check_types
from minigpt.data import train_val_split
from minigpt.files import load_tensors
from minigpt.model import GPT, GPTConfig
from minigpt.tokens import TokenDataset
from minigpt.train import TrainConfig, Trainer
from tests.test_cli import _config as _cli_config

REPO = Path(__file__).resolve().parents[1]
V, T = 32, 8


def _tokens(n: int = 3000) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (n,), generator=g)
    x[1::2] = (x[0::2][: len(x[1::2])] + 1) % V  # learnable: next = previous + 1, often
    return x.numpy().astype(np.uint16)


def _trainer(*, dropout: float = 0.0, n_layer: int = 2, n_embd: int = 32, **cfg) -> Trainer:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=V, block_size=T, n_layer=n_layer, n_head=2, n_embd=n_embd, dropout=dropout
        )
    )
    train_part, val_part = train_val_split(_tokens(), 0.1)
    config = dict(max_steps=5, batch_size=8, lr=3e-3, warmup_steps=2, eval_interval=0)
    config.update(eval_iters=2, progress=False, device="cpu", **cfg)
    return Trainer(
        model, TokenDataset(train_part, T), TokenDataset(val_part, T), TrainConfig(**config)
    )


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


# ----------------------------------------------------------------------------- accumulation


def _first_step_gradients(t: Trainer) -> dict[str, torch.Tensor]:
    """The gradients the optimizer sees at the trainer's next step."""
    seen: dict[str, torch.Tensor] = {}
    step = t.optimizer.step

    def capture(*args, **kwargs):
        if not seen:
            seen.update({n: p.grad.clone() for n, p in t.model.named_parameters()})
        return step(*args, **kwargs)

    t.optimizer.step = capture
    t.train_step()
    return seen


def test_accumulated_micro_batches_equal_one_big_batch():
    """4 micro-batches of 2 with grad_accum_steps=4 give the gradients and the losses of
    one batch of 8 (the global batch is drawn the same way, then cut into pieces)."""
    big = _trainer(batch_size=8, grad_accum_steps=1)
    small = _trainer(batch_size=2, grad_accum_steps=4)
    a, b = _first_step_gradients(big), _first_step_gradients(small)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-7, msg=name)
    big_losses = [big.train_step() for _ in range(5)]
    small_losses = [small.train_step() for _ in range(5)]
    assert small_losses == pytest.approx(big_losses, abs=1e-5)
    # one micro-batch of 2 without accumulation is another run: the comparison can fail
    alone = _first_step_gradients(_trainer(batch_size=2, grad_accum_steps=1))
    assert not torch.allclose(alone["wte.weight"], a["wte.weight"], rtol=1e-2, atol=1e-4)


# ----------------------------------------------------------------------------- bfloat16


def test_bfloat16_and_float32_training_losses_agree():
    """bfloat16 autocast on the CPU follows float32's loss curve for 20 steps."""
    fp32 = _trainer(max_steps=20, dtype="float32")
    bf16 = _trainer(max_steps=20, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    a = fp32.train().train_loss
    b = bf16.train().train_loss
    assert len(a) == len(b) == 20
    assert a[-1] < a[0] - 0.3 and b[-1] < b[0] - 0.3  # both learn
    diffs = np.abs(np.array(a) - np.array(b))
    assert diffs.max() < 0.03, diffs  # bfloat16 keeps about 3 significant digits
    assert diffs.max() > 0  # and autocast really ran in bfloat16
    # the weights (and so the checkpoints) stay float32 under autocast
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    with torch.no_grad(), bf16._autocast():
        x, _ = bf16.train_data.batch(2, torch.Generator().manual_seed(0))
        assert bf16.model(x)[0].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- checkpointing


def test_activation_checkpointing_trains_like_the_plain_model():
    # one after the other: a Trainer seeds torch's global RNG, which draws the dropout masks
    plain = _trainer(dropout=0.1, max_steps=4)
    plain_losses = plain.train().train_loss
    ckpt = _trainer(dropout=0.1, max_steps=4, activation_checkpointing=True)
    assert ckpt.model.h[0].__dict__.get("forward") is not None
    assert ckpt.train().train_loss == pytest.approx(plain_losses, abs=1e-5)
    a, b = _weights(plain), _weights(ckpt)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_config_checks_the_new_options():
    with pytest.raises(ValueError, match="TrainConfig.parallel must be one of ddp, fsdp"):
        TrainConfig(parallel="zero")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing="yes")
    # one process: fsdp changes nothing (there is nothing to shard across)
    t = _trainer(parallel="fsdp")
    assert t._runner is t.model


# ----------------------------------------------------------------------------- command line


def _config(tmp_path: Path, **train) -> Path:
    """tests/test_cli.py's config with two blocks (one to checkpoint while another runs)."""
    return _cli_config(tmp_path, n_layer=2, **train)


def _history(run: Path) -> dict:
    return json.loads((run / "last" / "trainer.json").read_text())["history"]


def test_cli_takes_the_options(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(tmp_path)
    options = ["--dtype=bfloat16", "--activation_checkpointing=true", "--grad_accum_steps=2"]
    loaded = load_config(cfg, [*options, "--parallel=fsdp"])
    train = check_types(loaded)
    assert (train.dtype, train.activation_checkpointing, train.parallel) == (
        "bfloat16",
        True,
        "fsdp",
    )
    with pytest.raises(SystemExit, match="train.parallel must be one of ddp, fsdp"):
        check_types(load_config(cfg, ["--parallel=zero"]))
    assert main(["train", str(cfg), *options, "--max_steps=3"]) == 0
    saved = json.loads((tmp_path / "run" / "last" / "trainer.json").read_text())
    assert saved["train_config"]["dtype"] == "bfloat16"
    assert saved["train_config"]["activation_checkpointing"] is True
    assert _history(tmp_path / "run")["steps"] == [1, 2, 3]


# ----------------------------------------------------------------------------- FSDP


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MINIGPT_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }


def _run(args: list[str], env: dict[str, str], processes: int = 1) -> str:
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    done = subprocess.run(
        [*launch, "-m", "minigpt", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torchrun_fsdp_matches_one_process(tmp_path):
    """2 FSDP processes x batch 4 (gloo, CPU) follow one process x batch 8: the same
    losses, the same saved weights and AdamW moments, and the same resumed run."""
    cfg = _config(tmp_path, grad_accum_steps=2)
    env = _env(tmp_path)
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    out = _run(["train", str(cfg), "--parallel=fsdp", f"--out_dir={fsdp}"], env, processes=2)
    assert "world size 2 (fsdp)" in out
    _run(["train", str(cfg), "--batch_size=8", f"--out_dir={one}"], env)
    a, b = _history(fsdp), _history(one)
    assert a["steps"] == b["steps"] == list(range(1, 7))
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    assert a["train_loss"][-1] < a["train_loss"][0]
    # rank 0 gathered every shard: whole tensors, equal to the one-process run's
    for file in ("model.safetensors", "optimizer.safetensors"):
        x, y = load_tensors(fsdp / "last" / file), load_tensors(one / "last" / file)
        assert x.keys() == y.keys() and len(x) > 10
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-3, atol=1e-5, msg=f"{file} {k}")
    # resuming shards the checkpoint again: 2 more steps, as in the one-process run
    more = ["--resume", "--max_steps=8"]
    _run(["train", str(cfg), "--parallel=fsdp", f"--out_dir={fsdp}", *more], env, processes=2)
    _run(["train", str(cfg), "--batch_size=8", f"--out_dir={one}", *more], env)
    a, b = _history(fsdp), _history(one)
    assert a["steps"] == b["steps"] == list(range(1, 9))
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)


def test_the_memory_check_knows_about_checkpointing(monkeypatch):
    """``minigpt train`` refuses a run too big for the machine; checkpointing shrinks it."""
    import minigpt.config as run_config

    model = GPTConfig(vocab_size=65, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    B, L, C, T = 16, 12, 768, 1024
    P = run_config.num_parameters(model)
    plain = 16 * P + 4 * (B * T * 16 * L * C + 2 * B * T * 65)
    ckpt = 16 * P + 4 * (B * T * (L + 16) * C + 2 * B * T * 65)
    monkeypatch.setattr(run_config, "_memory_limit", lambda: (plain + ckpt) // 2)
    with pytest.raises(SystemExit, match="would need about"):
        run_config.check_training_memory(model, TrainConfig(batch_size=B))
    run_config.check_training_memory(
        model, TrainConfig(batch_size=B, activation_checkpointing=True)
    )
