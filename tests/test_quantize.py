"""Weight-only int8: the rounding bound, the layer against F.linear, whole models, generation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minigpt.quantize as quantize_module
from minigpt import GPT, GPTConfig
from minigpt.cli import main
from minigpt.generate import generate, stream
from minigpt.quantize import (
    KERNEL_MAX_ROWS,
    Int8Embedding,
    Int8Linear,
    dequantize,
    int8_kernel_available,
    model_size_bytes,
    quantize,
    quantize_per_channel,
)
from minigpt.tokenizer import CharTokenizer
from minigpt.train import validation_loss

needs_kernel = pytest.mark.skipif(
    not int8_kernel_available(), reason="this PyTorch has no torch._weight_int8pack_mm"
)


def random_weight(out: int = 24, inp: int = 48, seed: int = 0) -> torch.Tensor:
    """Rows of very different sizes (1e-4 .. 10) and one row of zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-4, 1, out)[:, None]
    w[3] = 0.0
    return w


# ---------------------------------------------------------------- the number format


def test_quantize_per_channel_rounds_each_row_within_half_a_step():
    w = random_weight()
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (24,)
    assert int(q.abs().max()) <= 127
    # the scale, computed here independently: a row's largest |weight| over 127
    for o in range(w.shape[0]):
        assert scales[o].item() == pytest.approx(max(abs(v) for v in w[o].tolist()) / 127)
    deq = dequantize(q, scales)
    err = (w - deq).abs()
    bound = scales[:, None] / 2
    assert bool((err <= bound * (1 + 1e-6) + 1e-30).all())
    nonzero = [o for o in range(24) if o != 3]
    # the largest weight of each row lands on +-127, and rounding really happens
    assert (q[nonzero].abs().amax(dim=1) == 127).all()
    assert bool((err[nonzero] > 0.3 * bound[nonzero]).any(dim=1).all())
    # a row of zeros is stored exactly, with scale 0
    assert scales[3] == 0 and (q[3] == 0).all() and (deq[3] == 0).all()


def test_weights_on_the_grid_round_trip_exactly():
    g = torch.Generator().manual_seed(1)
    k = torch.randint(-127, 128, (6, 32), generator=g)
    k[:, 0] = torch.tensor([127, -127, 127, -127, 127, -127])  # each row reaches the top
    step = 2.0 ** torch.arange(-12, -6).float()  # powers of two: exact in float32
    w = k.float() * step[:, None]
    q, scales = quantize_per_channel(w)
    assert torch.equal(q, k.to(torch.int8))
    assert torch.equal(scales, step)
    assert torch.equal(dequantize(q, scales), w)


def test_bfloat16_weights_keep_their_dtype_and_the_bound():
    w = random_weight(seed=2).bfloat16()
    q, scales = quantize_per_channel(w)
    assert scales.dtype == torch.bfloat16
    assert dequantize(q, scales).dtype == torch.bfloat16
    # the bound holds for the exact product (a bfloat16 product rounds it once more)
    err = (w.float() - q.float() * scales.float()[:, None]).abs()
    assert bool((err <= scales.float()[:, None] / 2 * (1 + 1e-6) + 1e-30).all())


@pytest.mark.parametrize(
    ("weight", "error", "match"),
    [
        (torch.randn(8), ValueError, "2-D"),
        (torch.randn(2, 3, 4), ValueError, "2-D"),
        (torch.ones(4, 4, dtype=torch.int32), TypeError, "floating point"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN"),
        ([[1.0, 2.0]], TypeError, "tensor"),
    ],
)
def test_quantize_per_channel_errors_are_one_line(weight, error, match):
    with pytest.raises(error, match=match) as e:
        quantize_per_channel(weight)
    assert "\n" not in str(e.value)


def test_dequantize_errors_are_one_line():
    q, scales = quantize_per_channel(random_weight())
    for args, error in [
        ((q.float(), scales), TypeError),
        ((q, scales.to(torch.int32)), TypeError),
        ((q, scales[:-1]), ValueError),
    ]:
        with pytest.raises(error) as e:
            dequantize(*args)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the layer


def test_int8_linear_equals_f_linear_with_the_dequantized_weight():
    torch.manual_seed(0)
    for bias in (True, False):
        linear = nn.Linear(48, 20, bias=bias)
        layer = Int8Linear.from_linear(linear, use_kernel=False)
        x = torch.randn(2, 5, 48)
        w = dequantize(*quantize_per_channel(linear.weight))
        torch.testing.assert_close(layer(x), F.linear(x, w, linear.bias))
        torch.testing.assert_close(layer.weight, w)
        assert (layer.in_features, layer.out_features) == (48, 20)
        # and close to the float layer it came from
        torch.testing.assert_close(layer(x), linear(x), atol=0.02, rtol=0.02)


@needs_kernel
def test_the_kernel_path_agrees_with_the_plain_path(monkeypatch):
    calls = []
    kernel = quantize_module._KERNEL

    def counting(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setattr(quantize_module, "_KERNEL", counting)
    torch.manual_seed(0)
    linear = nn.Linear(64, 37)
    fast = Int8Linear.from_linear(linear, use_kernel=True)
    plain = Int8Linear.from_linear(linear, use_kernel=False)
    with torch.no_grad():
        for shape in [(1, 64), (1, 1, 64), (3, 5, 64)]:  # at most KERNEL_MAX_ROWS rows
            x = torch.randn(shape)
            y = fast(x)
            assert y.shape == (*shape[:-1], 37) and y.dtype == torch.float32
            # bfloat16 activations: about 3 significant digits
            torch.testing.assert_close(y, plain(x), atol=2e-2, rtol=2e-2)
            assert not torch.equal(y, plain(x))  # it really is another computation
        assert len(calls) == 3
        x = torch.randn(KERNEL_MAX_ROWS + 1, 64)  # many rows: the plain path is faster
        torch.testing.assert_close(fast(x), plain(x))
        assert len(calls) == 3
        y = fast(torch.randn(2, 64).bfloat16())  # a bfloat16 model stays in bfloat16
        assert y.dtype == torch.bfloat16 and len(calls) == 4
        x = torch.randn(2, 64)[:, None, :].expand(2, 3, 64)  # a strided view
        torch.testing.assert_close(fast(x), plain(x), atol=2e-2, rtol=2e-2)
    # with a gradient to compute, the plain (differentiable) path runs
    x = torch.randn(2, 64, requires_grad=True)
    fast(x).sum().backward()
    torch.testing.assert_close(x.grad, fast.weight.sum(dim=0).expand(2, 64))
    assert len(calls) == 5


def test_int8_linear_errors_are_one_line():
    q, scales = quantize_per_channel(torch.randn(8, 65))
    cases = [
        (lambda: Int8Linear(q, scales, torch.zeros(3)), ValueError),
        (lambda: Int8Linear(q, scales, use_kernel="yes"), TypeError),
        (lambda: Int8Linear.from_linear(nn.Conv1d(4, 4, 1)), TypeError),
    ]
    if int8_kernel_available():
        cases.append((lambda: Int8Linear(q, scales, use_kernel=True), ValueError))  # 65 % 16
    for make, error in cases:
        with pytest.raises(error) as e:
            make()
        assert "\n" not in str(e.value)


def test_int8_embedding_looks_up_dequantized_rows():
    w = random_weight(10, 16)
    q, scales = quantize_per_channel(w)
    emb = Int8Embedding(q, scales)
    idx = torch.tensor([[0, 3, 9], [9, 9, 1]])
    torch.testing.assert_close(emb(idx), F.embedding(idx, dequantize(q, scales)))


# ---------------------------------------------------------------- whole models


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=64)
    return GPT(GPTConfig(**{**config, **overrides}))


def test_quantize_returns_a_copy_and_leaves_the_model_alone():
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize(model)
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if "c_" in n)
    assert model.lm_head.weight is model.wte.weight
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the copy: every linear layer is int8, and the tied head and embedding share one matrix
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in qmodel.modules())
    assert isinstance(qmodel.lm_head, Int8Linear) and isinstance(qmodel.wte, Int8Embedding)
    assert qmodel.lm_head.q is qmodel.wte.q and qmodel.lm_head.scales is qmodel.wte.scales
    # skip keeps the named layers (and the embedding tied to the head) in float32
    kept = quantize(model, skip=("lm_head", "attn.c_proj"))
    assert isinstance(kept.lm_head, nn.Linear) and kept.lm_head.weight is kept.wte.weight
    assert isinstance(kept.h[0].attn.c_proj, nn.Linear)
    assert isinstance(kept.h[0].mlp.c_proj, Int8Linear)
    # an untied head is quantized on its own; its embedding stays a float lookup
    untied = quantize(tiny_gpt(tie_weights=False))
    assert isinstance(untied.lm_head, Int8Linear) and isinstance(untied.wte, nn.Embedding)


def test_model_size_bytes_counts_parameters_and_buffers_once():
    layer = Int8Linear(*quantize_per_channel(torch.randn(8, 32)), torch.zeros(8))
    # int8 weights + float32 scales + float32 bias + the kernel's bfloat16 unit scales
    assert model_size_bytes(layer) == 8 * 32 + 8 * 4 + 8 * 4 + 8 * 2
    model = tiny_gpt(positions="rope")  # rotary tables are buffers
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffers > 0
    assert model_size_bytes(model) == 4 * model.num_parameters() + buffers  # tied once
    qmodel = quantize(model)
    assert model_size_bytes(qmodel) < 0.4 * model_size_bytes(model)
    # the embedding adds nothing to the head: they share one int8 matrix
    pair = nn.ModuleList([qmodel.lm_head, qmodel.wte])
    assert model_size_bytes(pair) == model_size_bytes(qmodel.lm_head)


def test_generation_never_dequantizes_a_whole_matrix(monkeypatch):
    """generate and stream read only the model's device and dtype, from a float weight:
    the int8 layers' ``weight`` (a new float matrix at each access) stays untouched."""
    model = quantize(tiny_gpt())

    def refuse(self):
        raise RuntimeError("dequantized a whole matrix")

    monkeypatch.setattr(Int8Linear, "weight", property(refuse))
    monkeypatch.setattr(Int8Embedding, "weight", property(refuse))
    with pytest.raises(RuntimeError):
        model.lm_head.weight  # noqa: B018 -- the trap works
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(model, prompt, 5, temperature=0)
    assert list(stream(model, [1, 2, 3], 5, temperature=0)) == out[0, 3:].tolist()


def test_quantize_errors_are_one_line():
    model = tiny_gpt()
    cases = [
        (lambda: quantize("model"), TypeError, "nn.Module"),
        (lambda: quantize(model, skip="lm_haed"), ValueError, "c_attn"),
        (lambda: quantize(quantize(model)), ValueError, "quantized already"),
    ]
    for make, error, match in cases:
        with pytest.raises(error, match=match) as e:
            make()
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- a trained model

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained on a repetitive text until its predictions are confident."""
    tokenizer = CharTokenizer.fit(TEXT)
    ids = torch.tensor(tokenizer.encode(TEXT))
    model = tiny_gpt(vocab_size=tokenizer.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g)
        x = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        y = torch.stack([ids[s + 1 : s + 65] for s in starts.tolist()])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tokenizer, ids


def test_int8_greedy_generation_follows_the_float_model(trained):
    model, tokenizer, ids = trained
    base = validation_loss(model, ids[:1025])
    assert base < 0.5  # confident predictions, so greedy tokens are well defined
    qmodel = quantize(model)
    prompt = torch.tensor([tokenizer.encode("the quick")])
    fp32 = generate(model, prompt, 64, temperature=0)[0, prompt.shape[1] :]
    int8 = generate(qmodel, prompt, 64, temperature=0)[0, prompt.shape[1] :]
    same = (fp32 == int8).tolist()
    first_divergence = same.index(False) if False in same else len(same)
    assert sum(same) / 64 >= 0.9 and first_divergence >= 32, (sum(same), first_divergence)
    # the cache-free path and stream run on the int8 model unchanged
    uncached = generate(qmodel, prompt, 64, temperature=0, use_cache=False)[0, prompt.shape[1] :]
    assert (uncached == int8).float().mean() >= 0.9
    assert list(stream(qmodel, prompt[0], 64, temperature=0)) == int8.tolist()
    # validation loss moves by well under 1%
    loss = validation_loss(qmodel, ids[:1025])
    assert abs(loss - base) / base < 0.01, (base, loss)


def test_cli_sample_and_eval_with_int8(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    config = {
        "model": {"preset": None, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "train": {"max_steps": 2, "batch_size": 4, "eval_interval": 2, "eval_iters": 1},
        "data": {"text_file": str(tmp_path / "text.txt"), "tokenizer": "char"},
    }
    config["train"].update(warmup_steps=1, out_dir=str(tmp_path / "run"), progress=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["train", str(tmp_path / "config.json")]) == 0
    quantized = []

    def spy(model, *args, **kwargs):
        quantized.append(model)
        return quantize(model, *args, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize", spy)
    capsys.readouterr()
    args = ["sample", str(tmp_path / "run"), "--prompt", "the", "--max-new-tokens", "10"]
    assert main(args) == 0 and not quantized
    assert main([*args, "--int8"]) == 0 and len(quantized) == 1
    assert isinstance(quantized[0], GPT)
    assert [line[:3] for line in capsys.readouterr().out.splitlines()] == ["the", "the"]
    assert main(["eval", str(tmp_path / "run"), "--iters", "1", "--int8"]) == 0
    assert len(quantized) == 2 and "val loss" in capsys.readouterr().out


@pytest.mark.parametrize("tie", [True, False])
def test_an_int8_copy_counts_its_weights_and_refuses_to_be_saved(tie, tmp_path):
    model = tiny_gpt(tie_weights=tie)
    qmodel = quantize(model)
    # by hand: each quantized matrix keeps its numbers (int8) plus one scale per row
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    scales = sum(m.out_features for m in linears)
    assert qmodel.num_parameters() == model.num_parameters() + scales
    embedding_scales = model.config.vocab_size if tie else 0  # a tied table shares the head's
    expected = model.num_parameters(exclude_embeddings=True) + scales - embedding_scales
    assert qmodel.num_parameters(exclude_embeddings=True) == expected > 0
    with pytest.raises(TypeError, match="save the float model"):
        qmodel.save(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
    model.save(tmp_path / "fp32")  # the float model saves as before
