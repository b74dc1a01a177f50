"""minigpt.generate: the generation loop, its KV cache, streaming, sampling settings."""

from __future__ import annotations

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.generate import _TextDecoder, generate, generate_text, stream
from minigpt.pretrained import from_pretrained
from minigpt.sampling import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = {
    "gpt2-style": ("tiny", {}),
    "llama-style": ("llama-tiny", {}),
    "sinusoidal": ("tiny", {"positions": "sinusoidal"}),
}


def small_model(kind: str = "gpt2-style", vocab_size: int = 61, block_size: int = 24) -> GPT:
    preset, overrides = VARIANTS[kind]
    torch.manual_seed(0)
    config = GPTConfig.preset(preset, vocab_size=vocab_size, block_size=block_size, **overrides)
    return GPT(config).eval()


def prompt(B: int = 2, T: int = 5, V: int = 61, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the loop


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0},
        {"temperature": 0.9, "seed": 3},
        {"temperature": 1.2, "top_k": 10, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 4},
    ],
    ids=["greedy", "sampled", "filtered"],
)
@pytest.mark.parametrize("new_tokens", [12, 40], ids=["inside", "past-block-size"])
def test_cached_equals_uncached(kind, sampling, new_tokens):
    model = small_model(kind)  # block_size 24: 5 + 40 tokens slide past it
    idx = prompt()
    cached = generate(model, idx, new_tokens, **sampling)
    uncached = generate(model, idx, new_tokens, use_cache=False, **sampling)
    assert cached.shape == (2, 5 + new_tokens)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], idx)


@pytest.mark.parametrize(("T", "new_tokens", "positions"), [(5, 12, 17), (5, 40, 24), (30, 3, 24)])
def test_the_cache_holds_only_the_positions_a_call_can_fill(monkeypatch, T, new_tokens, positions):
    """Zeroing block_size positions per layer for a short generation cost a GPT-2
    several tokens' time (1024 positions x 24 tensors); a cache of prompt + new
    tokens is enough unless the window slides."""
    model = small_model()  # block_size 24
    sizes = []
    original = model.new_kv_cache

    def spy(batch_size, max_len=None):
        caches = original(batch_size, max_len)
        sizes.append(caches[0].max_len)
        return caches

    monkeypatch.setattr(model, "new_kv_cache", spy)
    idx = prompt(T=T)
    out = generate(model, idx, new_tokens, temperature=0)
    assert sizes == [positions]
    assert torch.equal(out, generate(model, idx, new_tokens, temperature=0, use_cache=False))


@pytest.mark.parametrize("kind", ["gpt2-style", "llama-style"])
def test_greedy_equals_a_plain_loop_over_the_last_block_size_tokens(kind):
    """The textbook loop: run the model on the last block_size tokens, take the argmax."""
    model = small_model(kind, block_size=16)
    idx = prompt(T=7)
    seq = idx.clone()
    with torch.no_grad():
        for _ in range(40):  # past block_size: the window slides
            logits, _ = model(seq[:, -16:])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, idx, 40, temperature=0), seq)


def test_prompt_longer_than_the_context_is_cropped():
    model = small_model(block_size=16)
    idx = prompt(T=40)
    out = generate(model, idx, 5, temperature=0)
    assert torch.equal(out[:, :40], idx)
    with torch.no_grad():
        logits, _ = model(idx[:, -16:])
    assert torch.equal(out[:, 40], logits[:, -1].argmax(-1))
    assert torch.equal(out, generate(model, idx, 5, temperature=0, use_cache=False))


def test_rows_are_independent_in_a_batch():
    model = small_model()
    idx = prompt(B=3)
    batch = generate(model, idx, 10, temperature=0)
    for b in range(3):
        assert torch.equal(batch[b : b + 1], generate(model, idx[b : b + 1], 10, temperature=0))


def test_seed_makes_sampling_reproducible_and_private():
    model = small_model()
    idx = prompt()
    torch.manual_seed(123)
    a = generate(model, idx, 15, seed=7)
    state = torch.get_rng_state()
    b = generate(model, idx, 15, seed=7)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a, generate(model, idx, 15, seed=8))


def test_stop_tokens_end_rows_and_generation():
    model = small_model()
    idx = prompt()
    free = generate(model, idx, 20, temperature=0)
    stop = int(free[0, 5 + 3])  # the 4th token of row 0
    out = generate(model, idx, 20, temperature=0, stop_tokens=[stop])
    for row_free, row in zip(free, out):
        new = row_free[5:].tolist()
        if stop in new:
            k = new.index(stop)
            assert row[5 : 5 + k + 1].tolist() == new[: k + 1]  # kept up to the stop token
            assert (row[5 + k :] == stop).all()  # then padded with it
        else:
            assert row[5:].tolist() == new[: out.shape[1] - 5]
    if all(stop in r[5:].tolist() for r in free):  # every row stopped: the loop ends early
        assert out.shape[1] < free.shape[1]
    single = generate(model, idx[:1], 20, temperature=0, stop_tokens=stop)
    k = free[0, 5:].tolist().index(stop)
    assert single.shape[1] == 5 + k + 1 and int(single[0, -1]) == stop


def test_repetition_penalty_changes_greedy_output():
    model = small_model()
    idx = prompt(B=1)
    plain = generate(model, idx, 30, temperature=0)
    penalized = generate(model, idx, 30, temperature=0, repetition_penalty=5.0)
    assert not torch.equal(plain, penalized)
    # a strong penalty spreads the output over more distinct tokens
    assert penalized[0, 5:].unique().numel() > plain[0, 5:].unique().numel()


def test_model_mode_and_prompt_are_left_alone():
    model = small_model()
    model.train()
    idx = prompt()
    before = idx.clone()
    out = generate(model, idx, 4)
    assert model.training
    assert torch.equal(idx, before)
    assert not out.is_inference()  # usable as training data afterwards
    assert torch.equal(generate(model, idx, 0), idx)


@pytest.mark.parametrize(
    ("idx", "error", "words"),
    [
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, "empty"),
        (torch.zeros(2, 3), TypeError, "integer"),
        (torch.zeros(5, dtype=torch.long), ValueError, r"idx\[None\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"\(B, T\)"),
        (torch.full((1, 3), 61), ValueError, r"\[0, 61\)"),
        ([[1, 2, 3]], TypeError, "torch.tensor"),
    ],
)
def test_bad_prompts(idx, error, words):
    with pytest.raises(error, match=words):
        generate(small_model(), idx, 3)


def test_bad_loop_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt(), -1)
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(model, prompt(), 3, stop_tokens=[61])
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, prompt(), 3, repetition_penalty=-1.0)
    with pytest.raises(TypeError, match="GPT"):
        generate(torch.nn.Linear(2, 2), prompt(), 3)


def test_last_only_logits():
    model = small_model()
    idx = prompt()
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, 61)
    torch.testing.assert_close(last, full[:, -1:])
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)


def test_hidden_states_feed_the_head():
    model = small_model()
    idx = prompt()
    logits, _ = model(idx)
    hidden = model.hidden_states(idx)
    assert hidden.shape == (2, 5, model.config.n_embd)
    torch.testing.assert_close(model.lm_head(hidden), logits)
    assert model.hidden_states(idx, last_only=True).shape == (2, 1, model.config.n_embd)


# ---------------------------------------------------------------- transformers


def test_greedy_equals_transformers_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_config = GPT2Config(
        vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    hf = GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    model = from_pretrained(tmp_path)
    idx = torch.randint(2, 97, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.generate(
            idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, min_new_tokens=20,
            do_sample=False,
        )  # fmt: skip
    assert torch.equal(generate(model, idx, 20, temperature=0), theirs)
    assert torch.equal(generate(model, idx, 20, temperature=0, use_cache=False), theirs)


# ---------------------------------------------------------------- streaming and text


class ByteTokenizer:
    """ids are the raw UTF-8 bytes; decode replaces broken characters with U+FFFD."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class ByteTokenizerWithBytes(ByteTokenizer):
    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(ids)


CYCLE = "a é✓🙂世b"  # 1-, 2-, 3- and 4-byte characters; no byte occurs twice


@pytest.fixture(scope="module")
def byte_model() -> GPT:
    """A byte-level bigram model built by hand: each byte of CYCLE predicts the next
    one, so greedy decoding writes multi-byte characters one byte per step.

    The blocks are zeroed (the residual stream is just the token's one-hot
    embedding) and the head is a permutation matrix scaled so that the right byte
    wins greedily but sampling at temperature 2 still picks stray bytes.
    """
    data = list(CYCLE.encode("utf-8"))
    config = GPTConfig(
        vocab_size=256, block_size=32, n_layer=1, n_head=1, n_embd=256,
        positions="none", tie_weights=False,
    )  # fmt: skip
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.h.named_parameters():
            if "c_proj" in name:
                p.zero_()  # attention and MLP add nothing to the residual stream
        model.wte.weight.copy_(torch.eye(256))
        model.lm_head.weight.zero_()
        for a, b in zip(data, data[1:] + data[:1]):
            model.lm_head.weight[b, a] = 0.3
    return model.eval()


@pytest.mark.parametrize("tok", [ByteTokenizer(), ByteTokenizerWithBytes()])
def test_stream_text_splits_only_between_whole_characters(byte_model, tok):
    pieces = list(stream(byte_model, "a é", 60, tokenizer=tok, temperature=0))
    text = "".join(pieces)
    assert text == (CYCLE * 10)[3:][: len(text)] and len(text.encode()) >= 58
    assert "🙂" in pieces and "世" in pieces  # whole multi-byte characters, one piece each
    assert all("\ufffd" not in p for p in pieces)
    assert text == generate_text(byte_model, tok, "a é", 60, temperature=0)


@pytest.mark.parametrize("tok", [ByteTokenizer(), ByteTokenizerWithBytes()])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_text_equals_generate_text_when_sampling(byte_model, tok, seed):
    """Temperature 2 makes plenty of invalid UTF-8: both paths must agree on it too."""
    opts = dict(temperature=2.0, seed=seed, top_k=200)
    pieces = list(stream(byte_model, "✓", 60, tokenizer=tok, **opts))
    text = generate_text(byte_model, tok, "✓", 60, **opts)
    assert "".join(pieces) == text
    assert "\ufffd" in text  # the case this test is about did come up


def test_stream_ids_equal_generate(byte_model):
    idx = torch.tensor([list(b"a ")])
    out = generate(byte_model, idx, 25, temperature=1.5, seed=0)
    assert list(stream(byte_model, idx, 25, temperature=1.5, seed=0)) == out[0, 2:].tolist()
    assert list(stream(byte_model, [97, 32], 3, temperature=0)) == (
        generate(byte_model, torch.tensor([[97, 32]]), 3, temperature=0)[0, 2:].tolist()
    )


def test_stream_stops_at_a_stop_token_without_decoding_it(byte_model):
    tok = ByteTokenizerWithBytes()
    text = generate_text(byte_model, tok, "a", 60, temperature=0, stop_tokens=ord("b"))
    assert text == " é✓🙂世"
    pieces = stream(byte_model, "a", 60, tokenizer=tok, temperature=0, stop_tokens=[98])
    assert "".join(pieces) == text
    ids = list(stream(byte_model, [97], 60, temperature=0, stop_tokens=98))
    assert ids[-1] == 98 and bytes(ids[:-1]).decode() == text


def test_text_decoder_on_split_characters():
    data = "a✓🙂é".encode()
    for tok in (ByteTokenizer(), ByteTokenizerWithBytes()):
        decoder = _TextDecoder(tok, stops=[])
        pieces = [decoder.push(b) for b in data] + [decoder.flush()]
        assert pieces == ["a", "", "", "✓", "", "", "", "🙂", "", "é", ""]
        decoder = _TextDecoder(tok, stops=[])  # a character cut off at the end
        assert [decoder.push(b) for b in "é".encode()[:1]] + [decoder.flush()] == ["", "\ufffd"]


def test_stream_errors_come_at_the_call(byte_model):
    with pytest.raises(ValueError, match="no tokens"):
        stream(byte_model, "", 5, tokenizer=ByteTokenizer())
    with pytest.raises(TypeError, match="tokenizer"):
        stream(byte_model, "hi", 5)
    with pytest.raises(ValueError, match="generate for a batch"):
        stream(byte_model, torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="empty"):
        stream(byte_model, [], 5)


# ---------------------------------------------------------------- sampling settings


def test_generate_checks_the_sampling_settings():
    for kwargs, error, words in [
        ({"temperature": -0.5}, ValueError, "temperature"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_p": 1.5}, ValueError, "top_p"),
    ]:
        with pytest.raises(error, match=words):
            generate(small_model(), prompt(), 3, **kwargs)


def test_a_sampling_config_equals_the_same_keywords():
    model, idx = small_model(), prompt()
    settings = dict(temperature=0.9, top_k=8, top_p=0.95, repetition_penalty=1.3, seed=4)
    config = SamplingConfig(**settings)
    expected = generate(model, idx, 10, **settings)
    assert torch.equal(generate(model, idx, 10, config), expected)
    assert torch.equal(generate(model, idx, 10, sampling=config), expected)
    # keywords override the config's fields
    assert torch.equal(generate(model, idx, 10, SamplingConfig(seed=9), **{**settings}), expected)
    ids = list(stream(model, idx[:1], 10, config))
    assert ids == generate(model, idx[:1], 10, **settings)[0, 5:].tolist()


def test_unknown_or_misplaced_settings_are_refused_clearly():
    model, idx = small_model(), prompt()
    with pytest.raises(
        TypeError,
        match=r"unknown sampling setting\(s\) \['temprature'\]; did you mean 'temperature'",
    ):
        generate(model, idx, 3, temprature=0.5)
    with pytest.raises(TypeError, match="unknown sampling setting"):
        stream(model, [1, 2], 3, topk=5)
    with pytest.raises(TypeError, match="pass sampling settings by name"):
        generate(model, idx, 3, 0.8)  # a temperature where the SamplingConfig goes


def test_generation_checks_the_prompt_once_not_at_every_step(monkeypatch):
    model, idx = small_model(), prompt()
    checks = []
    real = GPT._check_ids
    monkeypatch.setattr(GPT, "_check_ids", lambda self, *a: checks.append(1) or real(self, *a))
    reads = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: reads.append(1) or real_aminmax(*a, **k))
    for use_cache in (True, False):
        generate(model, idx, 6, temperature=0, use_cache=use_cache)
        list(stream(model, idx[:1], 6, temperature=0, use_cache=use_cache))
    assert checks == []  # the model's own forward checks are not repeated per step
    assert len(reads) == 4  # one range check of the prompt per call


def test_same_length_rows_groups_indices_by_length_in_first_seen_order():
    from minigpt.generate import same_length_rows

    groups = same_length_rows([[1, 2], [3], [4, 5], [6, 7, 8], [9]])
    assert groups == {2: [0, 2], 1: [1, 4], 3: [3]}
    assert list(groups) == [2, 1, 3]
    assert same_length_rows([]) == {}
