"""Chapter 05 exercises, backpropagation by hand (``ch05`` re-exports them): q8, the
gradients of a linear layer and its cross-entropy loss, and q9, the backward step of a
product in the lesson's scalar ``Value``. Both checks compare the answer with autograd's
gradients and refuse autograd itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minigpt.exercises.core import Incorrect, Question, call, call_modifying, close, number, tensor
from minigpt.exercises.shortcuts import BACKWARD_PASS, Shortcut, forbid

__all__ = ["Value", "q8", "q9"]


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
