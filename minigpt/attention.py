"""Causal self-attention: the reference math, the fused module, and its KV cache.

- ``scaled_dot_product_attention`` is the textbook formula, softmax(q kᵀ / √d) v,
  written out so it can be read and tested against.
- ``CausalSelfAttention`` is what the model uses: fused Q/K/V projection, many
  heads, optional grouped-query attention (fewer K/V heads), optional rotary
  positions, and PyTorch's fused ``F.scaled_dot_product_attention`` inside.
- ``KVCache`` keeps one layer's keys and values so that generation only has to
  process the newest token at each step (chapter 06).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.embeddings import RotaryEmbedding

__all__ = ["CausalSelfAttention", "KVCache", "causal_mask", "scaled_dot_product_attention"]


def causal_mask(q_len: int, k_len: int | None = None, device: torch.device | None = None) -> Tensor:
    """Boolean (q_len, k_len) mask, True where a query may attend to a key.

    Queries are the last ``q_len`` positions of a ``k_len``-long sequence, so query
    i sits at absolute position ``k_len - q_len + i`` and sees keys 0..that position.
    With ``k_len == q_len`` this is the lower-triangular matrix.
    """
    k_len = q_len if k_len is None else k_len
    if k_len < q_len:
        raise ValueError(f"need k_len >= q_len, got q_len={q_len}, k_len={k_len}")
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Reference attention: softmax(q kᵀ / √d + mask) v.

    Args:
        q: (..., Tq, d) queries; any number of leading batch/head dims.
        k: (..., Tk, d) keys.
        v: (..., Tk, dv) values.
        mask: optional boolean tensor broadcastable to (..., Tq, Tk); True = attend.
            A query row with no True entry gets NaN outputs (nothing to attend to).
    Returns:
        (..., Tq, dv).
    """
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ValueError(
            "q, k and v need shape (..., T, d), got "
            f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same last dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v need the same length, got {k.shape[-2]} and {v.shape[-2]}")
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Tq, Tk)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend), got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
                f"{tuple(scores.shape)} (..., Tq, Tk)"
            ) from None
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (..., Tq, Tk), rows sum to 1
    return weights @ v  # (..., Tq, dv)


class KVCache:
    """Keys and values of one attention layer for the tokens processed so far.

    Memory is allocated once for ``max_len`` positions; ``append`` writes the new
    keys/values after the old ones and returns views of everything so far.

    Args:
        batch_size: B.
        n_kv_head: number of key/value heads (fewer than query heads with GQA).
        head_dim: hs.
        max_len: the most positions the cache can hold (the model's block_size).
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # how many positions are filled

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, n_kv_head, T, hs) keys/values; return all so far, (B, n_kv_head, length, hs)."""
        B, Hkv, _, hs = self.k.shape
        if (
            k.dim() != 4
            or k.shape != v.shape
            or (k.shape[0], k.shape[1], k.shape[3]) != (B, Hkv, hs)
        ):
            raise ValueError(
                f"cache holds keys/values of shape ({B}, {Hkv}, T, {hs}) "
                f"(batch, kv heads, time, head size), got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        T = k.shape[-2]
        if self.length + T > self.max_len:
            raise ValueError(
                f"KV cache is full: {self.length} + {T} positions exceed its max_len {self.max_len}; "
                "reset it or crop the sequence"
            )
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reset(self) -> None:
        """Forget everything (the memory is kept for reuse)."""
        self.length = 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional GQA and RoPE.

    Args:
        n_embd: model width C.
        n_head: number of query heads H (C must be divisible by H).
        n_kv_head: number of key/value heads (H must be divisible by it); None = H.
        block_size: the longest sequence (context length) this layer accepts.
        dropout: dropout on the attention weights and on the output projection.
        bias: whether the projections have biases (GPT-2: yes, Llama: no).
        rope: a shared ``RotaryEmbedding`` to rotate q and k with, or None.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int | None = None,
        block_size: int = 1024,
        dropout: float = 0.0,
        bias: bool = True,
        rope: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if n_head < 1 or n_kv_head < 1:
            raise ValueError(f"n_head and n_kv_head must be >= 1, got {n_head} and {n_kv_head}")
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be divisible by n_kv_head ({n_kv_head})")
        if rope is not None and rope.head_dim != n_embd // n_head:
            raise ValueError(
                f"rope head_dim {rope.head_dim} != attention head size {n_embd // n_head}"
            )
        self._build(n_embd, n_head, n_kv_head, block_size, dropout, bias, rope)

    @classmethod
    def from_config(cls, config: Any, rope: RotaryEmbedding | None = None) -> CausalSelfAttention:
        """The layer a ``GPTConfig`` describes, built without checking again what the
        config checked when it was made (``GPT`` builds its layers this way).

        ``config`` needs ``n_embd``, ``n_head``, ``n_kv_head`` (None = n_head),
        ``block_size``, ``dropout`` and ``bias``; ``rope`` must have its head size.
        """
        layer = cls.__new__(cls)  # skip __init__ and its checks
        nn.Module.__init__(layer)
        n_kv_head = config.n_head if config.n_kv_head is None else config.n_kv_head
        layer._build(
            config.n_embd, config.n_head, n_kv_head, config.block_size, config.dropout,
            config.bias, rope,
        )  # fmt: skip
        return layer

    def _build(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int,
        block_size: int,
        dropout: float,
        bias: bool,
        rope: RotaryEmbedding | None,
    ) -> None:
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.block_size, self.dropout = block_size, dropout
        self.rope = rope
        # queries for every head, keys and values for the (fewer) kv heads, in one matmul
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty ``KVCache`` for this layer, on its weights' device and dtype.

        ``max_len`` defaults to (and may not exceed) ``block_size``.
        """
        max_len = self.block_size if max_len is None else min(max_len, self.block_size)
        w = self.c_attn.weight
        return KVCache(
            batch_size, self.n_kv_head, self.head_dim, max_len, device=w.device, dtype=w.dtype
        )

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C).

        Without a cache every position attends to itself and the ones before it.
        With a ``kv_cache`` (see ``new_kv_cache``), ``x`` holds only the new tokens:
        their keys/values are appended to the cache and they attend to everything
        cached plus themselves, so feeding a sequence in pieces gives the same
        outputs as feeding it whole.
        """
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(
                f"expected input of shape (B, T, {self.n_embd}), got {tuple(x.shape)}; "
                "use x[None] for a single sequence"
            )
        B, T, C = x.shape
        offset = 0 if kv_cache is None else kv_cache.length
        if offset + T > self.block_size:
            raise ValueError(
                f"sequence of {offset + T} tokens is longer than block_size {self.block_size}"
            )
        hs, H, Hkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([H * hs, Hkv * hs, Hkv * hs], dim=2)
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, Hkv, hs).transpose(1, 2)  # (B, Hkv, T, hs)
        v = v.view(B, T, Hkv, hs).transpose(1, 2)  # (B, Hkv, T, hs)
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, Hkv, offset + T, hs)
        if Hkv != H:  # grouped-query attention: each kv head serves H // Hkv query heads
            k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, hs)
            v = v.repeat_interleave(H // Hkv, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:  # new queries see every cached key and the new keys up to themselves
            mask = None if T == 1 else causal_mask(T, offset + T, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))
