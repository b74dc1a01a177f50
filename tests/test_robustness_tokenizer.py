"""minigpt.tokenizer on hostile input: texts cut anywhere, huge whitespace runs, odd
characters, arguments of the wrong shape.

The reference everywhere is ``encode`` on the whole text, and tiktoken's own gpt2
encoding (``tiktoken_gpt2_reference``) where it can take the input.
"""

from __future__ import annotations

import tempfile
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.tokenizer import (
    GPT2_PATTERN,
    TIKTOKEN_GPT2_PATTERN,
    BPETokenizer,
    CharTokenizer,
    safe_cuts,
)
from minigpt.tokens import encode_to_file

EOT = "<|endoftext|>"

# Pieces that random texts are glued from: whitespace runs of every kind (the split of
# a run depends on what follows it), letters, digits, contractions, punctuation, wide
# and astral characters, surrogates (lone and paired), and special tokens, whole and
# broken.
PIECES = [
    *[" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "\n ", "\t \n", "\u00a0", "\u3000"],
    *["a", "B", "ab", "é", "日本", "1", "23", "4.5"],
    *["'", "'s", "'ll", "'re", "'t", "x's", "I'm"],
    *["!", ".", ",", "?!", "--", "<|", "|>", "😀", "👨‍👩‍👧"],
    *["\ud800", "\udfff", "\ud83d\ude00"],
    *[EOT, EOT[:5], "\n\n" + EOT],
]

texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
cut_lists = st.lists(st.integers(0, 200), max_size=10)


def pieces_of(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    return [text[i:j] for i, j in pairwise(bounds)]


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fast(gpt2):
    return gpt2.to_tiktoken()


@pytest.fixture(scope="module")
def shakespeare_text(_data):
    return (_data / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def small(shakespeare_text):
    """A tokenizer trained on a slice of Shakespeare (whitespace runs included)."""
    return BPETokenizer.train(shakespeare_text[:30_000] + "\n\n\n  \t", 500, special_tokens=[EOT])


@pytest.fixture(scope="module")
def out_dir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def flushing_copy(tok: BPETokenizer, flush_chars: int) -> BPETokenizer:
    """The same tokenizer, flushing encode_iterable's buffer every few characters."""
    copy = BPETokenizer(tok.vocab, tok.merges, tok.special_tokens, tok.pattern)
    copy.flush_chars = flush_chars
    return copy


@pytest.fixture(scope="module")
def copies(gpt2, small):
    """Copies of the two tokenizers whose flush_chars a test may set."""
    return [flushing_copy(gpt2, 1), flushing_copy(small, 1)]


def file_ids(text, encode, out_dir, vocab_size, chunk_chars):
    f = encode_to_file(
        text, encode, out_dir / "t.npy", vocab_size=vocab_size, chunk_chars=chunk_chars,
        progress=False,
    )  # fmt: skip
    return np.load(f).tolist()


# -- 1. cutting the text never changes the ids ---------------------------------


def test_cut_after_a_whitespace_run_regressions(gpt2, reference, out_dir):
    # "\n\n" is one token (628) at the end of a text, two (198, 198) before "cd"
    assert gpt2.encode("ab\n\ncd") == reference.encode("ab\n\ncd") == [397, 198, 198, 10210]
    assert file_ids("ab\n\ncd", gpt2.encode, out_dir, gpt2.vocab_size, 4) == [397, 198, 198, 10210]
    # encode_iterable used to cut this buffer at "b", right after "\n\n"
    tok = flushing_copy(gpt2, 8)
    text = "a\n\n" + "b" * 18
    assert list(tok.encode_iterable([text])) == reference.encode(text)
    # before an allowed special token "\n\n" is one token: no cut between the two
    text = "a\n\n" + EOT + "b" * 20
    want = reference.encode(text, allowed_special="all")
    assert list(tok.encode_iterable([text], "all")) == want


def test_encode_iterable_in_64k_pieces_equals_tiktoken(gpt2, reference, shakespeare_text):
    # Tiny Shakespeare read like a file in 64 KiB pieces: one cut used to land after "\n\n"
    n = 1 << 16
    pieces = (shakespeare_text[i : i + n] for i in range(0, len(shakespeare_text), n))
    assert list(gpt2.encode_iterable(pieces)) == reference.encode(shakespeare_text)


@settings(max_examples=2000, deadline=None)
@given(texts, st.integers(0, 200))
def test_safe_cuts_keep_gpt2_pre_tokens(text, stop):
    """The mechanism itself: every cut splits into the same chunks, reading only
    text[:stop], so what comes later can never move it."""
    chunks = regex.findall(GPT2_PATTERN, text)
    for p in safe_cuts(text, 0, stop):
        assert 0 < p < min(stop, len(text))
        assert regex.findall(GPT2_PATTERN, text[:p]) + regex.findall(GPT2_PATTERN, text[p:]) == (
            chunks
        )
    forward = list(safe_cuts(text, 0, stop, last_first=False))
    assert forward == sorted(safe_cuts(text, 0, stop))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, cut_lists, st.integers(1, 40))
def test_encode_iterable_equals_encode_for_any_cut(copies, gpt2, reference, text, cuts, flush):
    pieces = pieces_of(text, cuts)
    whole = {
        "all": reference.encode(text, allowed_special="all"),
        "none": reference.encode(text, disallowed_special=()),
    }
    for tok in copies:
        tok.flush_chars = flush
        for allowed in ("all", "none"):
            ids = list(tok.encode_iterable(pieces, allowed))
            assert ids == tok.encode(text, allowed)
            if tok.vocab_size == gpt2.vocab_size:
                assert ids == whole[allowed]
        if EOT in text:
            with pytest.raises(ValueError, match="special token"):
                list(tok.encode_iterable(pieces))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, st.integers(1, 24))
def test_encode_to_file_equals_encode_for_any_chunk_size(
    gpt2, fast, small, out_dir, text, chunk_chars
):
    # encoders that treat special tokens as text or refuse them, as encode_to_file asks
    def check(encode, want, vocab_size):
        assert file_ids(text, encode, out_dir, vocab_size, chunk_chars) == want

    check(fast.encode_ordinary, gpt2.encode(text, allowed_special="none"), gpt2.vocab_size)
    none = small.encode(text, allowed_special="none")
    check(lambda s: small.encode(s, allowed_special="none"), none, small.vocab_size)
    char = CharTokenizer.fit(text or "a")
    check(char.encode, char.encode(text), char.vocab_size)
    if EOT in text:
        with pytest.raises(ValueError, match="special token"):
            file_ids(text, gpt2.encode, out_dir, gpt2.vocab_size, chunk_chars)
    else:
        check(gpt2.encode, gpt2.encode(text), gpt2.vocab_size)


def test_encode_iterable_with_another_pattern_is_still_exact():
    # safe_cuts is proven for GPT-2's pattern only; with another one nothing is cut
    tok = BPETokenizer.train("ab\n\ncd " * 20, 280, pattern=r"[\s\S]+")
    tok.flush_chars = 3
    text = "ab\n\ncd " * 5
    assert list(tok.encode_iterable(list(text))) == tok.encode(text)


# -- 2. a million whitespace characters ----------------------------------------


@settings(max_examples=300, deadline=None)
@given(texts)
def test_tiktoken_form_of_the_pattern_splits_the_same(fast, gpt2, reference, text):
    chunks = regex.findall(GPT2_PATTERN, text)
    assert regex.findall(TIKTOKEN_GPT2_PATTERN, text) == chunks
    assert regex.findall(reference._pat_str, text) == chunks  # tiktoken's own spelling
    assert fast.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")


@pytest.mark.parametrize("run", [" ", "\n", " \n\t"])
def test_fast_path_takes_a_million_whitespace_characters(gpt2, fast, reference, run):
    # 1M is where tiktoken's regex engine gave up on the old spelling of the pattern
    text = "x" + run * (1_000_000 // len(run))
    assert fast.encode(text) == gpt2.encode(text) == reference.encode(text)


@pytest.mark.parametrize("run", ["a", "!"])
def test_fast_path_takes_a_million_character_word(fast, run):
    # plain + (not tiktoken's ++) on letters and punctuation is no risk either
    text = " " + run * 1_000_000 + " x"
    assert fast.decode(fast.encode(text)) == text


def test_token_cache_gets_through_a_million_spaces_before_a_word(gpt2, fast, tmp_path):
    # tiktoken (its own gpt2 encoding too) panics on such a run when text follows it;
    # encode_to_file's default chunks are short enough that it cuts the run just
    # before its last space, which leaves tiktoken a run that ends its text
    text = "x" + " " * 1_000_003 + "y z"
    f = encode_to_file(text, fast.encode_ordinary, tmp_path / "t.npy", vocab_size=50257)
    assert np.load(f).tolist() == gpt2.encode(text)


# -- 3. lone surrogates ----------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["\ud800", "\udfff", "a\ud800b", "a\ud83d\ude00b", "\ude00\ud83d", f"\ud800{EOT}"]
)
def test_surrogates_encode_like_tiktoken(gpt2, reference, text):
    # like tiktoken: a surrogate pair is the character it stands for, a lone one U+FFFD
    assert gpt2.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert list(gpt2.encode_iterable(list(text), "all")) == gpt2.encode(text, "all")


def test_surrogates_with_a_trained_tokenizer(small):
    assert small.decode(small.encode("a\ud800b")) == "a\ufffdb"
    assert small.encode("a\ud83d\ude00") == small.encode("a😀")


# -- 4. special tokens given as one string ---------------------------------------


def test_train_rejects_one_string_as_special_tokens():
    with pytest.raises(TypeError, match=r"special_tokens=\['<\|x\|>'\]"):
        BPETokenizer.train("abc abc", 300, special_tokens="<|x|>")
    base = {i: bytes([i]) for i in range(256)}
    with pytest.raises(TypeError, match=r"special_tokens=\['<\|x\|>'\]"):
        BPETokenizer(base, [], special_tokens="<|x|>")
    tok = BPETokenizer.train("abc abc", 300, special_tokens=["<|x|>"])
    assert list(tok.special_tokens) == ["<|x|>"]
