"""minigpt.cpu: the opt-in CPU fast paths compute what the plain layers compute,
and leave the model as they found it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt import GPT, GPTConfig, cpu
from minigpt.cpu import _RowBlockLinear, accelerated, decoding, fastpath_enabled, linear

needs_onednn = pytest.mark.skipif(cpu._onednn_op() is None, reason="no oneDNN in this build")


@pytest.fixture
def calls(monkeypatch):
    """Count the products that went to oneDNN."""
    n = {"mm": 0}
    real = cpu._mm

    def counting(*args):
        n["mm"] += 1
        return real(*args)

    monkeypatch.setattr(cpu, "_mm", counting)
    return n


def _grads(fn, x, w, b, g):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    fn(x, w, b).backward(g)
    return [None if t is None or t.grad is None else t.grad.clone() for t in (x, w, b)]


def small_gpt(preset: str = "tiny") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset(preset, vocab_size=300, n_embd=128))


# ---------------------------------------------------------------- the switch


def test_fastpath_environment_variable(monkeypatch):
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    assert fastpath_enabled()  # on by default
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(cpu.ENV_VAR, off)
        assert not fastpath_enabled()
    monkeypatch.setenv(cpu.ENV_VAR, "1")
    assert fastpath_enabled()
    monkeypatch.setenv(cpu.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="MINIGPT_CPU_FASTPATH must be 1 .* or 0"):
        fastpath_enabled()


# ---------------------------------------------------------------- oneDNN products


@needs_onednn
@pytest.mark.parametrize(
    "shape", [(64, 96), (4, 33, 96), (2, 3, 11, 96)], ids=["2d", "3d", "4d-ragged"]
)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_forward_and_backward(calls, shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(200, 96, requires_grad=True)
    b = torch.randn(200, requires_grad=True) if bias else None
    y = linear(x, w, b)
    assert y.shape == (*shape[:-1], 200)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    g = torch.randn_like(y)
    ours, ref = _grads(linear, x, w, b, g), _grads(F.linear, x, w, b, g)
    for got, expected in zip(ours, ref, strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert calls["mm"] == 1 + 3  # y; then forward, input grad and weight grad in _grads


@needs_onednn
def test_linear_close_to_float64_reference():
    torch.manual_seed(1)
    x, w, b = torch.randn(128, 256), torch.randn(384, 256), torch.randn(384)
    exact = F.linear(x.double(), w.double(), b.double())
    err = (linear(x, w, b).double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-6


@needs_onednn
def test_linear_non_contiguous_inputs():
    torch.manual_seed(2)
    x = torch.randn(96, 40, requires_grad=True)
    w = torch.randn(96, 128, requires_grad=True)  # used transposed: (128, 96) strided
    xt = x.t()  # (40, 96), not contiguous
    torch.testing.assert_close(linear(xt, w.t()), F.linear(xt, w.t()), atol=1e-4, rtol=1e-5)
    g = torch.randn(40, 128)
    linear(xt, w.t()).backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.linear(xt, w.t()).backward(g)
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-4, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("trainable", ["x", "w", "b", "none"])
def test_linear_frozen_parts_get_no_gradient(trainable):
    torch.manual_seed(3)
    x = torch.randn(64, 96, requires_grad=trainable == "x")
    w = torch.randn(128, 96, requires_grad=trainable == "w")
    b = torch.randn(128, requires_grad=trainable == "b")
    y = linear(x, w, b)
    if trainable == "none":
        assert not y.requires_grad
        return
    y.sum().backward()
    for name, t in (("x", x), ("w", w), ("b", b)):
        assert (t.grad is not None) == (name == trainable)
    ref = {
        "x": w.sum(0).expand(64, 96),
        "w": x.sum(0).expand(128, 96),
        "b": torch.full((128,), 64.0),
    }
    got = {"x": x, "w": w, "b": b}[trainable].grad
    torch.testing.assert_close(got, ref[trainable], atol=1e-4, rtol=1e-5)


@needs_onednn
def test_linear_deterministic():
    torch.manual_seed(4)
    x, w = torch.randn(300, 128), torch.randn(256, 128)
    assert torch.equal(linear(x, w), linear(x, w))


@needs_onednn
def test_small_and_other_products_fall_back_to_f_linear(calls):
    w = torch.randn(512, 512)
    linear(torch.randn(1, 512), w)  # one row: decoding's row-block mode handles these
    linear(torch.randn(15, 512), w)
    linear(torch.randn(64, 8), torch.randn(4, 8))  # tiny
    linear(torch.randn(64, 512, dtype=torch.float64), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(torch.randn(64, 512), w)
    x = torch.randn(64, 512)
    torch.func.grad(lambda v: linear(v, w).sum())(x)  # functorch transforms
    linear(torch.randn(64, 512, device="meta"), w.to("meta"))  # not on the CPU
    assert calls["mm"] == 0
    linear(torch.randn(16, 512), w)
    assert calls["mm"] == 1


def test_without_onednn_everything_is_f_linear(calls, monkeypatch):
    monkeypatch.setattr(cpu, "_onednn_op", lambda: None)
    x, w = torch.randn(64, 256), torch.randn(256, 256)
    assert torch.equal(linear(x, w), F.linear(x, w))
    model = small_gpt()
    with accelerated(model, enabled=True):
        assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert calls["mm"] == 0


def test_shape_mismatch_is_f_linears_error():
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        linear(torch.randn(64, 100), torch.randn(512, 99))


# ---------------------------------------------------------------- accelerated(model)


def _linears(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, nn.Linear)]


@needs_onednn
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_accelerated_model_equals_the_plain_model(calls, preset):
    model, plain = small_gpt(preset), small_gpt(preset)
    idx = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    logits, loss = plain(idx, idx)
    loss.backward()
    with accelerated(model, enabled=True) as same:
        assert same is model
        assert set(_linears(model)) == {cpu._AcceleratedLinear}
        fast_logits, fast_loss = model(idx, idx)
        fast_loss.backward()
    assert calls["mm"] > 0  # the products went to oneDNN
    torch.testing.assert_close(fast_logits, logits, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@needs_onednn
def test_accelerated_restores_plain_layers_and_keeps_the_state_dict(tmp_path):
    model = small_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    with accelerated(model, enabled=True):
        assert model.state_dict().keys() == before.keys()
        model.save(tmp_path / "inside")
    assert set(_linears(model)) == {nn.Linear}
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.save(tmp_path / "outside")
    for name in ("model.safetensors", "config.json"):
        inside = (tmp_path / "inside" / name).read_bytes()
        assert inside == (tmp_path / "outside" / name).read_bytes()


@needs_onednn
def test_accelerated_restores_on_exception():
    model = small_gpt()
    with pytest.raises(RuntimeError, match="boom"), accelerated(model, enabled=True):
        assert set(_linears(model)) == {cpu._AcceleratedLinear}
        raise RuntimeError("boom")
    assert set(_linears(model)) == {nn.Linear}


@needs_onednn
def test_accelerated_nested_and_other_linear_subclasses():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), MyLinear(8, 8))
    with accelerated(model, enabled=True):
        with accelerated(model, enabled=True):  # the inner one finds nothing to switch
            assert _linears(model) == [cpu._AcceleratedLinear, MyLinear]
        assert _linears(model) == [cpu._AcceleratedLinear, MyLinear]  # still the outer's
    assert _linears(model) == [nn.Linear, MyLinear]  # a user's subclass is left alone


def test_accelerated_off_by_argument_or_environment(monkeypatch):
    model = small_gpt()
    with accelerated(model, enabled=False):
        assert set(_linears(model)) == {nn.Linear}
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    with accelerated(model):
        assert set(_linears(model)) == {nn.Linear}


def test_accelerated_needs_a_module():
    with pytest.raises(TypeError, match="nn.Module"), accelerated("gpt2"):
        pass


# ---------------------------------------------------------------- decoding()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "shape", [(4096, 192), (4099, 130), (50, 64)], ids=["even", "ragged", "small"]
)
def test_row_block_linear_equals_f_linear(shape, bias):
    """One-row products on big weights run as a batched matmul over row blocks."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    b = torch.randn(shape[0], generator=gen) if bias else None
    x = torch.randn(1, 1, shape[1], generator=gen)
    mode = _RowBlockLinear(blocks=8, min_size=1000)
    with torch.inference_mode():
        expected = F.linear(x, weight, b)
        with mode:
            got = F.linear(x, weight, b)
            got_module = torch.nn.functional.linear(x[0], weight, bias=b)
            two_rows = F.linear(x.expand(2, 1, -1), weight, b)  # passes through
    assert got.shape == expected.shape == (1, 1, shape[0])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_module, expected[0])
    torch.testing.assert_close(two_rows, expected.expand(2, 1, -1))


def _row_block_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = _RowBlockLinear._linear
    monkeypatch.setattr(
        _RowBlockLinear, "_linear", lambda self, *a: calls.append(1) or real(self, *a)
    )
    return calls


@pytest.mark.parametrize(
    ("threads", "enabled", "env", "used"),
    [(2, None, None, True), (2, False, None, False), (2, None, "0", False), (1, True, None, False)],
)
def test_decoding_switch(monkeypatch, threads, enabled, env, used):
    from torch.overrides import _get_current_function_mode_stack

    calls = _row_block_calls(monkeypatch)
    if env is not None:
        monkeypatch.setenv(cpu.ENV_VAR, env)
    else:
        monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    w, x = torch.randn(1024, 1024), torch.randn(1, 1024)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)  # nothing to share out on one thread
    try:
        with decoding(enabled):
            torch.testing.assert_close(F.linear(x, w), x @ w.T)
    finally:
        torch.set_num_threads(n)
    assert bool(calls) == used
    assert _get_current_function_mode_stack() == []


def test_decoding_mode_ends_on_exception():
    from torch.overrides import _get_current_function_mode_stack

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"), decoding(True):
            assert len(_get_current_function_mode_stack()) == 1
            raise RuntimeError("boom")
    finally:
        torch.set_num_threads(n)
    assert _get_current_function_mode_stack() == []
