"""Tokenizers: text in, integer ids out, and back.

Two tokenizers live here:

- ``CharTokenizer``: one id per character. Tiny vocabulary, long sequences, and it
  cannot encode a character it never saw (unless you give it a fallback token).
- ``BPETokenizer``: byte-level byte-pair encoding, the scheme GPT-2 uses. Text is
  UTF-8 bytes, so nothing is ever unknown; frequent byte sequences are merged into
  single tokens. It trains from text (``BPETokenizer.train``), loads GPT-2's own
  files (``BPETokenizer.from_gpt2``) and converts to a ``tiktoken.Encoding``
  (``to_tiktoken``) when you need speed.

How BPE training works here (and why it is fast in pure Python):

1. The text is cut at special tokens (never merged across), then pre-split with a
   regex (``GPT2_PATTERN``) into chunks such as ``"Hello"``, ``" world"``, ``"!"``;
   merges never cross a chunk boundary. Identical chunks are counted once, with
   their frequency: Tiny Shakespeare has ~300k chunks but only ~15k distinct ones.
2. Every adjacent pair of tokens inside a chunk is counted (weighted by frequency),
   and we remember which chunks contain each pair.
3. Repeatedly: take the most frequent pair from a max-heap, give it a new id, and
   rewrite only the chunks that contain it, adjusting the pair counts of those
   chunks. No full recount per merge.

Tie-breaking is part of the contract: when several pairs are equally frequent, the
pair ``(left, right)`` that is greatest when compared as a Python tuple of
``bytes`` wins (compare ``left`` first, then ``right``; a string is greater than
its own prefix). Training is therefore deterministic.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken

from minigpt.files import atomic_write

__all__ = [
    "GPT2_PATTERN",
    "TIKTOKEN_GPT2_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "bytes_to_unicode",
    "merge_pair",
    "safe_cuts",
    "tiktoken_gpt2_reference",
]

# GPT-2's pre-split pattern: contractions, words with an optional leading space,
# numbers, punctuation runs, and whitespace (a run of spaces keeps its last space
# for the next word, so " world" stays one chunk). Needs the `regex` module for \p{L}.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-2's pattern written for tiktoken's regex engine (``to_tiktoken`` hands it over).
# That engine keeps a backtracking entry per character ``\s+(?!\S)`` matches and gives
# up (a Rust panic) near a million. So, as in tiktoken's own gpt2 pattern (``r50k_pat_str``
# in tiktoken_ext/openai_public.py), ``\s++$`` comes before it and takes a run that ends
# the text: possessive ``++`` never backtracks. The last alternative ``\s`` equals ``\s+``:
# only a single whitespace character before a non-whitespace one gets that far. We leave
# tiktoken's ``\p{L}++`` (digits, punctuation) plain: nothing follows them to backtrack
# into, and ``++`` there only slows tiktoken down. A run of a million followed by more
# text is still too much for the engine, as for tiktoken's own gpt2 encoding.
TIKTOKEN_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s++$|\s+(?!\S)|\s"""
)

# Where text can be cut without changing how GPT2_PATTERN splits it (see safe_cuts):
# before a whitespace character that follows a non-whitespace one, or before the last
# character of a whitespace run that a non-whitespace character follows.
_SAFE_CUT = r"(?<=\S)(?=\s)|(?<=\s)(?=\s\S)"
_SAFE_CUT_FORWARD = regex.compile(_SAFE_CUT)
_SAFE_CUT_BACKWARD = regex.compile(_SAFE_CUT, flags=regex.REVERSE)

_SAVE_FORMAT = "minigpt-bpe"
_SAVE_VERSION = 1


# ---------------------------------------------------------------------------
# Character tokenizer
# ---------------------------------------------------------------------------


class CharTokenizer:
    """One id per character: ids are the positions of the characters in ``chars``.

    Args:
        chars: the vocabulary, one string per id (usually single characters).
        unk_token: optional fallback. When given, it is added to the vocabulary (if
            missing) and every unknown character encodes to its id; when ``None``
            (the default) an unknown character raises a ``ValueError``.
    """

    def __init__(self, chars: Iterable[str], unk_token: str | None = None) -> None:
        itos = list(chars)
        if unk_token is not None and unk_token not in itos:
            itos.append(unk_token)
        if len(set(itos)) != len(itos):
            dupes = sorted({c for c in itos if itos.count(c) > 1})
            raise ValueError(f"the vocabulary lists {dupes!r} more than once")
        if any(not isinstance(c, str) or not c for c in itos):
            raise ValueError("every vocabulary entry must be a non-empty string")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(itos)}
        self.unk_token = unk_token
        self._unk_id = None if unk_token is None else self.stoi[unk_token]

    @classmethod
    def fit(cls, text: str, unk_token: str | None = None) -> CharTokenizer:
        """A tokenizer whose vocabulary is the sorted set of characters in ``text``."""
        return cls(sorted(set(text)), unk_token=unk_token)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``, shape ``(len(text),)``."""
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        if self._unk_id is not None:
            return [stoi.get(c, self._unk_id) for c in text]
        pos, ch = next((i, c) for i, c in enumerate(text) if c not in stoi)
        raise ValueError(
            f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the vocabulary "
            f"of {self.vocab_size} characters. Fit the tokenizer on text that contains it, "
            f"or build it with unk_token=... to map unknown characters to a fallback."
        )

    def decode(self, ids: Iterable[int]) -> str:
        """The text for ``ids``; an id outside ``0..vocab_size-1`` raises ``ValueError``."""
        out = []
        for i in _as_int_list(ids):
            if not 0 <= i < len(self.itos):
                raise ValueError(f"unknown token id {i}: valid ids are 0..{self.vocab_size - 1}")
            out.append(self.itos[i])
        return "".join(out)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary as JSON (atomically)."""
        obj = {"format": "minigpt-char", "version": 1, "unk_token": self.unk_token}
        obj["chars"] = self.itos
        _write_json_atomic(Path(path), obj)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CharTokenizer:
        """Read a tokenizer written by ``save``."""
        obj = _read_json(Path(path), "minigpt-char")
        return cls(obj["chars"], unk_token=obj.get("unk_token"))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk_token={self.unk_token!r})"


# ---------------------------------------------------------------------------
# Byte-level BPE: training
# ---------------------------------------------------------------------------


def _descending(token: bytes) -> str:
    """A sort key that orders byte strings from greatest to smallest.

    Python's ``heapq`` pops the smallest item, but ties must go to the greatest pair.
    Byte ``x`` becomes the character ``chr(256 - x)`` (so greater bytes sort first)
    and a final ``chr(257)`` makes a string sort before its own prefixes.
    """
    return "".join([chr(256 - x) for x in token]) + chr(257)


def merge_pair(ids: list[int], a: int, b: int, new_id: int) -> list[int]:
    """``ids`` with every occurrence of the pair ``(a, b)`` replaced by ``new_id``, left to right.

    The one step of BPE: training applies it to learn a merge, encoding to apply one.
    """
    out = []
    i, n = 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _learn_merges(
    word_counts: Mapping[bytes, int], n_tokens: int
) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """Learn merges until there are ``n_tokens`` distinct tokens (or nothing left to merge).

    Args:
        word_counts: each distinct pre-split chunk (as UTF-8 bytes) and how often it occurs.
        n_tokens: the number of (non-special) tokens wanted, 256 single bytes included.

    Returns:
        ``tokens`` (token id -> bytes; ids 0..255 are the single bytes) and ``merges``
        in the order they were learned.
    """
    tokens: list[bytes] = [bytes([i]) for i in range(256)]
    id_of: dict[bytes, int] = {t: i for i, t in enumerate(tokens)}
    sort_key: list[str] = [_descending(t) for t in tokens]

    words: list[list[int]] = [list(w) for w in word_counts]  # byte values are ids 0..255
    freqs: list[int] = list(word_counts.values())

    # pair -> total count over all words, and pair -> indices of words that contain it
    # (a superset: a word is not removed when a pair disappears from it; we re-check).
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in pairwise(w):
            pair_counts[pair] += f
            where[pair].add(i)

    # Max-heap of (-count, tie-break keys, pair) with lazy invalidation: an entry may
    # hold an outdated (too high) count; when it surfaces we re-push the true count.
    heap = [(-c, sort_key[a], sort_key[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    while len(tokens) < n_tokens and heap:
        neg_count, _, _, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -neg_count:  # stale entry
            if count > 0:
                heapq.heappush(heap, (-count, sort_key[a], sort_key[b], a, b))
            continue

        # (a, b) is the most frequent pair (ties: the greatest pair of byte strings).
        new_bytes = tokens[a] + tokens[b]
        merges.append((tokens[a], tokens[b]))
        new_id = id_of.get(new_bytes)
        if new_id is None:  # (rarely, another merge already built the same bytes)
            new_id = len(tokens)
            tokens.append(new_bytes)
            id_of[new_bytes] = new_id
            sort_key.append(_descending(new_bytes))

        # Rewrite only the words that contain (a, b). Pairs that do not involve the new
        # token can only lose counts, so only pairs with new_id need fresh heap entries.
        touched: set[tuple[int, int]] = set()
        for i in where.pop((a, b)):
            w = words[i]
            merged = merge_pair(w, a, b, new_id)
            if len(merged) == len(w):
                continue  # this word no longer contains the pair
            f = freqs[i]
            for pair in pairwise(w):
                pair_counts[pair] -= f
            for pair in pairwise(merged):
                pair_counts[pair] += f
                if new_id in pair:
                    where[pair].add(i)
                    touched.add(pair)
            words[i] = merged
        del pair_counts[(a, b)]
        for pair in touched:
            c = pair_counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, sort_key[pair[0]], sort_key[pair[1]], *pair))
    return tokens, merges


# ---------------------------------------------------------------------------
# Byte-level BPE: the tokenizer
# ---------------------------------------------------------------------------


class BPETokenizer:
    """Byte-level BPE tokenizer (GPT-2 compatible).

    Args:
        vocab: token id -> the bytes it stands for. Every single byte must have an id.
            Special tokens may be included (as their UTF-8 bytes) or left out.
        merges: the merge rules ``(left, right)`` in priority order (earliest first).
            The parts and the result of every merge must be in ``vocab``.
        special_tokens: strings such as ``"<|endoftext|>"`` that are never split. A
            sequence of strings takes the id the string already has in ``vocab`` or
            the next free id; a mapping gives the ids explicitly.
        pattern: the pre-split regex (``regex`` module syntax).

    Attributes ``vocab``, ``merges``, ``special_tokens`` and ``pattern`` return copies.
    """

    # encode_iterable encodes its buffer once it holds this many characters
    flush_chars: int = 1 << 16

    def __init__(
        self,
        vocab: Mapping[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | Mapping[str, int] = (),
        pattern: str = GPT2_PATTERN,
    ) -> None:
        vocab = {int(i): bytes(b) for i, b in vocab.items()}
        if any(i < 0 for i in vocab):
            raise ValueError("token ids must be >= 0")
        _check_not_one_string(special_tokens)

        # Special tokens: explicit ids, the id of the same bytes in vocab, or a new id.
        specials: dict[str, int] = {}
        if isinstance(special_tokens, Mapping):
            for s, i in special_tokens.items():
                if i in vocab and vocab[i] != s.encode("utf-8"):
                    raise ValueError(
                        f"special token {s!r} is given id {i}, but the vocab uses that id "
                        f"for {vocab[i]!r}; pick a free id"
                    )
                specials[s] = int(i)
        else:
            by_bytes = {b: i for i, b in vocab.items()}
            next_id = max(vocab, default=-1) + 1
            for s in special_tokens:
                if s in specials:
                    continue
                i = by_bytes.get(s.encode("utf-8"))
                if i is None:
                    i, next_id = next_id, next_id + 1
                specials[s] = i
        if any(not s for s in specials):
            raise ValueError("a special token cannot be the empty string")
        if len(set(specials.values())) != len(specials):
            raise ValueError("two special tokens share an id")
        for s, i in specials.items():
            vocab[i] = s.encode("utf-8")

        # Ordinary tokens: bytes -> id must be one-to-one.
        special_ids = set(specials.values())
        id_of: dict[bytes, int] = {}
        for i, b in vocab.items():
            if i in special_ids:
                continue
            if b in id_of:
                raise ValueError(
                    f"the token {b!r} appears twice in the vocab (ids {id_of[b]}, {i})"
                )
            id_of[b] = i
        missing = [x for x in range(256) if bytes([x]) not in id_of]
        if missing:
            raise ValueError(
                f"a byte-level vocab needs all 256 single bytes; missing {len(missing)}, "
                f"e.g. {bytes([missing[0]])!r}"
            )

        # merge rank: (left id, right id) -> (rank, id of the merged token)
        ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(merges):
            left, right = bytes(left), bytes(right)
            for part in (left, right, left + right):
                if part not in id_of:
                    raise ValueError(f"merge {rank} {(left, right)!r} uses {part!r}, not in vocab")
            ranks.setdefault((id_of[left], id_of[right]), (rank, id_of[left + right]))

        self._vocab = vocab
        self._merges = [(bytes(a), bytes(b)) for a, b in merges]
        self._special = specials
        self._id_of = id_of
        self._ranks = ranks
        self._byte_ids = [id_of[bytes([x])] for x in range(256)]
        self._pattern_str = pattern
        self._pattern = regex.compile(pattern)
        self._cache: dict[str, list[int]] = {}
        self._special_re: dict[frozenset[str], Any] = {}

    # -- construction -------------------------------------------------------

    @classmethod
    def train(
        cls,
        text_or_iterable: str | Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (),
        pattern: str = GPT2_PATTERN,
    ) -> BPETokenizer:
        """Learn a byte-level BPE from text.

        Args:
            text_or_iterable: one string, or an iterable of strings (documents or
                lines); chunks never span two items.
            vocab_size: the total vocabulary size, counting the 256 byte tokens and the
                special tokens. Training stops early if no pair is left to merge.
            special_tokens: strings that get their own ids (after all merged tokens) and
                are cut out of the training text, so no merge crosses them.
            pattern: the pre-split regex.

        Ids: 0..255 are the single bytes, 256.. the merged tokens in the order they were
        learned, then the special tokens.
        """
        _check_not_one_string(special_tokens)
        special_tokens = list(dict.fromkeys(special_tokens))
        n_tokens = vocab_size - len(special_tokens)
        if n_tokens < 256:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it must be at least 256 (the byte "
                f"tokens) + {len(special_tokens)} (special tokens)"
            )
        texts = [text_or_iterable] if isinstance(text_or_iterable, str) else text_or_iterable
        compiled = regex.compile(pattern)
        splitter = _special_regex(special_tokens)
        chunk_counts: Counter[str] = Counter()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"expected strings to train on, got {type(text).__name__}")
            # split() keeps the special tokens at odd positions: train on the rest
            pieces = splitter.split(text)[::2] if splitter is not None else [text]
            for piece in pieces:
                chunk_counts.update(compiled.findall(piece))
        word_counts: Counter[bytes] = Counter()
        for chunk, n in chunk_counts.items():
            word_counts[chunk.encode("utf-8")] += n

        tokens, merges = _learn_merges(word_counts, n_tokens)
        vocab = dict(enumerate(tokens))
        specials = {s: len(tokens) + k for k, s in enumerate(special_tokens)}
        return cls(vocab, merges, specials, pattern)

    @classmethod
    def from_gpt2(cls) -> BPETokenizer:
        """GPT-2's tokenizer, read from ``encoder.json`` and ``vocab.bpe``.

        The files come from ``minigpt.data`` (datasets ``"gpt2-encoder"`` and
        ``"gpt2-vocab"``): from ``$MINIGPT_DATA_DIR`` or the cache, downloaded once if
        needed. Both files spell bytes with ``bytes_to_unicode``'s printable alphabet.
        """
        from minigpt import data

        encoder = json.loads(data.path("gpt2-encoder").read_text(encoding="utf-8"))
        lines = data.path("gpt2-vocab").read_text(encoding="utf-8").split("\n")
        if not lines[0].startswith("#version"):
            raise ValueError("vocab.bpe should start with a '#version' line")
        decoder = {c: b for b, c in bytes_to_unicode().items()}

        def to_bytes(s: str) -> bytes:
            return bytes(decoder[c] for c in s)

        vocab = {i: to_bytes(s) for s, i in encoder.items()}
        merges = []
        for line in lines[1:]:
            if line:
                left, right = line.split(" ")
                merges.append((to_bytes(left), to_bytes(right)))
        return cls(vocab, merges, special_tokens=["<|endoftext|>"])

    # -- properties ---------------------------------------------------------

    @property
    def vocab(self) -> dict[int, bytes]:
        """Token id -> bytes, special tokens included."""
        return dict(self._vocab)

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merges ``(left, right)`` in priority order."""
        return list(self._merges)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id."""
        return dict(self._special)

    @property
    def pattern(self) -> str:
        return self._pattern_str

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (the size an embedding table needs)."""
        return max(self._vocab) + 1

    def __len__(self) -> int:
        return len(self._vocab)

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"special_tokens={sorted(self._special)!r})"
        )

    # -- encoding -----------------------------------------------------------

    def _bpe(self, chunk: str) -> list[int]:
        """Ids of one pre-split chunk: apply merges, earliest-learned first."""
        ids = [self._byte_ids[x] for x in chunk.encode("utf-8")]
        ranks = self._ranks
        while len(ids) > 1:
            best, best_rank = None, None
            for pair in pairwise(ids):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r[0] < best_rank):
                    best, best_rank = pair, r[0]
            if best is None:
                break  # no adjacent pair is a merge: done
            ids = merge_pair(ids, best[0], best[1], ranks[best][1])
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of text that holds no special tokens; repeated chunks come from a cache."""
        cache, out = self._cache, []
        for chunk in self._pattern.findall(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = self._bpe(chunk)
                if len(cache) >= 100_000:  # keep memory bounded on huge inputs
                    cache.clear()
                cache[chunk] = ids
            out.extend(ids)
        return out

    def _resolve_special(self, allowed_special: Any) -> tuple[frozenset[str], frozenset[str]]:
        """(allowed, disallowed) special tokens for an ``allowed_special`` argument."""
        everything = frozenset(self._special)
        if allowed_special == "none_raise":
            return frozenset(), everything
        if allowed_special == "all":
            return everything, frozenset()
        if allowed_special == "none":
            return frozenset(), frozenset()
        if isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special={allowed_special!r}: use 'none_raise', 'all', 'none' or a set "
                f"of special tokens"
            )
        allowed = frozenset(allowed_special)
        unknown = allowed - everything
        if unknown:
            raise ValueError(
                f"{sorted(unknown)!r} are not special tokens of this tokenizer "
                f"(it has {sorted(everything)!r})"
            )
        return allowed, everything - allowed

    def _splitter(self, specials: frozenset[str]) -> Any:
        if specials not in self._special_re:
            self._special_re[specials] = _special_regex(specials)
        return self._special_re[specials]

    def _encode(self, text: str, allowed: frozenset[str], disallowed: frozenset[str]) -> list[int]:
        try:
            return self._encode_valid(text, allowed, disallowed)
        except UnicodeEncodeError:
            # A lone surrogate (e.g. "\ud800") has no UTF-8 bytes. Do what tiktoken does:
            # join surrogate pairs into their character, and make the lone ones U+FFFD.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._encode_valid(text, allowed, disallowed)

    def _encode_valid(
        self, text: str, allowed: frozenset[str], disallowed: frozenset[str]
    ) -> list[int]:
        splitter = self._splitter(allowed)
        pieces = splitter.split(text) if splitter is not None else [text]
        guard = self._splitter(disallowed)
        out: list[int] = []
        # split() with a capture group alternates: text, special, text, special, ...
        for k, piece in enumerate(pieces):
            if k % 2:
                out.append(self._special[piece])
                continue
            if guard is not None and (m := guard.search(piece)):
                raise ValueError(
                    f"the text contains the special token {m.group()!r}. Pass "
                    f"allowed_special='all' (or a set containing it) to encode it as a special "
                    f"token, or allowed_special='none' to encode it as ordinary text."
                )
            out.extend(self._encode_ordinary(piece))
        return out

    def encode(self, text: str, allowed_special: str | Iterable[str] = "none_raise") -> list[int]:
        """Token ids for ``text``.

        Args:
            text: the string to encode.
            allowed_special: which special tokens in ``text`` become their special id:
                ``"none_raise"`` (default, like tiktoken): none, and finding one raises
                ``ValueError``; ``"all"``: every one; a set: those, the others raise;
                ``"none"``: none, they are encoded as ordinary text. Where special tokens
                overlap, the longest match wins.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._encode(text, *self._resolve_special(allowed_special))

    def encode_iterable(
        self, texts: Iterable[str], allowed_special: str | Iterable[str] = "none_raise"
    ) -> Iterator[int]:
        """Lazily yield the ids of the concatenation of ``texts`` (e.g. an open file).

        Exactly ``encode("".join(texts))``, however the text is cut into pieces, while
        holding only a small buffer: once it holds ``flush_chars`` characters, the
        buffer is encoded up to its last ``safe_cuts`` position that no special token
        straddles, and the rest is kept for the next round. Those cuts are proven for
        GPT-2's pattern; with another pattern the whole input is encoded at the end.
        """
        allowed, disallowed = self._resolve_special(allowed_special)
        can_cut = self._pattern_str in (GPT2_PATTERN, TIKTOKEN_GPT2_PATTERN)
        margin = 1 + max((len(s) for s in self._special), default=0)  # see a special whole
        pending: list[str] = []
        size, flush_at = 0, self.flush_chars
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_iterable expects strings, got {type(text).__name__}")
            pending.append(text)
            size += len(text)
            if size < flush_at:
                continue
            buf = "".join(pending)
            cut = self._safe_cut(buf, len(buf) - margin) if can_cut else 0
            if cut == 0:  # no safe cut yet (e.g. one huge whitespace run): read more
                pending, flush_at = [buf], 2 * size
                continue
            yield from self._encode(buf[:cut], allowed, disallowed)
            pending, size, flush_at = [buf[cut:]], len(buf) - cut, self.flush_chars
        yield from self._encode("".join(pending), allowed, disallowed)

    def _safe_cut(self, buf: str, stop: int) -> int:
        r"""The last ``safe_cuts`` position before ``stop`` where no special token,
        allowed or not, overlaps ``buf[cut : cut + 2]``; 0 if none.

        A cut through a special token would hide it (from the guard too). And the text
        before an allowed special token is encoded as if it ended there: in
        ``"\n\n<|endoftext|>"`` the two newlines are one token, which a cut between
        them would split.
        """
        for cut in safe_cuts(buf, 0, stop):
            if all(
                buf.find(s, max(0, cut - len(s) + 1), cut + len(s) + 1) < 0 for s in self._special
            ):
                return cut
        return 0

    # -- decoding -----------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``; an unknown id raises ``ValueError``."""
        vocab = self._vocab
        try:
            return b"".join([vocab[i] for i in _as_int_list(ids)])
        except KeyError as e:
            raise ValueError(
                f"unknown token id {e.args[0]!r}: this tokenizer has ids 0..{self.vocab_size - 1}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``. Bytes that are not valid UTF-8 (e.g. half of an emoji)
        become U+FFFD, the replacement character, instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- saving and loading ---------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as JSON a person can read (atomically).

        Tokens are spelled with GPT-2's printable byte alphabet (``bytes_to_unicode``:
        ``Ġ`` is a space, ``Ċ`` a newline), as in GPT-2's own files; merges are written
        ``"left right"`` like ``vocab.bpe``.
        """
        enc = bytes_to_unicode()

        def spell(b: bytes) -> str:
            return "".join(enc[x] for x in b)

        special_ids = set(self._special.values())
        obj = {
            "format": _SAVE_FORMAT,
            "version": _SAVE_VERSION,
            "note": "tokens use GPT-2's byte-to-unicode alphabet: Ġ is a space, Ċ a newline",
            "pattern": self._pattern_str,
            "special_tokens": self._special,
            "vocab": {spell(b): i for i, b in sorted(self._vocab.items()) if i not in special_ids},
            "merges": [f"{spell(a)} {spell(b)}" for a, b in self._merges],
        }
        _write_json_atomic(Path(path), obj)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Read a tokenizer written by ``save``."""
        obj = _read_json(Path(path), _SAVE_FORMAT)
        dec = {c: x for x, c in bytes_to_unicode().items()}
        try:

            def unspell(s: str) -> bytes:
                return bytes(dec[c] for c in s)

            vocab = {int(i): unspell(s) for s, i in obj["vocab"].items()}
            merges = [tuple(unspell(p) for p in m.split(" ")) for m in obj["merges"]]
            if any(len(m) != 2 for m in merges):
                raise ValueError("every merge must be two tokens separated by one space")
            return cls(vocab, merges, dict(obj["special_tokens"]), obj["pattern"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid minigpt BPE tokenizer file: {e}") from e

    # -- the fast path ------------------------------------------------------

    def to_tiktoken(self, name: str = "minigpt-bpe") -> tiktoken.Encoding:
        """A ``tiktoken.Encoding`` that gives exactly the same ids, much faster.

        tiktoken ranks tokens by id and merges the adjacent pair whose concatenation
        has the lowest rank. That equals our merge order when every merged token's id
        grows with its merge's position (true for trained tokenizers and for GPT-2).
        GPT-2's pattern is handed over as ``TIKTOKEN_GPT2_PATTERN``, the same split
        written for tiktoken's regex engine, so that a text ending in a run of a million
        spaces encodes instead of crashing it.
        """
        import tiktoken

        special_ids = set(self._special.values())
        ranks = {b: i for i, b in self._vocab.items() if i not in special_ids}
        merged = [self._id_of[a + b] for a, b in self._merges]
        byte_ids = set(self._byte_ids)
        if any(x >= y for x, y in pairwise(merged)) or (merged and max(byte_ids) >= merged[0]):
            raise ValueError(
                "tiktoken needs token ids that grow with merge order (bytes first, then "
                "each merge's result once); this vocab does not have that property"
            )
        extra = set(ranks.values()) - byte_ids - set(merged)
        if extra:
            raise ValueError(f"{len(extra)} tokens are neither single bytes nor merge results")
        return tiktoken.Encoding(
            name=name,
            pat_str=TIKTOKEN_GPT2_PATTERN
            if self._pattern_str == GPT2_PATTERN
            else self._pattern_str,
            mergeable_ranks=ranks,
            special_tokens=dict(self._special),
        )


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (used in its files).

    Printable Latin-1 bytes map to themselves; the others (space, newline, control
    bytes, ...) map to characters from U+0100 on, so a space is ``Ġ`` (U+0120).
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def safe_cuts(
    text: str, start: int = 0, stop: int | None = None, *, last_first: bool = True
) -> Iterator[int]:
    r"""Where ``text`` can be cut into two texts that encode separately to its own ids.

    Yields the positions ``p`` with ``start < p < stop`` (the last first, unless
    ``last_first=False``; the search is lazy either way) such that GPT-2's
    pattern splits ``text[:p]`` and ``text[p:]`` into exactly the chunks it splits
    ``text`` into; only ``text[start:stop]`` is read (``stop`` defaults to ``len(text)``),
    so a stream can be cut before the rest of it has arrived. ``encode_iterable`` and
    ``minigpt.tokens.encode_to_file`` cut only here.

    Why these are safe: every chunk of ``GPT2_PATTERN`` is either all whitespace, or an
    optional space followed by non-whitespace (letters, digits, punctuation, or a
    contraction such as ``'ll``). And the pattern never looks behind. So:

    1. Before a whitespace character that follows a non-whitespace one (``"word| next"``,
       ``"end.|\n"``) there is always a chunk boundary, and the left text ends in
       non-whitespace: no whitespace run reaches its end, where ``(?!\S)`` would see
       the end of the text instead of the character that follows.
    2. A whitespace run that a non-whitespace character follows splits as all of the
       run but its last character (``\s+(?!\S)``), then that last character, alone
       or as the space of ``" next"``. Cutting before that last character leaves the
       first part at the very end of the left text, where ``\s+(?!\S)`` takes it
       whole, as before.

    Anywhere else in a whitespace run the ids can change: ``"\n\n"`` alone is one
    token, but before ``"x"`` it is two. A run at the end of ``stop`` has no cut inside:
    what follows it decides how it splits.

    This is about the pattern alone. Where special tokens are split out first, the text
    before one is encoded as if it ended there, so a cut must also keep clear of them
    (``encode_iterable`` sees to that).
    """
    stop = len(text) if stop is None else min(stop, len(text))
    search = _SAFE_CUT_BACKWARD if last_first else _SAFE_CUT_FORWARD
    for m in search.finditer(text, start + 1, max(stop, start + 1)):
        yield m.start()


def _check_not_one_string(special_tokens: Any) -> None:
    if isinstance(special_tokens, str):
        raise TypeError(
            f"special_tokens must be a list of strings, not one string (it would be read "
            f"as {len(special_tokens)} one-character tokens): write "
            f"special_tokens=[{special_tokens!r}]"
        )


def _special_regex(specials: Iterable[str]) -> Any:
    """A regex matching any of ``specials``, longest first (so the longest match wins),
    with a capture group so that ``split`` keeps the matches; ``None`` for no specials."""
    specials = sorted(set(specials), key=lambda s: (-len(s), s))
    if not specials:
        return None
    return regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")


def _as_int_list(ids: Iterable[int]) -> list[int]:
    """Accept lists, tuples, numpy arrays and tensors of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    out = list(ids)
    for i in out:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"token ids must be integers, got {i!r}")
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_json(path: Path, fmt: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); was it written by save()?") from e
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt!r} file (its 'format' field says otherwise)")
    return obj


def tiktoken_gpt2_reference() -> tiktoken.Encoding:
    """tiktoken's own ``get_encoding("gpt2")``, built offline from the course's files.

    tiktoken looks for its downloads in ``$TIKTOKEN_CACHE_DIR/<sha1 of the URL>``. We
    copy ``minigpt.data``'s ``encoder.json`` and ``vocab.bpe`` there under those names
    (``6c7ea1a7...`` and ``6d1cbeee...``) in a temporary folder, so no network is used.
    Tests, the benchmark and the notebook use this as the reference implementation.
    """
    import tiktoken

    from minigpt import data

    folder = Path(tempfile.mkdtemp(prefix="minigpt-tiktoken-"))
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    try:
        for name in ("gpt2-encoder", "gpt2-vocab"):
            key = hashlib.sha1(data.DATASETS[name].url.encode()).hexdigest()
            shutil.copyfile(data.path(name), folder / key)
        os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
        return tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
        shutil.rmtree(folder, ignore_errors=True)
