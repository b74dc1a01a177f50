"""Bias, measured where it lives: in the data, in word vectors, in a model's predictions.

A model learns the statistics of its training text, including the ones nobody
wanted: if "doctor" is mostly followed by "he", so are its predictions. Each
measure here asks one narrow, checkable question:

- in the data: ``gender_counts`` counts gendered words within a few words of each
  role word (a co-occurrence count, nothing more);
- in vectors: ``pair_direction`` turns word pairs (he/she, man/woman, ...) into a
  unit direction, ``projection`` reads each vector along it, and ``weat`` is
  Caliskan et al.'s (2017) Word Embedding Association Test: how much more one set of
  target words (X) sits near attribute set A than B, compared with another target
  set (Y), as an effect size (a Cohen's d) with a seeded permutation-test p-value;
- in predictions: ``continuation_logprob`` is the model's own log-probability of a
  continuation, and ``logprob_gap`` the difference between two (" he" vs " she")
  after the same prompt;
- mitigations: ``swap_gendered`` rewrites a text with each gendered word replaced
  by its counterpart, case kept (counterfactual data augmentation trains on both),
  and ``project_out`` removes a direction from vectors (Bolukbasi et al. 2016).

A number from one of these says how one list of words behaves in one corpus or
model; it does not say that a model is fair or unfair in a use it was not measured
in, and a small number after a mitigation can hide bias that other measures still
find (Gonen and Goldberg 2019).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt.generate import Tokenizer
from minigpt.model import GPT

__all__ = [
    "FEMALE_WORDS",
    "GENDER_PAIRS",
    "MALE_WORDS",
    "WEATResult",
    "continuation_logprob",
    "gender_counts",
    "logprob_gap",
    "pair_direction",
    "project_out",
    "projection",
    "swap_gendered",
    "swap_table",
    "weat",
    "words",
]

# (male, female) pairs. "her" is the partner of both "him" and "his": swapping it back
# has to pick one, and takes "his" (the first pair that names it, see ``swap_table``).
GENDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("he", "she"),
    ("his", "her"),
    ("him", "her"),
    ("himself", "herself"),
    ("man", "woman"),
    ("men", "women"),
    ("boy", "girl"),
    ("boys", "girls"),
    ("father", "mother"),
    ("fathers", "mothers"),
    ("son", "daughter"),
    ("sons", "daughters"),
    ("brother", "sister"),
    ("brothers", "sisters"),
    ("husband", "wife"),
    ("husbands", "wives"),
    ("king", "queen"),
    ("kings", "queens"),
    ("lord", "lady"),
    ("lords", "ladies"),
    ("sir", "madam"),
    ("uncle", "aunt"),
    ("nephew", "niece"),
    ("prince", "princess"),
    ("duke", "duchess"),
    ("gentleman", "gentlewoman"),
    ("gentlemen", "gentlewomen"),
    ("master", "mistress"),
)
MALE_WORDS: tuple[str, ...] = tuple(dict.fromkeys(m for m, _ in GENDER_PAIRS))
FEMALE_WORDS: tuple[str, ...] = tuple(dict.fromkeys(f for _, f in GENDER_PAIRS))

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _check_words(name: str, value: object) -> list[str]:
    ok = isinstance(value, (list, tuple)) and value and all(isinstance(w, str) for w in value)
    if not ok:
        raise ValueError(f"{name} must be a non-empty list of words, got {value!r}")
    return [w.lower() for w in value]  # type: ignore[union-attr]


def _check_vectors(name: str, value: object, d: int | None = None) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] < 1:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be an (N, d) tensor with N >= 1 rows, got {got}")
    if d is not None and value.shape[1] != d:
        raise ValueError(f"{name} must have d = {d} columns like the others, got {value.shape[1]}")
    return value.double()


def _check_direction(direction: object, d: int) -> Tensor:
    if not isinstance(direction, Tensor) or direction.shape != (d,) or not direction.norm() > 0:
        raise ValueError(f"direction must be a non-zero ({d},) tensor, the vectors' width")
    return F.normalize(direction.double(), dim=0)


# ---------------------------------------------------------------- in the data


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (letters, with an inner apostrophe: "o'er")."""
    return _WORD.findall(_check_str("text", text).lower())


def gender_counts(
    text: str,
    roles: Sequence[str],
    *,
    window: int = 5,
    male: Sequence[str] = MALE_WORDS,
    female: Sequence[str] = FEMALE_WORDS,
) -> dict[str, tuple[int, int, int]]:
    """For each role word, how often male and female words appear near it.

    Every occurrence of a role in ``words(text)`` looks at the ``window`` words on each
    side and counts those in ``male`` and in ``female`` (a word near two occurrences
    counts twice). Returns role -> (occurrences, male count, female count), in the
    order of ``roles``.
    """
    roles_, male_, female_ = (
        _check_words(n, v) for n, v in (("roles", roles), ("male", male), ("female", female))
    )
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive integer (words on each side), got {window!r}")
    seq = words(text)
    is_male = torch.tensor([w in set(male_) for w in seq], dtype=torch.long)
    is_female = torch.tensor([w in set(female_) for w in seq], dtype=torch.long)
    m_sum = torch.cat([torch.zeros(1, dtype=torch.long), is_male.cumsum(0)])  # prefix sums
    f_sum = torch.cat([torch.zeros(1, dtype=torch.long), is_female.cumsum(0)])
    where: dict[str, list[int]] = {r: [] for r in roles_}
    for i, w in enumerate(seq):
        if w in where:
            where[w].append(i)
    out = {}
    for role in roles_:
        m = f = 0
        for i in where[role]:
            lo, hi = max(0, i - window), min(len(seq), i + window + 1)
            m += int(m_sum[hi] - m_sum[lo] - is_male[i])  # the role itself is not a neighbour
            f += int(f_sum[hi] - f_sum[lo] - is_female[i])
        out[role] = (len(where[role]), m, f)
    return out


# ---------------------------------------------------------------- counterfactual swaps


def swap_table(pairs: Iterable[tuple[str, str]] = GENDER_PAIRS) -> dict[str, str]:
    """Word -> counterpart, both ways, lower case. A word in two pairs ("her") maps to
    the partner of the first pair that names it."""
    table: dict[str, str] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"pairs must be (word, word) pairs, got {pair!r}")
        a, b = (_check_str("a pair's word", w).lower() for w in pair)
        table.setdefault(a, b)
        table.setdefault(b, a)
    return table


def _with_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[0].isupper():
        return word[0].upper() + word[1:]
    return word


def swap_gendered(text: str, pairs: Iterable[tuple[str, str]] = GENDER_PAIRS) -> str:
    """``text`` with every gendered word of ``pairs`` replaced by its counterpart.

    Whole words only ("he" in "then" stays), case kept ("He" -> "She", "HIS" -> "HER").
    Swapping twice gives the text back except where a word is ambiguous ("her" -> "his",
    so "him" comes back as "his"). Counterfactual data augmentation trains on a text
    and its swap, so that neither version's associations dominate.
    """
    table = swap_table(pairs)
    pattern = re.compile(
        r"\b(" + "|".join(map(re.escape, sorted(table, key=len, reverse=True))) + r")\b",
        re.IGNORECASE,
    )
    return pattern.sub(
        lambda m: _with_case(table[m.group(0).lower()], m.group(0)), _check_str("text", text)
    )


# ---------------------------------------------------------------- in word vectors


def pair_direction(a: Tensor, b: Tensor) -> Tensor:
    """The unit direction from one side of word pairs to the other.

    ``a``, ``b``: (N, d) vectors, row i of ``a`` paired with row i of ``b`` (he/she,
    man/woman, ...). Returns the (d,) unit vector along the mean of a[i] - b[i]
    (float64). A larger projection on it means "more like the a side".
    """
    a_ = _check_vectors("a", a)
    b_ = _check_vectors("b", b, a_.shape[1])
    if a_.shape[0] != b_.shape[0]:
        raise ValueError(
            f"a and b must pair up row by row, got {a_.shape[0]} and {b_.shape[0]} rows"
        )
    mean = (a_ - b_).mean(dim=0)
    if not mean.norm() > 0:
        raise ValueError("a and b are the same vectors on average: there is no direction")
    return F.normalize(mean, dim=0)


def projection(vectors: Tensor, direction: Tensor) -> Tensor:
    """(N,) cosine of each row of ``vectors`` (N, d) with ``direction`` (d,): the
    position along the direction, independent of the vectors' lengths."""
    v = _check_vectors("vectors", vectors)
    u = _check_direction(direction, v.shape[1])
    return F.normalize(v, dim=1) @ u


def project_out(vectors: Tensor, direction: Tensor) -> Tensor:
    """``vectors`` (N, d) with their component along ``direction`` (d,) removed:
    v - (v . u) u for the unit u, so every row ends orthogonal to it (float64)."""
    v = _check_vectors("vectors", vectors)
    u = _check_direction(direction, v.shape[1])
    return v - (v @ u)[:, None] * u


@dataclass(frozen=True)
class WEATResult:
    """A Word Embedding Association Test.

    Attributes:
        effect_size: (mean s(x) - mean s(y)) / std of s over X and Y (sample std),
            where s(w) = mean cos(w, A) - mean cos(w, B); about -2..2, 0 for none.
        statistic: sum s(x) - sum s(y).
        p_value: the share of random equal-size re-splits of X and Y whose statistic
            is at least the observed one (one-sided, +1 smoothed).
        permutations: how many re-splits were drawn.
    """

    effect_size: float
    statistic: float
    p_value: float
    permutations: int


def weat(
    X: Tensor, Y: Tensor, A: Tensor, B: Tensor, *, permutations: int = 10_000, seed: int = 0
) -> WEATResult:
    """Caliskan et al.'s association test of targets X, Y with attributes A, B.

    ``X`` (nx, d), ``Y`` (ny, d): target word vectors (e.g. career words, family words);
    ``A`` (na, d), ``B`` (nb, d): attribute word vectors (e.g. male, female words).
    A positive effect says X sits nearer A (and Y nearer B) than the other way round.
    The p-value shuffles X and Y together ``permutations`` times (seeded) and counts
    the re-splits with a statistic >= the observed one: (count + 1) / (permutations + 1).
    """
    X_ = _check_vectors("X", X)
    d = X_.shape[1]
    Y_, A_, B_ = (_check_vectors(n, v, d) for n, v in (("Y", Y), ("A", A), ("B", B)))
    if X_.shape[0] + Y_.shape[0] < 3:
        raise ValueError("X and Y need 3 words between them for a standard deviation")
    if not isinstance(permutations, int) or isinstance(permutations, bool) or permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}")
    W = F.normalize(torch.cat([X_, Y_]), dim=1)  # (nx + ny, d)
    s = (W @ F.normalize(A_, dim=1).T).mean(dim=1) - (W @ F.normalize(B_, dim=1).T).mean(dim=1)
    nx = X_.shape[0]
    sx, sy = s[:nx], s[nx:]
    statistic = float(sx.sum() - sy.sum())
    effect = float((sx.mean() - sy.mean()) / s.std())
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(len(s), generator=g) for _ in range(permutations)])
    in_x = s[orders[:, :nx]].sum(dim=1)  # (permutations,)
    stats = in_x - (s.sum() - in_x)  # sum over the new X minus sum over the new Y
    hits = int((stats >= statistic - 1e-12).sum())
    return WEATResult(effect, statistic, (hits + 1) / (permutations + 1), permutations)


# ---------------------------------------------------------------- in a model's predictions


@torch.no_grad()
def continuation_logprob(model: GPT, tokenizer: Tokenizer, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt) under ``model``: the sum of its tokens' log-probabilities.

    ``prompt`` and ``continuation`` are encoded separately and joined, so each token of
    the continuation is scored given the prompt and the continuation before it.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a minigpt GPT, got {type(model).__name__}")
    p, c = (
        tokenizer.encode(_check_str("prompt", prompt)),
        tokenizer.encode(_check_str("continuation", continuation)),
    )
    if not p or not c:
        raise ValueError("prompt and continuation must each encode to at least one token")
    ids = torch.tensor([p + c], device=model.device)[:, -model.config.block_size - 1 :]
    logits, _ = model(ids[:, :-1])  # (1, T - 1, V)
    logp = F.log_softmax(logits.float(), dim=-1)[0, -len(c) :]  # (len(c), V)
    return float(logp.gather(1, ids[0, -len(c) :, None]).sum())


def logprob_gap(
    model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], a: str = " he", b: str = " she"
) -> Tensor:
    """(N,) log p(a | prompt) - log p(b | prompt) for each prompt: positive leans to ``a``.

    A log-probability gap of g means the model finds ``a`` e^g times as likely as ``b``.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    return torch.tensor(
        [
            continuation_logprob(model, tokenizer, p, a)
            - continuation_logprob(model, tokenizer, p, b)
            for p in prompts
        ]
    )
