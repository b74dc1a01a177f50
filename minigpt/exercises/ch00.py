"""Chapter 00 exercises: what is a language model?

from minigpt.exercises import ch00
ch00.q1.check(bigram_counts)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from itertools import pairwise

import torch

from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    close,
    ints,
    number,
    shakespeare,
)

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"]

# Small inputs the checks try; each one has a trap for a common mistake
# (repeated letters, a pair that only appears if you wrap around, ...).
_TEXTS = ["hello", "abab", "aaa", "to be or not to be", "x", ""]


def _random_counts(V: int, seed: int) -> torch.Tensor:
    """A (V, V) int64 count matrix with zeros in it and one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (V, V), generator=g)
    counts[counts < 2] = 0  # plenty of unseen pairs
    counts[-1] = 0  # a character that never appears first
    return counts


def _random_probs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Strictly positive probabilities that sum to 1 along the last dim."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)


class BigramCounts(Question):
    name = "q1"
    _hint = """
Pair each character with the one after it: itertools.pairwise(text) (or zip(text, text[1:]))
gives exactly those pairs. collections.Counter counts anything you give it.
"""
    _solution = """
from collections import Counter
from itertools import pairwise

def bigram_counts(text):
    return Counter(pairwise(text))
"""

    def _check(self, fn):
        for text in _TEXTS:
            got = call(fn, text)
            if not isinstance(got, Mapping):
                raise Incorrect(f"expected a Counter (or dict), got {type(got).__name__}")
            want = Counter(pairwise(text))
            for key in got:
                if not (isinstance(key, tuple) and len(key) == 2):
                    raise Incorrect(
                        f"keys should be (first, second) tuples like ('h', 'e'), got {key!r}"
                    )
            counts = {k: number(v, f"the count of {k!r}", integer=True) for k, v in got.items()}
            got = {k: v for k, v in counts.items() if v != 0}
            if got != dict(want):
                missing = sorted(set(want) - set(got))
                extra = sorted(set(got) - set(want))
                detail = []
                if missing:
                    detail.append(f"missing pairs {missing}")
                if extra:
                    detail.append(f"pairs that are not in the text {extra}")
                wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
                if wrong:
                    k = wrong[0]
                    detail.append(f"{k} counted {got[k]} times instead of {want[k]}")
                raise Incorrect(f"bigram_counts({text!r}): " + "; ".join(detail))

    def reference(self):
        return lambda text: Counter(pairwise(text))

    def wrong_answers(self):
        return [
            # wraps around: the last character is paired with the first
            lambda text: Counter(zip(text, text[1:] + text[:1])),
            # counts single characters, not pairs
            lambda text: Counter(text),
            # pairs each character with itself
            lambda text: Counter(zip(text, text)),
            # counts only which pairs occur, not how often
            lambda text: Counter(set(pairwise(text))),
        ]


q1 = BigramCounts()


class NormalizeRows(Question):
    name = "q2"
    _hint = """
Add 1 to every count first (so nothing is zero), then divide each row by its own sum:
sum over dim=1 with keepdim=True, so the (V, 1) row sums broadcast against (V, V).
Make sure the result is a float tensor.
"""
    _solution = """
def normalize_rows(counts):
    smoothed = counts.float() + 1                         # (V, V) add-one smoothing
    return smoothed / smoothed.sum(dim=1, keepdim=True)   # (V, V) / (V, 1)
"""

    @staticmethod
    def _ref(counts: torch.Tensor) -> torch.Tensor:
        smoothed = counts.double() + 1
        return smoothed / smoothed.sum(dim=1, keepdim=True)

    def _check(self, fn):
        for V, seed in ((3, 0), (5, 1), (65, 2)):
            counts = _random_counts(V, seed)
            got = call(fn, counts)
            if not isinstance(got, torch.Tensor):
                raise Incorrect(f"expected a tensor, got {type(got).__name__}")
            if not got.is_floating_point():
                raise Incorrect(f"expected a float tensor of probabilities, got {got.dtype}")
            if got.shape != counts.shape:
                raise Incorrect(f"expected shape {tuple(counts.shape)}, got {tuple(got.shape)}")
            if torch.isnan(got).any():
                raise Incorrect(
                    "the result has NaNs: a row with no counts divides 0 by 0 "
                    "(add-one smoothing fixes that)"
                )
            row_sums = got.double().sum(dim=1)
            off = (row_sums - 1).abs() > 1e-4
            if off.any():
                i = int(off.nonzero()[0])
                empty = " (a row with no counts at all)" if counts[i].sum() == 0 else ""
                raise Incorrect(
                    "each row should sum to 1 (a distribution over the next character), "
                    f"but row {i}{empty} sums to {row_sums[i].item():.4f}"
                )
            close(got, self._ref(counts), what=f"normalize_rows of a {V}x{V} count matrix")

    def reference(self):
        return lambda counts: self._ref(counts).float()

    def wrong_answers(self):
        return [
            # no smoothing: unseen pairs get probability 0, empty rows give NaN
            lambda c: c.float() / c.float().sum(dim=1, keepdim=True).clamp(min=1),
            # normalises columns instead of rows
            lambda c: (c.float() + 1) / (c.float() + 1).sum(dim=0, keepdim=True),
            # adds 1 on top but forgets it in the denominator
            lambda c: (c.float() + 1) / (c.float().sum(dim=1, keepdim=True) + 1),
            # divides by the total of the whole matrix
            lambda c: (c.float() + 1) / (c.float() + 1).sum(),
        ]


q2 = NormalizeRows()


class ApplyTemperature(Question):
    name = "q3"
    _hint = """
Raise every probability to the power 1/T, then renormalise along the last dimension so
it sums to 1 again. (Equivalently: softmax(log(probs) / T, dim=-1).) T < 1 sharpens,
T > 1 flattens.
"""
    _solution = """
def apply_temperature(probs, T):
    scaled = probs ** (1.0 / T)                        # (..., V)
    return scaled / scaled.sum(dim=-1, keepdim=True)   # renormalise each row
"""

    @staticmethod
    def _ref(probs: torch.Tensor, T: float) -> torch.Tensor:
        return torch.softmax(torch.log(probs) / T, dim=-1)

    def _check(self, fn):
        for shape, seed in (((6,), 0), ((4, 7), 1)):
            probs = _random_probs(shape, seed)
            for T in (1.0, 0.5, 2.0, 0.1):
                got = call(fn, probs, T)
                if not isinstance(got, torch.Tensor):
                    raise Incorrect(f"expected a tensor, got {type(got).__name__}")
                if got.shape != probs.shape:
                    raise Incorrect(f"expected shape {tuple(probs.shape)}, got {tuple(got.shape)}")
                sums = got.double().sum(dim=-1)
                if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                    raise Incorrect(
                        f"with T={T} the probabilities should still sum to 1 along the last "
                        f"dimension, but they sum to {sums.flatten()[0].item():.4f}: renormalise"
                    )
                close(got, self._ref(probs, T), what=f"apply_temperature(probs, T={T})")

    def reference(self):
        return self._ref

    def wrong_answers(self):
        def renorm(x):
            return x / x.sum(dim=-1, keepdim=True)

        return [
            # multiplies by T: renormalising undoes it, so nothing changes
            lambda p, T: renorm(p * T),
            # raises to the power T instead of 1/T: sharpens when it should flatten
            lambda p, T: renorm(p**T),
            # forgets to renormalise
            lambda p, T: p ** (1.0 / T),
            # softmax of the probabilities themselves instead of their logs
            lambda p, T: torch.softmax(p / T, dim=-1),
        ]


q3 = ApplyTemperature()


class AverageNLL(Question):
    name = "q4"
    _hint = """
For each position i from 0 to len(ids) - 2, the model predicted ids[i + 1] from ids[i]
with probability probs[ids[i], ids[i + 1]]. Take minus the natural log (torch.log or
math.log) of each and average them (divide by the number of predictions, len(ids) - 1).
"""
    _solution = """
def average_nll(probs, ids):
    ids = torch.tensor(ids)
    p = probs[ids[:-1], ids[1:]]          # (N - 1,) probability of each actual next id
    return -torch.log(p).mean().item()
"""

    @staticmethod
    def _ref(probs: torch.Tensor, ids: list[int]) -> float:
        t = torch.tensor(ids)
        return -torch.log(probs[t[:-1], t[1:]].double()).mean().item()

    def _check(self, fn):
        cases = [
            (_random_probs((3, 3), 0), [0, 1, 2, 2, 0]),
            (_random_probs((5, 5), 1), [4, 4, 1, 0, 3, 2, 4, 0]),
            (_random_probs((5, 5), 2), [1, 3]),
        ]
        for probs, ids in cases:
            got = number(call(fn, probs, ids), f"average_nll for ids {ids}")
            want = self._ref(probs, ids)
            if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6):
                raise Incorrect(
                    f"average_nll for ids {ids} gave {got:.4f}, expected {want:.4f} "
                    "(the mean of -ln p(next | previous) over every adjacent pair)"
                )

    def reference(self):
        return self._ref

    def wrong_answers(self):
        def pairs(probs, ids):
            t = torch.tensor(ids)
            return probs[t[:-1], t[1:]]

        return [
            # sums instead of averaging
            lambda p, ids: -torch.log(pairs(p, ids)).sum().item(),
            # log base 2 (bits) instead of natural log (nats)
            lambda p, ids: -torch.log2(pairs(p, ids)).mean().item(),
            # forgets the minus sign
            lambda p, ids: torch.log(pairs(p, ids)).mean().item(),
            # reads the matrix the wrong way round: p(previous | next)
            lambda p, ids: -torch.log(pairs(p.T, ids)).mean().item(),
            # averages the probabilities, then takes the log
            lambda p, ids: -math.log(pairs(p, ids).mean().item()),
        ]


q4 = AverageNLL()


class UniformPerplexity(Question):
    name = "q5"
    _hint = """
A uniform model gives every one of the 65 characters probability 1/65, whatever came
before. Its average NLL is -ln(1/65) = ln(65), and perplexity = exp(NLL).
"""
    _solution = """
import math

answer = math.exp(-math.log(1 / 65))   # = 65: as unsure as picking among 65 equal choices
"""

    def _check(self, answer):
        answer = number(answer, "your answer")
        if math.isclose(answer, math.log(65), rel_tol=1e-3):
            raise Incorrect("that is the average NLL, ln(65); perplexity is exp(NLL)")
        if math.isclose(answer, 1 / 65, rel_tol=1e-3):
            raise Incorrect("that is the probability of each character; perplexity is 1/p here")
        if not math.isclose(answer, 65.0, rel_tol=1e-4):
            raise Incorrect(f"{answer} is not the perplexity of a uniform 65-way guess")

    def reference(self):
        return 65.0

    def wrong_answers(self):
        return [1 / 65, math.log(65), math.log2(65), 64, 2**65]


q5 = UniformPerplexity()


class Greedy(Question):
    name = "q6"
    _hint = """
Start from [start_id]. n times: look at the row probs[last id], take its argmax
(torch.argmax, then .item() to get a Python int) and append it.
"""
    _solution = """
def greedy(probs, start_id, n):
    ids = [start_id]
    for _ in range(n):
        ids.append(torch.argmax(probs[ids[-1]]).item())
    return ids
"""

    @staticmethod
    def _ref(probs: torch.Tensor, start_id: int, n: int) -> list[int]:
        ids = [start_id]
        for _ in range(n):
            ids.append(int(torch.argmax(probs[ids[-1]])))
        return ids

    def _check(self, fn):
        for V, start, n, seed in ((4, 0, 6, 0), (7, 3, 10, 1), (7, 6, 0, 2)):
            probs = _random_probs((V, V), seed)
            got = ints(call(fn, probs, start, n), f"greedy(probs, {start}, {n})")
            want = self._ref(probs, start, n)
            if len(got) != len(want):
                raise Incorrect(
                    f"greedy(probs, {start}, {n}) returned {len(got)} ids, expected "
                    f"{len(want)}: the start id followed by {n} new ones"
                )
            if got != want:
                raise Incorrect(f"greedy(probs, {start}, {n}) gave {got}, expected {want}")

    def reference(self):
        return self._ref

    def wrong_answers(self):
        def least_likely(probs, start_id, n):
            ids = [start_id]
            for _ in range(n):
                ids.append(int(torch.argmin(probs[ids[-1]])))
            return ids

        def column(probs, start_id, n):
            ids = [start_id]
            for _ in range(n):
                ids.append(int(torch.argmax(probs[:, ids[-1]])))
            return ids

        def always_from_start(probs, start_id, n):
            return [start_id] + [int(torch.argmax(probs[start_id]))] * n

        def without_start(probs, start_id, n):
            return self._ref(probs, start_id, n)[1:]

        return [least_likely, column, always_from_start, without_start]


q6 = Greedy()


# ---------------------------------------------------------------- q7, q8: less data, and why


def _bigram_nll(train: str, texts: tuple[str, ...], chars: list[str]) -> list[float]:
    """Average NLL of each text under the add-one bigram counted in ``train``."""
    stoi = {c: i for i, c in enumerate(chars)}
    V = len(chars)
    ids = torch.tensor([stoi[c] for c in train])
    counts = torch.bincount(ids[:-1] * V + ids[1:], minlength=V * V).view(V, V).double() + 1
    P = counts / counts.sum(dim=1, keepdim=True)  # (V, V)
    out = []
    for text in texts:
        t = torch.tensor([stoi[c] for c in text])
        out.append(-torch.log(P[t[:-1], t[1:]]).mean().item())
    return out


class LessData(Experiment):
    name = "q7"
    N = 5_000
    question = f"""
The lesson counted bigrams in the whole training text (1,003,854 characters). Count them
in only its first **{N:,} characters** instead, with add-one smoothing and the full
65-character vocabulary of Tiny Shakespeare. Report a dict with two average NLLs in nats:
`"train"` on those {N:,} characters, and `"val"` on the lesson's validation text (the
last 10%). Both within ±0.01.
"""
    keys = ("train", "val")
    atol = 0.01
    trivial = (0.0, 1.0, float(N))
    _hint = """
text = data.load_text("tinyshakespeare"); chars = sorted(set(text)); n = int(0.9 * len(text)).
Take small = text[:n][:5000], count its pairs into a (65, 65) table, add 1, normalise the
rows, and average -log P[a, b] over the pairs of small and of text[n:].
"""
    _solution = """
from minigpt import data

text = data.load_text("tinyshakespeare")
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
V, n = len(chars), int(0.9 * len(text))
small, val = text[:n][:5000], text[n:]
ids = torch.tensor([stoi[c] for c in small])
counts = torch.bincount(ids[:-1] * V + ids[1:], minlength=V * V).view(V, V).float() + 1
P = counts / counts.sum(dim=1, keepdim=True)  # (V, V)

def nll(s):
    t = torch.tensor([stoi[c] for c in s])
    return -torch.log(P[t[:-1], t[1:]]).mean().item()

losses = {"train": nll(small), "val": nll(val)}
"""

    def measure(self):
        train, val = shakespeare()
        chars = sorted(set(train + val))
        small_train, small_val = _bigram_nll(train[: self.N], (train[: self.N], val), chars)
        return {"train": small_train, "val": small_val}

    def decoys(self):
        train, val = shakespeare()
        local = sorted(set(train[: self.N]) | set(val))
        return {
            "the lesson's loss with all of the training text": {"train": 2.4546, "val": 2.4819},
            "the uniform model's ln 65": {"train": math.log(65), "val": math.log(65)},
            "the loss with a vocabulary built from fewer characters than all 65": dict(
                zip(self.keys, _bigram_nll(train[: self.N], (train[: self.N], val), local))
            ),
        }


q7 = LessData()


class WhyHeldOut(MultipleChoice):
    name = "q8"
    question = """
With 5,000 training characters the bigram's training loss is lower than its validation
loss, and the gap is wider than with the whole text. Why does the course judge a model by
its loss on **held-out** text rather than on the text it was counted on?
"""
    options = (
        Option(
            "Held-out text is harder, so its loss is a stricter grade.",
            "Harder is not the point: the validation text is more Shakespeare of the same "
            "kind. What differs is that the model has not seen it.",
        ),
        Option(
            "A model can score well on its training text by memorising it; only text it "
            "has not seen shows how well it predicts new text.",
            "The training loss rewards remembering the exact pairs counted; the loss on "
            "unseen text measures what carries over, which is what predicting new text "
            "needs. A small training text memorises more and carries over less.",
        ),
        Option(
            "The validation loss is always the lower of the two, so it flatters the model less.",
            "It is usually the higher one (your two numbers show it), and a grade should "
            "be fair, not flattering or harsh.",
        ),
        Option(
            "The validation text is short, so its loss is quicker to compute.",
            "Speed is a side effect; a loss on the training text would be worth less even "
            "if it were free to compute.",
        ),
    )
    answer = "b"
    _hint = "Think of a model that stored the training text word for word: what would each loss be?"


q8 = WhyHeldOut()
