"""Exercise checks reject the shortcut their text forbids, and the boundary variants
their convention rules out, while the solutions still pass.

``SHORTCUTS`` writes each forbidden shortcut out as a learner would (``F.layer_norm``
for "LayerNorm by hand", ``block(x)`` for "using only those four parts"): the check
must say "incorrect: <the shortcut> is not allowed here: ...". ``BOUNDARIES`` holds
off-by-one and ``>`` vs ``>=`` variants (top-p's exact mass, top-k's ties, a mask that
is not causal, the schedule's edges): each must be incorrect. Every question named in
either table is also checked with its printed solution and with its solutions
notebook's code, which must stay correct.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt import optim as package_optim
from minigpt.exercises import ch00, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, ch10
from minigpt.exercises.core import Incorrect, LearnerError, call
from minigpt.exercises.shortcuts import BACKWARD_PASS, Shortcut, forbid
from tests.test_exercises import ALL

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- ch00, ch02: edges


def _nll_over_len(probs, ids):  # divides by len(ids), not by the len(ids) - 1 predictions
    t = torch.tensor(ids)
    return -torch.log(probs[t[:-1], t[1:]]).sum().item() / len(ids)


def _refuses_a_table_that_just_fits(tok_emb, table, offset):  # >= instead of >
    T = tok_emb.shape[1]
    if offset + T >= table.shape[0]:
        raise ValueError("past the end of the table")
    return tok_emb + table[offset : offset + T]


# ---------------------------------------------------------------- ch02 q1: by matrix multiplication


def _embedding_module(ids, W):
    return nn.Embedding.from_pretrained(W)(ids)


def _row_by_row(ids, W):
    rows = [W[i] for i in ids.flatten().tolist()]
    return torch.stack(rows).reshape(*ids.shape, W.shape[1])


def _one_hot_computed_but_indexed(ids, W):
    F.one_hot(ids, W.shape[0]).to(W.dtype) @ W  # the product, thrown away
    return W.double()[ids].to(W.dtype)


def _transposed_select(ids, W):
    return W.T.index_select(1, ids.flatten()).T.reshape(*ids.shape, W.shape[1])


# ---------------------------------------------------------------- ch03 q2: attention by hand


def _sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sdpa_imported_by_name(q, k, v, mask=None):
    from torch.nn.functional import scaled_dot_product_attention as attend

    return attend(q, k, v, attn_mask=mask)


def _package_attention(q, k, v, mask=None):
    from minigpt.attention import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, mask)


def _builds_its_own_causal_mask(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:  # ignores the mask it was given
        causal = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool))
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ---------------------------------------------------------------- ch04: norms, the block, the count


def _by_hand_layer_norm(x, weight, bias, eps=1e-5):
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(var + eps) * weight + bias


def _layer_norm_module(x, weight, bias, eps=1e-5):
    ln = nn.LayerNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        ln.weight.copy_(weight)
        ln.bias.copy_(bias)
    return ln(x).detach()


def _tries_layer_norm_then_by_hand(x, weight, bias, eps=1e-5):
    with contextlib.suppress(Exception):  # "if the check refuses it, fall back"
        F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _by_hand_layer_norm(x, weight, bias, eps)


def _layer_norm_then_raises(x, weight, bias, eps=1e-5):
    F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    raise ValueError("and then something else went wrong")


def _builds_the_model(vocab_size, block_size, n_layer, n_embd):
    from minigpt.model import GPT, GPTConfig

    with torch.device("meta"):
        return GPT(GPTConfig(vocab_size, block_size, n_layer, 1, n_embd)).num_parameters()


def _rms_norm_module(x, weight, eps=1e-5):
    from minigpt.model import RMSNorm

    norm = RMSNorm(x.shape[-1], eps=eps)
    norm.weight = nn.Parameter(weight.clone())
    return norm(x).detach()


# ---------------------------------------------------------------- ch05: written by you


def _token_dataset(data, offsets, block_size):
    from minigpt.tokens import TokenDataset

    return TokenDataset(data, block_size).windows(offsets)


def _torch_adamw(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    param = nn.Parameter(p.clone())
    opt = torch.optim.AdamW(
        [param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
    )
    opt.state[param] = {
        "step": torch.tensor(float(step - 1)),
        "exp_avg": m.clone(),
        "exp_avg_sq": v.clone(),
    }
    param.grad = g.clone()
    opt.step()
    state = opt.state[param]
    return param.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()


def _package_adamw(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    from minigpt.optim import adamw_update

    p, m, v = p.clone(), m.clone(), v.clone()
    adamw_update(
        p, g, m, v, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
    )
    return p, m, v


def _package_lr_at(step, max_lr, min_lr, warmup_steps, max_steps):
    from minigpt.optim import lr_at

    return lr_at(step, lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps, decay_steps=max_steps)


def _schedule(*, through=False, plus=1, span=0, shift=0):
    """The reference schedule with one edge moved: warmup through step == warmup_steps,
    ``max_lr * (step + plus) / warmup_steps``, or a cosine over ``span`` more steps,
    ``shift`` steps ahead."""

    def lr_at(step, max_lr, min_lr, warmup_steps, max_steps):
        if step < warmup_steps or (through and step == warmup_steps):
            return max_lr * (step + plus) / warmup_steps
        if step >= max_steps:
            return min_lr
        progress = (step - warmup_steps + shift) / (max_steps - warmup_steps + span)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (max_lr - min_lr)

    return lr_at


def _clip_with(clip):
    def clip_gradients(grads, max_norm):
        params = [nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p, t in zip(params, grads):
            p.grad = t.clone()
        clip(params, max_norm)
        return [p.grad for p in params]

    return clip_gradients


# ---------------------------------------------------------------- ch05 backprop: q8, q9
# q8 asks for the gradients of cross-entropy(feats @ W.T + b) written out, q9 for the
# backward step of Value's product; both forbid autograd in every form.


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _q8_loss(f, w, bb, labels):
    return F.cross_entropy(f @ w.T + bb, labels)


def _q8_tensor_backward(feats, W, b, labels):
    f, w, bb = _leaves(feats, W, b)
    _q8_loss(f, w, bb, labels).backward()
    return f.grad, w.grad, bb.grad


def _q8_autograd_grad(feats, W, b, labels):
    f, w, bb = _leaves(feats, W, b)
    return torch.autograd.grad(_q8_loss(f, w, bb, labels), (f, w, bb))


def _q8_autograd_backward(feats, W, b, labels):
    f, w, bb = _leaves(feats, W, b)
    torch.autograd.backward(_q8_loss(f, w, bb, labels))
    return f.grad, w.grad, bb.grad


def _q8_torch_func(feats, W, b, labels):
    return torch.func.grad(_q8_loss, argnums=(0, 1, 2))(feats, W, b, labels)


def _q8_grad_fn_by_hand(feats, W, b, labels):  # no .backward(): the loss's grad_fn, called
    logits = (feats @ W.T + b).requires_grad_()
    (G,) = _q8_loss_node(F.cross_entropy(logits, labels))
    return G @ W, G.T @ feats, G.sum(dim=0)


def _q8_loss_node(loss):
    """Walk the loss's grad_fn chain by hand down to the leaf logits: dL/dlogits."""
    node, grads = loss.grad_fn, (torch.ones(()),)
    while node is not None and type(node).__name__ != "AccumulateGrad":
        grads = node(*grads)
        grads = grads if isinstance(grads, tuple) else (grads,)
        node = node.next_functions[0][0]
    return grads[:1]


def _q8_backward_kernels(feats, W, b, labels):
    logits = feats @ W.T + b
    log_probs = torch.log_softmax(logits, dim=-1)
    d_log_probs = torch.zeros_like(log_probs)
    d_log_probs[torch.arange(len(labels)), labels] = -1.0 / len(labels)
    G = torch.ops.aten._log_softmax_backward_data(d_log_probs, log_probs, -1, logits.dtype)
    return G @ W, G.T @ feats, G.sum(dim=0)


def _q9_tensor_backward(a, b, out_grad):
    ta, tb = torch.tensor(a.data, requires_grad=True), torch.tensor(b.data, requires_grad=True)
    (ta * tb).backward(torch.tensor(out_grad))
    a.grad += ta.grad.item()
    b.grad += tb.grad.item()
    return a.grad, b.grad


def _q9_autograd_grad(a, b, out_grad):
    ta, tb = torch.tensor(a.data, requires_grad=True), torch.tensor(b.data, requires_grad=True)
    da, db = torch.autograd.grad(ta * tb, (ta, tb), torch.tensor(out_grad))
    a.grad += da.item()
    b.grad += db.item()
    return a.grad, b.grad


def _q8_formula(*, mean=True, one_hot=True, transpose_d_W=False):
    """The q8 formula with one mistake: no division by N, no one-hot, d_W transposed."""

    def backward_by_hand(feats, W, b, labels):
        G = torch.softmax(feats @ W.T + b, dim=-1)  # (N, K)
        G = G - F.one_hot(labels, W.shape[0]) if one_hot else G
        G = G / len(labels) if mean else G
        d_W = feats.T @ G if transpose_d_W else G.T @ feats  # (C_in, K) vs (K, C_in)
        return G @ W, d_W, G.sum(dim=0)

    return backward_by_hand


def _q8_one_hot_without_num_classes(feats, W, b, labels):  # right until labels miss class K-1
    G = (torch.softmax(feats @ W.T + b, dim=-1) - F.one_hot(labels)) / len(labels)
    return G @ W, G.T @ feats, G.sum(dim=0)


def _q9_step(*, add=True, swap=False):
    """q9's backward step with one mistake: = instead of +=, or the local gradients swapped."""

    def mul_backward(a, b, out_grad):
        da, db = (a.data, b.data) if swap else (b.data, a.data)  # d(a*b)/da = b
        if add:
            a.grad += da * out_grad
            b.grad += db * out_grad
        else:
            a.grad = da * out_grad
            b.grad = db * out_grad
        return a.grad, b.grad

    return mul_backward


CH05_BACKPROP_SHORTCUTS = [
    (ch05.q8, "Tensor.backward", _q8_tensor_backward),
    (ch05.q8, "torch.autograd.grad", _q8_autograd_grad),
    (ch05.q8, "torch.autograd.backward", _q8_autograd_backward),
    (ch05.q8, "torch.func.grad", _q8_torch_func),
    (ch05.q8, "the loss's grad_fn called by hand", _q8_grad_fn_by_hand),
    (ch05.q8, "aten._log_softmax_backward_data", _q8_backward_kernels),
    (ch05.q9, "Tensor.backward on a torch product", _q9_tensor_backward),
    (ch05.q9, "torch.autograd.grad on a torch product", _q9_autograd_grad),
]

CH05_BACKPROP_BOUNDARIES = [
    (ch05.q8, "no division by N", _q8_formula(mean=False)),
    (ch05.q8, "d_W transposed (feats.T @ G)", _q8_formula(transpose_d_W=True)),
    (ch05.q8, "softmax without the one-hot subtracted", _q8_formula(one_hot=False)),
    (ch05.q8, "F.one_hot(labels) without num_classes (N = 1)", _q8_one_hot_without_num_classes),
    (ch05.q9, "= instead of +=", _q9_step(add=False)),
    (ch05.q9, "local gradients swapped", _q9_step(swap=True)),
]


def test_the_backprop_variants_change_one_thing_of_a_correct_answer():
    assert ch05.q8.check(_q8_formula()).status == "correct"
    assert ch05.q9.check(_q9_step()).status == "correct"


def test_the_backprop_shortcuts_compute_the_right_gradients():
    """Each shortcut would pass if it were allowed: only forbid rejects it."""
    g = torch.Generator().manual_seed(0)
    feats, W, b = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4)
    labels = torch.tensor([0, 3, 1, 1, 2])
    want = _q8_formula()(feats, W, b, labels)
    for q, _, answer in CH05_BACKPROP_SHORTCUTS:
        if q is ch05.q8:
            for got, w in zip(answer(feats, W, b, labels), want):
                torch.testing.assert_close(got, w)
    a, bv = ch05.Value(0.5), ch05.Value(-1.5)
    assert _q9_tensor_backward(a, bv, 2.0) == pytest.approx((-3.0, 1.0))


# ---------------------------------------------------------------- ch06: sampling edges


def _top_k_keeps_ties(logits, k):  # nanoGPT: logits[logits < v[:, [-1]]] = -inf
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p_strict(logits, p):  # drops a token only when the mass above it is > p
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs > p, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def _top_p_drops_at_cumsum(logits, p):  # drops the token whose own mass reaches p
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) >= p, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


# ---------------------------------------------------------------- ch07: edges, tasks, the collator


def _reads_padding(hidden, lengths):  # position lengths[b], one past the last real token
    return hidden[torch.arange(hidden.shape[0]), lengths.clamp(max=hidden.shape[1] - 1)]


def _counts_one_padding(logp, idx, lengths):  # <= instead of <: one padding position too
    token = logp.gather(-1, idx[..., None]).squeeze(-1)
    return (token * (torch.arange(idx.shape[1])[None, :] <= lengths[:, None])).sum(dim=1)


def _peeks_at_tasks(instruction, response):
    from minigpt import tasks

    tasks.make_tasks("train", 3, families=["sort"])  # only looks, then works the answer out
    return ch07.q7.reference()(instruction, response)


def _collator_then_by_hand(prompt, answer, encode, eos_id):
    from minigpt.instruct import InstructionCollator

    with contextlib.suppress(Exception):
        InstructionCollator(pad_id=0, eos_id=eos_id)([(encode(prompt), encode(answer))])
    return ch07.q8.reference()(prompt, answer, encode, eos_id)


# ---------------------------------------------------------------- ch10: scale


def _six_from_gpt(n_params, n_tokens, flops_per_second, utilization):
    from minigpt import GPT, GPTConfig

    m = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4))
    per_weight = m.flops_per_token(training=True) / m.flops_per_token(training=False) * 2  # 6
    return per_weight * n_params * n_tokens / (flops_per_second * utilization) / 86_400


def _polyfit_line(N, L):
    import numpy as np

    slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
    return 0.0, float(np.exp(intercept)), float(-slope)


def _package_fit(N, L):
    from minigpt.scaling import fit_power_law

    fit = fit_power_law(N, L)
    return fit.E, fit.A, fit.alpha


def _package_quantize(w):
    from minigpt.quantize import quantize_per_channel

    return quantize_per_channel(w)


def _torch_quantize_per_channel(w):
    s = w.abs().amax(dim=1) / 127
    safe = torch.where(s > 0, s, torch.ones_like(s))
    zeros = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch deprecates its quantized tensors
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, safe.double(), zeros, 0, torch.qint8)
    return q.int_repr(), s


def _adam_state(make):
    def answer(model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = make(trainable)
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()
        return sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if t.dim() > 0
        )

    return answer


def _configure_optimizer_state(model):
    opt = package_optim.configure_optimizer(model, lr=1e-3, weight_decay=0.0, fused=False)
    return sum(2 * p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])


def _stack_mean(grads):
    mean = torch.stack(grads).mean(dim=0)
    return [mean.clone() for _ in grads]


def _sum_of_stack(grads):
    total = torch.sum(torch.stack(grads), dim=0)
    return [total / len(grads) for _ in grads]


# ---------------------------------------------------------------- ch09: the package's versions


def _package_probe_then_by_hand(features, labels, weight, bias):
    from minigpt.inspect import linear_probe

    linear_probe(features, labels, max_iter=1)  # a peek at the package's own probe
    return ch09.q4.reference()(features, labels, weight, bias)


def _weat_imported_by_name(X, Y, A, B):
    from minigpt.bias import weat

    return weat(X, Y, A, B, permutations=5).effect_size


def _projection_then_by_hand(X, Y, A, B):
    from minigpt.bias import projection

    projection(X, A[0])  # any function of minigpt.bias counts
    return ch09.q5.reference()(X, Y, A, B)


# ---------------------------------------------------------------- ch08: the package's alignment pieces


def _package_bradley_terry(r_chosen, r_rejected):
    from minigpt.preference import bradley_terry_loss

    return bradley_terry_loss(r_chosen, r_rejected)


def _package_dpo(pc, pr, rc, rr, beta):
    from minigpt.align import dpo_loss

    return dpo_loss(pc, pr, rc, rr, beta)[0]


def _package_mask(turns):
    from minigpt.chat import ChatTemplate, Message, encode_chat
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(["x", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    messages = [Message(role, "x" * len(content)) for role, content in turns]
    return encode_chat(ChatTemplate(tokenizer), messages)[1]


def _package_kl(logp_policy, logp_ref):
    from minigpt.align import kl_estimate

    return kl_estimate(logp_policy, logp_ref, "k3")


def _package_kl_then_by_hand(logp_policy, logp_ref):
    from minigpt.align import kl_estimate

    kl_estimate(logp_policy, logp_ref)  # only looks, then computes it
    log_r = logp_ref - logp_policy
    return torch.exp(log_r) - 1 - log_r


def _package_advantages(rewards, eps=1e-6):
    from minigpt.align import group_advantages

    return group_advantages(rewards, eps=eps)


# ---------------------------------------------------------------- the tables


def _wrong(q, name):
    """One of ``q.wrong_answers()``, by its function's name."""
    (answer,) = [w for w in q.wrong_answers() if w.__name__ == name]
    return answer


def _f_layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _torch_layer_norm(x, weight, bias, eps=1e-5):
    return torch.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _log_softmax_picked(logits, targets):
    return -F.log_softmax(logits, -1)[torch.arange(len(targets)), targets].mean()


def _tensor_log_softmax_picked(logits, targets):
    return -logits.log_softmax(-1)[torch.arange(len(targets)), targets].mean()


# (question, what the answer does): each must be "incorrect: ... is not allowed here: ..."
SHORTCUTS = [
    (ch02.q1, "W[ids]", lambda ids, W: W[ids]),
    (ch02.q1, "F.embedding", lambda ids, W: F.embedding(ids, W)),
    (ch02.q1, "nn.Embedding", _embedding_module),
    (ch02.q1, "W[i] row by row", _row_by_row),
    (ch02.q1, "a copy of W indexed", _one_hot_computed_but_indexed),
    (ch02.q1, "W.T.index_select", _transposed_select),
    (ch03.q2, "F.scaled_dot_product_attention", _sdpa),
    (ch03.q2, "sdpa imported by name", _sdpa_imported_by_name),
    (ch03.q2, "minigpt's attention", _package_attention),
    (ch04.q1, "F.layer_norm", _f_layer_norm),
    (ch04.q1, "torch.layer_norm", _torch_layer_norm),
    (ch04.q1, "nn.LayerNorm", _layer_norm_module),
    (ch04.q1, "F.layer_norm, error caught", _tries_layer_norm_then_by_hand),
    (ch04.q1, "F.layer_norm, then raises", _layer_norm_then_raises),
    (ch04.q2, "GPT(...).num_parameters()", _builds_the_model),
    (ch04.q3, "block(x)", lambda block, x: block(x)),
    (ch04.q3, "block.forward(x)", lambda block, x: block.forward(x)),
    (ch04.q3, "Block.forward(block, x)", lambda block, x: type(block).forward(block, x)),
    (ch04.q3, "nn.Module.__call__", lambda block, x: nn.Module.__call__(block, x)),
    (ch04.q5, "F.rms_norm", lambda x, w, eps=1e-5: F.rms_norm(x, (x.shape[-1],), w, eps)),
    (ch04.q5, "torch.rms_norm", lambda x, w, eps=1e-5: torch.rms_norm(x, (x.shape[-1],), w, eps)),
    (ch04.q5, "minigpt's RMSNorm", _rms_norm_module),
    (ch05.q1, "TokenDataset.windows", _token_dataset),
    (ch05.q2, "F.cross_entropy", lambda z, t: F.cross_entropy(z, t)),
    (ch05.q2, "nn.CrossEntropyLoss", lambda z, t: nn.CrossEntropyLoss()(z, t)),
    (ch05.q2, "F.log_softmax", _log_softmax_picked),
    (ch05.q2, "Tensor.log_softmax", _tensor_log_softmax_picked),
    (ch05.q2, "nll_loss of log_softmax", lambda z, t: F.nll_loss(torch.log_softmax(z, -1), t)),
    (ch05.q3, "torch.optim.AdamW", _torch_adamw),
    (ch05.q3, "minigpt.optim.adamw_update", _package_adamw),
    (ch05.q4, "minigpt.optim.lr_at", _package_lr_at),
    (ch05.q5, "torch clip_grad_norm_", _clip_with(torch.nn.utils.clip_grad_norm_)),
    (ch05.q5, "minigpt.optim.clip_grad_norm", _clip_with(package_optim.clip_grad_norm)),
    (ch07.q7, "looks the instruction up in minigpt.tasks", _wrong(ch07.q7, "looks_up")),
    (ch07.q7, "consults minigpt.tasks, then works it out", _peeks_at_tasks),
    (ch07.q8, "InstructionCollator", _wrong(ch07.q8, "calls_the_collator")),
    (ch07.q8, "InstructionCollator, then by hand", _collator_then_by_hand),
    (ch10.q1, "GPT.flops_per_token", _six_from_gpt),
    (ch10.q2, "np.polyfit in log-log", _polyfit_line),
    (ch10.q2, "minigpt.scaling.fit_power_law", _package_fit),
    (ch10.q3, "minigpt.quantize.quantize_per_channel", _package_quantize),
    (ch10.q3, "torch.quantize_per_channel", _torch_quantize_per_channel),
    (ch10.q4, "torch.optim.AdamW, stepped", _adam_state(lambda ps: torch.optim.AdamW(ps))),
    (ch10.q4, "torch.optim.Adam, stepped", _adam_state(lambda ps: torch.optim.Adam(ps))),
    (ch10.q4, "minigpt.optim.configure_optimizer", _configure_optimizer_state),
    (ch10.q5, "torch.stack(...).mean", _stack_mean),
    (ch10.q5, "torch.sum of a stack", _sum_of_stack),
    *CH05_BACKPROP_SHORTCUTS,
    (ch09.q1, "minigpt.inspect.previous_token_score", _wrong(ch09.q1, "calls_the_package")),
    (ch09.q2, "minigpt.inspect.logit_lens, then by hand", _wrong(ch09.q2, "through_the_package")),
    (ch09.q3, "minigpt.inspect.patching_map", _wrong(ch09.q3, "calls_the_package")),
    (ch09.q4, "minigpt.inspect.linear_probe", _wrong(ch09.q4, "fits_a_new_probe")),
    (ch09.q4, "linear_probe, then by hand", _package_probe_then_by_hand),
    (ch09.q5, "minigpt.bias.weat", _wrong(ch09.q5, "calls_the_package")),
    (ch09.q5, "weat imported by name", _weat_imported_by_name),
    (ch09.q5, "minigpt.bias.projection, then by hand", _projection_then_by_hand),
    (ch08.q1, "minigpt.preference.bradley_terry_loss", _package_bradley_terry),
    (ch08.q2, "minigpt.align.dpo_loss", _package_dpo),
    (ch08.q3, "minigpt.chat.encode_chat", _package_mask),
    (ch08.q4, "minigpt.align.kl_estimate", _package_kl),
    (ch08.q4, "kl_estimate, then by hand", _package_kl_then_by_hand),
    (ch08.q5, "minigpt.align.group_advantages", _package_advantages),
]

# (question, what the answer gets wrong): each must be incorrect
BOUNDARIES = [
    (ch00.q4, "divides by len(ids), not len(ids) - 1", _nll_over_len),
    (
        ch02.q5,
        "raises when the positions just fit (>= instead of >)",
        _refuses_a_table_that_just_fits,
    ),
    (ch03.q1, "lets each query see one step ahead", lambda T: torch.ones(T, T).tril(1).bool()),
    (ch03.q2, "ignores the mask and builds a causal one", _builds_its_own_causal_mask),
    (ch05.q4, "warmup through step == warmup_steps (<=)", _schedule(through=True)),
    (ch05.q4, "warmup without the + 1 (step 0 gets lr 0)", _schedule(plus=0)),
    (ch05.q4, "cosine over max_steps - warmup_steps - 1 steps", _schedule(span=-1)),
    (ch05.q4, "cosine one step ahead", _schedule(shift=1)),
    (ch06.q2, "keeps every logit tied with the k-th", _top_k_keeps_ties),
    (ch06.q3, "drops when the mass above is > p, not >= p", _top_p_strict),
    (ch06.q3, "drops the token whose own mass reaches p", _top_p_drops_at_cumsum),
    (ch07.q1, "reads position lengths, not lengths - 1", _reads_padding),
    (ch07.q2, "masks n_prompt targets, not n_prompt - 1", _wrong(ch07.q2, "off_by_one")),
    (ch07.q6, "counts position lengths[b] too (<= instead of <)", _counts_one_padding),
    (
        ch10.q1,
        "counts 2 N D (the forward pass only)",
        lambda n, d, f, u: 2 * n * d / (f * u) / 86_400,
    ),
    (ch10.q3, "scales by 128 and lets -128 in", _wrong(ch10.q3, "scale_128")),
    (ch10.q3, "truncates instead of rounding", _wrong(ch10.q3, "truncates")),
    (ch10.q5, "averages with one neighbour only", _wrong(ch10.q5, "pairwise")),
    *CH05_BACKPROP_BOUNDARIES,
    (ch09.q1, "divides by T, counting query 0", _wrong(ch09.q1, "counts_query_zero")),
    (ch09.q5, "population std instead of the sample std", _wrong(ch09.q5, "population_std")),
    (ch08.q1, "log(sigmoid(x)): inf for a margin of -1000", _wrong(ch08.q1, "unstable")),
    (ch08.q3, "leaves the assistant's end marker out", _wrong(ch08.q3, "without_end")),
    (ch08.q5, "std with Bessel's correction", _wrong(ch08.q5, "sample_std")),
    (ch08.q5, "no eps: nan for a group of equal rewards", _wrong(ch08.q5, "no_eps")),
]

_CHAPTER = {id(q): chapter for chapter, q in ALL}


def _id(row) -> str:
    return f"{_CHAPTER[id(row[0])]}.{row[0].name}: {row[1]}"


@pytest.mark.parametrize(("q", "label", "answer"), SHORTCUTS, ids=[_id(r) for r in SHORTCUTS])
def test_forbidden_shortcut_is_rejected_and_named(q, label, answer):
    result = q.check(answer)
    assert result.status == "incorrect", result
    assert "is not allowed here: " in result.message, result
    assert result.message.split(" is not allowed here: ")[0] in {s.name for s in q.shortcuts}
    assert sys.getprofile() is None, "forbid left its profile hook behind"
    assert not torch.overrides._get_current_function_mode_stack(), "forbid left its torch mode on"


@pytest.mark.parametrize(("q", "label", "answer"), BOUNDARIES, ids=[_id(r) for r in BOUNDARIES])
def test_boundary_variant_is_rejected(q, label, answer):
    result = q.check(answer)
    assert result.status == "incorrect", result
    assert "not allowed" not in result.message, "a boundary variant takes no forbidden shortcut"
    assert "cannot take" not in result.message, "the variant must be called, and be wrong"


def test_the_schedule_variants_move_one_edge_of_a_correct_schedule():
    assert ch05.q4.check(_schedule()).status == "correct"


# ---------------------------------------------------------------- the solutions still pass

QUESTIONS = sorted(
    {(_CHAPTER[id(q)], q.name) for q, _, _ in SHORTCUTS + BOUNDARIES},
)


def _question(chapter: str, name: str):
    return getattr(importlib.import_module(f"minigpt.exercises.{chapter}"), name)


def test_every_question_with_shortcuts_has_a_row():
    listed = {(_CHAPTER[id(q)], q.name) for q, _, _ in SHORTCUTS}
    forbidding = {(chapter, q.name) for chapter, q in ALL if q.shortcuts}
    assert forbidding == listed


@pytest.mark.parametrize(("chapter", "name"), QUESTIONS, ids=[f"{c}.{n}" for c, n in QUESTIONS])
def test_printed_solution_passes(chapter, name):
    q = _question(chapter, name)
    namespace = {"torch": torch, "F": F, "nn": nn, "math": math}
    exec(q._solution, namespace)  # what q.solution() prints
    (fn_name,) = re.findall(r"^def (\w+)\(", q._solution, flags=re.M)
    result = q.check(namespace[fn_name])
    assert result.status == "correct", result


@cache
def _solution_notebook(chapter: str) -> tuple[dict, dict[str, str]]:
    """The solutions notebook's namespace (every cell but the checks) and, per question,
    the name of the answer its check cell passes."""
    (path,) = REPO.glob(f"solutions/{chapter[2:]}_*.ipynb")
    namespace: dict = {}
    answers = {}
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] != "code":
            continue
        checks = re.findall(rf"{chapter}\.(q\d+)\.check\((\w+)\)", source)
        if checks:
            answers.update(checks)
        else:
            with contextlib.redirect_stdout(None):
                exec(source, namespace)
    return namespace, answers


@pytest.mark.parametrize(("chapter", "name"), QUESTIONS, ids=[f"{c}.{n}" for c, n in QUESTIONS])
def test_solution_notebook_answer_passes(chapter, name):
    namespace, answers = _solution_notebook(chapter)
    result = _question(chapter, name).check(namespace[answers[name]])
    assert result.status == "correct", result


def test_top_k_may_break_ties_its_own_way():
    """'Exactly k' with ties: which of the tied logits stays is the learner's choice."""

    def keeps_the_last_of_ties(logits, k):
        flipped = logits.flip(-1)
        values, indices = torch.topk(flipped, k, dim=-1)
        kept = torch.full_like(flipped, float("-inf")).scatter(-1, indices, values)
        return kept.flip(-1)

    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0])
    assert not torch.equal(
        torch.isfinite(keeps_the_last_of_ties(logits, 2)), torch.isfinite(ch06._top_k(logits, 2))
    ), "the two must really break the tie differently"
    assert ch06.q2.check(keeps_the_last_of_ties).status == "correct"


def test_top_p_boundary_agrees_with_the_package():
    from minigpt.sampling import top_p_filter

    for V, p, n in ((4, 0.5, 2), (4, 0.25, 1), (8, 0.375, 3), (4, 1.0, 4)):
        assert int(torch.isfinite(top_p_filter(torch.zeros(V), p)).sum()) == n


def test_top_k_ties_agree_with_the_package():
    from minigpt.sampling import top_k_filter

    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 4.0]])
    for k in (2, 3):
        assert torch.isfinite(top_k_filter(logits, k)).sum(-1).tolist() == [k, k]


# ---------------------------------------------------------------- forbid itself

_LAYER_NORM = Shortcut("F.layer_norm", "by hand", ("layer_norm",))


def _tracer(frame, event, arg):
    return None


def test_forbid_restores_the_profile_hook_and_the_torch_modes_when_the_code_raises():
    x = torch.randn(2, 4)
    block = Shortcut("block(x)", "parts", (ch04.Block.forward,))
    before = sys.getprofile()
    sys.setprofile(_tracer)  # someone's profiler was on before the check
    try:
        for answer, error in (
            (lambda: 1 / 0, LearnerError),
            (lambda: (F.layer_norm(x, (4,)), 1 / 0), Incorrect),
        ):
            with pytest.raises(error), forbid(_LAYER_NORM, block):
                call(answer)
            assert sys.getprofile() is _tracer
            assert not torch.overrides._get_current_function_mode_stack()
    finally:
        sys.setprofile(before)


def test_forbid_reports_the_shortcut_over_the_codes_own_error():
    x = torch.randn(2, 4)
    with (
        pytest.raises(Incorrect, match="F.layer_norm is not allowed here: by hand"),
        forbid(_LAYER_NORM),
    ):
        call(lambda: (F.layer_norm(x, (4,)), 1 / 0))
    with (
        pytest.raises(LearnerError) as raised,
        forbid(_LAYER_NORM),
    ):  # no shortcut: the code's own error stands
        call(lambda: 1 / 0)
    assert isinstance(raised.value.error, ZeroDivisionError)


def test_forbid_refuses_nothing_while_the_code_runs():
    x = torch.randn(2, 4)
    seen = []
    with pytest.raises(Incorrect), forbid(_LAYER_NORM):
        seen.append(F.layer_norm(x, (4,)))
    torch.testing.assert_close(seen[0], _by_hand_layer_norm(x, 1.0, 0.0))


def test_forbid_lets_keyboard_interrupt_through():
    def interrupted():
        F.layer_norm(torch.ones(1, 2), (2,))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), forbid(_LAYER_NORM):
        interrupted()
    assert sys.getprofile() is None


def test_a_when_that_raises_does_not_count():
    def broken(args, kwargs):
        raise RuntimeError("a learner's odd argument")

    with forbid(Shortcut("layer_norm", "by hand", ("layer_norm",), when=broken)):
        F.layer_norm(torch.ones(1, 2), (2,))


def test_a_target_forbid_cannot_spot_is_a_type_error():
    with (
        pytest.raises(TypeError, match="name a torch function by str"),
        forbid(Shortcut("torch.layer_norm", "by hand", (torch.layer_norm,))),
    ):
        pass


def test_backward_pass_sees_a_grad_fn_called_by_hand_but_not_a_graph_left_alone():
    backward = Shortcut("autograd", "by hand", (BACKWARD_PASS,))
    x = torch.randn(3)
    with pytest.raises(Incorrect, match="autograd is not allowed here"), forbid(backward):
        y = (x.clone().requires_grad_() * 2).exp()  # exp saves its result for backward
        y.grad_fn(torch.ones(3))  # one node's backward, no .backward() anywhere
    with forbid(backward):  # a graph recorded but never run backwards is no shortcut
        z = (x.clone().requires_grad_() * 2).exp().sum()
    assert z.grad_fn is not None
    z.backward()  # outside the block: not watched
