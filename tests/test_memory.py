"""Memory: activation checkpointing (same gradients, fewer saved bytes), the exact count
of saved activations, and the weights / gradients / optimizer-state breakdown."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minigpt.memory import (
    activation_bytes,
    checkpoint_blocks,
    is_checkpointed,
    training_memory,
    uncheckpoint_blocks,
)
from minigpt.model import GPT, Block, GPTConfig

B, T, V, C, L = 4, 8, 32, 16, 2


def _model(dropout: float = 0.0, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=2, n_embd=C, dropout=dropout, **kw)
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def _grads(model: GPT, seed: int = 3) -> tuple[float, dict[str, torch.Tensor]]:
    x, y = _batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"}])
def test_checkpointed_gradients_equal_plain_ones(kw):
    model = _model(dropout=0.2, **kw)  # dropout on: the recomputation must replay its masks
    loss, plain = _grads(model)
    checkpoint_blocks(model)
    assert all(is_checkpointed(b) for b in model.h)
    loss_ckpt, ckpt = _grads(model)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # a different dropout draw gives different gradients: the comparison can fail
    _, other = _grads(model, seed=4)
    assert not torch.allclose(other["h.0.mlp.c_fc.weight"], plain["h.0.mlp.c_fc.weight"])
    uncheckpoint_blocks(model)
    assert not any(is_checkpointed(b) for b in model.h) and "forward" not in model.h[0].__dict__
    torch.testing.assert_close(_grads(model)[1]["wte.weight"], plain["wte.weight"])


def test_checkpointing_is_idempotent_and_leaves_generation_alone():
    model = checkpoint_blocks(checkpoint_blocks(_model()))
    x, _ = _batch()
    with torch.no_grad():
        logits, _ = model(x)
    uncheckpoint_blocks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], logits)
    with pytest.raises(TypeError, match="minigpt GPT"):
        checkpoint_blocks(nn.Linear(2, 2))


def test_activation_bytes_counts_saved_storages_once_and_skips_weights():
    x = torch.randn(100, requires_grad=True)
    n, _ = activation_bytes(lambda: x.exp().sin().sum())  # exp saves its output, sin its input
    assert n == 100 * 4  # one storage, counted once
    n, _ = activation_bytes(lambda: (x * 2).exp().sum())  # mul by a number saves nothing
    assert n == 100 * 4
    lin = nn.Linear(100, 7)
    n, _ = activation_bytes(lambda: lin(x.view(1, 100)).sum())  # the input, not the weight
    assert n == 100 * 4
    with torch.no_grad():
        assert activation_bytes(lambda: lin(x.view(1, 100)).exp())[0] == 0


def test_checkpointing_saves_only_each_blocks_input():
    """Exact counts: a checkpointed model saves the plain model's bytes minus, per block,
    what the block saves, plus the block's input (B, T, C) float32."""
    model = _model()
    x, y = _batch()
    plain, _ = activation_bytes(lambda: model(x, y)[1])
    block_input = torch.randn(B, T, C)
    per_block, _ = activation_bytes(lambda: model.h[0](block_input))
    checkpoint_blocks(model)
    ckpt, loss_ckpt = activation_bytes(lambda: model(x, y)[1])
    assert ckpt < plain
    assert plain - ckpt == L * (per_block - B * T * C * 4)
    loss_ckpt.backward()  # the count leaves a working graph behind
    assert model.wte.weight.grad is not None
    # the saving grows with depth: a deeper model saves the same outside the blocks
    assert per_block > B * T * C * 4 * 10  # attention weights, MLP activations, norms...


def _hand_count(vocab=V, block=T, n_embd=C, layers=1) -> tuple[int, int]:
    """Parameters and tensors of a GPT-2 style model with tied weights, by hand."""
    E, H = n_embd, 4 * n_embd
    per_layer = (2 * E) + (E * 3 * E + 3 * E) + (E * E + E) + (2 * E) + (E * H + H) + (H * E + E)
    params = vocab * E + block * E + layers * per_layer + 2 * E
    tensors = 2 + layers * 12 + 2
    return params, tensors


def test_training_memory_equals_a_hand_count_and_the_optimizers_own_state():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=C))
    P, N = _hand_count()
    assert P == 3952 and model.num_parameters() == P  # tied: the head is the embedding
    mem = training_memory(model)
    assert (mem.weights, mem.gradients, mem.optimizer_state) == (4 * P, 4 * P, 8 * P + 4 * N)
    assert mem.total == 16 * P + 4 * N
    assert training_memory(model, "sgd").optimizer_state == 0
    assert training_memory(model, "sgd_momentum").optimizer_state == 4 * P

    def state_bytes(opt: torch.optim.Optimizer) -> int:
        x, y = _batch()
        model(x, y)[1].backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        return sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )

    assert state_bytes(torch.optim.AdamW(model.parameters())) == mem.optimizer_state
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert state_bytes(sgd) == training_memory(model, "sgd_momentum").optimizer_state
    # frozen parameters have no gradients and no optimizer state
    model.wte.weight.requires_grad_(False)
    frozen = training_memory(model)
    assert frozen.weights == 4 * P and frozen.gradients == 4 * (P - V * C)
    assert frozen.optimizer_state == 8 * (P - V * C) + 4 * (N - 1)
    # bfloat16 weights take 2 bytes
    assert training_memory(model.bfloat16()).weights == 2 * P
    with pytest.raises(ValueError, match="optimizer_name must be one of"):
        training_memory(model, "lion")


def test_block_is_still_a_plain_module():
    model = checkpoint_blocks(_model())
    assert type(model.h[0]) is Block and isinstance(model.h[0].mlp.c_fc, nn.Linear)
