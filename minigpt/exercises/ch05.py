"""Checks for chapter 05, pretraining: batches, cross-entropy, AdamW, the schedule, clipping,
and backpropagation by hand.

The exercises are "written by you and checked against PyTorch": each check rejects the
library function that would do the whole job (TokenDataset, F.cross_entropy, torch.optim,
minigpt.optim, clip_grad_norm_, and autograd itself for the two backpropagation questions,
q8 and q9, whose answers are compared with autograd's gradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.nn.utils.clip_grad

from minigpt import optim as package_optim
from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    call_modifying,
    close,
    number,
    tensor,
)
from minigpt.exercises.shortcuts import BACKWARD_PASS, Shortcut, forbid
from minigpt.tokens import TokenDataset

__all__ = ["Value", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8", "q9"]


def _data() -> torch.Tensor:
    return torch.arange(100, 160)  # ids whose values show where a window starts


class GetBatch(Question):
    name = "q1"
    _hint = (
        "For each offset i, the input is data[i : i + block_size] and the target is the same "
        "window moved one token right: data[i + 1 : i + 1 + block_size]. torch.stack the rows."
    )
    _solution = """
def get_batch(data, offsets, block_size):
    x = torch.stack([data[i : i + block_size] for i in offsets.tolist()])          # (B, T)
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in offsets.tolist()])  # (B, T)
    return x, y
"""

    shortcuts = (
        Shortcut(
            "minigpt's TokenDataset",
            "slice the windows out of data yourself and torch.stack them",
            (TokenDataset,),
        ),
    )

    def _check(self, fn) -> None:
        data = _data()
        for offsets, T in (
            (torch.tensor([0, 5, 17]), 4),
            (torch.tensor([50]), 8),
            (torch.tensor([3, 3]), 1),
        ):
            with forbid(*self.shortcuts):
                out = call(fn, data, offsets, T)
            if not isinstance(out, tuple) or len(out) != 2:
                raise Incorrect("return a pair (x, y)")
            x, y = out
            ex, ey = self.reference()(data, offsets, T)
            close(x, ex, what=f"x for offsets {offsets.tolist()}, block_size {T}")
            if isinstance(y, torch.Tensor) and y.shape == ex.shape and torch.equal(y, ex):
                raise Incorrect("y equals x: the targets must be the inputs shifted by one token")
            close(y, ey, what=f"y for offsets {offsets.tolist()}, block_size {T}")

    def reference(self):
        def get_batch(data, offsets, block_size):
            x = torch.stack([data[i : i + block_size] for i in offsets.tolist()])
            y = torch.stack([data[i + 1 : i + 1 + block_size] for i in offsets.tolist()])
            return x, y

        return get_batch

    def wrong_answers(self):
        def same(data, offsets, T):
            x = torch.stack([data[i : i + T] for i in offsets.tolist()])
            return x, x.clone()

        def too_far(data, offsets, T):
            x = torch.stack([data[i : i + T] for i in offsets.tolist()])
            y = torch.stack([data[i + 2 : i + 2 + T] for i in offsets.tolist()])
            return x, y

        def transposed(data, offsets, T):
            x, y = self.reference()(data, offsets, T)
            return x.T, y.T

        return [same, too_far, transposed]


class CrossEntropy(Question):
    name = "q2"
    _hint = (
        "log_softmax(z)_j = z_j - logsumexp(z). Subtract each row's max before exp so that large "
        "logits do not overflow; pick the target's log-probability with gather or indexing; "
        "average the negatives over the rows."
    )
    _solution = """
def cross_entropy(logits, targets):
    z = logits - logits.max(dim=-1, keepdim=True).values        # (N, V), stable
    log_probs = z - z.exp().sum(dim=-1, keepdim=True).log()       # (N, V)
    return -log_probs[torch.arange(len(targets)), targets].mean() # scalar
"""

    shortcuts = (
        Shortcut(
            "F.cross_entropy (or F.log_softmax)",
            "subtract each row's max, take log_softmax = z - log(sum(exp(z))) yourself, pick "
            "the targets' entries and average their negatives",
            ("cross_entropy", "cross_entropy_loss", "log_softmax", "_log_softmax"),
        ),
    )

    def _check(self, fn) -> None:
        g = torch.Generator().manual_seed(5)
        for scale in (1.0, 200.0):  # 200: exp overflows without the max trick
            logits = torch.randn(6, 11, generator=g) * scale
            targets = torch.randint(0, 11, (6,), generator=g)
            with forbid(*self.shortcuts):
                got = call(fn, logits, targets)
            if isinstance(got, torch.Tensor):
                if got.dim() != 0:
                    raise Incorrect(
                        f"return one number (the mean loss), got shape {tuple(got.shape)}"
                    )
                got = got.item()
            if isinstance(got, float) and not math.isfinite(got):
                raise Incorrect(
                    f"got {got} for logits of size ~{scale:g}: subtract the row max before exp"
                )
            got = number(got, "the loss")
            close(
                got, F.cross_entropy(logits, targets), what=f"the loss (logits of size ~{scale:g})"
            )

    def reference(self):
        def cross_entropy(logits, targets):
            z = logits - logits.max(dim=-1, keepdim=True).values
            log_probs = z - z.exp().sum(dim=-1, keepdim=True).log()
            return -log_probs[torch.arange(len(targets)), targets].mean()

        return cross_entropy

    def wrong_answers(self):
        def unstable(logits, targets):
            log_probs = logits - logits.exp().sum(dim=-1, keepdim=True).log()
            return -log_probs[torch.arange(len(targets)), targets].mean()

        def summed(logits, targets):
            z = logits - logits.max(dim=-1, keepdim=True).values
            log_probs = z - z.exp().sum(dim=-1, keepdim=True).log()
            return -log_probs[torch.arange(len(targets)), targets].sum()

        def probs_not_logs(logits, targets):
            return -F.softmax(logits, -1)[torch.arange(len(targets)), targets].mean()

        return [unstable, summed, probs_not_logs]


class AdamWStep(Question):
    name = "q3"
    _hint = (
        "Decay first: p = p * (1 - lr * weight_decay). Then m = b1*m + (1-b1)*g, "
        "v = b2*v + (1-b2)*g², bias-correct m_hat = m / (1 - b1**step), v_hat = v / (1 - b2**step), "
        "and p = p - lr * m_hat / (sqrt(v_hat) + eps)."
    )
    _solution = """
def adamw_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    p = p * (1 - lr * weight_decay)                 # decoupled weight decay
    m = beta1 * m + (1 - beta1) * g                 # mean of gradients
    v = beta2 * v + (1 - beta2) * g**2              # mean of squared gradients
    m_hat = m / (1 - beta1**step)                   # bias correction: m, v start at 0
    v_hat = v / (1 - beta2**step)
    p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p, m, v
"""
    _hp = dict(lr=0.05, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    shortcuts = (
        Shortcut(
            "an optimizer from torch.optim or minigpt.optim",
            "write the update out with tensor arithmetic: the decay, both moments, the bias "
            "correction and the step",
            (torch.optim, package_optim, "_fused_adamw_", "_fused_adam_"),
        ),
    )

    def _check(self, fn) -> None:
        g = torch.Generator().manual_seed(3)
        p0 = torch.randn(3, 4, generator=g)
        grads = [torch.randn(3, 4, generator=g) for _ in range(3)]
        ref = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW(
            [ref], lr=self._hp["lr"], betas=(self._hp["beta1"], self._hp["beta2"]),
            eps=self._hp["eps"], weight_decay=self._hp["weight_decay"],
        )  # fmt: skip
        p, m, v = p0.clone(), torch.zeros(3, 4), torch.zeros(3, 4)
        for step, grad in enumerate(grads, start=1):
            ref.grad = grad.clone()
            opt.step()
            with forbid(*self.shortcuts):
                out = call(fn, p, grad, m, v, step, **self._hp)
            if not isinstance(out, tuple) or len(out) != 3:
                raise Incorrect("return the triple (new_param, new_m, new_v)")
            p, m, v = (tensor(t, w) for t, w in zip(out, ("new_param", "new_m", "new_v")))
            state = opt.state[ref]
            close(m, state["exp_avg"], what=f"m after step {step}")
            close(v, state["exp_avg_sq"], what=f"v after step {step}")
            close(p, ref.detach(), what=f"the parameter after step {step} (vs torch.optim.AdamW)")

    def reference(self):
        def adamw_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
            p = p * (1 - lr * weight_decay)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g**2
            m_hat = m / (1 - beta1**step)
            v_hat = v / (1 - beta2**step)
            return p - lr * m_hat / (v_hat.sqrt() + eps), m, v

        return adamw_step

    def wrong_answers(self):
        def no_bias_correction(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
            p = p * (1 - lr * weight_decay)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g**2
            return p - lr * m / (v.sqrt() + eps), m, v

        def adam_l2(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
            g = g + weight_decay * p  # Adam with L2: decay goes through the moments
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g**2
            m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
            return p - lr * m_hat / (v_hat.sqrt() + eps), m, v

        def decay_without_lr(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
            p = p * (1 - weight_decay)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g**2
            m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
            return p - lr * m_hat / (v_hat.sqrt() + eps), m, v

        return [no_bias_correction, adam_l2, decay_without_lr]


def _lr_reference(step, max_lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


class Schedule(Question):
    name = "q4"
    _hint = (
        "Three cases: step < warmup_steps -> max_lr * (step + 1) / warmup_steps; step >= max_steps "
        "-> min_lr; otherwise progress = (step - warmup_steps) / (max_steps - warmup_steps) and "
        "min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr)."
    )
    _solution = """
def lr_at(step, max_lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
"""

    shortcuts = (
        Shortcut(
            "minigpt.optim's lr_at (or a torch.optim scheduler)",
            "write the three cases yourself with math.cos",
            (package_optim, torch.optim),
        ),
    )

    def _check(self, fn) -> None:
        args = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
        for step in (0, 4, 9, 10, 30, 55, 99, 100, 150):
            with forbid(*self.shortcuts):
                got = call(fn, step, **args)
            got = number(got, f"lr_at({step})")
            want = _lr_reference(step, **args)
            if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12):
                raise Incorrect(f"lr_at({step}) = {got:.6g}, expected {want:.6g}")

    def reference(self):
        return _lr_reference

    def wrong_answers(self):
        def no_warmup(step, max_lr, min_lr, warmup_steps, max_steps):
            return _lr_reference(
                step + warmup_steps, max_lr, min_lr, warmup_steps, max_steps + warmup_steps
            )

        def linear_decay(step, max_lr, min_lr, warmup_steps, max_steps):
            if step < warmup_steps:
                return max_lr * (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
            return max_lr - progress * (max_lr - min_lr)

        def decays_to_zero(step, max_lr, min_lr, warmup_steps, max_steps):
            return _lr_reference(step, max_lr, 0.0, warmup_steps, max_steps)

        return [no_warmup, linear_decay, decays_to_zero]


class ClipGradients(Question):
    name = "q5"
    _hint = (
        "The norm is over all gradients together: sqrt(sum of every squared entry of every "
        "tensor). Scale every gradient by max_norm / (norm + 1e-6), but only when that is < 1."
    )
    _solution = """
def clip_gradients(grads, max_norm):
    norm = torch.sqrt(sum((g**2).sum() for g in grads))   # one norm for all tensors
    scale = min(1.0, max_norm / (norm.item() + 1e-6))       # never scale up
    return [g * scale for g in grads]
"""

    shortcuts = (
        Shortcut(
            "clip_grad_norm_ (torch.nn.utils's or minigpt.optim's)",
            "compute one norm over all the tensors together and scale them yourself",
            (torch.nn.utils.clip_grad, package_optim),
        ),
    )

    def _check(self, fn) -> None:
        g = torch.Generator().manual_seed(7)
        grads = [torch.randn(4, 3, generator=g) * 2, torch.randn(5, generator=g)]
        for max_norm in (1.0, 100.0):
            with forbid(*self.shortcuts):
                got = call(fn, grads, max_norm)
            if not isinstance(got, (list, tuple)):
                raise Incorrect(f"return a list of gradients, got {type(got).__name__}")
            params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
            for p, t in zip(params, grads):
                p.grad = t.clone()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            if len(got) != len(grads):
                raise Incorrect(
                    f"return one gradient per input tensor ({len(grads)}), got {len(got)}"
                )
            for i, (a, p) in enumerate(zip(got, params)):
                close(a, p.grad, what=f"gradient {i} with max_norm={max_norm}")

    def reference(self):
        def clip_gradients(grads, max_norm):
            norm = torch.sqrt(sum((t**2).sum() for t in grads))
            scale = min(1.0, max_norm / (norm.item() + 1e-6))
            return [t * scale for t in grads]

        return clip_gradients

    def wrong_answers(self):
        def per_tensor(grads, max_norm):
            return [t * min(1.0, max_norm / (t.norm().item() + 1e-6)) for t in grads]

        def always_scale(grads, max_norm):
            norm = torch.sqrt(sum((t**2).sum() for t in grads))
            return [t * max_norm / (norm + 1e-6) for t in grads]

        return [per_tensor, always_scale]


q1 = GetBatch()
q2 = CrossEntropy()
q3 = AdamWStep()
q4 = Schedule()
q5 = ClipGradients()


# ---------------------------------------------------------------- q6, q7: a short run, and ln V


_RECIPE = dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)
_STEPS, _LR = 60, 3e-3


def _shakespeare_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (8, 32) batch of character ids of Tiny Shakespeare's training text."""
    from minigpt.exercises.core import shakespeare

    train, val = shakespeare()
    stoi = {c: i for i, c in enumerate(sorted(set(train + val)))}
    ids = torch.tensor([stoi[c] for c in train])
    offsets = torch.randint(len(ids) - 32, (8,), generator=torch.Generator().manual_seed(3))
    x = torch.stack([ids[i : i + 32] for i in offsets])  # (B, T)
    y = torch.stack([ids[i + 1 : i + 33] for i in offsets])  # (B, T)
    return x, y


def _short_run(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from minigpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**_RECIPE))
    opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=0.0)
    out = {}
    for step in range(_STEPS):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            out["initial"] = loss.item()
            out["grad_norm"] = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
            out["wte_grad_norm"] = model.wte.weight.grad.norm().item()
        opt.step()
    with torch.no_grad():
        out["loss"] = model(x, y)[1].item()
    out["grad_norm"] = float(out["grad_norm"])
    return out


class ShortRun(Experiment):
    name = "q6"
    question = f"""
Train a fresh model on one fixed batch, `x, y = ch05.q6.batch()` (8 windows of 32
characters of Tiny Shakespeare, ids of the lesson's 65-character tokenizer): seed with
`torch.manual_seed(0)` just before building `GPT(GPTConfig(vocab_size=65, block_size=32,
n_layer=2, n_head=2, n_embd=32))`, and run **{_STEPS} steps** of
`torch.optim.AdamW(model.parameters(), lr={_LR}, weight_decay=0.0)`, one
`model(x, y)`, `zero_grad`, `backward`, `step` each. Report
`{{"grad_norm": ..., "loss": ...}}`: the global gradient norm (the square root of the sum
of every parameter gradient's squares) at the first step, before the optimizer moved
anything, and the loss on `(x, y)` after the {_STEPS} steps. Each within ±0.01.
"""
    keys = ("grad_norm", "loss")
    atol = 0.01
    trivial = (0.0, 1.0, float(_STEPS), _LR, 65.0)
    _hint = """
model(x, y) returns (logits, loss). After loss.backward() at step 0, the global norm is
torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())), which is also what
torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")) returns. The last loss
is one more model(x, y) after the loop.
"""
    _solution = f"""
from minigpt.model import GPT, GPTConfig

x, y = ch05.q6.batch()
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
opt = torch.optim.AdamW(model.parameters(), lr={_LR}, weight_decay=0.0)
for step in range({_STEPS}):
    _, loss = model(x, y)
    opt.zero_grad()
    loss.backward()
    if step == 0:
        grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    opt.step()
with torch.no_grad():
    final_loss = model(x, y)[1].item()
run = {{"grad_norm": grad_norm, "loss": final_loss}}
"""

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experiment's batch: inputs and targets, both (8, 32) int64."""
        return _shakespeare_batch()

    def _run(self) -> dict[str, float]:
        cached = self.__dict__.get("_all")
        if cached is None:
            cached = self.__dict__["_all"] = _short_run(*self.batch())
        return cached

    def measure(self):
        run = self._run()
        return {"grad_norm": run["grad_norm"], "loss": run["loss"]}

    def decoys(self):
        run = self._run()
        return {
            "the loss before training (about ln 65)": {"loss": run["initial"]},
            "ln 65, the uniform model's loss": {"loss": math.log(65)},
            "the lesson's initial loss": {"loss": 4.209},
            "the gradient norm of the token embedding alone, not of every parameter": {
                "grad_norm": run["wte_grad_norm"]
            },
            "the lesson's gradient norm of the token embedding": {"grad_norm": 0.7657},
            "the squared norm (no square root)": {"grad_norm": run["grad_norm"] ** 2},
        }


q6 = ShortRun()


class WhyLnV(MultipleChoice):
    name = "q7"
    question = """
Before any training, a GPT over 65 characters has a loss close to ln 65 ≈ 4.17 (the
lesson's 4.209, and the loss at the first step of your run). Why is that the loss to expect?
"""
    options = (
        Option(
            "Cross-entropy is divided by ln V, so every loss is measured against it.",
            "Nothing divides by ln V: cross-entropy is the plain average of -log p of the "
            "right token. ln V only appears because of what a fresh model predicts.",
        ),
        Option(
            "No model can have a loss below ln V, and a fresh one starts at that floor.",
            "ln V is a ceiling to beat, not a floor: your run took the loss well below it in "
            "60 steps, and the trained course model reaches about 1.5.",
        ),
        Option(
            "Small random weights give small, nearly equal logits, so the softmax gives every "
            "token about 1/V, and -ln(1/V) = ln V.",
            "A fresh model knows nothing and says so: close to the uniform guess. A first "
            "loss much above ln V means over-confident wrong predictions, a sign of a bug "
            "or a bad initialisation.",
        ),
        Option(
            "The initialisation gives the model the character frequencies of the text.",
            "The weights are drawn at random, before any text is read; knowing the "
            "frequencies would give the unigram loss (3.35 in chapter 00), not ln 65.",
        ),
    )
    answer = "c"
    _hint = "What does softmax give when all V logits are (nearly) equal?"


q7 = WhyLnV()


# ---------------------------------------------------------------- q8, q9: backpropagation by hand

_AUTOGRAD = (
    Shortcut(
        "autograd (Tensor.backward, torch.autograd.grad, torch.func, a grad_fn called by hand)",
        "write the gradients out with the chain rule: tensor arithmetic only, no backward pass",
        (
            torch.Tensor.backward,
            torch.autograd.backward,
            torch.autograd.grad,
            torch.func.grad,
            torch.func.grad_and_value,
            torch.func.vjp,
            BACKWARD_PASS,
        ),
    ),
    Shortcut(
        "F.cross_entropy's backward kernels",
        "the gradient of the mean cross-entropy is (softmax(logits) - one_hot(labels)) / N",
        ("_log_softmax_backward_data", "_softmax_backward_data", "nll_loss_backward"),
    ),
)


def _linear_ce_grads(feats, W, b, labels, *, mean=True, one_hot=True, width=None):
    """(d_feats, d_W, d_b) of cross-entropy(feats @ W.T + b) by formula; the flags give
    the mistakes q8 names (no division by N, no one-hot subtracted, a one-hot ``width``
    wide, as ``F.one_hot(labels)`` without num_classes is when it broadcasts)."""
    G = torch.softmax(feats @ W.T + b, dim=-1)  # (N, K)
    if one_hot:
        G = G - F.one_hot(labels, width or W.shape[0]).to(G.dtype)
    if mean:
        G = G / len(labels)
    return G @ W, G.T @ feats, G.sum(dim=0)


class LinearBackward(Question):
    name = "q8"
    _hint = (
        "Three steps. G = softmax(feats @ W.T + b) minus the one-hot of the labels, divided by "
        "N because the loss is a mean over the N rows: (N, K). Then the chain rule through the "
        "linear layer: d_W = G.T @ feats (K, C_in, W's shape), d_b = G summed over the rows "
        "(K,), d_feats = G @ W (N, C_in)."
    )
    _solution = """
def backward_by_hand(feats, W, b, labels):
    logits = feats @ W.T + b                                  # (N, K)
    one_hot = F.one_hot(labels, W.shape[0]).to(logits.dtype)  # (N, K)
    G = (torch.softmax(logits, dim=-1) - one_hot) / len(labels)  # dL/dlogits (N, K)
    return G @ W, G.T @ feats, G.sum(dim=0)  # (N, C_in), (K, C_in), (K,)
"""
    shortcuts = _AUTOGRAD
    # (N, C_in, K): N = 1 and K = 2 included; C_in != K, so a transposed d_W has the wrong shape
    _SHAPES = ((1, 3, 2), (6, 4, 3), (5, 7, 2), (9, 5, 8))

    def _cases(self):
        g = torch.Generator().manual_seed(8)
        for N, C_in, K in self._SHAPES:
            labels = torch.randint(0, K, (N,), generator=g)
            labels[: min(N, K)] = torch.arange(min(N, K))  # every class that fits appears
            yield (
                torch.randn(N, C_in, generator=g),
                torch.randn(K, C_in, generator=g),
                torch.randn(K, generator=g) * 0.5,
                labels,
            )

    def _check(self, fn) -> None:
        for feats, W, b, labels in self._cases():
            N, C_in, K = *feats.shape, W.shape[0]
            with forbid(*self.shortcuts):
                out = call(fn, feats, W, b, labels)
            if not isinstance(out, (tuple, list)) or len(out) != 3:
                raise Incorrect("return the triple (d_feats, d_W, d_b)")
            got = [tensor(t, w) for t, w in zip(out, ("d_feats", "d_W", "d_b"))]
            want = _autograd_grads(feats, W, b, labels)
            where = f"for N={N}, C_in={C_in}, K={K}"
            if tuple(got[1].shape) == (C_in, K):
                raise Incorrect(
                    f"d_W has shape {(C_in, K)} {where}: it must have W's shape (K, C_in) = "
                    f"{(K, C_in)}; transpose G, not feats"
                )
            no_one_hot = "is softmax without the one-hot subtracted: dL/dlogits is p - one_hot"
            mistakes = [(no_one_hot, {"one_hot": False})]
            if N > 1:  # with one row, the mean is the sum
                no_mean = "forgets to divide by N: the loss is the mean over the rows"
                mistakes.append((no_mean, {"mean": False}))
            if labels.max() == 0:  # F.one_hot(labels) is one column wide: it broadcasts
                narrow = "has a one-hot too narrow: give F.one_hot num_classes=K"
                mistakes.append((narrow, {"width": 1}))
            for mistake, kwargs in mistakes:
                wrong = _linear_ce_grads(feats, W, b, labels, **kwargs)
                for t, w, name in zip(got, wrong, ("d_feats", "d_W", "d_b")):
                    if t.shape == w.shape and torch.allclose(t.double(), w.double()):
                        raise Incorrect(f"{name} {where} {mistake}")
            for t, w, name in zip(got, want, ("d_feats", "d_W", "d_b")):
                close(t, w, what=f"{name} {where} (vs autograd)")

    def reference(self):
        return _linear_ce_grads

    def wrong_answers(self):
        def no_mean(feats, W, b, labels):
            return _linear_ce_grads(feats, W, b, labels, mean=False)

        def no_one_hot(feats, W, b, labels):
            return _linear_ce_grads(feats, W, b, labels, one_hot=False)

        def d_W_transposed(feats, W, b, labels):
            d_feats, d_W, d_b = _linear_ce_grads(feats, W, b, labels)
            return d_feats, d_W.T, d_b

        def ignores_bias(feats, W, b, labels):
            return _linear_ce_grads(feats, W, torch.zeros_like(b), labels)

        def autograd(feats, W, b, labels):
            return _autograd_grads(feats, W, b, labels)

        return [no_mean, no_one_hot, d_W_transposed, ignores_bias, autograd]


def _autograd_grads(feats, W, b, labels):
    """What autograd says: the check's expected answer (run outside ``forbid``)."""
    leaves = [t.detach().clone().requires_grad_() for t in (feats, W, b)]
    F.cross_entropy(leaves[0] @ leaves[1].T + leaves[2], labels).backward()
    return [t.grad for t in leaves]


q8 = LinearBackward()


class Value:
    """The lesson's scalar autograd, with one change: a product's backward step is
    ``mul_backward(a, b, out.grad)``, the function q9 asks for, instead of its local
    gradients. ``+`` and ``tanh`` record their local gradients as in the lesson."""

    def __init__(self, data, parents=(), local_grads=()):
        self.data, self.grad = float(data), 0.0
        self.parents, self.local_grads = parents, local_grads

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data + other.data, (self, other), (1.0, 1.0))

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data * other.data, (self, other), None)  # None: a product

    __radd__, __rmul__ = __add__, __mul__

    def tanh(self):
        t = math.tanh(self.data)
        return Value(t, (self,), (1 - t * t,))

    def backward(self, mul_backward):
        """Fill ``.grad`` of every Value this one was computed from (d self / d value),
        visiting them from this one back; products call ``mul_backward(a, b, out.grad)``."""
        order, seen = [], set()

        def visit(v):
            if id(v) not in seen:
                seen.add(id(v))
                for p in v.parents:
                    visit(p)
                order.append(v)

        visit(self)
        self.grad = 1.0
        for v in reversed(order):
            if v.local_grads is None:  # a product: the learner's backward step
                a, b = v.parents
                out = call_modifying(mul_backward, a, b, v.grad)
                if not isinstance(out, (tuple, list)) or len(out) != 2:
                    raise Incorrect("return the pair (a.grad, b.grad) after adding to them")
                if number(out[0], "a.grad") != a.grad or number(out[1], "b.grad") != b.grad:
                    raise Incorrect("return (a.grad, b.grad) as they are after your update")
            else:
                for p, local in zip(v.parents, v.local_grads):
                    p.grad += local * v.grad

    def __repr__(self):
        return f"Value(data={self.data:.4f}, grad={self.grad:.4f})"


# expressions over (a, b, c), written once for Value and once for torch
_GRAPHS = (
    ("a * b", lambda a, b, c, tanh: a * b),
    ("(a * b).tanh()", lambda a, b, c, tanh: tanh(a * b)),
    ("a * a (one Value, both inputs)", lambda a, b, c, tanh: a * a),
    ("a * b + a * c (a used twice)", lambda a, b, c, tanh: a * b + a * c),
    (
        "(a * b + c) * a + (b * c).tanh()",
        lambda a, b, c, tanh: (a * b + c) * a + tanh(b * c),
    ),
)
_INPUTS = (0.5, -1.5, 0.8)


class MulBackward(Question):
    name = "q9"
    _hint = (
        "out = a * b, so d(out)/da = b and d(out)/db = a: each input's local gradient is the "
        "OTHER input's data. The chain rule multiplies it by out_grad. Add (+=) to a.grad and "
        "b.grad: a Value used twice (a * a, or a in two products) gets both contributions, and "
        "= would throw the first one away."
    )
    _solution = """
def mul_backward(a, b, out_grad):
    a.grad += b.data * out_grad  # d(a*b)/da = b, times the gradient flowing in
    b.grad += a.data * out_grad  # d(a*b)/db = a; += so that a * a gets 2a
    return a.grad, b.grad
"""
    shortcuts = _AUTOGRAD

    def _check(self, fn) -> None:
        for text, graph in _GRAPHS:
            leaves = [Value(x) for x in _INPUTS]
            out = graph(*leaves, Value.tanh)
            with forbid(*self.shortcuts):
                out.backward(fn)
            want = _torch_grads(graph)
            for name, leaf, w in zip("abc", leaves, want):
                got = number(leaf.grad, f"{name}.grad")
                if not math.isclose(got, w, rel_tol=1e-9, abs_tol=1e-12):
                    raise Incorrect(
                        f"{name}.grad of {text} (a={_INPUTS[0]:g}, b={_INPUTS[1]:g}, "
                        f"c={_INPUTS[2]:g}) is {got:.4g}, PyTorch says {w:.4g}"
                        + (_WHY.get(text, "") if w != 0 else "")
                    )

    def reference(self):
        def mul_backward(a, b, out_grad):
            a.grad += b.data * out_grad
            b.grad += a.data * out_grad
            return a.grad, b.grad

        return mul_backward

    def wrong_answers(self):
        def assigns(a, b, out_grad):
            a.grad = b.data * out_grad
            b.grad = a.data * out_grad
            return a.grad, b.grad

        def swapped(a, b, out_grad):
            a.grad += a.data * out_grad
            b.grad += b.data * out_grad
            return a.grad, b.grad

        def ignores_out_grad(a, b, out_grad):
            a.grad += b.data
            b.grad += a.data
            return a.grad, b.grad

        def returns_without_adding(a, b, out_grad):
            return a.grad + b.data * out_grad, b.grad + a.data * out_grad

        return [assigns, swapped, ignores_out_grad, returns_without_adding]


_WHY = {
    "a * b": ": d(a*b)/da is b and d(a*b)/db is a, each the other input's data",
    "(a * b).tanh()": ": multiply the local gradient by out_grad (the chain rule)",
    "a * a (one Value, both inputs)": ": a Value used twice must get both contributions (+=)",
    "a * b + a * c (a used twice)": ": a Value used twice must get both contributions (+=)",
}


def _torch_grads(graph) -> list[float]:
    leaves = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in _INPUTS]
    graph(*leaves, torch.tanh).backward()
    return [0.0 if t.grad is None else t.grad.item() for t in leaves]


q9 = MulBackward()
