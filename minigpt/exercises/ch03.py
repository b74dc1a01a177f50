"""Checks for exercises/03_attention.ipynb: masks, attention by hand, heads, GQA."""

from __future__ import annotations

import math

import torch

from minigpt import attention as package_attention
from minigpt.exercises.core import Incorrect, Question, call, close, tensor
from minigpt.exercises.shortcuts import Shortcut, forbid

__all__ = ["q1", "q2", "q3", "q4", "q5"]


class CausalMask(Question):
    name = "q1"
    _hint = (
        "Query t may look at keys 0..t: that is the lower triangle (diagonal included) of a "
        "T x T matrix. torch.tril(torch.ones(T, T, dtype=torch.bool)) builds it."
    )
    _solution = """
def causal_mask(T):
    return torch.tril(torch.ones(T, T, dtype=torch.bool))   # True = may attend
"""

    def _check(self, fn):
        for T in (1, 3, 6):
            got = tensor(call(fn, T), f"causal_mask({T})")
            if got.dtype != torch.bool:
                raise Incorrect(f"expected a bool tensor (True = attend), got {got.dtype}")
            want = torch.tril(torch.ones(T, T, dtype=torch.bool))
            if got.shape != want.shape:
                raise Incorrect(f"causal_mask({T}) has shape {tuple(got.shape)}, expected {(T, T)}")
            if not torch.equal(got, want):
                if torch.equal(got, want.T):
                    raise Incorrect("this mask lets each query see the future and not the past")
                raise Incorrect(f"causal_mask({T}) is not the lower-triangular mask")

    def reference(self):
        return lambda T: torch.tril(torch.ones(T, T, dtype=torch.bool))

    def wrong_answers(self):
        return [
            lambda T: torch.triu(torch.ones(T, T, dtype=torch.bool)),  # sees the future
            lambda T: torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1),  # not itself
            lambda T: torch.ones(T, T, dtype=torch.bool),  # no mask at all
        ]


def _attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class AttentionByHand(Question):
    name = "q2"
    _hint = (
        "scores = q @ k.transpose(-2, -1) / sqrt(d) has shape (..., Tq, Tk); where the mask "
        "is False put -inf (scores.masked_fill(~mask, float('-inf'))); softmax over the LAST "
        "dim (the keys) and multiply by v."
    )
    _solution = """
def attention(q, k, v, mask=None):
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)             # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)                      # each row sums to 1
    return weights @ v                                           # (..., Tq, dv)
"""

    shortcuts = (
        Shortcut(
            "scaled_dot_product_attention (torch's or minigpt's)",
            "compute the scores q @ k.transpose(-2, -1) / sqrt(d), fill the masked ones with "
            "-inf, take the softmax over the keys and multiply by v",
            (
                "scaled_dot_product_attention",
                "multi_head_attention_forward",
                package_attention.scaled_dot_product_attention,
            ),
        ),
    )

    def _check(self, fn):
        gen = torch.Generator().manual_seed(7)
        causal5, causal6 = torch.tril(torch.ones(5, 5)).bool(), torch.tril(torch.ones(6, 6)).bool()
        # any boolean mask, not only a causal one: 3 queries, 5 keys, each query sees >= 1 key
        scattered = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]).bool()
        cases = [
            ((4, 8), (4, 8), (4, 3), None, ""),
            ((2, 5, 4), (2, 5, 4), (2, 5, 6), causal5, " and a causal mask"),
            ((2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 4), causal6, " and a causal mask"),
            ((2, 3, 4), (2, 5, 4), (2, 5, 2), scattered, " and a mask that is not causal"),
        ]
        for qs, ks, vs, mask, which in cases:
            q = torch.randn(*qs, generator=gen, dtype=torch.float64)
            k = torch.randn(*ks, generator=gen, dtype=torch.float64)
            v = torch.randn(*vs, generator=gen, dtype=torch.float64)
            with forbid(*self.shortcuts):
                got = call(fn, q, k, v, mask)
            got = tensor(got, "attention")
            close(got, _attention(q, k, v, mask), what=f"attention with q of shape {qs}{which}")

    def reference(self):
        return _attention

    def wrong_answers(self):
        def unscaled(q, k, v, mask=None):
            scores = q @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return torch.softmax(scores, dim=-1) @ v

        def softmax_over_queries(q, k, v, mask=None):
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return torch.softmax(scores, dim=-2) @ v

        def mask_with_zero(q, k, v, mask=None):  # a 0 score still gets weight
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, 0.0)
            return torch.softmax(scores, dim=-1) @ v

        return [unscaled, softmax_over_queries, mask_with_zero]


def _split(x, n_head):
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


class SplitHeads(Question):
    name = "q3"
    _hint = (
        "Each head owns a contiguous block of C // n_head channels. x.view(B, T, n_head, hs) "
        "cuts the channels into heads; then .transpose(1, 2) moves the head dim in front of "
        "time, giving (B, n_head, T, hs)."
    )
    _solution = """
def split_heads(x, n_head):
    B, T, C = x.shape
    hs = C // n_head
    return x.view(B, T, n_head, hs).transpose(1, 2)   # (B, T, C) -> (B, n_head, T, hs)
"""

    def _check(self, fn):
        gen = torch.Generator().manual_seed(8)
        for B, T, C, H in ((1, 3, 4, 2), (2, 5, 12, 3), (2, 4, 8, 1)):
            x = torch.randn(B, T, C, generator=gen)
            got = tensor(call(fn, x, H), "split_heads")
            close(got, _split(x, H), what=f"split_heads of a {(B, T, C)} input into {H} heads")

    def reference(self):
        return _split

    def wrong_answers(self):
        def view_directly(x, n_head):  # mixes time and channels
            B, T, C = x.shape
            return x.reshape(B, n_head, T, C // n_head)

        def heads_strided(x, n_head):  # channel c goes to head c % n_head
            B, T, C = x.shape
            return x.view(B, T, C // n_head, n_head).permute(0, 3, 1, 2)

        def no_transpose(x, n_head):
            B, T, C = x.shape
            return x.view(B, T, n_head, C // n_head)

        return [view_directly, heads_strided, no_transpose]


def _merge(y):
    B, H, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, H * hs)


class MergeHeads(Question):
    name = "q4"
    _hint = (
        "Undo split_heads: y.transpose(1, 2) gives (B, T, n_head, hs), then "
        ".reshape(B, T, n_head * hs) (or .contiguous().view(...)) puts the heads side by side."
    )
    _solution = """
def merge_heads(y):
    B, H, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, H * hs)    # (B, H, T, hs) -> (B, T, C)
"""

    def _check(self, fn):
        gen = torch.Generator().manual_seed(9)
        for shape in ((1, 2, 3, 2), (2, 3, 5, 4), (2, 1, 4, 6)):
            y = torch.randn(*shape, generator=gen)
            got = tensor(call(fn, y), "merge_heads")
            close(got, _merge(y), what=f"merge_heads of a {shape} input")
        x = torch.randn(2, 5, 12, generator=gen)
        close(call(fn, _split(x, 3)), x, what="merge_heads(split_heads(x, 3)) (should give back x)")

    def reference(self):
        return _merge

    def wrong_answers(self):
        def reshape_only(y):  # forgets to move time back in front of the heads
            B, H, T, hs = y.shape
            return y.reshape(B, T, H * hs)

        def wrong_order(y):  # head dims interleaved: channel = i * H + h
            B, H, T, hs = y.shape
            return y.permute(0, 2, 3, 1).reshape(B, T, H * hs)

        def sums_heads(y):
            return y.sum(dim=1)

        return [reshape_only, wrong_order, sums_heads]


def _repeat_kv(k, n_rep):
    return k.repeat_interleave(n_rep, dim=1)


class RepeatKV(Question):
    name = "q5"
    _hint = (
        "With grouped-query attention, query heads 0..n_rep-1 share kv head 0, the next n_rep "
        "share kv head 1, and so on: each kv head must appear n_rep times IN A ROW along dim 1. "
        "torch.repeat_interleave does that; torch.repeat (or .repeat) tiles the whole block instead."
    )
    _solution = """
def repeat_kv(k, n_rep):
    # (B, Hkv, T, hs) -> (B, Hkv * n_rep, T, hs): kv head j serves query heads j*n_rep .. j*n_rep+n_rep-1
    return k.repeat_interleave(n_rep, dim=1)
"""

    def _check(self, fn):
        gen = torch.Generator().manual_seed(10)
        for shape, n_rep in (((1, 2, 3, 4), 2), ((2, 3, 4, 2), 4), ((1, 4, 2, 2), 1)):
            k = torch.randn(*shape, generator=gen)
            got = tensor(call(fn, k, n_rep), "repeat_kv")
            close(got, _repeat_kv(k, n_rep), what=f"repeat_kv of a {shape} input, n_rep={n_rep}")

    def reference(self):
        return _repeat_kv

    def wrong_answers(self):
        return [
            lambda k, n_rep: k.repeat(1, n_rep, 1, 1),  # tiles: head order 0,1,0,1
            lambda k, n_rep: k.repeat_interleave(n_rep, dim=2),  # repeats time steps
            lambda k, n_rep: k.repeat_interleave(n_rep, dim=0),  # repeats the batch
        ]


q1 = CausalMask()
q2 = AttentionByHand()
q3 = SplitHeads()
q4 = MergeHeads()
q5 = RepeatKV()
