"""Looking inside a trained model: what it computes, layer by layer, head by head.

A GPT is a residual stream that every block reads and adds to. Record that stream
and what the layers compute from it, then change one piece and watch the output:

- ``capture`` records, per layer, the residual stream around each block, the MLP's
  hidden activations and the attention weights (B, n_head, T, T), which the fused
  kernel never forms: ``attention_weights`` recomputes them exactly from the
  layer's own queries and keys (RoPE and GQA included).
- Head roles as (n_layer, n_head) scores: heads that look at the previous token,
  park on the first token, look at earlier copies of the current token, or are
  *induction heads*, which look at the token after the earlier copy so that
  ``A B ... A`` predicts ``B`` (Olsson et al. 2022); ``induction_loss_drop``
  measures the copying itself on a random sequence repeated twice.
- ``ablate_heads`` silences heads; the loss increase says how much they matter.
- ``logit_lens``: what the model would predict if it stopped after each layer.
- Activation patching (``patch``, ``patching_map``): run a corrupted input with the
  clean run's residual stream pasted in at one layer and position; where the clean
  answer comes back, that activation carries the information.
- ``linear_probe``: is a property linearly readable from the activations?
  ``nearest_tokens``: which tokens' embeddings point the same way?
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.attention import CausalSelfAttention, causal_mask
from minigpt.generate import Tokenizer
from minigpt.model import GPT

__all__ = [
    "ProbeResult",
    "Recording",
    "ablate_heads",
    "ablation_loss_increase",
    "attention_weights",
    "capture",
    "first_token_score",
    "induction_loss_drop",
    "induction_score",
    "linear_probe",
    "logit_lens",
    "nearest_tokens",
    "patch",
    "patching_map",
    "previous_token_score",
    "repeated_random_tokens",
    "same_token_score",
]

Metric = Callable[[Tensor], Any]  # logits (B, T, V) -> a number (float or 0-d tensor)


# ---------------------------------------------------------------- checks and hooks


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_int(name: str, value: Any, lo: int, hi: int, why: str = "") -> int:
    if not _is_int(value, lo, hi):
        raise ValueError(f"{name} must be an integer in {lo}..{hi}{why}, got {value!r}")
    return value


def _check_model(model: Any) -> GPT:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a minigpt GPT, got {type(model).__name__}")
    return model


def _check_layer(model: GPT, layer: Any, head: Any = None) -> int:
    """``layer`` (and ``head``, unless None) must exist in ``model``."""
    L, H = model.config.n_layer, model.config.n_head
    if not _is_int(layer, 0, L - 1):
        raise ValueError(f"layer {layer!r} does not exist: the model has layers 0..{L - 1}")
    if head is not None and not _is_int(head, 0, H - 1):
        raise ValueError(f"head {head!r} does not exist: each layer has heads 0..{H - 1}")
    return layer


def _check_ids(ids: Any, name: str = "ids", min_len: int = 1) -> Tensor:
    # the shape only: the model's forward checks the length and the id range
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] < min_len:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a (B, T) tensor of ids with T >= {min_len}, got {got}")
    return ids


def _check_weights(w: Any) -> Tensor:
    if not isinstance(w, Tensor) or w.dim() != 5 or w.shape[-1] != w.shape[-2] or w.shape[-1] < 2:
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"weights must be (n_layer, B, n_head, T, T) with T >= 2, got {got}")
    return w


@contextmanager
def _removed_after(handles: list[Any]) -> Iterator[None]:
    """Remove the hooks ``handles`` on leaving the block, also when it raises."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- capture


class _Layers(dict):
    """A dict keyed by layer whose missing key says which layers were recorded."""

    def __missing__(self, layer: Any) -> Tensor:
        raise KeyError(f"layer {layer!r} was not recorded; recorded: {sorted(self)} (see layers=)")


@dataclass
class Recording:
    """What ``capture`` recorded in the last forward pass, keyed by layer.

    Attributes:
        resid_pre: layer -> (B, T, C), the residual stream entering the block.
        resid_post: layer -> (B, T, C), the residual stream leaving it.
        mlp: layer -> (B, T, hidden), the MLP's hidden activations (GELU's output or
            SwiGLU's gated product): what its output projection reads.
        attention: layer -> (B, n_head, T, T) weights, rows summing to 1, before
            attention dropout (empty with ``attention=False``).
    """

    resid_pre: dict[int, Tensor] = field(default_factory=_Layers)
    resid_post: dict[int, Tensor] = field(default_factory=_Layers)
    mlp: dict[int, Tensor] = field(default_factory=_Layers)
    attention: dict[int, Tensor] = field(default_factory=_Layers)

    def attention_stack(self) -> Tensor:
        """The recorded layers' attention weights in layer order: (L, B, n_head, T, T)."""
        if not self.attention:
            raise ValueError("no attention weights recorded: run the model inside capture(...)")
        return torch.stack([self.attention[i] for i in sorted(self.attention)])


@torch.no_grad()
def attention_weights(layer: CausalSelfAttention, x: Tensor) -> Tensor:
    """The attention weights of ``layer`` on its input ``x``: the slow, exact path.

    softmax(q kᵀ / √hs + causal mask) from the projections of ``layer`` (``model.h[i].attn``),
    with its rotary positions and (GQA) each key head shared by its group of query heads,
    as ``CausalSelfAttention.forward`` computes them without a KV cache. ``x``: (B, T, C),
    what the layer reads (the block's normed residual stream). Returns (B, n_head, T, T)
    float32 weights; row i is zero after column i.
    """
    if not isinstance(layer, CausalSelfAttention):
        raise TypeError(f"layer must be a CausalSelfAttention, got {type(layer).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != layer.n_embd:
        raise ValueError(f"x must have shape (B, T, {layer.n_embd}), got {getattr(x, 'shape', x)}")
    B, T, _ = x.shape
    hs, H, Hkv = layer.head_dim, layer.n_head, layer.n_kv_head
    q, k, _ = layer.c_attn(x).split([H * hs, Hkv * hs, Hkv * hs], dim=2)
    q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
    k = k.view(B, T, Hkv, hs).transpose(1, 2)  # (B, Hkv, T, hs)
    if layer.rope is not None:
        q, k = layer.rope(q), layer.rope(k)
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, T, hs): each kv head serves H/Hkv
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(hs)  # (B, H, T, T)
    scores = scores.masked_fill(~causal_mask(T, device=x.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


@contextmanager
def capture(
    model: GPT, layers: Iterable[int] | None = None, *, attention: bool = True
) -> Iterator[Recording]:
    """Record the activations of the forward passes run inside the ``with`` block.

    ``with capture(model) as rec: model(ids)`` fills ``rec`` (a ``Recording``); a second
    pass overwrites the first. Only full passes are recorded (a KV cache raises).

    Args:
        layers: the layers to record (default: all).
        attention: also compute the attention weights (a (B, H, T, T) tensor per layer).
    """
    layers = range(len(_check_model(model).h)) if layers is None else layers
    chosen, rec = sorted({_check_layer(model, i) for i in layers}), Recording()

    def hooks(i: int, block: nn.Module) -> list[Any]:
        def pre(_: nn.Module, args: tuple[Any, ...]) -> None:
            if len(args) > 1 and args[1] is not None:
                raise ValueError("capture records full passes: call the model without kv_cache")
            rec.resid_pre[i] = args[0].detach()

        def post(_: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            rec.resid_post[i] = out.detach()

        def mlp(_: nn.Module, args: tuple[Any, ...]) -> None:
            rec.mlp[i] = args[0].detach()

        def attn(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            rec.attention[i] = attention_weights(module, args[0])

        found = [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
        found.append(block.mlp.c_proj.register_forward_pre_hook(mlp))
        return found + ([block.attn.register_forward_hook(attn)] if attention else [])

    with _removed_after([h for i in chosen for h in hooks(i, model.h[i])]):
        yield rec


# ---------------------------------------------------------------- head roles


def previous_token_score(weights: Tensor) -> Tensor:
    """How much each head attends to the token just before the query.

    ``weights``: (n_layer, B, n_head, T, T) (``Recording.attention_stack()``). Returns
    (n_layer, n_head): the mean of weight[i, i - 1] over queries i >= 1 and the batch;
    1 for a pure previous-token head, about ln(T)/T for one that spreads evenly.
    """
    return _check_weights(weights).diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, -1))


def first_token_score(weights: Tensor) -> Tensor:
    """How much each head parks its attention on position 0 (an "attention sink").

    ``weights``: (n_layer, B, n_head, T, T). Returns (n_layer, n_head): the mean of
    weight[i, 0] over queries i >= 1 (query 0 can only look at itself) and the batch.
    """
    return _check_weights(weights)[..., 1:, 0].mean(dim=(1, -1))


def same_token_score(weights: Tensor, ids: Tensor) -> Tensor:
    """How much each head attends to earlier occurrences of the query's own token.

    ``weights``: (n_layer, B, n_head, T, T), computed on ``ids`` (B, T). Returns
    (n_layer, n_head): the weight on keys j < i with ids[j] == ids[i], averaged over the
    queries i that have such an earlier occurrence.
    """
    w = _check_weights(weights)
    if not isinstance(ids, Tensor) or ids.shape != (w.shape[1], w.shape[-1]):
        raise ValueError(f"ids must have the weights' (B, T) = {(w.shape[1], w.shape[-1])}")
    T = ids.shape[1]
    earlier = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril(-1)  # key j < query i
    same = (ids[:, :, None] == ids[:, None, :]) & earlier  # (B, T, T)
    has = same.any(dim=-1)  # (B, T): queries with an earlier copy
    if not has.any():
        raise ValueError("no token occurs twice in ids: there is nothing to score")
    per_query = (w * same[None, :, None]).sum(dim=-1)  # (L, B, H, T)
    return (per_query * has[None, :, None]).sum(dim=(1, -1)) / has.sum()


def induction_score(weights: Tensor, period: int) -> Tensor:
    """How much each head acts as an induction head, on a sequence that repeats.

    On tokens that repeat with period n (``repeated_random_tokens``), an induction head's
    query i in the second copy attends to key i - n + 1: the token that followed the
    earlier occurrence of the current token.

    ``weights``: (n_layer, B, n_head, T, T) on the repeated sequence; ``period``: n < T.
    Returns (n_layer, n_head): the mean of weight[i, i - n + 1] over queries i = n..T-1
    and the batch.
    """
    w = _check_weights(weights)
    T = w.shape[-1]
    _check_int("period", period, 1, T - 1, f" for {T} positions")
    # diagonal offset -(n - 1) pairs query i with key i - n + 1 for i = n - 1..T-1
    return w.diagonal(offset=1 - period, dim1=-2, dim2=-1)[..., 1:].mean(dim=(1, -1))


def repeated_random_tokens(
    vocab_size: int, length: int, batch_size: int = 8, seed: int = 0
) -> Tensor:
    """(batch_size, 2 * length) ids: a uniformly random block of ``length`` ids, twice."""
    for name, value in (("vocab_size", vocab_size), ("length", length), ("batch_size", batch_size)):
        _check_int(name, value, 1, 2**62)
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(0, vocab_size, (batch_size, length), generator=g)
    return torch.cat([block, block], dim=1)


def _token_losses(model: GPT, ids: Tensor) -> Tensor:
    """(B, T - 1) cross-entropy of each next token: position t predicts ids[:, t + 1]."""
    logits, _ = model(ids[:, :-1])
    return F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")


@torch.no_grad()
def induction_loss_drop(
    model: GPT, length: int | None = None, batch_size: int = 16, seed: int = 0
) -> float:
    """The mean loss on the first copy of a repeated random sequence minus that on the second.

    Random tokens cost about ln V nats the first time; a model that copies (induction
    heads) predicts the second copy, and the drop approaches ln V. Both copies are
    scored on their tokens 2..length (a copy's first token cannot be predicted);
    ``length`` defaults to ``block_size // 2``.
    """
    half = _check_model(model).config.block_size // 2
    n = _check_int("length", half if length is None else length, 2, half, " (two copies fit)")
    ids = repeated_random_tokens(model.config.vocab_size, n, batch_size, seed)
    losses = _token_losses(model, ids.to(model.device))  # (B, 2n - 1)
    # column t predicts token t + 1: the first copy's tokens 1..n-1, the second's n+1..2n-1
    return float(losses[:, : n - 1].mean() - losses[:, n:].mean())


# ---------------------------------------------------------------- ablation


@contextmanager
def ablate_heads(
    model: GPT, heads: Iterable[tuple[int, int]], mode: str = "zero"
) -> Iterator[None]:
    """Silence attention heads inside the ``with`` block.

    A head's output (its hs channels of the concatenated heads, before the output
    projection) becomes zero (``mode="zero"``) or its mean over the batch and positions
    of the same pass (``mode="mean"``). The hooks go on leaving, also on an error.

    Args:
        heads: (layer, head) pairs, e.g. ``[(1, 0), (1, 3)]``; an empty list ablates nothing.
    """
    _check_model(model)
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    chosen: dict[nn.Module, list[int]] = {}  # output projection -> heads to silence
    for pair in heads:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"heads must be (layer, head) pairs, got {pair!r}")
        proj = model.h[_check_layer(model, *pair)].attn.c_proj
        chosen.setdefault(proj, []).append(pair[1])
    hs = model.config.head_dim

    def silence(proj: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor]:
        y = args[0].clone()  # (B, T, C): head h in channels h*hs..(h+1)*hs
        for h in chosen[proj]:
            part = y[..., h * hs : (h + 1) * hs]
            part[:] = 0.0 if mode == "zero" else part.mean(dim=(0, 1), keepdim=True)
        return (y,)

    with _removed_after([proj.register_forward_pre_hook(silence) for proj in chosen]):
        yield


@torch.no_grad()
def ablation_loss_increase(
    model: GPT, ids: Tensor, heads: Iterable[tuple[int, int]], mode: str = "zero"
) -> float:
    """Next-token loss on ``ids`` (B, T) with ``heads`` ablated, minus the loss without."""
    _check_ids(ids, min_len=2)
    with ablate_heads(model, heads, mode):  # checks model and heads before any work
        ablated = _token_losses(model, ids).mean()
    return float(ablated - _token_losses(model, ids).mean())


# ---------------------------------------------------------------- logit lens


@torch.no_grad()
def logit_lens(model: GPT, ids: Tensor) -> Tensor:
    """The logits the model would give if it stopped after each layer.

    The final norm and the output head read the residual stream after 0, 1, ...,
    n_layer blocks (entry 0: the embeddings); entry n_layer is the model's logits.

    ``ids``: (B, T) token ids. Returns (n_layer + 1, B, T, V).
    """
    _check_ids(ids)
    with capture(model, attention=False) as rec:
        model(ids)
    resid = [rec.resid_pre[0]] + [rec.resid_post[i] for i in range(len(model.h))]
    return model.lm_head(model.ln_f(torch.stack(resid)))  # (L + 1, B, T, V)


# ---------------------------------------------------------------- activation patching


def _clean_run(
    model: GPT, clean_ids: Tensor, corrupted_ids: Tensor, layers: list[int]
) -> Recording:
    """Check a clean/corrupted pair and record the clean residual stream at ``layers``."""
    _check_ids(clean_ids, "clean_ids")
    if not isinstance(corrupted_ids, Tensor) or corrupted_ids.shape != clean_ids.shape:
        got = tuple(corrupted_ids.shape) if isinstance(corrupted_ids, Tensor) else corrupted_ids
        raise ValueError(
            f"corrupted_ids must have the shape of clean_ids, {tuple(clean_ids.shape)}, got {got}"
        )
    with capture(model, layers, attention=False) as rec:
        model(clean_ids)
    return rec


def _patched_logits(
    model: GPT, corrupted_ids: Tensor, layer: int, positions: list[int], clean: Tensor
) -> Tensor:
    """(B, T, V) logits of ``corrupted_ids`` with block ``layer``'s output at ``positions``
    replaced by ``clean`` (B, T, C) there."""

    def hook(_: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        out = out.clone()
        out[:, positions] = clean[:, positions]
        return out

    with _removed_after([model.h[layer].register_forward_hook(hook)]):
        return model(corrupted_ids)[0]


@torch.no_grad()
def patch(
    model: GPT,
    clean_ids: Tensor,
    corrupted_ids: Tensor,
    layer: int,
    position: int | Sequence[int] | None,
    metric: Metric,
) -> float:
    """Run ``corrupted_ids`` with the clean run's residual stream pasted in at one place.

    The output of block ``layer`` at ``position`` (an int, a list of ints, or None for
    all) is replaced by its value on ``clean_ids`` (B, T), and the corrupted run (B, T,
    same shape) goes on from there. Returns ``metric`` of the patched run's logits,
    e.g. ``lambda logits: logits[0, -1, good] - logits[0, -1, bad]``.
    """
    _check_layer(_check_model(model), layer)
    T = _check_ids(clean_ids, "clean_ids").shape[1]
    chosen = range(T) if position is None else [position] if isinstance(position, int) else position
    ok = isinstance(chosen, (list, tuple, range)) and all(_is_int(p, -T, T - 1) for p in chosen)
    if not ok:
        raise ValueError(f"position must be in -{T}..{T - 1}, a list or None, got {position!r}")
    clean = _clean_run(model, clean_ids, corrupted_ids, [layer]).resid_post[layer]
    logits = _patched_logits(model, corrupted_ids, layer, [p % T for p in chosen], clean)
    return float(metric(logits))


@torch.no_grad()
def patching_map(model: GPT, clean_ids: Tensor, corrupted_ids: Tensor, metric: Metric) -> Tensor:
    """``patch`` at every layer and position: an (n_layer, T) map of ``metric``.

    Entry [l, t] is the metric with the clean residual stream after block l at position
    t. (patched - corrupted) / (clean - corrupted), with the metric of the two plain
    runs, reads it as the fraction of the clean answer recovered.
    """
    L = len(_check_model(model).h)
    rec = _clean_run(model, clean_ids, corrupted_ids, list(range(L)))
    out = torch.empty(L, clean_ids.shape[1])
    for layer in range(L):
        for t in range(clean_ids.shape[1]):
            logits = _patched_logits(model, corrupted_ids, layer, [t], rec.resid_post[layer])
            out[layer, t] = float(metric(logits))
    return out


# ---------------------------------------------------------------- probes and embeddings


@dataclass(frozen=True)
class ProbeResult:
    """A fitted linear probe: accuracy on each split (fraction correct), and the
    classifier ``features @ weight.T + bias`` with weight (K, d) and bias (K,)."""

    train_accuracy: float
    test_accuracy: float
    weight: Tensor
    bias: Tensor


def linear_probe(
    features: Tensor,
    labels: Tensor,
    *,
    test_fraction: float = 0.25,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
    seed: int = 0,
) -> ProbeResult:
    """Fit a softmax-regression probe on a seeded training split, score it on the rest.

    Args:
        features: (N, d) activations, e.g. ``rec.resid_post[layer].flatten(0, 1)``.
        labels: (N,) integer classes 0..K-1.
        test_fraction: the share of the rows held out (chosen by a shuffle with ``seed``).
        weight_decay: L2 penalty on the weights (keeps separable data from diverging).
        max_iter: L-BFGS iterations on the whole training split, in float64.
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError("features must be an (N, d) tensor: one row of d numbers per example")
    N = features.shape[0]
    fraction = test_fraction if isinstance(test_fraction, float) else 0.0
    if not 1 <= round(N * fraction) < N:
        raise ValueError(f"test_fraction must leave both splits non-empty for {N} rows")
    bad = not isinstance(labels, Tensor) or labels.shape != (N,) or labels.dtype.is_floating_point
    if bad or labels.min() < 0:
        raise ValueError(f"labels must be a ({N},) tensor of classes 0..K-1, one per row")
    x, y = features.detach().double().cpu(), labels.detach().long().cpu()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    test, train = order[: round(N * fraction)], order[round(N * fraction) :]
    mean, std = x[train].mean(dim=0), x[train].std(dim=0, unbiased=False).clamp_min(1e-8)
    x = (x - mean) / std
    W = torch.zeros(int(y.max()) + 1, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(W.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x[train] @ W.T + b, y[train]) + weight_decay * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W, b = W.detach(), b.detach()

    def accuracy(rows: Tensor) -> float:
        return float(((x[rows] @ W.T + b).argmax(dim=-1) == y[rows]).double().mean())

    W_raw = W / std  # the same classifier on the features as given
    return ProbeResult(accuracy(train), accuracy(test), W_raw.float(), (b - W_raw @ mean).float())


@torch.no_grad()
def nearest_tokens(
    model: GPT, tokenizer: Tokenizer, token: str | int, k: int = 5
) -> list[tuple[str, float]]:
    """The ``k`` tokens whose embedding rows are closest in cosine to ``token``'s.

    ``token`` is a string the tokenizer encodes as one token, or a token id. Returns
    (decoded token, cosine) pairs, most similar first, the token itself left out.
    """
    V = _check_model(model).config.vocab_size
    if isinstance(token, str):
        ids = tokenizer.encode(token)
        if len(ids) != 1:
            raise ValueError(f"{token!r} is {len(ids)} tokens, not one: pass one token or its id")
        token = ids[0]
    _check_int("token", token, 0, V - 1, " (or a string of one token)")
    _check_int("k", k, 1, V - 1)
    emb = F.normalize(model.wte.weight.float(), dim=-1)  # (V, C), unit rows
    cos = emb @ emb[token]  # (V,)
    cos[token] = -math.inf
    top = cos.topk(k)
    return [(tokenizer.decode([int(i)]), float(c)) for c, i in zip(top.values, top.indices)]
