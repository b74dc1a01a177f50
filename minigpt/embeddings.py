"""Token positions, injected three ways: learned, sinusoidal, rotary (RoPE).

Attention on its own is blind to order (permute the tokens and the outputs are
permuted the same way), so a model must be told where each token is:

- ``LearnedPositionalEmbedding``: a trainable vector per position, added to the
  token embedding (GPT-2).
- ``SinusoidalPositionalEncoding``: fixed sines and cosines of geometrically spaced
  frequencies, added to the token embedding ("Attention Is All You Need").
- ``RotaryEmbedding``: rotate each query/key pair of channels by an angle
  proportional to the position, so that q·k depends only on the relative offset
  (RoFormer; Llama). Nothing is added to the residual stream.

All three take an ``offset``: the position of the first token, which is non-zero
when generating with a KV cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "apply_rotary",
    "sinusoidal_table",
]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_span(seq_len: int, offset: int, max_len: int) -> None:
    if seq_len < 1 or offset < 0:
        raise ValueError(
            f"need seq_len >= 1 and offset >= 0, got seq_len={seq_len}, offset={offset}"
        )
    if offset + seq_len > max_len:
        raise ValueError(
            f"positions {offset}..{offset + seq_len - 1} go past the maximum length {max_len}; "
            f"use a shorter sequence or build the encoding with a larger max_len (block_size)"
        )


class LearnedPositionalEmbedding(nn.Module):
    """One trainable vector per position.

    Args:
        max_len: the largest number of positions (the context length).
        n_embd: embedding size C.
    """

    def __init__(self, max_len: int, n_embd: int) -> None:
        super().__init__()
        _check_positive(max_len=max_len, n_embd=n_embd)
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, n_embd))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        """Return the (seq_len, C) position vectors for positions offset..offset+seq_len-1."""
        _check_span(seq_len, offset, self.max_len)
        return self.weight[offset : offset + seq_len]


def sinusoidal_table(max_len: int, dim: int, base: float = 10000.0) -> Tensor:
    """The (max_len, dim) sinusoidal table: even channels sin, odd channels cos.

    ``table[p, 2i] = sin(p / base**(2i/dim))`` and ``table[p, 2i+1] = cos(...)``.
    """
    _check_positive(max_len=max_len, dim=dim)
    if dim % 2:
        raise ValueError(f"sinusoidal encodings need an even dimension, got {dim}")
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (T, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = pos * inv_freq  # (T, dim/2)
    table = torch.empty(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal position vectors (no parameters).

    Args:
        max_len: the largest number of positions.
        n_embd: embedding size C (even).
        base: the wavelength base, 10000 in the original paper.
    """

    table: Tensor

    def __init__(self, max_len: int, n_embd: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_positive(max_len=max_len, n_embd=n_embd)
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, n_embd, base), persistent=False)

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        """Return the (seq_len, C) encodings for positions offset..offset+seq_len-1."""
        _check_span(seq_len, offset, self.max_len)
        return self.table[offset : offset + seq_len]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of ``x`` by the angles whose cos/sin are given.

    Channels are paired as (i, i + hs/2), the "rotate half" layout of GPT-NeoX and
    Llama in Hugging Face ``transformers``.

    Args:
        x: (..., T, hs) queries or keys.
        cos, sin: (T, hs/2) broadcastable over the leading dims of ``x``.
    Returns:
        (..., T, hs), same dtype as ``x``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) with precomputed cos/sin tables.

    Args:
        head_dim: size hs of each attention head (even).
        max_len: the largest number of positions.
        base: the frequency base (10000 in RoFormer and GPT-NeoX; larger in newer Llamas).
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_positive(head_dim=head_dim, max_len=max_len)
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
        self.head_dim, self.max_len = head_dim, max_len
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq  # (T, hs/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate queries or keys ``x`` of shape (..., T, hs) at positions offset..offset+T-1."""
        if x.dim() < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"expected queries or keys of shape (..., T, {self.head_dim}), got {tuple(x.shape)}"
            )
        T = x.shape[-2]
        _check_span(T, offset, self.max_len)
        return apply_rotary(x, self.cos[offset : offset + T], self.sin[offset : offset + T])
