"""Checks for exercises/03_attention.ipynb: masks, attention by hand, heads, GQA."""

from __future__ import annotations

import math

import torch

from minigpt import attention as package_attention
from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    close,
    tensor,
)
from minigpt.exercises.shortcuts import Shortcut, forbid

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]


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


# ---------------------------------------------------------------- q6, q7: the scale, and why


def _max_weights(d: int, n_keys: int, seed: int = 1, n: int = 2000) -> dict[str, float]:
    """The mean largest attention weight of random q, k: raw scores and scores / sqrt(d)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g)
    k = torch.randn(n, n_keys, d, generator=g)
    s = (k @ q[:, :, None]).squeeze(-1)  # (n, n_keys) raw scores
    return {
        "raw": torch.softmax(s, -1).max(-1).values.mean().item(),
        "scaled": torch.softmax(s / math.sqrt(d), -1).max(-1).values.mean().item(),
    }


class ScaleExperiment(Experiment):
    name = "q6"
    question = """
The lesson measured the mean largest attention weight for 8 keys per query. Measure it
for **d = 32** with **16 keys** per query: 2,000 queries, drawn as in the lesson
(`g = torch.Generator().manual_seed(1)`, then `q` of shape `(2000, 32)`, then `k` of
shape `(2000, 16, 32)`). Report `{"raw": ..., "scaled": ...}`: the mean over queries of
the largest softmax weight of the raw scores `q·k`, and of the scores divided by √d.
Each within ±0.02.
"""
    keys = ("raw", "scaled")
    atol = 0.02
    trivial = (0.0, 1.0, 1 / 16, 32.0, 16.0)
    _hint = """
s = (k @ q[:, :, None]).squeeze(-1) gives the (2000, 16) scores. The largest weight of
each row is torch.softmax(s, -1).max(-1).values; average it over the 2000 rows.
"""
    _solution = """
import math

g = torch.Generator().manual_seed(1)
q = torch.randn(2000, 32, generator=g)
k = torch.randn(2000, 16, 32, generator=g)  # 16 keys per query
s = (k @ q[:, :, None]).squeeze(-1)  # (2000, 16) raw scores
weights = {
    "raw": torch.softmax(s, -1).max(-1).values.mean().item(),
    "scaled": torch.softmax(s / math.sqrt(32), -1).max(-1).values.mean().item(),
}
"""

    def measure(self):
        return _max_weights(32, 16)

    def decoys(self):
        return {
            "the lesson's number for d = 16 with 8 keys": {"raw": 0.75, "scaled": 0.36},
            "the lesson's number for d = 64 with 8 keys": {"raw": 0.88, "scaled": 0.36},
            "the number for 8 keys per query, not 16": _max_weights(32, 8),
            "the scores divided by d, not by its square root": {"scaled": _scaled_by(32, 16, 32.0)},
        }


def _scaled_by(d: int, n_keys: int, divisor: float) -> float:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2000, d, generator=g)
    k = torch.randn(2000, n_keys, d, generator=g)
    s = (k @ q[:, :, None]).squeeze(-1)
    return torch.softmax(s / divisor, -1).max(-1).values.mean().item()


q6 = ScaleExperiment()


class WhySqrtD(MultipleChoice):
    name = "q7"
    question = """
Why does attention divide the scores `q·k` by √d (d the head size) before the softmax?
"""
    options = (
        Option(
            "To make the attention weights of each query sum to 1.",
            "The softmax makes them sum to 1 whatever the scale of the scores; the division "
            "changes how peaked they are, not their sum.",
        ),
        Option(
            "To normalise the query and key vectors to length 1, so the score is a cosine.",
            "A vector of d unit-variance entries has length about √d, but dividing by √d once "
            "is not dividing by both lengths: the score is no cosine and can exceed 1.",
        ),
        Option(
            "The dot product of two random d-dimensional vectors has variance d; dividing "
            "by √d keeps the scores at unit variance, so the softmax does not collapse onto "
            "one key and its gradients do not vanish, whatever the head size.",
            "Your experiment shows it: raw scores put most of the weight on one key already "
            "at d = 32, scaled ones stay spread out as in the lesson at every d.",
        ),
        Option(
            "To make attention cheaper to compute.",
            "One division costs the same as none in practice, and it changes no shapes; it "
            "is there for what it does to the softmax.",
        ),
    )
    answer = "c"
    _hint = "What is the variance of a sum of d products of independent unit-variance numbers?"


q7 = WhySqrtD()
