"""The GRU written out equals PyTorch's, and the GRU language model has GPT's interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt.model import GPT, GPTConfig
from minigpt.rnn import GRUCell, GRUConfig, GRULanguageModel, run_gru
from minigpt.tokens import TokenDataset
from minigpt.train import evaluate, validation_loss


def test_cell_equals_torch_grucell():
    torch.manual_seed(0)
    ours, theirs = GRUCell(5, 7), nn.GRUCell(5, 7)
    theirs.load_state_dict(ours.state_dict())  # same names and layout
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    torch.testing.assert_close(ours(x, h), theirs(x, h))


def test_cell_gates_by_hand():
    # an independent reading of the equations: with zero weights r = z = 1/2 and
    # n = tanh(0) = 0, so h' = h / 2
    cell = GRUCell(2, 3)
    for p in cell.parameters():
        nn.init.zeros_(p)
    h = torch.tensor([[1.0, -2.0, 4.0]])
    torch.testing.assert_close(cell(torch.ones(1, 2), h), h / 2)


def test_run_gru_equals_nn_gru():
    torch.manual_seed(1)
    cell, gru = GRUCell(4, 6), nn.GRU(4, 6, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, f"{name}_l0").copy_(getattr(cell, name))
    x, h0 = torch.randn(2, 9, 4), torch.randn(2, 6)
    states, last = run_gru(cell, x, h0)
    want_states, want_last = gru(x, h0[None])
    torch.testing.assert_close(states, want_states)
    torch.testing.assert_close(last, want_last[0])
    # the gradient flows back through every step the same way
    states.sum().backward()
    want_states.sum().backward()
    torch.testing.assert_close(cell.weight_hh.grad, gru.weight_hh_l0.grad)


def test_model_matches_gpt_return_convention():
    torch.manual_seed(0)
    model = GRULanguageModel(GRUConfig(vocab_size=11, block_size=8, n_embd=6, n_hidden=10))
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    idx = torch.randint(11, (2, 8))
    for m in (model, gpt):
        logits, loss = m(idx)
        assert logits.shape == (2, 8, 11) and loss is None
    logits, loss = model(idx, idx)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 11), idx.reshape(-1)))
    targets = idx.clone()
    targets[:, :4] = -100
    _, masked = model(idx, targets)
    torch.testing.assert_close(
        masked, F.cross_entropy(logits[:, 4:].reshape(-1, 11), idx[:, 4:].reshape(-1))
    )


def test_model_is_causal():
    # changing a later token never changes an earlier prediction
    torch.manual_seed(0)
    model = GRULanguageModel(GRUConfig(vocab_size=7, block_size=6, n_embd=4, n_hidden=5))
    idx = torch.randint(7, (1, 6))
    other = idx.clone()
    other[0, 4] = (idx[0, 4] + 1) % 7
    a, _ = model(idx)
    b, _ = model(other)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_model_learns_and_evaluates_like_gpt():
    torch.manual_seed(0)
    ids = torch.arange(200) % 5  # 0 1 2 3 4 0 1 ...: perfectly predictable
    model = GRULanguageModel(GRUConfig(vocab_size=5, block_size=8, n_embd=8, n_hidden=16))
    data = TokenDataset(ids, 8)
    before = validation_loss(model, ids)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = data.batch(8, gen)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = validation_loss(model, ids)
    assert before > 1.4 and after < 0.1, (before, after)
    assert evaluate(model, data, iters=2) < 0.1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="n_hidden"):
        GRUConfig(n_hidden=0)
    with pytest.raises(TypeError, match="GRUConfig"):
        GRULanguageModel(GPTConfig())
    model = GRULanguageModel(GRUConfig(vocab_size=5, block_size=4, n_embd=2, n_hidden=3))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(2, 4))
