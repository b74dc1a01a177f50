"""Checks for exercises/02_embeddings.ipynb: lookups, word vectors, positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    LearnerError,
    MultipleChoice,
    NotAttempted,
    Option,
    Question,
    call,
    close,
    ints,
)
from minigpt.exercises.shortcuts import Shortcut, forbid

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]


def _one_hot_lookup(ids, W):
    return F.one_hot(ids, W.shape[0]).to(W.dtype) @ W


def _lookup_matrix() -> torch.Tensor:
    """The (V, C) = (7, 3) matrix q1 embeds with."""
    return torch.randn(7, 3, generator=torch.Generator().manual_seed(2))


# Torch functions that pick rows (or entries) out of a tensor instead of multiplying it.
_ROW_PICKS = (
    "__getitem__",
    "embedding",
    "embedding_bag",
    "index_select",
    "index",
    "gather",
    "take",
    "take_along_dim",
    "select",
    "narrow",
    "unbind",
    "split",
    "split_with_sizes",
    "chunk",
    "tensor_split",
    "masked_select",
)


def _is_lookup_matrix(t) -> bool:
    """Whether ``t`` holds q1's matrix W (or its transpose), in any float dtype or layout:
    a copy (``W.double()``, ``W.clone()``) is still W."""
    W = _lookup_matrix().double()
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() != W.numel():
        return False
    got = t.detach().cpu().double().flatten()
    return any(torch.allclose(got, w.flatten(), rtol=1e-2, atol=1e-3) for w in (W, W.T))


def _only_reshapes(key) -> bool:
    """Whether an index only adds axes or takes everything (W[None], W[...], W[:])."""
    keys = key if isinstance(key, tuple) else (key,)
    return all(
        k is None or k is Ellipsis or (isinstance(k, slice) and k == slice(None)) for k in keys
    )


def _picks_from_w(args, kwargs) -> bool:
    """Whether a call of one of ``_ROW_PICKS`` reads W: ``W[ids]``, ``F.embedding(ids, W)``."""
    if len(args) == 2 and not kwargs and _only_reshapes(args[1]):
        return False  # W[None] picks nothing (no other row-picking call takes such a key)
    return any(_is_lookup_matrix(a) for a in (*args, *kwargs.values()))


class OneHotLookup(Question):
    name = "q1"
    _hint = (
        "F.one_hot(ids, num_classes) gives (..., V) integers; convert them to W's dtype "
        "with .to(W.dtype) and multiply by W (V, C) on the right."
    )
    _solution = """
def one_hot_lookup(ids, W):
    V = W.shape[0]
    return F.one_hot(ids, V).to(W.dtype) @ W   # (..., V) @ (V, C) -> (..., C)
"""

    shortcuts = (
        Shortcut(
            "picking rows of W (W[ids], F.embedding, index_select, ...)",
            "build the one-hot vectors with F.one_hot(ids, V), convert them to W's dtype and "
            "multiply them by W: the lookup is a matrix product",
            _ROW_PICKS,
            when=_picks_from_w,
        ),
    )

    def _check(self, fn):
        W = _lookup_matrix()
        for ids in (torch.tensor([0, 3, 6]), torch.tensor([[1, 1], [5, 2]]), torch.tensor(4)):
            with forbid(*self.shortcuts):
                got = call(fn, ids, W)
            if not isinstance(got, torch.Tensor):
                raise Incorrect(f"expected a tensor, got {type(got).__name__}")
            close(got, W[ids], what=f"one_hot_lookup for ids of shape {tuple(ids.shape)}")

    def reference(self):
        return _one_hot_lookup

    def wrong_answers(self):
        return [
            # the one-hot vector picks a column of the transposed matrix: fine only for square W
            lambda ids, W: F.one_hot(ids, W.shape[1]).to(W.dtype) @ W.T,
            # off by one: ids treated as 1-based
            lambda ids, W: F.one_hot((ids + 1) % W.shape[0], W.shape[0]).to(W.dtype) @ W,
            # sums the rows instead of picking one per id
            lambda ids, W: (F.one_hot(ids, W.shape[0]).to(W.dtype) @ W).sum(0),
        ]


def _sinusoidal(max_len, dim):
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class Sinusoidal(Question):
    name = "q2"
    _hint = (
        "Build positions p as a (max_len, 1) column and frequencies 10000**(-2i/dim) for "
        "i = 0..dim/2-1 as a row (torch.arange(0, dim, 2) gives 2i). Their product is the "
        "(max_len, dim/2) angle table: sin goes in the even channels table[:, 0::2], cos in "
        "the odd ones table[:, 1::2]."
    )
    _solution = """
def sinusoidal_table(max_len, dim):
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]                   # (T, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    angles = pos * inv_freq                                                     # (T, dim/2)
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table
"""

    def _check(self, fn):
        for max_len, dim in ((4, 2), (10, 8), (50, 16)):
            got = call(fn, max_len, dim)
            if not isinstance(got, torch.Tensor):
                raise Incorrect(f"expected a tensor, got {type(got).__name__}")
            close(got, _sinusoidal(max_len, dim), what=f"sinusoidal_table({max_len}, {dim})")

    def reference(self):
        return lambda max_len, dim: _sinusoidal(max_len, dim).float()

    def wrong_answers(self):
        def swapped(max_len, dim):  # cos in the even channels, sin in the odd ones
            t = _sinusoidal(max_len, dim)
            return torch.stack([t[:, 1::2], t[:, 0::2]], dim=-1).reshape(max_len, dim)

        def exponent_i_over_dim(max_len, dim):  # 10000**(i/dim) instead of 10000**(2i/dim)
            pos = torch.arange(max_len, dtype=torch.float64)[:, None]
            inv_freq = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / dim)
            t = torch.zeros(max_len, dim, dtype=torch.float64)
            t[:, 0::2], t[:, 1::2] = torch.sin(pos * inv_freq), torch.cos(pos * inv_freq)
            return t

        def halves(max_len, dim):  # sin block then cos block: another layout, not this one
            t = _sinusoidal(max_len, dim)
            return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)

        return [swapped, exponent_i_over_dim, halves]


def _nearest(E, i, k):
    En = F.normalize(E, dim=1)
    sims = En @ En[i]
    sims[i] = -float("inf")
    return sims.topk(k).indices.tolist()


class Nearest(Question):
    name = "q3"
    _hint = (
        "Normalise every row with F.normalize(E, dim=1), so that dot products are cosines; "
        "compute the similarity of row i with every row, exclude i itself (set its score to "
        "-inf) and take .topk(k).indices."
    )
    _solution = """
def nearest(E, i, k):
    En = F.normalize(E, dim=1)        # (V, C) unit rows
    sims = En @ En[i]                 # (V,) cosine similarity with word i
    sims[i] = -float("inf")           # a word is not its own neighbour
    return sims.topk(k).indices.tolist()
"""

    def _check(self, fn):
        gen = torch.Generator().manual_seed(3)
        E = torch.randn(30, 5, generator=gen)
        E *= torch.rand(30, 1, generator=gen) * 10 + 0.1  # norms differ a lot
        for i, k in ((0, 3), (7, 5), (29, 1)):
            got = ints(call(fn, E, i, k), f"nearest(E, {i}, {k})")
            want = _nearest(E, i, k)
            if i in got:
                raise Incorrect(f"nearest(E, {i}, {k}) contains {i} itself")
            if got != want:
                raise Incorrect(
                    f"nearest(E, {i}, {k}) returned {got}, expected {want} (most similar first)"
                )

    def reference(self):
        return _nearest

    def wrong_answers(self):
        def dot_product(E, i, k):  # long vectors win: not a cosine
            sims = E @ E[i]
            sims[i] = -float("inf")
            return sims.topk(k).indices.tolist()

        def includes_self(E, i, k):
            En = F.normalize(E, dim=1)
            return (En @ En[i]).topk(k).indices.tolist()

        def farthest(E, i, k):
            En = F.normalize(E, dim=1)
            sims = En @ En[i]
            sims[i] = float("inf")
            return (-sims).topk(k).indices.tolist()

        return [dot_product, includes_self, farthest]


def _rope_sign(x, base, sign):
    T, hs = x.shape
    half = hs // 2
    inv_freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = sign * torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, hs/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=1)


def _rope(x, base=10000.0):
    return _rope_sign(x, base, 1)


class Rope(Question):
    name = "q4"
    _hint = (
        "angles[t, i] = t * base**(-2i/hs) for i = 0..hs/2-1 (a (T, hs/2) table). Split x into "
        "x1 = x[:, :hs/2] and x2 = x[:, hs/2:]; the rotated pair is "
        "(x1*cos - x2*sin, x1*sin + x2*cos); concatenate them back along the last dim."
    )
    _solution = """
def rope(x, base=10000.0):
    T, hs = x.shape
    inv_freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq       # (T, hs/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[:, : hs // 2], x[:, hs // 2 :]                               # (T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=1)     # (T, hs)
"""

    def _check(self, fn):
        gen = torch.Generator().manual_seed(4)
        for T, hs in ((1, 2), (5, 4), (12, 16)):
            x = torch.randn(T, hs, generator=gen)
            got = call(fn, x)
            if not isinstance(got, torch.Tensor):
                raise Incorrect(f"expected a tensor, got {type(got).__name__}")
            close(got, _rope(x.double()), what=f"rope of a ({T}, {hs}) input")

    def reference(self):
        return _rope

    def wrong_answers(self):
        def backwards(x, base=10000.0):  # rotates by -angle
            return _rope_sign(x, base, -1)

        def starts_at_one(x, base=10000.0):  # positions 1..T instead of 0..T-1
            pad = torch.cat([torch.zeros(1, x.shape[1], dtype=x.dtype), x])
            return _rope(pad, base)[1:]

        def interleaved(x, base=10000.0):  # pairs (2i, 2i+1): the paper's layout, not ours
            hs = x.shape[1]
            perm = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
            inv = torch.argsort(perm)
            return _rope(x[:, perm], base)[:, inv]

        return [backwards, starts_at_one, interleaved]


class PositionsWithOffset(Question):
    name = "q5"
    _hint = (
        "The new tokens sit at positions offset, offset+1, ..., offset+T-1: slice those rows "
        "of the table and add them to tok_emb; (T, C) broadcasts over the batch dim of "
        "(B, T, C). Raise a ValueError when offset + T > the table's length."
    )
    _solution = """
def add_positions(tok_emb, table, offset):
    T = tok_emb.shape[1]
    if offset + T > table.shape[0]:
        raise ValueError(f"positions up to {offset + T - 1} do not fit a table of {table.shape[0]}")
    return tok_emb + table[offset : offset + T]   # (B, T, C) + (T, C)
"""

    def _check(self, fn):
        gen = torch.Generator().manual_seed(5)
        table = torch.randn(10, 4, generator=gen)
        for B, T, offset in ((2, 3, 0), (1, 4, 6), (3, 1, 9)):
            tok = torch.randn(B, T, 4, generator=gen)
            got = call(fn, tok, table, offset)
            close(got, tok + table[offset : offset + T], what=f"T={T}, offset={offset}")
        past_the_end = "positions 8..10 are past a 10-row table"
        try:
            got = call(fn, torch.zeros(1, 3, 4), table, 8)
        except LearnerError as e:
            if isinstance(e.error, ValueError):
                return
            if isinstance(e.error, IndexError):
                raise Incorrect(
                    f"{past_the_end}: raise a ValueError that says so (not an IndexError)"
                ) from None
            raise
        except NotAttempted:
            raise Incorrect(
                f"{past_the_end}, but your function returned None: raise a ValueError"
            ) from None
        shape = f" of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else ""
        raise Incorrect(
            f"{past_the_end}, but your function returned a result{shape}: raise a ValueError instead"
        )

    def reference(self):
        def add_positions(tok_emb, table, offset):
            T = tok_emb.shape[1]
            if offset + T > table.shape[0]:
                raise ValueError("past the end of the table")
            return tok_emb + table[offset : offset + T]

        return add_positions

    def wrong_answers(self):
        def ignores_offset(tok_emb, table, offset):
            T = tok_emb.shape[1]
            if offset + T > table.shape[0]:
                raise ValueError("too long")
            return tok_emb + table[:T]

        def no_check(tok_emb, table, offset):  # slicing past the end silently gives fewer rows
            T = tok_emb.shape[1]
            return tok_emb[:, : table[offset : offset + T].shape[0]] + table[offset : offset + T]

        def last_rows(tok_emb, table, offset):
            T = tok_emb.shape[1]
            if offset + T > table.shape[0]:
                raise ValueError("too long")
            return tok_emb + table[-T:]

        return [ignores_offset, no_check, last_rows]


q1 = OneHotLookup()
q2 = Sinusoidal()
q3 = Nearest()
q4 = Rope()
q5 = PositionsWithOffset()


# ---------------------------------------------------------------- q6, q7: word vectors, order


def _word_vector_cosines(V_words: int, D: int, steps: int) -> dict[str, dict[str, float]]:
    """The lesson's SGNS training at another setting: cosines of w_in and of w_out rows."""
    import collections
    import re

    from torch import nn

    from minigpt.exercises.core import shakespeare

    train, val = shakespeare()
    words = re.findall(r"[a-z']+", (train + val).lower())
    vocab = [w for w, _ in collections.Counter(words).most_common(V_words)]
    stoi = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([stoi.get(w, -1) for w in words])
    X = torch.zeros(V_words, V_words)
    for off in range(1, 5):  # a window of 4 words
        a, b = ids[:-off], ids[off:]
        ok = (a >= 0) & (b >= 0)
        ones = torch.ones(int(ok.sum()))
        X.index_put_((a[ok], b[ok]), ones, accumulate=True)
        X.index_put_((b[ok], a[ok]), ones, accumulate=True)
    noise = X.sum(0) ** 0.75
    negatives = 5 * X.sum(1, keepdim=True) * (noise / noise.sum())[None, :]
    weight, total = X + negatives, X.sum()
    torch.manual_seed(0)
    w_in = nn.Parameter(0.1 * torch.randn(V_words, D))
    w_out = nn.Parameter(0.1 * torch.randn(V_words, D))
    opt = torch.optim.Adam([w_in, w_out], lr=0.05)
    for _ in range(steps):
        S = w_in @ w_out.T  # (V, V)
        loss = -(weight * F.logsigmoid(S) - negatives * S).sum() / total
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {}
    for side, W in (("in", w_in), ("out", w_out)):
        E = F.normalize(W.detach(), dim=1)
        out[side] = {
            pair: (E[stoi[a]] @ E[stoi[b]]).item()
            for pair in ("my/thy", "king/sword")
            for a, b in [pair.split("/")]
        }
    return out


class WordVectors(Experiment):
    name = "q6"
    question = """
Rerun the lesson's word2vec training (section 2) with a smaller setting: keep the
**500** most frequent words (not 1,500), vectors of size **D = 32** (not 64), and **60**
Adam steps, everything else as in the lesson (window 4, k = 5, `torch.manual_seed(0)`
just before drawing `w_in` then `w_out`, lr 0.05). Report the cosine similarity of the
trained `w_in` vectors for two pairs: `{"my/thy": ..., "king/sword": ...}`, each within
±0.02.
"""
    keys = ("my/thy", "king/sword")
    atol = 0.02
    trivial = (0.0, 1.0, -1.0)
    _hint = """
Copy the lesson's three cells (words, co-occurrence matrix X, training loop) and change
only V_words = 500, D = 32. The cosine of two rows is their dot product after
F.normalize(w_in.detach(), dim=1).
"""
    _solution = """
# the lesson's cells with V_words = 500 and D = 32; 60 steps as there
import collections
import re

from torch import nn
import torch.nn.functional as F
from minigpt import data

words = re.findall(r"[a-z']+", data.load_text("tinyshakespeare").lower())
V_words, D = 500, 32
vocab = [w for w, _ in collections.Counter(words).most_common(V_words)]
stoi = {w: i for i, w in enumerate(vocab)}
ids = torch.tensor([stoi.get(w, -1) for w in words])
X = torch.zeros(V_words, V_words)
for off in range(1, 5):
    a, b = ids[:-off], ids[off:]
    ok = (a >= 0) & (b >= 0)
    ones = torch.ones(int(ok.sum()))
    X.index_put_((a[ok], b[ok]), ones, accumulate=True)
    X.index_put_((b[ok], a[ok]), ones, accumulate=True)
noise = X.sum(0) ** 0.75
negatives = 5 * X.sum(1, keepdim=True) * (noise / noise.sum())[None, :]
weight, total = X + negatives, X.sum()
torch.manual_seed(0)
w_in = nn.Parameter(0.1 * torch.randn(V_words, D))
w_out = nn.Parameter(0.1 * torch.randn(V_words, D))
opt = torch.optim.Adam([w_in, w_out], lr=0.05)
for _ in range(60):
    S = w_in @ w_out.T  # (V, V)
    loss = -(weight * F.logsigmoid(S) - negatives * S).sum() / total
    opt.zero_grad()
    loss.backward()
    opt.step()
E = F.normalize(w_in.detach(), dim=1)
cosines = {p: (E[stoi[p.split("/")[0]]] @ E[stoi[p.split("/")[1]]]).item()
           for p in ("my/thy", "king/sword")}
"""

    def _runs(self) -> dict[str, dict[str, float]]:
        cached = self.__dict__.get("_both")
        if cached is None:
            cached = self.__dict__["_both"] = _word_vector_cosines(500, 32, 60)
        return cached

    def measure(self):
        return self._runs()["in"]

    def decoys(self):
        return {
            "the lesson's cosine with 1,500 words and D = 64": {"my/thy": 0.59, "king/sword": 0.25},
            "the cosine of the context vectors w_out, not of the word vectors w_in": (
                self._runs()["out"]
            ),
        }


q6 = WordVectors()


class WhyPositions(MultipleChoice):
    name = "q7"
    question = """
A self-attention layer with **no mask** and **no position information** reads the token
embeddings of "dog bites man" and of "man bites dog". What does it see?
"""
    options = (
        Option(
            'Two different inputs: the embedding of "dog" depends on where the token stands.',
            "An embedding is a row lookup: token id in, the same row out, wherever the token "
            "stands. The place is exactly what the lookup leaves out.",
        ),
        Option(
            "Two different inputs, because the softmax weights depend on the order of the keys.",
            "Softmax and the weighted sum treat the keys as a set: reorder the keys (with "
            "their values) and every output stays the same.",
        ),
        Option(
            "Nothing: attention raises an error on inputs without positions.",
            "It runs without complaint; that is what makes the problem easy to miss. It "
            "just cannot use the order.",
        ),
        Option(
            "The same three vectors in another order: each word gets the same output in both "
            "sentences, so the order must be added to the embeddings.",
            "Attention without a mask is permutation-equivariant: permute the tokens and the "
            "outputs are permuted the same way, nothing else changes. Adding a position "
            "vector (learned, sinusoidal) or rotating q and k (RoPE) gives it the order.",
        ),
    )
    answer = "d"
    _hint = "Swap two tokens of the input: which scores change, and how?"


q7 = WhyPositions()
