"""minigpt.linear: the oneDNN CPU path must compute what F.linear computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt import linear as lin
from minigpt.linear import Linear, linear, linear_backend, set_linear_backend

needs_onednn = pytest.mark.skipif(lin._onednn_op() is None, reason="no oneDNN in this build")


@pytest.fixture
def backend():
    """Set a backend for one test and restore the automatic choice afterwards."""
    yield set_linear_backend
    set_linear_backend("auto")


@pytest.fixture
def calls(monkeypatch):
    """Count the products that went to oneDNN."""
    n = {"mm": 0}
    real = lin._mm

    def counting(*args):
        n["mm"] += 1
        return real(*args)

    monkeypatch.setattr(lin, "_mm", counting)
    return n


def _grads(fn, x, w, b, g):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    fn(x, w, b).backward(g)
    return [None if t is None or t.grad is None else t.grad.clone() for t in (x, w, b)]


@needs_onednn
@pytest.mark.parametrize("mode", ["onednn", "auto"])
@pytest.mark.parametrize(
    "shape", [(64, 96), (4, 33, 96), (2, 3, 11, 96)], ids=["2d", "3d", "4d-ragged"]
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_forward_and_backward(backend, calls, mode, shape, bias):
    backend(mode)
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
    if linear_backend() != "torch":
        # the forward, and in backward the input grad (and the weight grad when
        # linear_backend() is "onednn") went to oneDNN
        assert calls["mm"] == (4 if linear_backend() == "onednn" else 3)


@needs_onednn
def test_close_to_float64_reference(backend):
    backend("onednn")
    torch.manual_seed(1)
    x, w, b = torch.randn(128, 256), torch.randn(384, 256), torch.randn(384)
    exact = F.linear(x.double(), w.double(), b.double())
    err = (linear(x, w, b).double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-6


@needs_onednn
def test_non_contiguous_inputs(backend):
    backend("onednn")
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
def test_frozen_parts_get_no_gradient(backend, trainable):
    backend("onednn")
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
def test_deterministic(backend):
    backend("onednn")
    torch.manual_seed(4)
    x, w = torch.randn(300, 128), torch.randn(256, 128)
    assert torch.equal(linear(x, w), linear(x, w))


@needs_onednn
def test_small_and_other_products_take_f_linear(backend, calls):
    backend("onednn")
    w = torch.randn(512, 512)
    linear(torch.randn(1, 512), w)  # one row: generation's row-block mode handles these
    linear(torch.randn(15, 512), w)
    linear(torch.randn(64, 8), torch.randn(4, 8))  # tiny
    linear(torch.randn(64, 512, dtype=torch.float64), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(torch.randn(64, 512), w)
    x = torch.randn(64, 512)
    torch.func.grad(lambda v: linear(v, w).sum())(x)  # functorch transforms
    assert calls["mm"] == 0
    linear(torch.randn(16, 512), w)
    assert calls["mm"] == 1


def test_torch_backend_is_f_linear(backend, calls):
    backend("torch")
    assert linear_backend() == "torch"
    x, w = torch.randn(64, 256), torch.randn(256, 256)
    assert torch.equal(linear(x, w), F.linear(x, w))
    assert calls["mm"] == 0


def test_environment_variable(backend, monkeypatch):
    monkeypatch.setenv("MINIGPT_LINEAR", "torch")
    backend("auto")
    assert linear_backend() == "torch"
    monkeypatch.setenv("MINIGPT_LINEAR", "fastest")
    backend("auto")
    with pytest.raises(ValueError, match="MINIGPT_LINEAR must be one of"):
        linear_backend()


def test_bad_backend_name():
    with pytest.raises(ValueError, match="must be one of"):
        set_linear_backend("mkl")


def test_onednn_backend_needs_the_kernel(backend, monkeypatch):
    monkeypatch.setattr(lin, "_onednn_op", lambda: None)
    with pytest.raises(RuntimeError, match="no oneDNN linear kernel"):
        backend("onednn")
    backend("auto")
    assert linear_backend() == "torch"  # auto falls back quietly


def test_shape_mismatch_is_f_linears_error():
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        linear(torch.randn(64, 100), torch.randn(512, 99))


def test_linear_module_is_an_nn_linear():
    torch.manual_seed(5)
    layer = Linear(96, 200)
    plain = nn.Linear(96, 200)
    assert isinstance(layer, nn.Linear)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 50, 96)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-4, rtol=1e-5)
