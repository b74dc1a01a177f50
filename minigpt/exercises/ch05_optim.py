"""Chapter 05 exercises, the optimizer (``ch05`` re-exports them): q3, one AdamW step;
q4, the warmup + cosine learning-rate schedule; q5, clipping the global gradient norm.
Each check refuses the library version (torch.optim, minigpt.optim, clip_grad_norm_).
"""

from __future__ import annotations

import math

import torch
import torch.nn.utils.clip_grad

from minigpt import optim as package_optim
from minigpt.exercises.core import Incorrect, Question, call, close, number, tensor
from minigpt.exercises.shortcuts import Shortcut, forbid

__all__ = ["q3", "q4", "q5"]


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


q3 = AdamWStep()
q4 = Schedule()
q5 = ClipGradients()
