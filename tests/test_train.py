"""Training: schedule, clipping, AdamW, exact resume, crashes, corrupt checkpoints, NaN, DDP."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt.checkpoint import CheckpointError, load_optimizer, save_optimizer
from minigpt.data import train_val_split
from minigpt.model import GPT, GPTConfig, _store_column_major
from minigpt.optim import adamw_update, clip_grad_norm, configure_optimizer, lr_at
from minigpt.tokens import TokenDataset, cached_tokens, encode_to_file, load_tokens
from minigpt.train import TrainConfig, Trainer, TrainingDivergedError, train

REPO = Path(__file__).resolve().parents[1]
V, T = 32, 8


def _tokens(n: int = 3000) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    # a learnable stream: mostly "next = previous + 1", with noise
    x = torch.randint(0, V, (n,), generator=g)
    x[1::2] = (x[0::2][: len(x[1::2])] + 1) % V
    return x.numpy().astype(np.uint16)


def _trainer(out_dir=None, *, steps=8, dropout=0.1, seed=0, **overrides) -> Trainer:
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16, dropout=dropout)
    )
    toks = _tokens()
    train_part, val_part = train_val_split(toks, 0.1)
    cfg = dict(
        max_steps=steps,
        batch_size=4,
        grad_accum_steps=2,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=3,
        eval_iters=2,
        checkpoint_interval=2,
        out_dir=None if out_dir is None else str(out_dir),
        progress=False,
        seed=seed,
    )
    cfg.update(overrides)
    return Trainer(
        model, TokenDataset(train_part, T), TokenDataset(val_part, T), TrainConfig(**cfg)
    )


# ----------------------------------------------------------------------------- data


def test_token_file_roundtrip_and_cache(tmp_path):
    text = "hello world\n" * 50
    encode = lambda s: [ord(c) % 40 for c in s]
    f = encode_to_file(
        text, encode, tmp_path / "t.npy", vocab_size=40, chunk_chars=7, progress=False
    )
    ids = load_tokens(f)
    assert ids.dtype == np.uint16 and ids.tolist() == encode(text)
    a = cached_tokens(text, encode, vocab_size=40, key="mod40", directory=tmp_path, progress=False)
    assert a.tolist() == encode(text)
    assert len(list((tmp_path / "tokens").glob("mod40-*.npy"))) == 1
    with pytest.raises(ValueError, match="outside"):
        encode_to_file(text, encode, tmp_path / "u.npy", vocab_size=10, progress=False)


def test_batches_are_shifted_windows_and_deterministic():
    toks = np.arange(100, dtype=np.uint16)
    data = TokenDataset(toks, 8)
    x, y = data.batch(5, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.long
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    x2, _ = data.batch(5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        TokenDataset(toks[:5], 8)


# ----------------------------------------------------------------------------- pieces


def test_schedule_values():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_clipping_equals_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn_like(pa) * 3
        pb.grad = pa.grad.clone()
    for max_norm in (0.5, 1e3):
        na = clip_grad_norm(a, max_norm)
        nb = torch.nn.utils.clip_grad_norm_(b, max_norm)
        torch.testing.assert_close(na, nb)
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa.grad, pb.grad)


def test_from_scratch_adamw_equals_torch():
    torch.manual_seed(0)
    p = torch.randn(4, 3)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    mine, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 6):
        grad = torch.randn(4, 3)
        ref.grad = grad.clone()
        opt.step()
        adamw_update(mine, grad, m, v, step, lr=0.01, beta1=0.9, beta2=0.95, weight_decay=0.1)
    torch.testing.assert_close(mine, ref.detach())


def test_weight_decay_groups():
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16))
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, fused=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in no_decay["params"]
    )
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_parameters()


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss():
    trainer = _trainer(steps=30, dropout=0.0, eval_interval=10, lr=2e-2)
    history = trainer.train()
    assert len(history.train_loss) == 30 and history.eval_steps == [10, 20, 30]
    assert history.val_loss[-1] < math.log(V) - 0.3


def _interrupt_at(step):
    def on_step(trainer):
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C

    return on_step


def test_ctrl_c_saves_and_resume_is_exact(tmp_path):
    full = _trainer(tmp_path / "full").train()

    stopped = _trainer(tmp_path / "run")
    stopped.on_step = _interrupt_at(5)
    with pytest.raises(KeyboardInterrupt, match="step 5"):
        stopped.train()
    state = json.loads((tmp_path / "run" / "last" / "trainer.json").read_text())
    assert state["step"] == 5

    resumed = Trainer.from_checkpoint(tmp_path / "run", stopped.train_data, stopped.val_data)
    assert resumed.step == 5
    history = resumed.train()
    assert history.train_loss == full.train_loss  # bit for bit, dropout included
    assert history.val_loss == full.val_loss
    assert (tmp_path / "run" / "best" / "trainer.json").is_file()


@pytest.mark.parametrize("fused", [False, True])
def test_training_gives_the_same_bits_in_either_weight_order(fused):
    """Column-major weights (minigpt.model) train bit for bit like row-major ones: the
    products and AdamW agree, and clipping sums each gradient's norm in row-major order
    (a sum in memory order rounds differently, and the models drift apart)."""
    runs = []
    for order in ("column-major", "row-major"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset("cpu-small", vocab_size=V))
        if order == "row-major":
            _store_column_major(model, column_major=False)
        linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        # the two runs really differ in memory order (else the equality below says nothing)
        assert linears and all(w.is_contiguous() == (order == "row-major") for w in linears)
        opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, fused=fused)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            x = torch.randint(0, V, (8, 64), generator=g)
            opt.zero_grad(set_to_none=True)
            model(x, x.roll(1, 1))[1].backward()
            clip_grad_norm(model.parameters(), 0.5)
            opt.step()
        runs.append(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_reloaded_moments_have_their_weights_memory_layout(tmp_path):
    """GPT's linear weights are column-major; safetensors stores row-major. The fused
    AdamW kernel reads weight, gradient and moments as flat memory, so a reloaded
    moment in the other order would update the wrong numbers without an error."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=V))
    optimizer = configure_optimizer(model, lr=1e-2, weight_decay=0.1, fused=True)
    idx = torch.randint(0, V, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    groups = save_optimizer(optimizer, tmp_path)
    again = GPT(model.config)
    again.load_state_dict(model.state_dict())
    reloaded = configure_optimizer(again, lr=1e-2, weight_decay=0.1, fused=True)
    load_optimizer(reloaded, tmp_path, groups)
    for p in again.parameters():
        for value in reloaded.state[p].values():
            if value.shape == p.shape:
                assert value.stride() == p.stride()
    for m, opt in [(model, optimizer), (again, reloaded)]:
        opt.zero_grad()
        m(idx, idx)[1].backward()
        opt.step()
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_function_resumes(tmp_path):
    t = _trainer(tmp_path)
    t.on_step = _interrupt_at(4)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    model = GPT(t.model.config)
    history = train(model, t.train_data, t.val_data, t.config, resume=True)
    assert history.steps[0] == 1 and history.steps[-1] == 8


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(trainer):
        if trainer.step == 4:
            with torch.no_grad():
                trainer.model.ln_f.weight.fill_(float("nan"))

    t = _trainer(tmp_path)
    t.on_step = poison
    with pytest.raises(TrainingDivergedError, match=r"nan at step 5.*last good checkpoint.*step 4"):
        t.train()
    resumed = Trainer.from_checkpoint(tmp_path, t.train_data, t.val_data)
    assert resumed.step == 4
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_corrupt_checkpoints_name_the_file(tmp_path):
    t = _trainer(tmp_path, steps=2)
    t.train()
    last = tmp_path / "last"
    data = (t.train_data, t.val_data)
    # truncated weights
    weights = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Trainer.from_checkpoint(tmp_path, *data)
    (last / "model.safetensors").write_bytes(weights)
    # garbage optimizer state
    (last / "optimizer.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        Trainer.from_checkpoint(tmp_path, *data)
    # truncated JSON
    text = (last / "trainer.json").read_text()
    (last / "trainer.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="trainer.json"):
        Trainer.from_checkpoint(tmp_path, *data)
    with pytest.raises(CheckpointError, match="not found"):
        Trainer.from_checkpoint(tmp_path / "nowhere", *data)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    t = _trainer(tmp_path, steps=2)
    t.train()
    other = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16))
    t2 = Trainer(other, t.train_data, t.val_data, t.config)
    with pytest.raises(CheckpointError, match="different model"):
        t2.load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- subprocesses

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train import _trainer
    from minigpt.train import Trainer
    out, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "fresh":
        t = _trainer(out, steps=steps, checkpoint_interval=1, eval_interval=4)
        if len(sys.argv) > 4:  # slow down so the parent can kill us mid-run
            import time
            t.on_step = lambda tr: time.sleep(0.3)
    else:
        t0 = _trainer(None, steps=steps, checkpoint_interval=1, eval_interval=4)
        t = Trainer.from_checkpoint(out, t0.train_data, t0.val_data)
    print(json.dumps({{"start": t.step, "history": t.train().to_dict()}}))
    """
)


def _run(tmp_path, *args) -> subprocess.Popen:
    script = tmp_path / "run_train.py"
    script.write_text(_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 12
    reference = _run(tmp_path, tmp_path / "ref", "fresh", steps)
    victim = _run(tmp_path, tmp_path / "run", "fresh", steps, "slow")
    marker = tmp_path / "run" / "last" / "trainer.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if marker.is_file() and json.loads(marker.read_text())["step"] >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read()
    ref_out, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err
    resumed = _run(tmp_path, tmp_path / "run", "resume", steps)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    ref = json.loads(ref_out)["history"]
    got = json.loads(out)
    start = got["start"]
    assert 3 <= start < steps
    assert got["history"]["train_loss"] == ref["train_loss"]
    assert got["history"]["val_loss"] == ref["val_loss"]


# ----------------------------------------------------------------------------- pretrained helper


def test_shakespeare_char_model_trains_once_then_loads(tmp_path, monkeypatch, data_dir):
    import minigpt.pretrained as mt

    model, tok = mt.shakespeare_char_model(tmp_path, steps=2)
    assert isinstance(model, GPT) and not model.training
    assert tok.vocab_size == model.config.vocab_size == 65
    assert tok.decode(tok.encode("ROMEO:")) == "ROMEO:"
    (folder,) = [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert {"model.safetensors", "config.json", "tokenizer.json", "history.json"} <= {
        p.name for p in folder.iterdir()
    }

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been loaded")

    monkeypatch.setattr(mt, "_train", no_training)
    again, _ = mt.shakespeare_char_model(tmp_path, steps=2)
    for a, b in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)
    history, full_val = mt.shakespeare_char_history(tmp_path, steps=2)
    assert history.steps == [1, 2] and len(history.val_loss) == 2
    assert math.isfinite(full_val) and 3.0 < full_val < 5.0  # 2 steps: about ln(65)
