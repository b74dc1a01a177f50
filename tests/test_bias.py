"""minigpt.bias: counts near role words, directions, WEAT, model log-probs, swaps."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from minigpt import GPT, GPTConfig
from minigpt.bias import (
    FEMALE_WORDS,
    GENDER_PAIRS,
    MALE_WORDS,
    continuation_logprob,
    gender_counts,
    logprob_gap,
    pair_direction,
    project_out,
    projection,
    swap_gendered,
    swap_table,
    weat,
    words,
)
from minigpt.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- counts


def test_words_and_gender_counts_against_a_hand_count():
    assert words("O'er the King's men, he said.") == ["o'er", "the", "king's", "men", "he", "said"]
    text = "the doctor said he would come. she saw the doctor and his wife. nurse"
    #        0   1      2    3  4     5     6   7   8   9      10  11  12   13
    counts = gender_counts(text, ["doctor", "nurse", "cook"], window=2)
    # doctor at 1: words 0..3 -> "he"; doctor at 9: words 7..11 -> "his" (and "she" at 6 is 3 away)
    assert counts["doctor"] == (2, 2, 0)
    # nurse at 13: words 11..13 -> "wife" is female, "his" is male
    assert counts["nurse"] == (1, 1, 1)
    assert counts["cook"] == (0, 0, 0)
    assert list(counts) == ["doctor", "nurse", "cook"]
    wide = gender_counts(text, ["doctor"], window=3)
    assert wide["doctor"] == (2, 2, 2)  # now "she" (3 before) and "wife" (3 after) count


def test_gender_counts_equal_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    vocab = ["he", "she", "his", "her", "cook", "maid", "the", "a"]
    seq = [vocab[int(i)] for i in torch.randint(0, len(vocab), (300,), generator=g)]
    got = gender_counts(" ".join(seq), ["cook", "maid"], window=3)
    for role in ("cook", "maid"):
        n = m = f = 0
        for i, w in enumerate(seq):
            if w != role:
                continue
            n += 1
            for j in range(max(0, i - 3), min(len(seq), i + 4)):
                if j != i:
                    m += seq[j] in MALE_WORDS
                    f += seq[j] in FEMALE_WORDS
        assert got[role] == (n, m, f)


def test_gender_counts_errors():
    with pytest.raises(ValueError, match="roles"):
        gender_counts("text", [])
    with pytest.raises(ValueError, match="window"):
        gender_counts("text", ["cook"], window=0)
    with pytest.raises(TypeError, match="text"):
        gender_counts(b"bytes", ["cook"])


# ---------------------------------------------------------------- swaps


def test_swap_keeps_case_and_whole_words():
    assert swap_gendered("He gave HIS sister to the King.") == "She gave HER brother to the Queen."
    assert swap_gendered("then the shepherd sheared") == "then the shepherd sheared"
    assert swap_gendered("Madam, my lord.") == "Sir, my lady."


def test_swap_round_trip_except_the_ambiguous_her():
    text = "He told his mother that the Queen and her ladies were with the KING himself."
    assert swap_gendered(swap_gendered(text)) == text
    assert swap_gendered(swap_gendered("I saw him.")) == "I saw his."  # her -> his, documented
    table = swap_table()
    assert table["her"] == "his" and table["him"] == "her"
    for m, f in GENDER_PAIRS:
        assert table[m] == f


def test_swap_table_errors():
    with pytest.raises(ValueError, match="pairs"):
        swap_table([("he", "she", "it")])


# ---------------------------------------------------------------- directions


def test_pair_direction_projection_and_project_out():
    a = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    u = pair_direction(a, b)  # mean difference (2, 0, 0) -> (1, 0, 0)
    torch.testing.assert_close(u, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    v = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    torch.testing.assert_close(projection(v, u), torch.tensor([0.6, 0.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    vecs, d = torch.randn(20, 8, generator=g), torch.randn(8, generator=g)
    out = project_out(vecs, d)
    torch.testing.assert_close(out @ d.double(), torch.zeros(20, dtype=torch.float64))
    # what is left is the part orthogonal to d: the rest of each vector is unchanged
    unit = d.double() / d.double().norm()
    torch.testing.assert_close(out + (vecs.double() @ unit)[:, None] * unit, vecs.double())
    torch.testing.assert_close(project_out(out, d), out)


def test_direction_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="pair up"):
        pair_direction(x, x[:2])
    with pytest.raises(ValueError, match="no direction"):
        pair_direction(x, x)
    with pytest.raises(ValueError, match="columns"):
        pair_direction(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-zero"):
        projection(x, torch.zeros(4))
    with pytest.raises(ValueError, match="non-zero"):
        project_out(x, torch.ones(3))


# ---------------------------------------------------------------- WEAT


def test_weat_on_toy_vectors_against_a_hand_computation():
    # 2-D vectors at known angles: cosines are cos(angle differences)
    def at(*degrees):
        r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
        return torch.stack([r.cos(), r.sin()], dim=1)

    X, Y, A, B = at(0.0, 30.0), at(90.0, 120.0), at(0.0), at(90.0)
    # s(w) = cos(w - 0) - cos(w - 90)
    c = lambda d: math.cos(math.radians(d))
    s = [c(0) - c(90), c(30) - c(60), c(90) - c(0), c(120) - c(30)]
    mean = sum(s) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in s) / 3)
    want_effect = ((s[0] + s[1]) / 2 - (s[2] + s[3]) / 2) / std
    want_stat = s[0] + s[1] - s[2] - s[3]
    got = weat(X, Y, A, B, permutations=2000, seed=0)
    assert got.effect_size == pytest.approx(want_effect)
    assert got.statistic == pytest.approx(want_stat)
    # the exact p-value: of the 6 ways to split 4 words in two pairs, only the observed
    # split reaches the observed statistic, so the share is 1/6
    splits = list(itertools.combinations(range(4), 2))
    exact = sum(
        (sum(s[i] for i in x) - sum(s[i] for i in range(4) if i not in x)) >= want_stat - 1e-12
        for x in splits
    ) / len(splits)
    assert exact == pytest.approx(1 / 6)
    assert got.p_value == pytest.approx(exact, abs=0.03)
    # scale does not matter (cosines), and swapping A and B flips the sign
    assert weat(3 * X, Y, A, 2 * B).effect_size == pytest.approx(want_effect)
    assert weat(X, Y, B, A).effect_size == pytest.approx(-want_effect)


def test_weat_p_value_is_uniform_without_association_and_small_with_one():
    d, n = 16, 8
    ps = []
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        X, Y, A, B = (torch.randn(n, d, generator=g) for _ in range(4))
        ps.append(weat(X, Y, A, B, permutations=300, seed=seed).p_value)
    ps = torch.tensor(ps)
    # under no association the p-value is about uniform on (0, 1)
    assert 0.35 < float(ps.mean()) < 0.65
    assert 0.0 < float((ps < 0.1).float().mean()) < 0.25
    assert float((ps > 0.9).float().mean()) < 0.25
    # plant one: X leans towards A's mean, Y towards B's
    g = torch.Generator().manual_seed(99)
    A, B = torch.randn(n, d, generator=g) + 2.0, torch.randn(n, d, generator=g) - 2.0
    X, Y = torch.randn(n, d, generator=g) + 1.0, torch.randn(n, d, generator=g) - 1.0
    planted = weat(X, Y, A, B, permutations=2000, seed=0)
    assert planted.p_value < 0.01 and planted.effect_size > 1.0
    assert weat(X, Y, A, B, permutations=2000, seed=0) == planted  # seeded


def test_weat_errors():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="columns"):
        weat(x, x, x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="3 words"):
        weat(x[:1], x[:1], x, x)
    with pytest.raises(ValueError, match="permutations"):
        weat(x, x, x, x, permutations=0)


# ---------------------------------------------------------------- model predictions


def _tiny():
    tok = CharTokenizer("abcdehs ")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16))
    return model.eval().requires_grad_(False), tok


def test_continuation_logprob_is_the_sum_of_the_models_log_probs():
    model, tok = _tiny()
    prompt, cont = "a cab", " she"
    ids = torch.tensor([tok.encode(prompt + cont)])
    logp = F.log_softmax(model(ids)[0], dim=-1)[0]  # (T, V)
    n = len(prompt)
    want = sum(float(logp[n - 1 + j, ids[0, n + j]]) for j in range(len(cont)))
    assert continuation_logprob(model, tok, prompt, cont) == pytest.approx(want, abs=1e-5)
    gap = logprob_gap(model, tok, [prompt, "bad"], " he", " she")
    assert gap.shape == (2,)
    he = continuation_logprob(model, tok, prompt, " he")
    assert float(gap[0]) == pytest.approx(he - continuation_logprob(model, tok, prompt, " she"))
    # a prompt longer than the context keeps its last tokens
    long = "abcde" * 5
    logits = model(torch.tensor([tok.encode((long + " he")[-17:-1])]))[0]
    logp = F.log_softmax(logits, dim=-1)[0]
    ids = tok.encode((long + " he")[-17:])
    want = sum(float(logp[13 + j, ids[14 + j]]) for j in range(3))
    assert continuation_logprob(model, tok, long, " he") == pytest.approx(want, abs=1e-5)


def test_prediction_errors():
    model, tok = _tiny()
    with pytest.raises(TypeError, match="GPT"):
        continuation_logprob("model", tok, "a", "b")
    with pytest.raises(ValueError, match="at least one token"):
        continuation_logprob(model, tok, "", "b")
    with pytest.raises(ValueError, match="prompts"):
        logprob_gap(model, tok, "a prompt")
