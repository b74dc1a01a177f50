"""Positional encodings: learned, sinusoidal and rotary (minigpt.embeddings)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.embeddings import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)

# ------------------------------------------------------------------ sinusoidal


def test_sinusoidal_table_matches_the_formula():
    max_len, dim = 50, 16
    table = sinusoidal_table(max_len, dim)
    assert table.shape == (max_len, dim) and table.dtype == torch.float32
    for p in (0, 1, 7, 49):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_table_first_row_and_custom_base():
    table = sinusoidal_table(4, 6, base=100.0)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * 3))
    assert table[3, 4].item() == pytest.approx(math.sin(3 / 100 ** (4 / 6)), abs=1e-6)


def test_sinusoidal_module_slices_the_table_with_offset():
    enc = SinusoidalPositionalEncoding(32, 8)
    assert list(enc.parameters()) == []  # nothing to train
    assert "table" not in enc.state_dict()  # rebuilt, never saved
    table = sinusoidal_table(32, 8)
    torch.testing.assert_close(enc(5), table[:5])
    torch.testing.assert_close(enc(3, offset=10), table[10:13])
    torch.testing.assert_close(enc(1, offset=31), table[31:32])


def test_sinusoidal_dot_product_depends_on_offset_only():
    table = sinusoidal_table(64, 32).double()
    for shift in (1, 5, 12):
        dots = [(table[p] @ table[p + shift]).item() for p in range(0, 40, 7)]
        assert max(dots) - min(dots) < 1e-5


# ------------------------------------------------------------------ learned


def test_learned_embedding_is_trainable_and_sliced():
    torch.manual_seed(0)
    emb = LearnedPositionalEmbedding(10, 4)
    assert emb.weight.shape == (10, 4) and emb.weight.requires_grad
    torch.testing.assert_close(emb(3, offset=2), emb.weight[2:5])
    emb(3, offset=2).sum().backward()
    grad_rows = emb.weight.grad.abs().sum(dim=1) > 0
    assert grad_rows.tolist() == [False, False, True, True, True] + [False] * 5


# ------------------------------------------------------------------ errors past max length


@pytest.mark.parametrize(
    "make",
    [
        lambda: LearnedPositionalEmbedding(8, 4),
        lambda: SinusoidalPositionalEncoding(8, 4),
    ],
    ids=["learned", "sinusoidal"],
)
def test_additive_encodings_reject_positions_past_max_len(make):
    enc = make()
    enc(8)  # exactly max_len is fine
    enc(1, offset=7)
    with pytest.raises(ValueError, match=r"past the maximum length 8.*larger max_len"):
        enc(9)
    with pytest.raises(ValueError, match="positions 6..9 go past the maximum length 8"):
        enc(4, offset=6)
    with pytest.raises(ValueError, match="seq_len >= 1"):
        enc(0)
    with pytest.raises(ValueError, match="offset >= 0"):
        enc(2, offset=-1)


def test_rotary_rejects_positions_past_max_len():
    rope = RotaryEmbedding(4, max_len=8)
    rope(torch.zeros(2, 8, 4))
    with pytest.raises(ValueError, match="past the maximum length 8"):
        rope(torch.zeros(2, 9, 4))
    with pytest.raises(ValueError, match="positions 7..8"):
        rope(torch.zeros(2, 2, 4), offset=7)


def test_bad_construction_and_shapes_give_clear_errors():
    with pytest.raises(ValueError, match="even dimension"):
        sinusoidal_table(4, 5)
    with pytest.raises(ValueError, match="even head size"):
        RotaryEmbedding(5, 8)
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        LearnedPositionalEmbedding(0, 4)
    with pytest.raises(ValueError, match="n_embd must be a positive integer"):
        SinusoidalPositionalEncoding(4, 0)
    rope = RotaryEmbedding(4, 8)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., T, 4\)"):
        rope(torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., T, 4\)"):
        rope(torch.zeros(4))


# ------------------------------------------------------------------ rotary


def _rope_by_hand(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0):
    """Rotate pairs (i, i + hs/2) of x (T, hs) by angle pos * base**(-2i/hs), one 2x2 matrix at a time."""
    T, hs = x.shape
    out = torch.empty_like(x)
    for t in range(T):
        for i in range(hs // 2):
            theta = positions[t].item() * base ** (-2 * i / hs)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[t, i].item(), x[t, i + hs // 2].item()
            out[t, i], out[t, i + hs // 2] = c * a - s * b, s * a + c * b
    return out


def test_rotary_matches_explicit_rotation_matrices():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, max_len=20, base=100.0)
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = _rope_by_hand(x, torch.arange(3, 8), base=100.0)
    torch.testing.assert_close(rope(x, offset=3), expected, atol=1e-6, rtol=1e-6)


def test_rotary_position_zero_is_identity_and_norms_are_kept():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, max_len=64)
    x = torch.randn(2, 3, 10, 16)
    y = rope(x)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert y.shape == x.shape and y.dtype == x.dtype


def test_rotary_with_offset_equals_slice_of_full_sequence():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, max_len=32)
    x = torch.randn(1, 2, 12, 8)
    full = rope(x)
    torch.testing.assert_close(rope(x[:, :, 5:], offset=5), full[:, :, 5:])
    torch.testing.assert_close(rope(x[:, :, 11:], offset=11), full[:, :, 11:])


@settings(max_examples=25, deadline=None)
@given(
    half=st.integers(1, 16),
    m=st.integers(0, 60),
    n=st.integers(0, 60),
    shift=st.integers(0, 60),
    seed=st.integers(0, 2**16),
)
def test_rotary_score_depends_only_on_relative_offset(half, m, n, shift, seed):
    """RoPE's defining property: <R(m) q, R(n) k> = <R(m + s) q, R(n + s) k> for every shift s."""
    hs = 2 * half
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, hs, generator=gen, dtype=torch.float64)
    rope = RotaryEmbedding(hs, max_len=128)

    def score(pm: int, pn: int) -> float:
        return (rope(q[None], offset=pm) @ rope(k[None], offset=pn).T).item()

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)


def test_apply_rotary_broadcasts_over_heads_and_keeps_dtype():
    torch.manual_seed(0)
    rope = RotaryEmbedding(4, 16)
    x = torch.randn(2, 3, 5, 4).to(torch.bfloat16)
    y = apply_rotary(x, rope.cos[:5], rope.sin[:5])
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
