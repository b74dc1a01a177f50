"""minigpt.tokenizer: GPT-2 ids equal tiktoken's, round trips, training, errors."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt import GPT2_PATTERN, BPETokenizer, CharTokenizer
from minigpt.tokenizer import bytes_to_unicode

EOT = "<|endoftext|>"

HARD_STRINGS = [
    "",
    "a",
    " ",
    "Hello, world!",
    "Hello world 👋🏽 and 👨‍👩‍👧‍👦 family",
    "日本語のテキストと中文文本，还有한국어",
    "e\u0301 cafe\u0301 n\u0303 Z\u0351\u0352\u0353algo",
    "    four spaces, then\ttab\t\tand   \n\n\n  newlines \r\n\r\n",
    "   ",
    "\n",
    "\n\n\n",
    "trailing spaces   ",
    "1234567890 3.14159 1,000,000 0x1F 2024-05-01",
    "I'm you're he'll we've she'd it's don't I'M YOU'RE 'tis ''quoted''",
    "x'll 'll' ''s",
    "mixed\u00a0nbsp\u2003em-space\u200bzero-width",
    "ÿþ\x00\x01\x7f control \x1b[31m",
    "😀" * 20,
    "a" * 300,
    " " * 100 + "word",
]

SPECIAL_STRINGS = [
    f"Hello{EOT}world",
    f"{EOT}",
    f"{EOT}{EOT}",
    f"start {EOT} middle {EOT}end",
    f"<|endoftext{EOT}|>",
    "<|endoftext|",
]


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_text(_data):
    return (_data / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def small(shakespeare_text):
    """A tokenizer trained on a slice of Shakespeare, with a special token."""
    return BPETokenizer.train(shakespeare_text[:50_000], 600, special_tokens=[EOT])


def naive_train(text: str, vocab_size: int, pattern: str = GPT2_PATTERN):
    """The textbook trainer: recount every pair before every merge."""
    words = Counter(c.encode("utf-8") for c in regex.findall(pattern, text))
    seqs = {w: [bytes([x]) for x in w] for w in words}
    merges, vocab = [], {bytes([i]) for i in range(256)}
    while len(vocab) < vocab_size:
        counts = Counter()
        for w, n in words.items():
            for pair in pairwise(seqs[w]):
                counts[pair] += n
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))  # ties: the greater pair
        merges.append(best)
        vocab.add(best[0] + best[1])
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


# -- GPT-2: same ids as tiktoken ---------------------------------------------


def test_gpt2_shakespeare_matches_tiktoken(gpt2, reference, shakespeare_text):
    ids = gpt2.encode(shakespeare_text)
    assert ids == reference.encode(shakespeare_text)
    assert gpt2.decode(ids) == shakespeare_text


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_gpt2_hard_strings_match_tiktoken(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.mark.parametrize("text", SPECIAL_STRINGS)
def test_gpt2_special_tokens_inside_text_match_tiktoken(gpt2, reference, text):
    assert gpt2.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert gpt2.encode(text, allowed_special={EOT}) == reference.encode(text, allowed_special={EOT})
    assert gpt2.encode(text, allowed_special="none") == reference.encode(
        text, disallowed_special=()
    )


def test_gpt2_vocab_layout(gpt2):
    assert len(gpt2) == 50257 and gpt2.vocab_size == 50257
    assert len(gpt2.merges) == 50000
    assert gpt2.special_tokens == {EOT: 50256}
    assert gpt2.vocab[50256] == EOT.encode()
    assert gpt2.merges[0] == (b" ", b"t")  # 'Ġ t', the first line of vocab.bpe


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_gpt2_arbitrary_unicode_round_trip_and_matches_tiktoken(gpt2, reference, text):
    ids = gpt2.encode(text, allowed_special="none")
    assert gpt2.decode(ids) == text
    assert ids == reference.encode(text, disallowed_special=())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab 'l\n\té😀")))
def test_gpt2_tricky_alphabet_matches_tiktoken(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text)


def test_to_tiktoken_is_the_same_encoding(gpt2, reference, shakespeare_text):
    fast = gpt2.to_tiktoken()
    text = shakespeare_text[:200_000]
    assert fast.encode(text) == reference.encode(text)
    for s in HARD_STRINGS:
        assert fast.encode(s) == gpt2.encode(s)
    assert fast.encode(EOT, allowed_special="all") == [50256]


# -- trained tokenizers ---------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(st.text())
def test_trained_round_trip_arbitrary_unicode(small, text):
    assert small.decode(small.encode(text, allowed_special="none")) == text


def test_trained_layout(small):
    assert len(small) == 600 and small.vocab_size == 600
    assert len(small.merges) == 600 - 256 - 1
    assert small.special_tokens == {EOT: 599}
    vocab = small.vocab
    assert all(vocab[i] == bytes([i]) for i in range(256))
    # ids 256.. are the merges, in the order they were learned
    assert [vocab[256 + k] for k in range(len(small.merges))] == [a + b for a, b in small.merges]


def test_training_is_deterministic(shakespeare_text):
    text = shakespeare_text[:30_000]
    a = BPETokenizer.train(text, 500)
    b = BPETokenizer.train(text, 500)
    assert a.merges == b.merges and a.vocab == b.vocab


def test_incremental_trainer_equals_naive_recount(shakespeare_text):
    text = shakespeare_text[:20_000]
    assert BPETokenizer.train(text, 420).merges == naive_train(text, 420)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.sampled_from("aab bc\n'é"), max_size=80), st.integers(257, 300))
def test_incremental_trainer_equals_naive_on_random_text(text, vocab_size):
    assert BPETokenizer.train(text, vocab_size).merges == naive_train(text, vocab_size)


def test_ties_go_to_the_greater_pair():
    # every pair occurs exactly once: the lexicographically greatest pair wins
    tok = BPETokenizer.train(["ab", "cd", "ce"], 257, pattern=r"\S+")
    assert tok.merges == [(b"c", b"e")]
    # a longer left token beats its prefix: (b"ab", ...) > (b"a", ...)
    tok = BPETokenizer.train("abx aby", 259, pattern=r"\S+")
    assert tok.merges[0] == (b"a", b"b")
    assert tok.merges[1] == (b"ab", b"y")


def test_training_stops_when_nothing_is_left_to_merge():
    tok = BPETokenizer.train("aaaa", 1000)
    assert [a + b for a, b in tok.merges] == [b"aa", b"aaaa"]
    assert len(tok) == 258


def test_training_never_merges_across_special_tokens():
    text = f"ab{EOT}ab{EOT}" * 50
    tok = BPETokenizer.train(text, 300, special_tokens=[EOT])
    for i, b in tok.vocab.items():
        if i != tok.special_tokens[EOT]:
            assert b"<|" not in b and b"|>" not in b and b"b<" not in b, b
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(tok.special_tokens[EOT]) == 100
    assert tok.decode(ids) == text


def test_training_chunks_never_span_items():
    tok = BPETokenizer.train(["ab"] * 10 + ["cd"] * 5, 300, pattern=r".")
    assert tok.merges == []  # one-character chunks: nothing to merge


def test_trained_pure_python_equals_to_tiktoken(shakespeare_text):
    tok = BPETokenizer.train(shakespeare_text[:100_000], 1000, special_tokens=[EOT])
    fast = tok.to_tiktoken()
    text = shakespeare_text[100_000:300_000] + EOT + "tail"
    assert fast.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="too small"):
        BPETokenizer.train("abc", 100)
    with pytest.raises(ValueError, match="too small"):
        BPETokenizer.train("abc", 256, special_tokens=[EOT])
    with pytest.raises(TypeError, match="strings"):
        BPETokenizer.train([b"bytes"], 300)


# -- special tokens --------------------------------------------------------------


def test_special_token_guard(small):
    text = f"hello {EOT} world"
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>'.*allowed_special"):
        small.encode(text)
    eot = small.special_tokens[EOT]
    assert eot in small.encode(text, allowed_special="all")
    assert eot in small.encode(text, allowed_special={EOT})
    assert eot not in small.encode(text, allowed_special="none")
    assert small.decode(small.encode(text, allowed_special="none")) == text
    with pytest.raises(ValueError, match="not special tokens"):
        small.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        small.encode(text, allowed_special="sometimes")
    with pytest.raises(ValueError):
        list(small.encode_iterable([text]))


def test_only_allowed_specials_are_special():
    tok = BPETokenizer.train("abc", 300, special_tokens=["<|a|>", "<|b|>"])
    a, b = tok.special_tokens["<|a|>"], tok.special_tokens["<|b|>"]
    assert tok.encode("<|a|>", allowed_special={"<|a|>"}) == [a]
    with pytest.raises(ValueError, match=r"<\|b\|>"):
        tok.encode("<|a|><|b|>", allowed_special={"<|a|>"})
    assert tok.encode("<|a|><|b|>", allowed_special="all") == [a, b]


def test_overlapping_special_tokens_take_the_longest_match():
    tok = BPETokenizer.train("abc", 300, special_tokens=["<|im|>", "<|im|><|end|>"])
    short, long = tok.special_tokens["<|im|>"], tok.special_tokens["<|im|><|end|>"]
    assert tok.encode("<|im|><|end|>", allowed_special="all") == [long]
    assert tok.encode("<|im|>x<|im|><|end|><|im|>", allowed_special="all") == [
        short,
        *tok.encode("x"),
        long,
        short,
    ]


# -- decoding ------------------------------------------------------------------


def test_decode_never_crashes_on_invalid_utf8(gpt2):
    ids = gpt2.encode("😀")
    assert len(ids) > 1  # an emoji is split into byte tokens
    partial = ids[:1]
    assert gpt2.decode(partial) == "\ufffd"
    assert gpt2.decode_bytes(partial) == "😀".encode()[: len(gpt2.vocab[ids[0]])]
    assert gpt2.decode_bytes(ids) == "😀".encode()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 599), max_size=30))
def test_decode_any_valid_ids(small, ids):
    assert isinstance(small.decode(ids), str)
    assert small.decode(ids) == small.decode_bytes(ids).decode("utf-8", errors="replace")


def test_bad_ids(small):
    with pytest.raises(ValueError, match="unknown token id 600"):
        small.decode([1, 600])
    with pytest.raises(ValueError, match="unknown token id -1"):
        small.decode_bytes([-1])
    with pytest.raises(TypeError, match="integers"):
        small.decode(["a"])
    with pytest.raises(TypeError, match="integers"):
        small.decode([1.0])
    with pytest.raises(TypeError, match="str"):
        small.encode(b"bytes")


def test_decode_accepts_tensors_and_arrays(small):
    import numpy as np
    import torch

    ids = small.encode("Hello there")
    assert small.decode(torch.tensor(ids)) == "Hello there"
    assert small.decode(np.array(ids)) == "Hello there"


# -- encode_iterable -------------------------------------------------------------


def test_encode_iterable_equals_encode_on_shakespeare(gpt2, shakespeare_text):
    lines = shakespeare_text.splitlines(keepends=True)
    assert list(gpt2.encode_iterable(lines)) == gpt2.encode(shakespeare_text)


def test_encode_iterable_is_lazy(gpt2):
    def endless():
        while True:
            yield "All the world's a stage.\n"

    it = gpt2.encode_iterable(endless())
    first = [next(it) for _ in range(10)]
    assert first == gpt2.encode("All the world's a stage.\n" * 2)[:10]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", " ", "\n", "'", "l", "1", "!", "é", EOT, "<|"])).map(
        "".join
    ),
    st.lists(st.integers(0, 40), max_size=12),
)
def test_encode_iterable_equals_encode_for_any_split(small, text, cuts):
    cuts = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [text[i:j] for i, j in pairwise(cuts)]
    tok = BPETokenizer(small.vocab, small.merges, small.special_tokens)
    tok.flush_chars = 5  # flush often so every boundary is exercised
    for allowed in ("all", "none"):
        assert list(tok.encode_iterable(pieces, allowed)) == tok.encode(text, allowed)
    if EOT in text:
        with pytest.raises(ValueError, match="special token"):
            list(tok.encode_iterable(pieces))


def test_encode_iterable_long_whitespace_run(small):
    tok = BPETokenizer(small.vocab, small.merges, small.special_tokens)
    tok.flush_chars = 8
    text = "a" + " " * 200 + "b\n" + "\n" * 50 + "c"
    pieces = list(text)
    assert list(tok.encode_iterable(pieces)) == tok.encode(text)


# -- save / load ---------------------------------------------------------------


def test_save_load_round_trip(small, tmp_path, shakespeare_text):
    path = tmp_path / "tok.json"
    small.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.vocab == small.vocab
    assert loaded.merges == small.merges
    assert loaded.special_tokens == small.special_tokens
    assert loaded.pattern == small.pattern
    text = shakespeare_text[:5000] + EOT
    assert loaded.encode(text, allowed_special="all") == small.encode(text, allowed_special="all")
    # a person can read it: JSON, GPT-2's printable alphabet, merges as "left right"
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["format"] == "minigpt-bpe"
    first = small.merges[0]
    enc = bytes_to_unicode()
    assert obj["merges"][0] == " ".join("".join(enc[x] for x in part) for part in first)


def test_save_load_gpt2(gpt2, tmp_path):
    gpt2.save(tmp_path / "gpt2.json")
    loaded = BPETokenizer.load(tmp_path / "gpt2.json")
    assert loaded.vocab == gpt2.vocab and loaded.merges == gpt2.merges
    assert loaded.encode(HARD_STRINGS[4]) == gpt2.encode(HARD_STRINGS[4])


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        BPETokenizer.load(bad)
    bad.write_text('{"format": "something-else"}', encoding="utf-8")
    with pytest.raises(ValueError, match="minigpt-bpe"):
        BPETokenizer.load(bad)
    bad.write_text('{"format": "minigpt-bpe", "vocab": {}}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid"):
        BPETokenizer.load(bad)


# -- building one directly ------------------------------------------------------


def test_constructor_validates():
    base = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ValueError, match="256 single bytes"):
        BPETokenizer({i: bytes([i]) for i in range(200)}, [])
    with pytest.raises(ValueError, match="not in vocab"):
        BPETokenizer(base, [(b"a", b"b")])
    with pytest.raises(ValueError, match="twice"):
        BPETokenizer({**base, 256: b"a"}, [])
    with pytest.raises(TypeError):
        BPETokenizer(base, [], special_tokens=EOT)
    with pytest.raises(ValueError, match="pick a free id"):
        BPETokenizer(base, [], special_tokens={EOT: 65})
    tok = BPETokenizer({**base, 256: b"ab"}, [(b"a", b"b")], special_tokens=[EOT])
    assert tok.encode("abab") == [256, 256]
    assert tok.special_tokens == {EOT: 257}
    with pytest.raises(ValueError, match="grow with merge order"):
        BPETokenizer(
            {**base, 300: b"ab", 299: b"abab"}, [(b"a", b"b"), (b"ab", b"ab")]
        ).to_tiktoken()


# -- CharTokenizer -----------------------------------------------------------------


def test_char_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer.fit("hello world")
    assert tok.vocab_size == 8 and tok.itos == sorted(set("hello world"))
    ids = tok.encode("hold")
    assert tok.decode(ids) == "hold"
    tok.save(tmp_path / "c.json")
    assert CharTokenizer.load(tmp_path / "c.json").itos == tok.itos


def test_char_tokenizer_unknown_character():
    tok = CharTokenizer.fit("abc")
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="unknown token id 3"):
        tok.decode([3])
    fallback = CharTokenizer.fit("abc", unk_token="?")
    assert fallback.decode(fallback.encode("abzc")) == "ab?c"


def test_char_tokenizer_rejects_duplicates():
    with pytest.raises(ValueError, match="more than once"):
        CharTokenizer(["a", "a"])
