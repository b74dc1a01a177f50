"""Chapter 01 exercises: tokenization.

from minigpt.exercises import ch01
ch01.q1.check(get_pair_counts)
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from itertools import pairwise

from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    ints,
    number,
    shakespeare,
)
from minigpt.tokenizer import BPETokenizer, merge_pair

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"]

EOT = "<|endoftext|>"


def _ref_pair_counts(ids):
    return dict(Counter(pairwise(ids)))


def _ref_merge(ids, pair, new_id):
    return merge_pair(list(ids), pair[0], pair[1], new_id)


def _ref_train_bpe(text, num_merges):
    ids = list(text.encode("utf-8"))
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for k in range(num_merges):
        counts = _ref_pair_counts(ids)
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], (vocab[p[0]], vocab[p[1]])))
        new_id = 256 + k
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        merges.append((vocab[best[0]], vocab[best[1]]))
        ids = _ref_merge(ids, best, new_id)
    return merges


@lru_cache(maxsize=1)
def _small_tokenizer() -> BPETokenizer:
    text = (
        "To be, or not to be, that is the question: whether 'tis nobler in the mind "
        "to suffer the slings and arrows of outrageous fortune, or to take arms against "
        "a sea of troubles and by opposing end them. To die, to sleep; no more. "
    ) * 4
    return BPETokenizer.train(text, 320, special_tokens=[EOT])


def _merges(got, what):
    """The learner's merges as a list of (bytes, bytes) tuples."""
    if not isinstance(got, (list, tuple)):
        raise Incorrect(f"{what}: return a list of merges, got {type(got).__name__}")
    out = []
    for m in got:
        if not (isinstance(m, (tuple, list)) and len(m) == 2 and all(type(p) is bytes for p in m)):
            raise Incorrect("return the merges as (bytes, bytes) pairs, e.g. (b'a', b'b')")
        out.append((bytes(m[0]), bytes(m[1])))
    return out


class PairCounts(Question):
    name = "q1"
    _hint = (
        "Walk over neighbours with zip(ids, ids[1:]) (or itertools.pairwise(ids)) and count each (left, right) tuple; "
        "collections.Counter does the counting for you."
    )
    _solution = """
def get_pair_counts(ids):
    counts = {}
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts
"""
    cases = ([1, 2, 3, 1, 2], [5, 5, 5, 5], [7], [], [1, 2, 1, 2, 1, 2, 3])

    def _check(self, fn):
        for ids in self.cases:
            got = call(fn, list(ids))
            if not hasattr(got, "items"):
                raise Incorrect(f"return a dict of pair -> count, got {type(got).__name__}")
            got = {
                tuple(ints(k, "a pair")): number(v, f"the count of {k!r}", integer=True)
                for k, v in got.items()
            }
            got = {k: v for k, v in got.items() if v}
            want = _ref_pair_counts(ids)
            if got != want:
                raise Incorrect(f"get_pair_counts({ids}) returned {got}, expected {want}")

    def reference(self):
        return _ref_pair_counts

    def wrong_answers(self):
        return [
            # counts non-overlapping pairs only: (5, 5) in [5, 5, 5, 5] is 3, not 2
            lambda ids: dict(Counter(zip(ids[::2], ids[1::2]))),
            # forgets the last pair
            lambda ids: dict(Counter(list(pairwise(ids))[:-1])),
            # counts each pair once, not how often it occurs
            lambda ids: dict.fromkeys(pairwise(ids), 1),
        ]


class Merge(Question):
    name = "q2"
    _hint = (
        "Walk with an index i: if ids[i], ids[i+1] is the pair, append new_id and jump by 2, "
        "otherwise append ids[i] and step by 1. Mind the last element."
    )
    _solution = """
def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
"""
    cases = (
        ([1, 2, 3, 1, 2], (1, 2), 99),
        ([5, 5, 5], (5, 5), 7),
        ([5, 5, 5, 5], (5, 5), 7),
        ([1, 2, 3], (3, 4), 9),
        ([4, 1, 2], (1, 2), 8),
        ([], (1, 2), 3),
    )

    def _check(self, fn):
        for ids, pair, new_id in self.cases:
            got = ints(call(fn, list(ids), pair, new_id), f"merge({ids}, {pair}, {new_id})")
            want = _ref_merge(ids, pair, new_id)
            if got != want:
                raise Incorrect(f"merge({ids}, {pair}, {new_id}) returned {got}, expected {want}")

    def reference(self):
        return _ref_merge

    def wrong_answers(self):
        def drops_last(ids, pair, new_id):
            out, i = [], 0
            while i < len(ids) - 1:
                if (ids[i], ids[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            return out

        def overlapping(ids, pair, new_id):  # merges (5,5),(5,5) inside 5,5,5 twice
            out = []
            for i in range(len(ids)):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    out.append(new_id)
                elif not (i > 0 and (ids[i - 1], ids[i]) == pair):
                    out.append(ids[i])
            return out

        def first_only(ids, pair, new_id):
            for i in range(len(ids) - 1):
                if (ids[i], ids[i + 1]) == pair:
                    return [*ids[:i], new_id, *ids[i + 2 :]]
            return list(ids)

        return [drops_last, overlapping, first_only]


class TrainBPE(Question):
    name = "q3"
    _hint = (
        "Start from ids = list(text.encode('utf-8')) and vocab = {i: bytes([i])}. Each step: "
        "count pairs, pick max(counts, key=lambda p: (counts[p], (vocab[p[0]], vocab[p[1]]))), "
        "give it id 256 + step, record (vocab[a], vocab[b]), and merge it in ids."
    )
    _solution = """
def train_bpe(text, num_merges):
    ids = list(text.encode("utf-8"))
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for step in range(num_merges):
        counts = get_pair_counts(ids)
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], (vocab[p[0]], vocab[p[1]])))
        new_id = 256 + step
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        merges.append((vocab[best[0]], vocab[best[1]]))
        ids = merge(ids, best, new_id)
    return merges
"""
    cases = (
        ("aaabdaaabac", 3),
        ("hello hello help held", 6),
        ("zy ab zy ab", 4),  # ties everywhere: the greater pair of byte strings wins
        ("héllo wörld héllo", 5),
        ("ab", 5),  # runs out of pairs after one merge
    )

    def _check(self, fn):
        for text, n in self.cases:
            got = _merges(call(fn, text, n), f"train_bpe({text!r}, {n})")
            want = _ref_train_bpe(text, n)
            if got != want:
                raise Incorrect(f"train_bpe({text!r}, {n}) returned {got}, expected {want}")
        # and it is the package's trainer when the whole text is one chunk
        text = "the cat sat on the mat with the hat"
        want = BPETokenizer.train(text, 256 + 8, pattern=r"[\s\S]+").merges
        got = _merges(call(fn, text, 8), f"train_bpe({text!r}, 8)")
        if got != want:
            raise Incorrect(f"train_bpe({text!r}, 8) returned {got}, expected {want}")

    def reference(self):
        return _ref_train_bpe

    def wrong_answers(self):
        def ties_to_first_seen(text, num_merges):
            ids = list(text.encode("utf-8"))
            vocab = {i: bytes([i]) for i in range(256)}
            merges = []
            for k in range(num_merges):
                counts = _ref_pair_counts(ids)
                if not counts:
                    break
                best = max(counts, key=counts.get)
                vocab[256 + k] = vocab[best[0]] + vocab[best[1]]
                merges.append((vocab[best[0]], vocab[best[1]]))
                ids = _ref_merge(ids, best, 256 + k)
            return merges

        def never_updates_ids(text, num_merges):
            ids = list(text.encode("utf-8"))
            counts = Counter(pairwise(ids))
            top = sorted(counts, key=lambda p: (counts[p], bytes(p)), reverse=True)
            return [(bytes([a]), bytes([b])) for a, b in top[:num_merges]]

        def uses_characters(text, num_merges):  # fine on ASCII, wrong on 'é'
            merges, toks = [], list(text)
            for _ in range(num_merges):
                counts = Counter(pairwise(toks))
                if not counts:
                    break
                best = max(counts, key=lambda p: (counts[p], (p[0].encode(), p[1].encode())))
                merges.append((best[0].encode(), best[1].encode()))
                out, i = [], 0
                while i < len(toks):
                    if i + 1 < len(toks) and (toks[i], toks[i + 1]) == best:
                        out.append(best[0] + best[1])
                        i += 2
                    else:
                        out.append(toks[i])
                        i += 1
                toks = out
            return merges

        return [ties_to_first_seen, never_updates_ids, uses_characters]


class CountTokens(Question):
    name = "q4"
    _hint = (
        "Each document costs len(tokenizer.encode(doc)) tokens plus one for the "
        "<|endoftext|> after it. Do not encode '<|endoftext|>' as text: it is one token."
    )
    _solution = """
def count_tokens(tokenizer, documents):
    return sum(len(tokenizer.encode(doc)) + 1 for doc in documents)

# or, equivalently, encode the packed text and allow the special token:
# len(tokenizer.encode("<|endoftext|>".join(documents) + "<|endoftext|>", allowed_special="all"))
"""
    cases = (
        ["To be, or not to be."],
        ["the question", "whether 'tis nobler", ""],
        ["a sea of troubles " * 5, "To die, to sleep;\n\nno more."],
    )

    def _check(self, fn):
        tok = _small_tokenizer()
        for docs in self.cases:
            got = number(call(fn, tok, list(docs)), "count_tokens(...)", integer=True)
            want = sum(len(tok.encode(d)) + 1 for d in docs)
            if got != want:
                raise Incorrect(
                    f"count_tokens(tokenizer, {docs!r}) returned {got}, expected {want}"
                )

    def reference(self):
        return lambda tok, docs: sum(len(tok.encode(d)) + 1 for d in docs)

    def wrong_answers(self):
        return [
            # forgets the <|endoftext|> after each document
            lambda tok, docs: sum(len(tok.encode(d)) for d in docs),
            # spells <|endoftext|> out as ordinary text: several tokens instead of one
            lambda tok, docs: len(tok.encode(EOT.join(docs) + EOT, allowed_special="none")),
            # counts characters, not tokens
            lambda tok, docs: sum(len(d) + 1 for d in docs),
        ]


class SafeDecode(Question):
    name = "q5"
    _hint = (
        "Join the bytes of all tokens first, then decode once with "
        "errors='replace': a character's bytes may be split across tokens."
    )
    _solution = """
def safe_decode(vocab, ids):
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
"""

    @staticmethod
    def _cases():
        vocab = {i: bytes([i]) for i in range(256)}
        vocab[256] = "é".encode()[:1]  # a token that is half of a character
        vocab[257] = "é".encode()[1:] + b"t"
        vocab[258] = b" caf"
        return vocab, [
            [104, 105],  # "hi"
            [258, 256, 257],  # " café" + "t": valid once the bytes are joined
            [258, 256],  # ends halfway through 'é': U+FFFD
            [0xF0, 0x9F, 0x98, 0x80, 33],  # an emoji byte by byte, then '!'
            [0xFF, 104],  # 0xFF is never valid UTF-8
            [],
        ]

    def _check(self, fn):
        vocab, cases = self._cases()
        for ids in cases:
            got = call(fn, dict(vocab), list(ids))
            if type(got) is not str:
                raise Incorrect(f"return a str, got {type(got).__name__}")
            want = b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
            if got != want:
                raise Incorrect(f"safe_decode(vocab, {ids}) returned {got!r}, expected {want!r}")

    def reference(self):
        return lambda vocab, ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    def wrong_answers(self):
        return [
            # decodes each token on its own: breaks characters split across tokens
            lambda vocab, ids: "".join(vocab[i].decode("utf-8", errors="replace") for i in ids),
            # silently drops invalid bytes instead of marking them
            lambda vocab, ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="ignore"),
            # Latin-1 never fails, but it is the wrong encoding
            lambda vocab, ids: b"".join(vocab[i] for i in ids).decode("latin-1"),
        ]


class BytesPerToken(Question):
    name = "q6"
    _hint = "len(text.encode('utf-8')) / len(tokenizer.encode(text)): bytes, not characters."
    _solution = """
def bytes_per_token(tokenizer, text):
    return len(text.encode("utf-8")) / len(tokenizer.encode(text))
"""
    cases = ("To be, or not to be, that is the question.", "naïve café — déjà vu", "aaaa")

    def _check(self, fn):
        tok = _small_tokenizer()
        for text in self.cases:
            got = number(call(fn, tok, text), f"bytes_per_token(tokenizer, {text!r})")
            want = len(text.encode("utf-8")) / len(tok.encode(text))
            if abs(got - want) > 1e-9:
                raise Incorrect(
                    f"bytes_per_token(tokenizer, {text!r}) = {got}, expected {want:.4f}"
                )

    def reference(self):
        return lambda tok, text: len(text.encode("utf-8")) / len(tok.encode(text))

    def wrong_answers(self):
        return [
            # characters, not bytes: wrong as soon as the text is not ASCII
            lambda tok, text: len(text) / len(tok.encode(text)),
            # upside down: tokens per byte
            lambda tok, text: len(tok.encode(text)) / len(text.encode("utf-8")),
        ]


q1 = PairCounts()
q2 = Merge()
q3 = TrainBPE()
q4 = CountTokens()
q5 = SafeDecode()
q6 = BytesPerToken()


# ---------------------------------------------------------------- q7, q8: a small BPE, and bytes


def _bytes_per_token(tok: BPETokenizer, text: str) -> float:
    return len(text.encode("utf-8")) / len(tok.encode(text))


class SmallBPE(Experiment):
    name = "q7"
    N, K = 20_000, 300
    question = f"""
The lesson trained its BPE on the first 90% of Tiny Shakespeare (about a million
characters). Train one with `BPETokenizer.train` on only the first **{N:,} characters**
of that training text, with **{K} merges**, and measure its bytes per token. Report a dict:
`"train"` on those {N:,} characters, and `"heldout"` on the lesson's held-out text (the
last 10%). Both within ±0.01.
"""
    keys = ("train", "heldout")
    atol = 0.01
    trivial = (0.0, 1.0, float(K), float(256 + K), float(N))
    _hint = """
vocab_size counts the 256 byte tokens too, so 300 merges is vocab_size = 256 + 300.
Bytes per token of a text is len(text.encode("utf-8")) / len(tok.encode(text)).
"""
    _solution = """
from minigpt import data
from minigpt.tokenizer import BPETokenizer

text = data.load_text("tinyshakespeare")
n = int(0.9 * len(text))
small, heldout = text[:n][:20_000], text[n:]
tok = BPETokenizer.train(small, 256 + 300)  # 300 merges

def bytes_per_token(s):
    return len(s.encode("utf-8")) / len(tok.encode(s))

bpt = {"train": bytes_per_token(small), "heldout": bytes_per_token(heldout)}
"""

    def _measure(self, vocab_size: int) -> dict[str, float]:
        train, heldout = shakespeare()
        tok = BPETokenizer.train(train[: self.N], vocab_size)
        return {
            "train": _bytes_per_token(tok, train[: self.N]),
            "heldout": _bytes_per_token(tok, heldout),
        }

    def measure(self):
        return self._measure(256 + self.K)

    def decoys(self):
        truth = self.truth()
        return {
            "the lesson's number for a vocabulary of 600 trained on all the training text": {
                "heldout": 1.99
            },
            "the lesson's number for a vocabulary of 400": {"heldout": 1.71},
            f"the tokenizer with vocab_size={self.K}: {self.K} must be the number of merges": (
                self._measure(self.K)
            ),
            "tokens per byte, the other way up": {k: 1 / v for k, v in truth.items()},
        }


q7 = SmallBPE()


class NoUnknownToken(MultipleChoice):
    name = "q8"
    question = """
Your tokenizer saw only 20,000 characters of Shakespeare, yet it can encode an emoji, a
Chinese sentence or a line of code, and decode them back exactly. Why does a byte-level
BPE never need an "unknown" token?
"""
    options = (
        Option(
            "Its training text happened to contain every character the tokenizer meets later.",
            "Your training text had fewer than 60 distinct characters, all ASCII; an emoji "
            "was never in it, and it still encodes.",
        ),
        Option(
            "Characters it never saw are dropped before encoding.",
            "Nothing is dropped: decode(encode(text)) gives the text back byte for byte, "
            "which it could not if anything were thrown away.",
        ),
        Option(
            "Every text is a sequence of UTF-8 bytes, and all 256 byte values are tokens "
            "from the start, so any text can be encoded (at worst one token per byte).",
            "The merges only shorten what the bytes already spell. A character the training "
            "text never had is encoded as its raw bytes: more tokens, never an unknown one.",
        ),
        Option(
            "Its merges cover every possible pair of characters.",
            "300 merges cover 300 frequent pairs, out of millions of possible ones; a pair "
            "with no merge simply stays two tokens.",
        ),
    )
    answer = "c"
    _hint = "What are the first 256 ids of the vocabulary, before any merge?"


q8 = NoUnknownToken()
