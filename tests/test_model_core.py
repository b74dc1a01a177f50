"""Core invariants of minigpt.model that every later chapter relies on.

(Chapter 04 adds the full model test suite: GPT-2 weights, parameter counts, ...)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minigpt import GPT, GPTConfig
from minigpt.attention import CausalSelfAttention
from minigpt.checkpoint import CheckpointError
from minigpt.generate import generate
from minigpt.model import _store_column_major

VARIANTS = [
    ("tiny", {"positions": "learned"}),
    ("tiny", {"positions": "sinusoidal"}),
    ("tiny", {"positions": "rope"}),
    ("tiny", {"positions": "none"}),
    ("llama-tiny", {}),
]


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS)
def test_cached_forward_equals_full_forward(preset, overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, vocab_size=97, **overrides)).eval()
    idx = torch.randint(0, 97, (2, 20))
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    pieces = [model(idx[:, :7], kv_cache=cache)[0], model(idx[:, 7:12], kv_cache=cache)[0]]
    pieces += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS)
def test_causal(preset, overrides):
    """Changing a later token never changes the logits at earlier positions."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, vocab_size=50, **overrides)).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_untrained_loss_is_about_log_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=500))
    idx = torch.randint(0, 500, (4, 64))
    # not idx as targets: with tied weights a token predicts itself a little
    targets = torch.randint(0, 500, (4, 64))
    _, loss = model(idx, targets)
    assert abs(loss.item() - torch.log(torch.tensor(500.0)).item()) < 0.1


def test_ignore_index_positions_do_not_count():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=30))
    idx = torch.randint(0, 30, (1, 10))
    targets = torch.randint(0, 30, (1, 10))
    masked = targets.clone()
    masked[0, :5] = -100
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, 5:], targets[0, 5:])
    torch.testing.assert_close(loss, expected)


def test_save_load_roundtrip_is_bitwise(tmp_path):
    for preset in ("tiny", "llama-tiny"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(preset, vocab_size=40))
        model.save(tmp_path / preset)
        loaded = GPT.load(tmp_path / preset)
        for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), k
        assert (
            loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()
            or not loaded.config.tie_weights
        )


def test_corrupt_checkpoint_names_the_file(tmp_path):
    model = GPT(GPTConfig.preset("tiny", vocab_size=40))
    model.save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.load(tmp_path)


def test_checkpoint_of_another_shape_is_rejected(tmp_path):
    GPT(GPTConfig.preset("tiny", vocab_size=40)).save(tmp_path)
    other = GPT(GPTConfig.preset("tiny", vocab_size=41))
    from minigpt.files import load_tensors

    with pytest.raises(CheckpointError, match="wrong shape"):
        other.load_weights(load_tensors(tmp_path / "model.safetensors"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 100, "n_head": 3}, "divisible by n_head"),
        ({"n_kv_head": 3, "n_head": 4, "n_embd": 64}, "n_kv_head"),
        ({"norm": "batchnorm"}, "norm must be one of"),
        ({"positions": "alibi"}, "positions must be one of"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.preset("tiny", **overrides)


def test_bad_inputs_give_clear_errors():
    model = GPT(GPTConfig.preset("tiny", vocab_size=30))
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 30\)"):
        model(torch.full((1, 5), 30))
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"n_layers": 2})


@pytest.mark.parametrize(
    "preset", ["gpt2", "gpt2-medium", "tiny", "cpu-small", "llama-tiny", "llama-small"]
)
def test_every_linear_layer_is_a_plain_nn_linear(preset):
    """A reader who prints the model sees nn.Linear: no machine-specific layer types."""
    with torch.device("meta"):  # the shapes without the memory or the init time
        model = GPT(GPTConfig.preset(preset))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * model.config.n_layer + 1  # c_attn, c_proj, c_fc, c_proj; head
    assert all(type(m) is nn.Linear for m in linears)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_linear_weights_are_stored_column_major_and_compute_the_same(preset, tmp_path):
    """GPT keeps (out, in) weights in the memory order of their transpose (batch-1
    generation reads them faster); values, shapes and results are those of the
    usual row-major order, and a saved file is the same either way."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, vocab_size=97)).eval()
    row = GPT(copy.deepcopy(model.config)).eval()
    row.load_state_dict(model.state_dict())
    _store_column_major(row, column_major=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() for m in linears)
    assert all(m.weight.is_contiguous() for m in row.modules() if isinstance(m, nn.Linear))
    idx = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(model(idx)[0], row(idx)[0], atol=1e-6, rtol=1e-6)
    prompt = idx[:1, :4]
    assert torch.equal(
        generate(model, prompt, 16, temperature=0), generate(row, prompt, 16, temperature=0)
    )
    files = [
        m.save(tmp_path / name) / "model.safetensors" for m, name in [(model, "a"), (row, "b")]
    ]
    assert files[0].read_bytes() == files[1].read_bytes()
    assert GPT.load(tmp_path / "a").lm_head.weight.t().is_contiguous()  # loading keeps the order
    grown = model.resize_vocab(101)
    assert grown.lm_head.weight.t().is_contiguous()
    # the new rows (the mean of the old ones) are summed in the same order either way
    assert torch.equal(grown.wte.weight, row.resize_vocab(101).wte.weight)


def test_attention_built_from_the_config_equals_the_checked_constructor():
    config = GPTConfig.preset("llama-tiny")
    torch.manual_seed(0)
    block_attn = GPT(config).h[0].attn
    torch.manual_seed(0)
    direct = CausalSelfAttention(
        config.n_embd, config.n_head, config.n_kv_head, config.block_size, bias=config.bias
    )
    assert type(block_attn) is CausalSelfAttention
    assert block_attn.state_dict().keys() == direct.state_dict().keys()
    for name in ("n_embd", "n_head", "n_kv_head", "head_dim", "block_size", "dropout"):
        assert getattr(block_attn, name) == getattr(direct, name)
    assert block_attn.rope is not None  # the model's shared rotary table


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_forward_and_backward_never_read_values_off_the_cpu(preset):
    """On a device other than the CPU the model reads no tensor's values on the host
    (that would wait for a GPU at every step): a 'meta' tensor has no values at all,
    so any .item(), int() or bool() of one raises."""
    with torch.device("meta"):
        model = GPT(GPTConfig.preset(preset, vocab_size=50))
        idx = torch.zeros(2, 16, dtype=torch.long)
    logits, loss = model(idx, idx)
    loss.backward()
    assert logits.shape == (2, 16, 50) and logits.device.type == "meta"
    cache = model.new_kv_cache(2)
    model(idx[:, :8], kv_cache=cache)
    assert model(idx[:, 8:9], kv_cache=cache, last_only=True)[0].shape == (2, 1, 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_on_the_gpu_does_not_sync():
    model = GPT(GPTConfig.preset("tiny", vocab_size=50)).cuda()
    idx = torch.randint(0, 50, (2, 16), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, loss = model(idx, idx)
        loss.backward()
        cache = model.new_kv_cache(2)
        model(idx, kv_cache=cache, last_only=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "field, value",
    [
        ("rope_base", 0.0),
        ("rope_base", float("nan")),
        ("norm_eps", -1e-5),
        ("dropout", "abc"),
        ("dropout", 1.0),
        ("bias", "yes"),
        ("tie_weights", 1),
        ("mlp_hidden", 2.5),
        ("n_kv_head", True),
        ("norm", ["layernorm"]),
    ],
)
def test_gpt_config_refuses_bad_values_with_the_field_name(field, value):
    """GPTConfig itself checks every field (the CLI relies on it, it does not re-check)."""
    with pytest.raises(ValueError, match=f"GPTConfig.{field}|{field}"):
        GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=8, **{field: value})


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_weights=False),
        dict(n_kv_head=2, mlp_hidden=100, positions="sinusoidal"),
        dict(bias=False, norm="rmsnorm", tie_weights=False),
    ],
)
def test_the_cli_memory_estimate_counts_the_parameters_gpt_builds(overrides):
    """minigpt.config counts parameters from the config alone (to refuse absurd sizes
    before allocating); it must agree with the model it would build."""
    from minigpt.config import num_parameters

    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=32, **overrides)
    built = GPT(config).num_parameters()
    assert num_parameters(config) == built
