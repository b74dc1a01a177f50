"""English-to-French translation: the Tatoeba pairs, an honest split, and how to score it.

- ``load_translation_pairs`` reads ``english<TAB>french<TAB>credit`` rows (the
  Tatoeba export, dataset ``"tatoeba-eng-fra"``), naming the file and line of a bad
  one, and keeps each pair's CC BY 2.0 FR attribution.
- ``split_by_source`` splits by distinct English sentence: one English sentence has
  several French translations, and a pair-level split would put the same question
  on both sides, so the test set would reward memorising, not translating.
- ``chrf`` and ``sentence_chrf`` score translations by character n-grams (chrF,
  Popović 2015, computed as sacrebleu's ``CHRF()`` does); ``exact_match`` is the
  strict score. Short sentences with several good answers need both: exact match
  says 0 to "Je suis malade." when the references say "Je suis malade !".
- ``nearest_neighbour_translations`` is the baseline a model has to beat: answer
  with the translation of the most similar English training sentence
  (``nearest_sources``, by ``edit_distance``, Levenshtein).
- ``translation_example`` (and ``back_translation_example``, French to English)
  turns a sentence into an ``InstructionExample`` so the instruction-tuning code
  (``minigpt.finetune``) trains on translation unchanged; ``language_prompt`` is
  the short prompt it is asked with (``"English: Go.\\nFrench: "``).

The French text of Tatoeba puts a space before ``! ? : ; »``, typed by its
contributors as a plain space, a no-break space (U+00A0), a narrow no-break space
(U+202F) or a thin space (U+2009). The loader turns all four into a plain space:
otherwise exact match (and a model's vocabulary) would judge spacing nobody can see.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from minigpt import data
from minigpt.data import DataFormatError
from minigpt.instruct import InstructionExample

__all__ = [
    "TRANSLATE_BACK_INSTRUCTION",
    "TRANSLATE_INSTRUCTION",
    "TranslationPair",
    "back_translation_example",
    "chrf",
    "edit_distance",
    "exact_match",
    "language_prompt",
    "load_translation_pairs",
    "nearest_neighbour_translations",
    "nearest_sources",
    "normalize_spaces",
    "references",
    "sentence_chrf",
    "split_by_source",
    "translation_example",
]

TRANSLATE_INSTRUCTION = "Translate this sentence into French."
TRANSLATE_BACK_INSTRUCTION = "Translate this sentence into English."
# the languages each instruction reads and writes, for language_prompt
_LANGUAGES = {TRANSLATE_INSTRUCTION: ("English", "French"),
              TRANSLATE_BACK_INSTRUCTION: ("French", "English")}  # fmt: skip

# No-break, narrow no-break and thin spaces: French typography before ! ? : ; »
_SPACES = str.maketrans({"\u00a0": " ", "\u202f": " ", "\u2009": " "})


@dataclass(frozen=True)
class TranslationPair:
    """One English sentence, one French translation of it, and the contributors' credit."""

    source: str
    target: str
    credit: str


def normalize_spaces(text: str) -> str:
    """``text`` with U+00A0, U+202F and U+2009 replaced by a plain space, stripped."""
    return text.translate(_SPACES).strip()


# --------------------------------------------------------------------------- data


def load_translation_pairs(path: str | os.PathLike[str] | None = None) -> list[TranslationPair]:
    """Translation pairs from a file of ``english<TAB>french<TAB>credit`` lines.

    ``path`` defaults to ``minigpt.data.path("tatoeba-eng-fra")`` (5,000 pairs,
    2,597 distinct English sentences). Both sentences go through
    ``normalize_spaces`` (see the module docstring for why); the credit, which the
    CC BY 2.0 FR licence asks you to keep, is stored as it is, stripped. Blank
    lines are skipped.

    Raises:
        DataFormatError: a line that is not UTF-8, does not have three
            tab-separated fields, or has an empty English, French or credit
            field, naming the file and the line; or a file with no pairs.
    """
    file = Path(path) if path is not None else data.path("tatoeba-eng-fra")
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise DataFormatError(f"cannot read {file}: {e.strerror or e}") from e
    pairs = []
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(
                f"{file}, line {lineno}: not UTF-8 text (byte {e.start + 1} of the line is "
                f"{line_bytes[e.start : e.start + 1]!r}); save the file as UTF-8"
            ) from e
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataFormatError(
                f"{file}, line {lineno}: expected 3 tab-separated fields "
                f"(english, french, credit), found {len(fields)}"
            )
        source, target, credit = normalize_spaces(fields[0]), normalize_spaces(fields[1]), fields[2]
        for name, value in (("English", source), ("French", target), ("credit", credit)):
            if not value.strip():
                raise DataFormatError(f"{file}, line {lineno}: the {name} field is empty")
        pairs.append(TranslationPair(source, target, credit.strip()))
    if not pairs:
        raise DataFormatError(f"{file} has no translation pairs")
    return pairs


def split_by_source(
    pairs: Sequence[TranslationPair], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[TranslationPair], list[TranslationPair]]:
    """Split ``pairs`` into ``(train, test)`` by distinct English sentence.

    Every translation of an English sentence lands on the same side, so no test
    sentence was seen in training. The distinct sentences are sorted, shuffled
    with ``random.Random(seed)``, and the first ``round(n * test_fraction)`` go to
    the test side; each side keeps the pairs in their original order. The split
    depends only on the set of English sentences, the fraction and the seed.

    Raises:
        ValueError: ``test_fraction`` is not strictly between 0 and 1, or one side
            would have no sentence (too few distinct sentences for the fraction).
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a number, got {type(test_fraction).__name__}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction}; "
            "0.2 keeps a fifth of the English sentences for testing"
        )
    sources = sorted({p.source for p in pairs})
    n_test = round(len(sources) * test_fraction)
    if n_test == 0 or n_test == len(sources):
        raise ValueError(
            f"splitting {len(sources)} distinct English sentences with "
            f"test_fraction={test_fraction} leaves {len(sources) - n_test} for training and "
            f"{n_test} for testing; both need at least one, so use more pairs or another fraction"
        )
    random.Random(seed).shuffle(sources)
    test_sources = set(sources[:n_test])
    train = [p for p in pairs if p.source not in test_sources]
    test = [p for p in pairs if p.source in test_sources]
    return train, test


def references(pairs: Iterable[TranslationPair]) -> dict[str, list[str]]:
    """English sentence -> its French translations, in file order, without duplicates.

    The keys are in the order the English sentences first appear.
    """
    refs: dict[str, list[str]] = {}
    for p in pairs:
        targets = refs.setdefault(p.source, [])
        if p.target not in targets:
            targets.append(p.target)
    return refs


def translation_example(source: str, target: str = "") -> InstructionExample:
    """``source`` (English) as an instruction example whose response is ``target`` (French).

    ``language_prompt(translation_example(english))`` is the prompt the course's
    translation model answers; leave ``target`` empty to ask it.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a non-empty English sentence, got {source!r}")
    if not isinstance(target, str):
        raise TypeError(f"target must be a string (the French answer), got {type(target).__name__}")
    return InstructionExample(TRANSLATE_INSTRUCTION, source, target)


def back_translation_example(french: str, english: str = "") -> InstructionExample:
    """The same pair the other way: ``french`` as the input, ``english`` the response.

    Training on both directions teaches a model to read French as well as write it.
    """
    if not isinstance(french, str) or not french.strip():
        raise ValueError(f"french must be a non-empty French sentence, got {french!r}")
    if not isinstance(english, str):
        raise TypeError(f"english must be a string (the answer), got {type(english).__name__}")
    return InstructionExample(TRANSLATE_BACK_INSTRUCTION, french, english)


def language_prompt(example: InstructionExample) -> str:
    """The short prompt of a translation example: ``"English: Go.\\nFrench: "``.

    Tatoeba's sentences are about 20 characters; the course template adds about 80
    more to each, so a step of the short prompt costs less than half as much.
    Takes the examples of ``translation_example`` and ``back_translation_example``.
    """
    if example.instruction not in _LANGUAGES:
        raise ValueError(
            f"not a translation example: its instruction is {example.instruction!r}; make it "
            "with translation_example or back_translation_example"
        )
    source, target = _LANGUAGES[example.instruction]
    return f"{source}: {example.input}\n{target}: "


# --------------------------------------------------------------------------- scores


def _check_corpus(
    hypotheses: Sequence[str], refs: Sequence[Sequence[str]]
) -> list[tuple[str, Sequence[str]]]:
    """Validate (hypothesis, its references) rows for the corpus-level scores."""
    if isinstance(hypotheses, str) or isinstance(refs, str):
        raise TypeError(
            "hypotheses must be a list of strings and refs a list of lists of strings; "
            "for one sentence use sentence_chrf(hyp, [ref, ...])"
        )
    if len(hypotheses) != len(refs):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses and {len(refs)} reference lists; "
            "pass one list of references per hypothesis"
        )
    if not hypotheses:
        raise ValueError("no hypotheses to score; pass at least one")
    for i, (hyp, rs) in enumerate(zip(hypotheses, refs)):
        if not isinstance(hyp, str):
            raise TypeError(f"hypothesis {i} is a {type(hyp).__name__}; expected a string")
        if isinstance(rs, str) or not all(isinstance(r, str) for r in rs):
            raise TypeError(
                f"references of hypothesis {i} must be a list of strings, got {rs!r}; "
                "wrap a single reference in a list"
            )
        if not rs:
            raise ValueError(f"hypothesis {i} has no reference; each needs at least one")
    return list(zip(hypotheses, refs))


def _char_ngrams(text: str, order: int) -> list[Counter[str]]:
    """Counts of the character n-grams of ``text`` for n = 1..order, whitespace removed."""
    text = "".join(text.split())
    return [Counter(text[i : i + n] for i in range(len(text) - n + 1)) for n in range(1, order + 1)]


def _match_stats(hyp: list[Counter[str]], ref: list[Counter[str]]) -> list[int]:
    """[hyp n-grams, ref n-grams, matches] for each order, flattened.

    As in sacrebleu, an order that the reference is too short to have counts no
    hypothesis n-grams either, so it does not lower the precision.
    """
    stats = []
    for h, r in zip(hyp, ref):
        matches = sum(min(count, r[g]) for g, count in h.items() if g in r)
        stats += [sum(h.values()) if r else 0, sum(r.values()), matches]
    return stats


def _f_score(stats: Sequence[int], beta: float) -> float:
    """chrF from summed statistics: F-beta of the precision and recall averaged over
    the orders both sides have n-grams of (sacrebleu's "effective order"), 0..100."""
    factor = beta**2
    avg_prec = avg_rec = 0.0
    effective = 0
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i : i + 3]
        if n_hyp > 0 and n_ref > 0:
            avg_prec += n_match / n_hyp
            avg_rec += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    avg_prec /= effective
    avg_rec /= effective
    if avg_prec + avg_rec == 0:
        return 0.0
    score = (1 + factor) * avg_prec * avg_rec
    score /= factor * avg_prec + avg_rec
    return 100 * score


def _best_stats(hyp: str, refs: Sequence[str], char_order: int, beta: float) -> list[int]:
    """The statistics against the reference with the best sentence chrF (first on ties)."""
    hyp_ngrams = _char_ngrams(hyp, char_order)
    best: list[int] = []
    best_f = -1.0
    for ref in refs:
        stats = _match_stats(hyp_ngrams, _char_ngrams(ref, char_order))
        f = _f_score(stats, beta)
        if f > best_f:
            best, best_f = stats, f
    return best


def _check_params(char_order: int, beta: float) -> None:
    if isinstance(char_order, bool) or not isinstance(char_order, int) or char_order < 1:
        raise ValueError(f"char_order must be a positive integer, got {char_order!r}; chrF uses 6")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}; chrF uses 2")


def chrf(
    hypotheses: Sequence[str],
    refs: Sequence[Sequence[str]],
    char_order: int = 6,
    beta: float = 2.0,
) -> float:
    """Corpus-level chrF, 0..100: character n-gram F-score (Popović 2015).

    Computed as sacrebleu's ``CHRF()`` with its defaults computes it: character
    n-grams of orders 1..``char_order`` with whitespace removed, no word n-grams,
    case kept. Each hypothesis is compared with the one of its references that
    gives it the best sentence-level score (the first on ties), and that
    reference's n-gram counts are added to the corpus totals; precision and
    recall are averaged over the orders, and ``beta`` = 2 weighs recall twice as
    much as precision.

    Args:
        hypotheses: one translation per sentence.
        refs: for each hypothesis, a non-empty list of its reference translations
            (note: sacrebleu's ``corpus_score`` takes the transpose, one list per
            reference *stream*).

    Raises:
        ValueError: lengths differ, nothing to score, a hypothesis has no
            reference, or ``char_order``/``beta`` are not positive.
        TypeError: the arguments are not (lists of) strings.
    """
    _check_params(char_order, beta)
    rows = _check_corpus(hypotheses, refs)
    total = [0] * (3 * char_order)
    for hyp, rs in rows:
        for k, v in enumerate(_best_stats(hyp, rs, char_order, beta)):
            total[k] += v
    return _f_score(total, beta)


def sentence_chrf(
    hypothesis: str, refs: Sequence[str], char_order: int = 6, beta: float = 2.0
) -> float:
    """chrF of one translation against its references (``chrf`` on a one-sentence corpus)."""
    if isinstance(refs, str):
        refs = [refs]
    return chrf([hypothesis], [refs], char_order=char_order, beta=beta)


def exact_match(hypotheses: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Fraction (0..1) of hypotheses equal to one of their references.

    Both sides go through ``normalize_spaces`` first (surrounding whitespace
    stripped, no-break and thin spaces made plain); nothing else is forgiven:
    case, punctuation and inner spacing count.
    """
    rows = _check_corpus(hypotheses, refs)
    hits = sum(normalize_spaces(h) in {normalize_spaces(r) for r in rs} for h, rs in rows)
    return hits / len(rows)


# --------------------------------------------------------------------------- baseline


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions of one
    character that turn ``a`` into ``b``."""
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError(
            f"edit_distance compares two strings, got {type(a).__name__} and {type(b).__name__}"
        )
    row = list(range(len(a) + 1))  # distances from the first i characters of b to a's prefixes
    for i, cb in enumerate(b, start=1):
        row = _next_row(row, cb, a, i)
    return row[-1]


def _next_row(prev: list[int], ch: str, a: str, i: int) -> list[int]:
    """One step of the Levenshtein table: the row for a prefix one character (``ch``,
    its ``i``-th) longer, given the row ``prev`` of distances to the prefixes of ``a``."""
    left = i  # the distance from the longer prefix to a's empty prefix
    row = [left]
    for ca, diag, up in zip(a, prev, prev[1:]):
        if ca == ch:  # a match costs nothing (neighbouring entries differ by at most 1)
            left = diag
        else:  # 1 + the cheapest of substitute (diag), delete (up), insert (left)
            if up < left:
                left = up
            if diag < left:
                left = diag
            left += 1
        row.append(left)
    return row


def _shared_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _nearest(query: str, cands: Sequence[str], shared: Sequence[int]) -> int:
    """Index of the first of the sorted ``cands`` at the smallest edit distance from ``query``.

    ``shared[i]`` is the length of the common prefix of ``cands[i]`` and
    ``cands[i + 1]``. Neighbours in sorted order share prefixes, so the table rows
    of a shared prefix are computed once (``rows[k]`` is the row of the current
    candidate's first k characters). Once every entry of a row is above the
    bound, no word with that prefix can be closer, and all of them are skipped.
    """
    rows = [list(range(len(query) + 1))]
    valid = 0  # rows[0..valid] belong to the current candidate's prefix
    best_d, best = len(query) + max(map(len, cands)) + 1, 0
    i = 0
    while i < len(cands) and best_d > 0:
        cand, bound = cands[i], best_d - 1  # only a strictly closer one wins the tie-break
        if abs(len(cand) - len(query)) <= bound:
            k, pruned = valid, False
            while k < len(cand):
                row = _next_row(rows[k], cand[k], query, k + 1)
                k += 1
                rows[k:] = [row]
                if min(row) > bound:  # every word starting with cand[:k] is too far
                    pruned = True
                    break
            valid = k
            if pruned:
                while i + 1 < len(cands) and shared[i] >= k:
                    i += 1
            elif rows[k][-1] <= bound:
                best_d, best = rows[k][-1], i
        if i + 1 < len(cands):
            valid = min(valid, shared[i])
        i += 1
    return best


def nearest_sources(
    train_pairs: Sequence[TranslationPair], sources: Sequence[str], leave_out_self: bool = False
) -> list[str]:
    """The English training sentence nearest to each of ``sources`` by ``edit_distance``
    (ties go to the first in sorted order).

    ``leave_out_self=True`` never answers a source with itself: the nearest *other*
    training sentence, as a test sentence (never trained on) would see it; use it
    to find neighbours for the training sentences themselves.

    Raises:
        ValueError: ``train_pairs`` is empty (or, leaving a source out, has nothing else).
        TypeError: ``sources`` is a string, or holds something other than strings.
    """
    if isinstance(sources, str):
        raise TypeError("sources must be a list of English sentences, not one string")
    cands = sorted(references(train_pairs))
    if not cands:
        raise ValueError("train_pairs is empty; the baseline needs sentences to look up")
    shared = [_shared_prefix(a, b) for a, b in itertools.pairwise(cands)]
    out = []
    for src in sources:
        if not isinstance(src, str):
            raise TypeError(f"each source must be a string, got {type(src).__name__}")
        j = bisect.bisect_left(cands, src)
        if leave_out_self and j < len(cands) and cands[j] == src:
            if len(cands) == 1:
                raise ValueError(f"{src!r} is the only training sentence; nothing else to find")
            others = cands[:j] + cands[j + 1 :]
            # the prefixes shared by neighbours, with src's two neighbours now adjacent
            bridge = [_shared_prefix(cands[j - 1], cands[j + 1])] if 0 < j < len(cands) - 1 else []
            others_shared = shared[: max(j - 1, 0)] + bridge + shared[j + 1 :]
            out.append(others[_nearest(src, others, others_shared)])
        else:
            out.append(cands[_nearest(src, cands, shared)])
    return out


def nearest_neighbour_translations(
    train_pairs: Sequence[TranslationPair], sources: Sequence[str]
) -> list[str]:
    """The baseline: translate each source as its nearest English training sentence.

    For each sentence of ``sources``, find the training English sentence with the
    smallest ``edit_distance`` (``nearest_sources``) and answer with that
    sentence's first French translation in ``train_pairs``. It knows nothing of
    French; a model that does not beat it has learnt nothing but lookup.

    Raises:
        ValueError: ``train_pairs`` is empty.
        TypeError: ``sources`` is a string, or holds something other than strings.
    """
    table = references(train_pairs)
    return [table[near][0] for near in nearest_sources(train_pairs, sources)]
