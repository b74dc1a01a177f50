"""LoRA adapters: start as the identity update, train only themselves, merge exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minigpt import GPT, GPTConfig
from minigpt.classify import GPTClassifier
from minigpt.lora import LoRALinear, apply_lora, count_parameters, lora_modules, merge_lora


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", vocab_size=40, **overrides))


def test_lora_linear_starts_equal_to_base_and_has_the_right_shapes():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3)
    assert layer.scaling == 2.0
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at the start
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_lora_linear_computes_the_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 4, bias=False)
    layer = LoRALinear(base, rank=2, alpha=1)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    expected = x @ (base.weight + 0.5 * layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rank=0, alpha=1), "rank"),
        (dict(rank=2, alpha=0), "alpha"),
        (dict(rank=2, alpha=1, dropout=1.0), "dropout"),
    ],
)
def test_lora_linear_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(4, 4), **kwargs)
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=1, alpha=1)


def test_apply_lora_wraps_the_named_layers_and_freezes_the_rest():
    model = tiny_gpt()
    n_total = model.num_parameters()
    apply_lora(model, targets=("c_attn", "c_proj", "c_fc"), rank=4, alpha=8)
    wrapped = lora_modules(model)
    assert sorted(wrapped) == sorted(
        f"h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names)
    trainable, total = count_parameters(model)
    C, H = 64, 256
    per_block = 4 * (C + 3 * C) + 4 * (C + C) + 4 * (C + H) + 4 * (H + C)
    assert trainable == 2 * per_block
    assert total == n_total + trainable


def test_apply_lora_matches_suffixes_at_dot_boundaries_only():
    model = tiny_gpt()
    apply_lora(model, targets=("attn.c_proj",), rank=2, alpha=2)
    assert sorted(lora_modules(model)) == ["h.0.attn.c_proj", "h.1.attn.c_proj"]
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, targets=("c_fc",), rank=2, alpha=2)
    with pytest.raises(ValueError, match="no nn.Linear.*c_attn"):
        apply_lora(tiny_gpt(), targets=("proj",), rank=2, alpha=2)


def test_apply_lora_keeps_named_parameters_trainable():
    clf = GPTClassifier(tiny_gpt(), num_classes=2)
    apply_lora(clf, targets=("c_attn",), rank=2, alpha=4, trainable=("head",))
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith("head.") or ".lora_" in n for n in trainable)


def test_merged_outputs_equal_unmerged_and_names_return_to_gpt2():
    model = tiny_gpt()
    reference_names = sorted(n for n, _ in model.named_parameters())
    apply_lora(model, targets=("c_attn", "c_proj", "c_fc"), rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.normal_(std=0.05)  # a non-zero, "trained" update
    idx = torch.randint(0, 40, (3, 17))
    before, _ = model(idx)
    merge_lora(model)
    after, _ = model(idx)
    assert not lora_modules(model)
    assert sorted(n for n, _ in model.named_parameters()) == reference_names
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    # merged weights keep GPT's column-major order (the faster one for generation)
    assert all(m.weight.t().is_contiguous() for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # the update really changed the model (the test above is not vacuous)
    fresh, _ = tiny_gpt()(idx)
    assert (fresh - after).abs().max() > 1e-3


def test_lora_training_leaves_frozen_parameters_unchanged():
    model = tiny_gpt()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, targets=("c_attn", "c_fc"), rank=2, alpha=4)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    idx = torch.randint(0, 40, (4, 16))
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = dict(model.named_parameters())
    for name, before in frozen_before.items():
        parts = name.rsplit(".", 1)
        now = state.get(name, state.get(f"{parts[0]}.base.{parts[1]}"))
        assert now is not None, name
        torch.testing.assert_close(now, before, rtol=0, atol=0)
    moved = [layer.lora_B.abs().sum().item() for layer in lora_modules(model).values()]
    assert all(m > 0 for m in moved)
