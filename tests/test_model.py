"""minigpt.model against Hugging Face's GPT-2: weights, logits, greedy text,
parameter counts; checkpoint files; the Llama-style variant trains.

Every checkpoint here is a tiny random GPT-2 that ``transformers`` builds from a
config and saves to a temporary directory: no network.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt import GPT, GPTConfig
from minigpt.checkpoint import CheckpointError
from minigpt.pretrained import from_pretrained

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar goes to stderr


def hf_gpt2(tmp_path, seed=0, **overrides):
    """A random tiny GPT2LMHeadModel saved with save_pretrained into tmp_path."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=101, n_positions=48, n_embd=48, n_layer=3, n_head=4)
    kwargs |= dict(bos_token_id=0, eos_token_id=0)  # inside the tiny vocab
    kwargs |= overrides
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    # give the norms and biases non-trivial values so a mix-up cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def greedy(step, idx, n_new):
    """Append the argmax token n_new times; step(idx) -> logits (B, T, V)."""
    for _ in range(n_new):
        idx = torch.cat([idx, step(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


# ---------------------------------------------------------------- GPT-2 weights


def test_from_pretrained_matches_transformers(tmp_path):
    hf = hf_gpt2(tmp_path)
    ours = from_pretrained(tmp_path)
    assert not ours.training, "from_pretrained returns a model ready for inference"
    assert ours.config.block_size == 48 and ours.config.vocab_size == 101
    idx = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)
        prompt = idx[:, :5]
        mine = greedy(lambda x: ours(x)[0], prompt, 20)
        theirs = greedy(lambda x: hf(x).logits, prompt, 20)
    assert torch.equal(mine, theirs)
    assert ours.num_parameters() == hf.num_parameters()
    assert ours.lm_head.weight.data_ptr() == ours.wte.weight.data_ptr()


def test_loss_matches_transformers(tmp_path):
    hf = hf_gpt2(tmp_path)
    ours = from_pretrained(tmp_path)
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # HF shifts labels inside the model; minigpt takes the next tokens as targets
        expected = hf(idx, labels=idx).loss
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_openai_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The hub's original gpt2 file has no "transformer." prefix and keeps the
    causal-mask buffers h.N.attn.bias; both must be handled (c_attn.bias is a weight)."""
    hf = hf_gpt2(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(3):
        renamed[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
        renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    renamed["lm_head.weight"] = renamed["wte.weight"].clone()  # an explicit tied head
    save_file(renamed, tmp_path / "model.safetensors")
    ours = from_pretrained(tmp_path)
    idx = torch.randint(0, 101, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_untied_head_and_custom_inner_width(tmp_path):
    hf = hf_gpt2(tmp_path, tie_word_embeddings=False, n_inner=80, layer_norm_epsilon=1e-6)
    ours = from_pretrained(tmp_path)
    assert not ours.config.tie_weights and ours.config.mlp_hidden == 80
    assert ours.config.norm_eps == 1e-6
    idx = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)
    assert ours.num_parameters() == hf.num_parameters()


def test_pickled_checkpoints_are_refused(tmp_path):
    hf_gpt2(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        from_pretrained(tmp_path)


def test_unsupported_or_broken_configs_are_refused(tmp_path):
    hf_gpt2(tmp_path)
    config_path = tmp_path / "config.json"
    original = json.loads(config_path.read_text())

    def with_config(**changes):
        config_path.write_text(json.dumps({**original, **changes}))

    with_config(activation_function="relu")
    with pytest.raises(CheckpointError, match="activation_function 'relu'"):
        from_pretrained(tmp_path)
    with_config(scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        from_pretrained(tmp_path)
    with_config(model_type="llama")
    with pytest.raises(CheckpointError, match="only GPT-2"):
        from_pretrained(tmp_path)
    with_config(n_embd=50)  # weights no longer fit, and 50 is not divisible by 4 heads
    with pytest.raises(CheckpointError, match="divisible by n_head"):
        from_pretrained(tmp_path)
    with_config(n_layer=2)  # one block too many in the file
    with pytest.raises(CheckpointError, match=r"unexpected \['h\.2\."):
        from_pretrained(tmp_path)
    config_path.unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path)


def test_missing_directory_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(tmp_path)

    import huggingface_hub

    asked = {}

    def offline(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not download 'gpt2'.*Offline"):
        from_pretrained("gpt2")
    assert asked["repo_id"] == "gpt2"
    assert sorted(asked["allow_patterns"]) == ["config.json", "model.safetensors"]


def test_hub_download_goes_through_the_local_loader(tmp_path, monkeypatch):
    hf = hf_gpt2(tmp_path / "snapshot")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: tmp_path / "snapshot")
    ours = from_pretrained("openai-community/gpt2")
    assert ours.num_parameters() == hf.num_parameters()


def test_save_load_after_from_pretrained_is_bitwise(tmp_path):
    hf_gpt2(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    model.save(tmp_path / "mine")
    loaded = GPT.load(tmp_path / "mine")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 101, (1, 10))
    assert torch.equal(model(idx)[0], loaded.eval()(idx)[0])


def test_too_long_input_names_the_context(tmp_path):
    hf_gpt2(tmp_path)
    model = from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"49 tokens is longer .*block_size=48.*last 48"):
        model(torch.zeros(1, 49, dtype=torch.long))


# ---------------------------------------------------------------- counting


@pytest.mark.parametrize(
    ("preset", "published"),
    [  # the sizes Hugging Face reports for OpenAI's checkpoints
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_gpt2_parameter_counts(preset, published):
    config = GPTConfig.preset(preset)
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(config)
    assert model.num_parameters() == published
    V, T, C, L = config.vocab_size, config.block_size, config.n_embd, config.n_layer
    per_block = 12 * C * C + 13 * C  # attention 4C² + 4C, MLP 8C² + 5C, two norms 4C
    assert published == V * C + T * C + L * per_block + 2 * C
    assert model.num_parameters(exclude_embeddings=True) == published - V * C - T * C


def test_parameter_count_matches_transformers_for_random_shapes():
    for n_layer, n_head, n_embd, vocab, ctx in [(1, 1, 8, 10, 4), (3, 4, 48, 101, 48)]:
        hf_config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head
        )
        with torch.device("meta"):
            hf = transformers.GPT2LMHeadModel(hf_config)
            ours = GPT(GPTConfig(vocab, ctx, n_layer, n_head, n_embd))
        assert ours.num_parameters() == hf.num_parameters()


def test_flops_per_token_formula():
    config = GPTConfig.preset("gpt2")
    with torch.device("meta"):
        model = GPT(config)
    N = model.num_parameters(exclude_embeddings=True)
    L, T, C, V = config.n_layer, config.block_size, config.n_embd, config.vocab_size
    assert model.flops_per_token() == 6 * (N + V * C) + 12 * L * T * C
    assert model.flops_per_token(seq_len=1, training=False) == 2 * (N + V * C) + 4 * L * C
    # the commonly quoted "6N" rule is within ~35 % for GPT-2 small at full context
    assert 1.0 < model.flops_per_token() / (6 * N) < 1.8


# ---------------------------------------------------------------- variants


def test_llama_style_is_a_configuration_of_the_same_model():
    model = GPT(GPTConfig.preset("llama-tiny", vocab_size=64))
    names = dict(model.named_modules())
    assert type(names["h.0.ln_1"]).__name__ == "RMSNorm"
    assert type(names["h.0.mlp"]).__name__ == "SwiGLU"
    assert model.wpe is None  # rotary positions live inside attention
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()


@pytest.mark.parametrize("preset", ["llama-tiny", "tiny"])
def test_model_trains_on_a_tiny_batch(preset):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, vocab_size=64, block_size=32))
    data = torch.randint(0, 64, (4, 33))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(64)) < 0.2, "an untrained model starts near ln(V)"
    assert losses[-1] < 0.25 * losses[0], losses[::5]


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    config = GPTConfig.preset("cpu-small", vocab_size=64)
    model = GPT(config)
    proj = model.h[0].mlp.c_proj.weight.std().item()
    fc = model.h[0].mlp.c_fc.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.05)
    assert proj == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.05)
