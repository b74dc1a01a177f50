"""minigpt.circuits: repeated-block data, the copying model's training and its cache."""

from __future__ import annotations

import pytest
import torch

from minigpt.circuits import (
    INDUCTION,
    attention_map,
    induction_model,
    repeated_blocks,
    train_copying_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _copies(row: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """Every (start, n) with lo <= n <= hi where row[start + n : start + 2n] repeats row[start : start + n]."""
    return [
        (s, n)
        for n in range(lo, hi + 1)
        for s in range(len(row) - 2 * n + 1)
        if row[s + n : s + 2 * n] == row[s : s + n]
    ]


def test_repeated_blocks_are_windows_with_one_copied_block_of_varying_length_and_place():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (5000,), generator=g)
    x, y = repeated_blocks(ids, 24, 300, min_period=3, max_period=9, generator=g)
    assert x.shape == y.shape == (300, 24) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    found = []
    for b in range(300):
        row = torch.cat([x[b], y[b, -1:]]).tolist()
        found.append(_copies(row, 3, 9))
        # outside the second copy the row is a window of ids
        s, n = found[-1][0]
        candidates = (ids[: len(ids) - 24] == row[0]).nonzero().flatten().tolist()
        start = next(i for i in candidates if ids[i : i + s + n].tolist() == row[: s + n])
        window = ids[start : start + 25].tolist()
        assert row[: s + n] == window[: s + n] and row[s + 2 * n :] == window[s + 2 * n :]
    # with 1000 ids, a chance repeat of 3 or more is rare: each row has its one block
    assert sum(len(f) == 1 for f in found) >= 295 and all(found)
    assert {f[0][1] for f in found} == set(range(3, 10))  # every length occurs
    assert len({f[0][0] for f in found}) >= 15  # and the block sits anywhere
    assert max(s + 2 * n for f in found for s, n in f) == 25  # the copy may end the row
    again = repeated_blocks(
        ids, 24, 300, min_period=3, max_period=9, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(again[0], x)  # a different generator state...
    g2 = torch.Generator().manual_seed(0)
    torch.randint(0, 1000, (5000,), generator=g2)
    assert torch.equal(
        repeated_blocks(ids, 24, 300, min_period=3, max_period=9, generator=g2)[0], x
    )


def test_repeated_blocks_errors():
    ids = torch.arange(10)
    with pytest.raises(ValueError, match="min_period"):
        repeated_blocks(ids, 8, 2, min_period=5)  # default max_period 4
    with pytest.raises(ValueError, match="two copies must fit"):
        repeated_blocks(ids, 8, 2, max_period=5)
    with pytest.raises(ValueError, match="1-D"):
        repeated_blocks(ids[None], 8, 2)
    with pytest.raises(ValueError, match="window needs"):
        repeated_blocks(ids, 10, 2)


TINY = {
    **INDUCTION,
    "model": {**INDUCTION["model"], "n_embd": 16, "block_size": 16},
    "vocab_size": 8,
}
TINY.update(steps=30, eval_every=10, batch_size=8)


def test_training_records_its_curves_and_lowers_the_loss(data_dir):
    model, tok, rec = train_copying_model(TINY, seed=0)
    assert rec["step"] == [0, 10, 20, 30] and rec["steps"] == 30
    assert all(len(rec[k]) == 4 for k in ("loss", "induction_score", "loss_drop"))
    assert rec["loss"][-1] < rec["loss"][0]  # even 30 steps learn the unigram statistics
    assert all(0.0 <= s <= 1.0 for s in rec["induction_score"])
    assert not model.training and tok.vocab_size == model.config.vocab_size == 65
    again = train_copying_model(TINY, seed=0)
    assert again[2]["loss"] == rec["loss"]  # seeded
    for p, q in zip(model.parameters(), again[0].parameters()):
        assert torch.equal(p, q)


def test_induction_model_is_trained_once_and_loaded(tmp_path, monkeypatch, data_dir):
    calls = []

    def fake(recipe, *, steps, seed):
        calls.append(steps)
        return train_copying_model(TINY, steps=steps, seed=seed)

    monkeypatch.setattr("minigpt.circuits.train_copying_model", fake)
    m1, _, r1 = induction_model(tmp_path, steps=5)
    m2, _, r2 = induction_model(tmp_path, steps=5)
    assert calls == [5] and r1 == r2
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert len(list((tmp_path / "models").glob("induction-*"))) == 1


def test_attention_map_is_the_captured_head_and_checks_its_arguments():
    from minigpt import GPT, GPTConfig
    from minigpt.inspect import capture
    from minigpt.tokenizer import CharTokenizer

    tok = CharTokenizer("abc ")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4, block_size=8, n_layer=2, n_head=2, n_embd=16)).eval()
    weights, tokens = attention_map(model, tok, "ab cab cabba", layer=1, head=1)
    ids = torch.tensor([tok.encode("ab cab cabba")[-8:]])
    with capture(model) as rec:
        model(ids)
    torch.testing.assert_close(weights, rec.attention[1][0, 1])
    assert tokens == list("cab cabba"[-8:]) and weights.shape == (8, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(8))
    with pytest.raises(ValueError, match="layer 2 does not exist"):
        attention_map(model, tok, "abc", layer=2, head=0)
    with pytest.raises(ValueError, match="head 2 does not exist"):
        attention_map(model, tok, "abc", layer=0, head=2)
    with pytest.raises(ValueError, match="non-empty"):
        attention_map(model, tok, "", layer=0, head=0)
    assert not any(b._forward_hooks for b in model.h)  # no hook left behind by the error
