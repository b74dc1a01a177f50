"""minigpt.inspect: capture, head scores, ablation, the logit lens, patching, probes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt import GPT, GPTConfig
from minigpt.inspect import (
    ablate_heads,
    ablation_loss_increase,
    attention_weights,
    capture,
    first_token_score,
    induction_loss_drop,
    induction_score,
    linear_probe,
    logit_lens,
    nearest_tokens,
    patch,
    patching_map,
    previous_token_score,
    repeated_random_tokens,
    same_token_score,
)
from minigpt.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


V = 23
VARIANTS = {
    "learned": dict(positions="learned"),
    "rope": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_weights=False),
    "rope-gqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
    "learned-mqa": dict(positions="learned", n_kv_head=1),
}


def tiny(kind: str = "learned", seed: int = 0) -> GPT:
    """A 2-layer model whose attention is sharp (larger q/k weights than at init)."""
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, **VARIANTS[kind]
    )
    model = GPT(config).eval()
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.weight.mul_(15)
    return model


def ids(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def n_hooks(model: GPT) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- capture


def rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE written independently: channel pairs (j, j + hs/2) as complex numbers."""
    T, hs = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs  # (T, hs/2)
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2 :].double()) * torch.polar(
        torch.ones_like(angles), angles
    )
    return torch.cat([z.real, z.imag], dim=-1).float()


def hand_attention(model: GPT, layer: int, x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) weights from the layer's weights, head by head, query by query."""
    attn, c = model.h[layer].attn, model.config
    H, hs = c.n_head, c.head_dim
    Hkv = c.n_kv_head or H
    W = attn.c_attn.weight
    b = attn.c_attn.bias if attn.c_attn.bias is not None else torch.zeros(W.shape[0])
    B, T, _ = x.shape
    out = torch.zeros(B, H, T, T)
    for h in range(H):
        g = h // (H // Hkv)  # the kv head of query head h
        q = x @ W[h * hs : (h + 1) * hs].T + b[h * hs : (h + 1) * hs]
        ks = slice(H * hs + g * hs, H * hs + (g + 1) * hs)
        k = x @ W[ks].T + b[ks]
        if c.positions == "rope":
            q, k = rotate(q, c.rope_base), rotate(k, c.rope_base)
        for i in range(T):
            scores = (k[:, : i + 1] @ q[:, i, :, None]).squeeze(-1) / math.sqrt(hs)  # (B, i+1)
            out[:, h, i, : i + 1] = torch.softmax(scores, dim=-1)
    return out


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_captured_attention_equals_a_hand_computation_and_gives_the_layer_output(kind):
    model, x = tiny(kind), ids()
    with capture(model) as rec, torch.no_grad():
        model(x)
    for layer, block in enumerate(model.h):
        with torch.no_grad():
            normed = block.ln_1(rec.resid_pre[layer])
            expected = hand_attention(model, layer, normed)
            fused = block.attn(normed)  # F.scaled_dot_product_attention inside
        w = rec.attention[layer]
        assert w.shape == (2, 4, 12, 12)
        torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-4)
        assert w.std() > 0.1  # sharp patterns, not a near-uniform average
        # the weights times the values, through the output projection: the fused output
        H, hs, Hkv = 4, 8, model.config.n_kv_head or 4
        v = block.attn.c_attn(normed)[..., (H + Hkv) * hs :].view(2, 12, Hkv, hs).transpose(1, 2)
        y = (w @ v.repeat_interleave(H // Hkv, dim=1)).transpose(1, 2).reshape(2, 12, 32)
        torch.testing.assert_close(block.attn.c_proj(y), fused, atol=1e-5, rtol=1e-4)


def test_capture_records_the_residual_stream_and_the_mlp_activations():
    model, x = tiny(), ids()
    with capture(model) as rec, torch.no_grad():
        logits, _ = model(x)
        pos = model.wpe(12)
        torch.testing.assert_close(rec.resid_pre[0], model.wte(x) + pos)
        for i, block in enumerate(model.h):
            mid = rec.resid_pre[i] + block.attn(block.ln_1(rec.resid_pre[i]))
            hidden = F.gelu(block.mlp.c_fc(block.ln_2(mid)), approximate="tanh")
            torch.testing.assert_close(rec.mlp[i], hidden)
            torch.testing.assert_close(rec.resid_post[i], mid + block.mlp.c_proj(hidden))
        torch.testing.assert_close(model.lm_head(model.ln_f(rec.resid_post[1])), logits)
    assert rec.mlp[0].shape == (2, 12, 128)
    assert rec.attention_stack().shape == (2, 2, 4, 12, 12)


def test_capture_changes_no_output_or_parameter_and_removes_its_hooks():
    model, x = tiny("rope-gqa"), ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain, _ = model(x)
        with capture(model) as rec:
            assert n_hooks(model) == 4 * 2
            inside, _ = model(x)
        after, _ = model(x)
    assert torch.equal(inside, plain) and torch.equal(after, plain)
    assert n_hooks(model) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sorted(rec.attention) == [0, 1]


def test_capture_removes_its_hooks_when_the_block_raises():
    model = tiny()
    with pytest.raises(RuntimeError, match="boom"), capture(model):
        model(ids())
        raise RuntimeError("boom")
    assert n_hooks(model) == 0


def test_capture_of_some_layers_and_its_errors():
    model = tiny()
    with capture(model, [1], attention=False) as rec:
        model(ids())
    assert list(rec.resid_post) == [1] and not rec.attention
    with pytest.raises(KeyError, match=r"layer 0 was not recorded; recorded: \[1\]"):
        rec.resid_post[0]
    with pytest.raises(ValueError, match="no attention weights recorded"):
        rec.attention_stack()
    bad_layer = r"layer 2 does not exist: the model has layers 0\.\.1"
    with pytest.raises(ValueError, match=bad_layer), capture(model, [0, 2]):
        pass
    with pytest.raises(ValueError, match="without kv_cache"), capture(model):
        model(ids(1, 3), kv_cache=model.new_kv_cache(1))
    assert n_hooks(model) == 0
    with pytest.raises(TypeError, match="model must be a minigpt GPT"), capture("gpt2"):
        pass
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 32\)"):
        attention_weights(model.h[0].attn, torch.zeros(2, 5))


# ---------------------------------------------------------------- head roles


def previous_token_model(big: float = 40.0) -> GPT:
    """One layer, two heads set by hand: head 0 attends to the previous token (queries
    read position i's one-hot channel as "i - 1", keys read it as is); head 1 has zero
    queries and keys, so it averages everything so far."""
    T, C = 16, 32
    config = GPTConfig(
        vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=C, norm="rmsnorm", bias=False
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.wpe.weight.zero_()
        model.wpe.weight[:, :T] = torch.eye(T)  # channels 0..15: one-hot position
        model.wte.weight[:, :T] = 0.0  # channels 16..31: the token
        W = model.h[0].attn.c_attn.weight
        W.zero_()
        for j in range(T - 1):
            W[j, j + 1] = big  # head 0 query channel j reads position j + 1
            W[C + j, j] = 1.0  # head 0 key channel j reads position j
    return model


def test_a_hand_built_previous_token_head_scores_one_and_an_averaging_head_low():
    model, x = previous_token_model(), ids(3, 16)
    with capture(model) as rec:
        model(x)
    w = rec.attention_stack()
    scores = previous_token_score(w)
    assert scores.shape == (1, 2)
    assert scores[0, 0] > 0.99
    uniform = sum(1 / (i + 1) for i in range(1, 16)) / 15  # weight 1/(i+1) on each key
    assert scores[0, 1] == pytest.approx(uniform, abs=1e-4)
    assert first_token_score(w)[0, 1] == pytest.approx(uniform, abs=1e-4)
    assert first_token_score(w)[0, 0] < 0.1  # only query 1 looks at position 0


def brute_force(w: torch.Tensor, pairs) -> torch.Tensor:
    """(L, H): mean over the batch and the listed (query, key) pairs of w[l, b, h, q, k]."""
    L, B, H = w.shape[:3]
    out = torch.zeros(L, H)
    for layer in range(L):
        for h in range(H):
            vals = [w[layer, b, h, q, k] for b in range(B) for q, k in pairs(b)]
            out[layer, h] = torch.stack(vals).mean()
    return out


def random_weights(L=2, B=3, H=4, T=10, seed=0) -> torch.Tensor:
    scores = torch.randn(L, B, H, T, T, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(scores.masked_fill(~torch.ones(T, T).tril().bool(), -math.inf), -1)


def test_scores_of_random_patterns_match_a_brute_force_loop():
    w = random_weights()
    T = w.shape[-1]
    prev = brute_force(w, lambda b: [(i, i - 1) for i in range(1, T)])
    torch.testing.assert_close(previous_token_score(w), prev)
    first = brute_force(w, lambda b: [(i, 0) for i in range(1, T)])
    torch.testing.assert_close(first_token_score(w), first)
    n = 4
    induct = brute_force(w, lambda b: [(i, i - n + 1) for i in range(n, T)])
    torch.testing.assert_close(induction_score(w, n), induct)


def test_same_token_score_matches_a_loop_and_is_one_for_a_copy_looking_head():
    x = torch.tensor([[1, 2, 1, 3, 2, 1, 4, 4], [5, 5, 5, 6, 7, 6, 8, 9]])
    w = random_weights(B=2, T=8)
    expected = torch.zeros(2, 4)
    for layer in range(2):
        for h in range(4):
            vals = []
            for b in range(2):
                for i in range(8):
                    same = [j for j in range(i) if x[b, j] == x[b, i]]
                    if same:
                        vals.append(sum(w[layer, b, h, i, j] for j in same))
            expected[layer, h] = sum(vals) / len(vals)
    torch.testing.assert_close(same_token_score(w, x), expected)
    copy = torch.zeros(1, 2, 1, 8, 8)  # each query spreads over the earlier copies of its token
    for b in range(2):
        for i in range(8):
            same = [j for j in range(i) if x[b, j] == x[b, i]] or [i]
            copy[0, b, 0, i, same] = 1 / len(same)
    assert same_token_score(copy, x).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no token occurs twice"):
        same_token_score(random_weights(1, 1, 1, 3), torch.tensor([[1, 2, 3]]))


def test_induction_score_of_constructed_patterns():
    n, T = 5, 10  # a block of 5 tokens, twice
    induction = torch.zeros(1, 2, 2, T, T)
    for i in range(T):
        induction[..., i, i - n + 1 if i >= n else 0] = 1.0  # head 0: the token after the copy
    induction[:, :, 1] = torch.eye(T)  # head 1: itself
    s = induction_score(induction, n)
    assert s.shape == (1, 2) and s[0, 0] == 1.0 and s[0, 1] == 0.0
    prev = torch.zeros(1, 1, 1, T, T)
    prev[..., torch.arange(1, T), torch.arange(T - 1)] = 1.0
    assert (
        induction_score(prev, n).item() == 0.0
    )  # the previous token is not the one after the copy
    assert previous_token_score(prev).item() == 1.0


def test_repeated_random_tokens_and_induction_loss_drop_against_a_hand_computation():
    x = repeated_random_tokens(V, 7, batch_size=3, seed=4)
    assert x.shape == (3, 14) and torch.equal(x[:, :7], x[:, 7:])
    assert torch.equal(x, repeated_random_tokens(V, 7, batch_size=3, seed=4))
    model = tiny("rope")
    n = 16  # block_size // 2
    y = repeated_random_tokens(V, n, batch_size=16, seed=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(y)[0], dim=-1)  # (B, 2n, V)
    nll = lambda t: -logp[torch.arange(16), t - 1, y[:, t]].mean()  # token t from position t-1
    first = torch.stack([nll(t) for t in range(1, n)]).mean()
    second = torch.stack([nll(t) for t in range(n + 1, 2 * n)]).mean()
    assert induction_loss_drop(model) == pytest.approx(float(first - second), abs=1e-5)
    assert induction_loss_drop(model, 5, seed=1) != induction_loss_drop(model, 5, seed=2)
    with pytest.raises(ValueError, match=r"length must be an integer in 2\.\.16"):
        induction_loss_drop(model, 17)


def test_score_inputs_are_checked():
    with pytest.raises(ValueError, match=r"\(n_layer, B, n_head, T, T\)"):
        previous_token_score(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"period must be an integer in 1\.\.9"):
        induction_score(random_weights(), 10)
    with pytest.raises(ValueError, match="ids must have the weights' "):
        same_token_score(random_weights(), torch.zeros(3, 9, dtype=torch.long))


# ---------------------------------------------------------------- ablation


def test_ablating_no_head_changes_nothing_and_all_heads_remove_attention():
    model, x = tiny("rope"), ids()  # no biases: a silenced layer adds nothing
    with torch.no_grad():
        plain, _ = model(x)
        with ablate_heads(model, []):
            assert torch.equal(model(x)[0], plain)
        with ablate_heads(model, [(0, h) for h in range(4)]):
            ablated, _ = model(x)
        h = model.wte(x)  # by hand: layer 0 without attention
        h = h + model.h[0].mlp(model.h[0].ln_2(h))
        h = model.h[1](h)
        expected = model.lm_head(model.ln_f(h))
    assert not torch.allclose(ablated, plain, atol=1e-3)
    torch.testing.assert_close(ablated, expected)
    assert n_hooks(model) == 0


def test_mean_ablation_replaces_a_head_by_its_mean_output():
    model, x = tiny(), ids()
    seen = []
    hook = lambda m, args: seen.append(args[0].clone())
    proj = model.h[1].attn.c_proj
    with torch.no_grad():
        handle = proj.register_forward_pre_hook(hook)
        model(x)
        handle.remove()
        with ablate_heads(model, [(1, 2)], mode="mean"):
            handle = proj.register_forward_pre_hook(hook)  # runs after ablate's: sees its result
            model(x)
            handle.remove()
    plain, ablated = seen
    head = slice(16, 24)
    torch.testing.assert_close(
        ablated[..., head], plain[..., head].mean(dim=(0, 1)).expand(2, 12, 8)
    )
    assert torch.equal(ablated[..., :16], plain[..., :16])


def test_ablation_loss_increase_is_the_difference_of_the_model_losses():
    model, x = tiny(), ids(4, 20)
    heads = [(0, 1), (1, 3)]
    with torch.no_grad():
        base = model(x[:, :-1], x[:, 1:])[1]
        with ablate_heads(model, heads):
            ablated = model(x[:, :-1], x[:, 1:])[1]
    assert ablation_loss_increase(model, x, heads) == pytest.approx(float(ablated - base), abs=1e-5)
    assert ablation_loss_increase(model, x, []) == 0.0


def test_ablation_errors_and_hooks_removed_on_an_error():
    model = tiny()
    bad_head = r"head 4 does not exist: each layer has heads 0\.\.3"
    with pytest.raises(ValueError, match=bad_head), ablate_heads(model, [(0, 4)]):
        pass
    with pytest.raises(ValueError, match="layer 3 does not exist"), ablate_heads(model, [(3, 0)]):
        pass
    with pytest.raises(ValueError, match=r"\(layer, head\) pairs"), ablate_heads(model, [1]):
        pass
    with pytest.raises(ValueError, match="mode must be 'zero' or 'mean'"):
        ablation_loss_increase(model, ids(), [(0, 0)], mode="half")
    with pytest.raises(RuntimeError), ablate_heads(model, [(0, 0)]):
        raise RuntimeError
    assert n_hooks(model) == 0


# ---------------------------------------------------------------- logit lens


@pytest.mark.parametrize("kind", ["learned", "rope"])
def test_logit_lens_ends_at_the_model_logits(kind):
    model, x = tiny(kind), ids()
    lens = logit_lens(model, x)
    assert lens.shape == (3, 2, 12, V)
    with torch.no_grad():
        logits, _ = model(x)
        embedded = model.wte(x) + (model.wpe(12) if model.wpe is not None else 0)
        torch.testing.assert_close(lens[0], model.lm_head(model.ln_f(embedded)))
    torch.testing.assert_close(lens[-1], logits)
    with pytest.raises(ValueError, match=r"ids must be a \(B, T\) tensor"):
        logit_lens(model, x[0])


# ---------------------------------------------------------------- patching


def last_logit(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 3].mean()


def test_patching_a_run_with_its_own_activations_changes_nothing():
    model, x = tiny("rope-gqa"), ids()
    with torch.no_grad():
        plain = float(last_logit(model(x)[0]))
    for layer in range(2):
        assert patch(model, x, x, layer, 5, last_logit) == pytest.approx(plain, abs=1e-6)
    torch.testing.assert_close(patching_map(model, x, x, last_logit), torch.full((2, 12), plain))
    assert n_hooks(model) == 0


def test_patching_clean_into_corrupted_recovers_what_it_should():
    model, clean = tiny(), ids()
    corrupted = clean.clone()
    corrupted[:, 6] = (clean[:, 6] + 1) % V  # one token differs
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean)[0], model(corrupted)[0]
    assert not torch.allclose(clean_logits, corrupted_logits, atol=1e-3)
    kept = []
    for layer in range(2):  # the whole residual stream after any block: the clean logits
        patch(model, clean, corrupted, layer, None, lambda logits: kept.append(logits) or 0.0)
        torch.testing.assert_close(kept[-1], clean_logits)
    m = patching_map(model, clean, corrupted, last_logit)
    assert m.shape == (2, 12)
    # before the changed token the two runs agree: patching there changes nothing
    torch.testing.assert_close(m[:, :6], torch.full((2, 6), float(last_logit(corrupted_logits))))
    # the last layer's residual at the last position decides the last logits
    assert m[1, -1].item() == pytest.approx(float(last_logit(clean_logits)), abs=1e-5)
    assert patch(model, clean, corrupted, 1, -1, last_logit) == pytest.approx(m[1, -1].item())


def test_patching_errors():
    model, x = tiny(), ids()
    with pytest.raises(ValueError, match="layer 2 does not exist"):
        patch(model, x, x, 2, 0, last_logit)
    with pytest.raises(ValueError, match=r"position must be in -12\.\.11"):
        patch(model, x, x, 0, 12, last_logit)
    with pytest.raises(
        ValueError, match=r"corrupted_ids must have the shape of clean_ids, \(2, 12\), got \(2, 5\)"
    ):
        patching_map(model, x, x[:, :5], last_logit)


# ---------------------------------------------------------------- probes and embeddings


def test_a_probe_reads_separable_features_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1000, 10, generator=g) * torch.linspace(0.1, 10, 10)  # unequal scales
    direction = torch.randn(10, generator=g) / torch.linspace(0.1, 10, 10)
    margin = (features @ direction).abs() > 0.3 * (features @ direction).std()
    features = features[margin][:600]  # separable with a margin
    labels = (features @ direction > 0).long()
    features = features + torch.arange(10.0) * 5  # far from the origin: the bias matters
    probe = linear_probe(features, labels)
    assert probe.train_accuracy == 1.0 and probe.test_accuracy >= 0.99
    predicted = (features @ probe.weight.T + probe.bias).argmax(-1)  # on the raw features
    assert (predicted == labels).double().mean() >= 0.99
    random = torch.randint(0, 2, (600,), generator=g)
    chance = linear_probe(features, random)
    assert abs(chance.test_accuracy - 0.5) < 0.12
    three = torch.bucketize(features @ direction, torch.tensor([-1.0, 1.0]))  # 3 classes
    assert linear_probe(features, three).test_accuracy >= 0.9
    again = linear_probe(features, random)
    assert again.test_accuracy == chance.test_accuracy and torch.equal(again.weight, chance.weight)
    assert linear_probe(features, random, seed=1).test_accuracy != chance.test_accuracy


def test_probe_errors():
    f, y = torch.randn(10, 3), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"features must be an \(N, d\) tensor"):
        linear_probe(f[0], y)
    with pytest.raises(ValueError, match=r"labels must be a \(10,\) tensor of classes"):
        linear_probe(f, y.float())
    with pytest.raises(ValueError, match="test_fraction must leave both splits non-empty"):
        linear_probe(f, y, test_fraction=0.01)


def test_nearest_tokens_by_cosine():
    tok = CharTokenizer("abcdefghijklmnopqrstuvw")
    model = tiny()
    with torch.no_grad():
        a = model.wte.weight[0]
        model.wte.weight[5] = 3 * a + 0.001  # 'f': the same direction, longer
        model.wte.weight[9] = -a  # 'j': the opposite direction
    top = nearest_tokens(model, tok, "a", k=3)
    emb = F.normalize(model.wte.weight.detach(), dim=-1)
    cos = sorted(((float(emb[0] @ emb[i]), tok.decode([i])) for i in range(1, V)), reverse=True)
    assert [t for t, _ in top] == [c for _, c in cos[:3]] and top[0][0] == "f"
    assert [s for _, s in top] == pytest.approx([s for s, _ in cos[:3]], abs=1e-6)
    assert nearest_tokens(model, tok, 0, k=V - 1)[-1][0] == "j"
    with pytest.raises(ValueError, match="'ab' is 2 tokens, not one"):
        nearest_tokens(model, tok, "ab")
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.22"):
        nearest_tokens(model, tok, "a", k=V)
