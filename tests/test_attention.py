"""Attention: the reference formula, CausalSelfAttention, GQA, RoPE and the KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minigpt.attention import (
    CausalSelfAttention,
    KVCache,
    causal_mask,
    scaled_dot_product_attention,
)
from minigpt.embeddings import RotaryEmbedding


def _naive_attention(q, k, v, mask=None):
    """Loop over every query and key with Python floats: the definition, nothing vectorised."""
    *lead, Tq, d = q.shape
    Tk, dv = v.shape[-2:]
    qf, kf, vf = q.reshape(-1, Tq, d), k.reshape(-1, Tk, d), v.reshape(-1, Tk, dv)
    mf = None if mask is None else mask.expand(*lead, Tq, Tk).reshape(-1, Tq, Tk)
    out = torch.zeros(qf.shape[0], Tq, dv, dtype=torch.float64)
    for b in range(qf.shape[0]):
        for i in range(Tq):
            keys = [j for j in range(Tk) if mf is None or bool(mf[b, i, j])]
            scores = [float(qf[b, i] @ kf[b, j]) / math.sqrt(d) for j in keys]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for w, j in zip(weights, keys):
                out[b, i] += w / total * vf[b, j]
    return out.reshape(*lead, Tq, dv)


# ------------------------------------------------------------------ reference function


@settings(max_examples=20, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    tq=st.integers(1, 6),
    tk=st.integers(1, 6),
    d=st.integers(1, 8),
    dv=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_reference_attention_equals_the_definition(lead, tq, tk, d, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, tq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(*lead, tk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(*lead, tk, dv, generator=gen, dtype=torch.float64)
    out = scaled_dot_product_attention(q, k, v)
    assert out.shape == (*lead, tq, dv)
    torch.testing.assert_close(out, _naive_attention(q, k, v))


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    t=st.integers(1, 7),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_reference_equals_torch_sdpa_with_causal_mask(b, h, t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, b, h, t, d, generator=gen, dtype=torch.float64)
    ours = scaled_dot_product_attention(q, k, v, causal_mask(t))
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(ours, _naive_attention(q, k, v, causal_mask(t)))


def test_masks_for_3d_and_4d_inputs():
    """A (T, T) mask broadcasts over (B, T, d) and (B, H, T, d); per-batch masks work too."""
    torch.manual_seed(0)
    q3, k3, v3 = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    q4, k4, v4 = torch.randn(3, 2, 3, 5, 4, dtype=torch.float64)
    mask = causal_mask(5)
    for q, k, v in ((q3, k3, v3), (q4, k4, v4)):
        torch.testing.assert_close(
            scaled_dot_product_attention(q, k, v, mask), _naive_attention(q, k, v, mask)
        )
    # a padding-style mask per batch element, (B, 1, 1, Tk) for 4-D and (B, 1, Tk) for 3-D
    keep = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    torch.testing.assert_close(
        scaled_dot_product_attention(q4, k4, v4, keep[:, None, None, :]),
        _naive_attention(q4, k4, v4, keep[:, None, None, :]),
    )
    out3 = scaled_dot_product_attention(q3, k3, v3, keep[:, None, :])
    torch.testing.assert_close(out3[0], scaled_dot_product_attention(q3[0], k3[0, :3], v3[0, :3]))


def test_reference_attention_errors():
    q = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="bool tensor"):
        scaled_dot_product_attention(q, q, q, torch.ones(3, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, q, q, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same last dim"):
        scaled_dot_product_attention(q, torch.randn(2, 3, 5), q)
    with pytest.raises(ValueError, match="same length"):
        scaled_dot_product_attention(q, q, torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., T, d\)"):
        scaled_dot_product_attention(torch.randn(4), q, q)


def test_causal_mask_shapes():
    assert torch.equal(causal_mask(3), torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    # two new queries at positions 3 and 4 of a 5-long sequence
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)
    with pytest.raises(ValueError, match="k_len >= q_len"):
        causal_mask(4, 3)


# ------------------------------------------------------------------ CausalSelfAttention


def _attention_by_hand(attn: CausalSelfAttention, x: torch.Tensor, rope=None) -> torch.Tensor:
    """The module's computation with the reference function: project, split, (rotate), repeat, attend, merge."""
    B, T, C = x.shape
    H, Hkv, hs = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.c_attn(x).split([H * hs, Hkv * hs, Hkv * hs], dim=2)
    q = q.view(B, T, H, hs).transpose(1, 2)
    k = k.view(B, T, Hkv, hs).transpose(1, 2)
    v = v.view(B, T, Hkv, hs).transpose(1, 2)
    if rope is not None:
        q, k = rope(q), rope(k)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    y = scaled_dot_product_attention(q, k, v, causal_mask(T))
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 9),
    hkv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2]),
    hs=st.sampled_from([2, 4, 6]),
    bias=st.booleans(),
    use_rope=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_module_equals_reference_math_in_float64(b, t, hkv, group, hs, bias, use_rope, seed):
    torch.manual_seed(seed)
    n_head = hkv * group
    rope = RotaryEmbedding(hs, 16) if use_rope else None
    attn = CausalSelfAttention(
        n_head * hs, n_head, hkv, block_size=16, bias=bias, rope=rope
    ).double()
    x = torch.randn(b, t, n_head * hs, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _attention_by_hand(attn, x, rope))


def test_gqa_with_all_kv_heads_equals_plain_multi_head():
    torch.manual_seed(0)
    plain = CausalSelfAttention(32, 4, block_size=16).double()
    gqa = CausalSelfAttention(32, 4, n_kv_head=4, block_size=16).double()
    gqa.load_state_dict(plain.state_dict())
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), plain(x))


def test_gqa_has_fewer_kv_weights_and_shares_kv_heads():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, n_kv_head=2, block_size=16).double()
    # the same module as plain MHA whose K/V weights repeat each kv head twice
    mha = CausalSelfAttention(32, 4, block_size=16).double()
    hs = 8
    Wq, Wk, Wv = attn.c_attn.weight.split([32, 16, 16])
    bq, bk, bv = attn.c_attn.bias.split([32, 16, 16])
    rep_w = lambda w: w.view(2, hs, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    rep_b = lambda b: b.view(2, hs).repeat_interleave(2, dim=0).reshape(32)
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([Wq, rep_w(Wk), rep_w(Wv)]))
        mha.c_attn.bias.copy_(torch.cat([bq, rep_b(bk), rep_b(bv)]))
        mha.c_proj.load_state_dict(attn.c_proj.state_dict())
    assert attn.c_attn.weight.shape == (64, 32) and mha.c_attn.weight.shape == (96, 32)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), mha(x))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("use_rope", [False, True])
def test_changing_a_future_token_never_changes_an_earlier_output(n_kv_head, use_rope):
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 32) if use_rope else None
    attn = CausalSelfAttention(32, 4, n_kv_head, block_size=32, rope=rope).eval()
    x = torch.randn(2, 12, 32)
    base = attn(x)
    for t in (0, 5, 11):
        changed = x.clone()
        changed[:, t] += torch.randn(2, 32)
        out = attn(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t])


# ------------------------------------------------------------------ KV cache


@pytest.mark.parametrize(
    ("n_head", "n_kv_head", "use_rope", "bias"),
    [(4, 4, False, True), (4, 2, True, False), (4, 1, True, True), (2, 2, True, True)],
)
def test_kv_cache_equals_uncached_output(n_head, n_kv_head, use_rope, bias):
    torch.manual_seed(0)
    rope = RotaryEmbedding(32 // n_head, 24) if use_rope else None
    attn = CausalSelfAttention(32, n_head, n_kv_head, block_size=24, bias=bias, rope=rope)
    attn.eval()
    x = torch.randn(3, 20, 32)
    full = attn(x)
    cache = attn.new_kv_cache(batch_size=3)
    assert cache.length == 0 and cache.k.shape == (3, n_kv_head, 24, 32 // n_head)
    pieces = [attn(x[:, :6], kv_cache=cache), attn(x[:, 6:13], kv_cache=cache)]
    pieces += [attn(x[:, t : t + 1], kv_cache=cache) for t in range(13, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    # reset and reuse: the same answer again
    cache.reset()
    torch.testing.assert_close(attn(x, kv_cache=cache), full, atol=1e-6, rtol=1e-6)


def test_kv_cache_errors():
    attn = CausalSelfAttention(16, 2, block_size=8)
    cache = attn.new_kv_cache(batch_size=1)
    attn(torch.randn(1, 6, 16), kv_cache=cache)
    with pytest.raises(ValueError, match="longer than block_size 8"):
        attn(torch.randn(1, 3, 16), kv_cache=cache)
    small = KVCache(1, 2, 8, max_len=4)
    with pytest.raises(ValueError, match="KV cache is full"):
        small.append(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8))
    with pytest.raises(ValueError, match=r"shape \(1, 2, T, 8\)"):
        small.append(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError, match=r"shape \(1, 2, T, 8\)"):
        small.append(torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))
    with pytest.raises(ValueError, match=r"shape \(1, 2, T, 8\)"):
        small.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 2, 8))
    assert attn.new_kv_cache(2, max_len=100).max_len == 8  # never past block_size


# ------------------------------------------------------------------ configuration errors


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match=r"n_head \(6\) must be divisible by n_kv_head \(4\)"):
        CausalSelfAttention(48, 6, n_kv_head=4)
    with pytest.raises(ValueError, match=">= 1"):
        CausalSelfAttention(32, 0)
    with pytest.raises(ValueError, match="dropout"):
        CausalSelfAttention(32, 4, dropout=1.0)
    with pytest.raises(ValueError, match="rope head_dim 4"):
        CausalSelfAttention(32, 4, rope=RotaryEmbedding(4, 16))


def test_input_errors_are_clear():
    attn = CausalSelfAttention(16, 2, block_size=8)
    with pytest.raises(ValueError, match=r"shape \(B, T, 16\).*x\[None\]"):
        attn(torch.randn(5, 16))
    with pytest.raises(ValueError, match=r"shape \(B, T, 16\)"):
        attn(torch.randn(1, 5, 12))
    with pytest.raises(ValueError, match="sequence of 9 tokens is longer than block_size 8"):
        attn(torch.randn(1, 9, 16))


def test_dropout_only_in_training_and_bias_flag():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, block_size=8, dropout=0.5, bias=False)
    assert attn.c_attn.bias is None and attn.c_proj.bias is None
    assert type(attn.c_attn) is nn.Linear and type(attn.c_proj) is nn.Linear
    x = torch.randn(2, 8, 16)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))
