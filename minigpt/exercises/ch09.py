"""Chapter 09 exercises: looking inside (a head score, a logit-lens step, a patching
loop, a probe's accuracy, and a WEAT association score); an experiment (a probe on a
synthetic feature next to its shuffled-label control) and a conceptual question (what a
probe's accuracy does and does not show).

The three questions on probes, q4, q6 and q7, are in ``ch09_probes``; they are read from
here like the others (``ch09.q6`` is ``ch09_probes.q6``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minigpt import bias, inspect
from minigpt.exercises.ch09_probes import q4, q6, q7
from minigpt.exercises.core import Incorrect, Question, call, close, number, tensor
from minigpt.exercises.shortcuts import Shortcut, forbid
from minigpt.model import GPT, GPTConfig

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]

_INSPECT = Shortcut(
    "minigpt.inspect",
    "compute it yourself from the tensors you are given (the chapter's cells show how)",
    (inspect,),
)
_BIAS = Shortcut(
    "minigpt.bias",
    "compute the cosines and the effect size yourself with torch",
    (bias,),
)


def _tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, norm="rmsnorm", bias=False
    )
    model = GPT(config).eval()
    with torch.no_grad():  # a final norm that is not the identity, so skipping it shows
        model.ln_f.weight.copy_(torch.linspace(0.5, 2.0, 16))
    return model.requires_grad_(False)


# ---------------------------------------------------------------- q1: a head score


def _previous_token_score(weights):
    return weights.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, -1))


def _attention_patterns(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L, B, H, T = 2, 3, 4, 6
    scores = torch.randn(L, B, H, T, T, generator=g) * 2
    scores[0, :, 1] += 6 * torch.eye(T, T).roll(-1, dims=1)  # head 1 of layer 0: previous token
    mask = torch.ones(T, T).tril().bool()
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class PreviousTokenScore(Question):
    name = "q1"
    _hint = (
        "weights[l, b, h, i, i - 1] is what query i puts on the token before it. "
        "weights.diagonal(offset=-1, dim1=-2, dim2=-1) collects them for i = 1..T-1 in "
        "shape (L, B, H, T - 1); average over the batch and those queries."
    )
    _solution = """
def previous_token_score(weights):
    sub = weights.diagonal(offset=-1, dim1=-2, dim2=-1)  # (L, B, H, T - 1)
    return sub.mean(dim=(1, -1))  # (L, H)
"""
    shortcuts = (_INSPECT,)

    def _check(self, fn):
        for seed in (0, 1):
            w = _attention_patterns(seed)
            with forbid(*self.shortcuts):
                got = tensor(call(fn, w))
            want = _previous_token_score(w)
            if tuple(got.shape) != (2, 4):
                raise Incorrect(
                    f"expected shape (n_layer, n_head) = (2, 4), got {tuple(got.shape)}"
                )
            if torch.allclose(
                got.double(), w.diagonal(dim1=-2, dim2=-1).mean(dim=(1, -1)).double()
            ):
                raise Incorrect(
                    "that is the weight on the query's own position (offset 0), not i - 1"
                )
            close(got, want, what="the scores")

    def reference(self):
        return _previous_token_score

    def wrong_answers(self):
        def own_position(w):
            return w.diagonal(dim1=-2, dim2=-1).mean(dim=(1, -1))

        def counts_query_zero(w):  # divides by T: query 0 has no previous token
            return w.diagonal(offset=-1, dim1=-2, dim2=-1).sum(-1).mean(1) / w.shape[-1]

        def first_row_only(w):
            return w[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)

        def calls_the_package(w):
            return inspect.previous_token_score(w)

        return [own_position, counts_query_zero, first_row_only, calls_the_package]


# ---------------------------------------------------------------- q2: a logit-lens step


def _lens(model, resid):
    return model.lm_head(model.ln_f(resid))


class LogitLensStep(Question):
    name = "q2"
    _hint = (
        "The model turns its last block's output into logits with the final norm and the "
        "output head: model.lm_head(model.ln_f(x)). The lens does the same to any layer's x."
    )
    _solution = """
def lens(model, resid):
    return model.lm_head(model.ln_f(resid))  # (B, T, C) -> (B, T, V)
"""
    shortcuts = (
        Shortcut(
            "minigpt.inspect",
            "apply the model's final norm and output head to resid yourself",
            (inspect,),
        ),
    )

    def _check(self, fn):
        model = _tiny_model()
        ids = torch.tensor([[1, 4, 2, 8, 5, 7], [3, 3, 0, 9, 10, 6]])
        with inspect.capture(model, attention=False) as rec:
            logits, _ = model(ids)
        for layer in (0, 1):
            resid = rec.resid_post[layer]
            with forbid(*self.shortcuts):
                got = tensor(call(fn, model, resid))
            if tuple(got.shape) != (2, 6, 11):
                raise Incorrect(f"expected (B, T, V) = (2, 6, 11) logits, got {tuple(got.shape)}")
            if torch.allclose(got, model.lm_head(resid), atol=1e-5):
                raise Incorrect("apply the final norm model.ln_f before the output head")
            if torch.allclose(got, _lens(model, resid).softmax(-1), atol=1e-5):
                raise Incorrect("return logits, not probabilities: leave out the softmax")
            close(got, _lens(model, resid), what=f"the lens after block {layer}")
        with forbid(*self.shortcuts):
            last = tensor(call(fn, model, rec.resid_post[1]))
        close(last, logits, what="the lens at the last layer")

    def reference(self):
        return _lens

    def wrong_answers(self):
        def no_norm(model, resid):
            return model.lm_head(resid)

        def probabilities(model, resid):
            return model.lm_head(model.ln_f(resid)).softmax(-1)

        def block_norm(model, resid):
            return model.lm_head(model.h[-1].ln_1(resid))

        def through_the_package(model, resid):
            inspect.logit_lens(model, torch.zeros(1, 2, dtype=torch.long))
            return model.lm_head(model.ln_f(resid))

        return [no_norm, probabilities, block_norm, through_the_package]


# ---------------------------------------------------------------- q3: a patching loop


def _patching_map(model, clean_ids, corrupted_ids, metric):
    stream = {}
    hooks = [
        b.register_forward_hook(lambda m, a, out, i=i: stream.__setitem__(i, out.detach()))
        for i, b in enumerate(model.h)
    ]
    with torch.no_grad():
        model(clean_ids)
    for h in hooks:
        h.remove()
    L, T = len(model.h), clean_ids.shape[1]
    out = torch.zeros(L, T)
    for layer in range(L):
        for t in range(T):

            def paste(m, a, o, layer=layer, t=t):
                o = o.clone()
                o[:, t] = stream[layer][:, t]
                return o

            hook = model.h[layer].register_forward_hook(paste)
            with torch.no_grad():
                out[layer, t] = float(metric(model(corrupted_ids)[0]))
            hook.remove()
    return out


class PatchingLoop(Question):
    name = "q3"
    _hint = (
        "First run clean_ids with a forward hook on every block that stores its output. "
        "Then for each layer and position, add a forward hook on model.h[layer] that "
        "returns a copy of its output with [:, t] replaced by the clean output there, run "
        "corrupted_ids, record metric(logits), and remove the hook."
    )
    _solution = """
def patching_map(model, clean_ids, corrupted_ids, metric):
    clean = {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: clean.__setitem__(i, out.detach()))
             for i, b in enumerate(model.h)]
    with torch.no_grad():
        model(clean_ids)
    for h in hooks:
        h.remove()
    L, T = len(model.h), clean_ids.shape[1]
    result = torch.zeros(L, T)
    for layer in range(L):
        for t in range(T):
            def paste(m, a, out, layer=layer, t=t):
                out = out.clone()
                out[:, t] = clean[layer][:, t]  # the clean stream after this block, here
                return out
            hook = model.h[layer].register_forward_hook(paste)
            with torch.no_grad():
                result[layer, t] = float(metric(model(corrupted_ids)[0]))
            hook.remove()
    return result  # (n_layer, T)
"""
    shortcuts = (_INSPECT,)

    def _check(self, fn):
        model = _tiny_model(1)
        clean = torch.tensor([[1, 4, 2, 8, 5, 7]])
        corrupted = torch.tensor([[1, 4, 9, 8, 5, 7]])

        def metric(logits):
            return logits[0, -1, 3] - logits[0, -1, 6]

        with forbid(*self.shortcuts):
            got = tensor(call(fn, model, clean, corrupted, metric))
        want = _patching_map(model, clean, corrupted, metric)
        if tuple(got.shape) != (2, 6):
            raise Incorrect(f"expected an (n_layer, T) = (2, 6) map, got {tuple(got.shape)}")
        with torch.no_grad():
            plain = float(metric(model(corrupted)[0]))
        if torch.allclose(got, torch.full_like(got, plain), atol=1e-5):
            raise Incorrect(
                "every entry is the corrupted run's metric: the clean activations never got in "
                "(return the modified output from the hook, and patch the corrupted run)"
            )
        if any(b._forward_hooks for b in model.h):
            raise Incorrect("remove your hooks when you are done (handle.remove())")
        close(got, want, what="the patching map")

    def reference(self):
        return _patching_map

    def wrong_answers(self):
        def patches_the_block_input(model, clean_ids, corrupted_ids, metric):
            stream = {}
            hooks = [
                b.register_forward_pre_hook(lambda m, a, i=i: stream.__setitem__(i, a[0].detach()))
                for i, b in enumerate(model.h)
            ]
            model(clean_ids)
            for h in hooks:
                h.remove()
            out = torch.zeros(len(model.h), clean_ids.shape[1])
            for layer in range(len(model.h)):
                for t in range(clean_ids.shape[1]):

                    def paste(m, a, layer=layer, t=t):
                        x = a[0].clone()
                        x[:, t] = stream[layer][:, t]
                        return (x,)

                    hook = model.h[layer].register_forward_pre_hook(paste)
                    out[layer, t] = float(metric(model(corrupted_ids)[0]))
                    hook.remove()
            return out

        def patches_every_later_position(model, clean_ids, corrupted_ids, metric):
            stream = {}
            hooks = [
                b.register_forward_hook(lambda m, a, o, i=i: stream.__setitem__(i, o.detach()))
                for i, b in enumerate(model.h)
            ]
            model(clean_ids)
            for h in hooks:
                h.remove()
            out = torch.zeros(len(model.h), clean_ids.shape[1])
            for layer in range(len(model.h)):
                for t in range(clean_ids.shape[1]):

                    def paste(m, a, o, layer=layer, t=t):
                        o = o.clone()
                        o[:, t:] = stream[layer][:, t:]
                        return o

                    hook = model.h[layer].register_forward_hook(paste)
                    out[layer, t] = float(metric(model(corrupted_ids)[0]))
                    hook.remove()
            return out

        def hook_returns_nothing(model, clean_ids, corrupted_ids, metric):
            with torch.no_grad():
                plain = float(metric(model(corrupted_ids)[0]))
            return torch.full((len(model.h), clean_ids.shape[1]), plain)

        def calls_the_package(model, clean_ids, corrupted_ids, metric):
            return inspect.patching_map(model, clean_ids, corrupted_ids, metric)

        return [
            patches_the_block_input,
            patches_every_later_position,
            hook_returns_nothing,
            calls_the_package,
        ]


# ---------------------------------------------------------------- q5: an association score


def _weat_effect(X, Y, A, B):
    X, Y, A, B = (F.normalize(v.double(), dim=1) for v in (X, Y, A, B))
    s = lambda W: (W @ A.T).mean(1) - (W @ B.T).mean(1)
    sx, sy = s(X), s(Y)
    return float((sx.mean() - sy.mean()) / torch.cat([sx, sy]).std())


def _weat_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    d = 6
    scale = torch.rand(1, d, generator=g) * 3 + 0.5  # lengths vary: cosines differ from dots
    A = (torch.randn(4, d, generator=g) + 1.0) * scale * torch.rand(4, 1, generator=g) * 4
    B = (torch.randn(5, d, generator=g) - 1.0) * scale
    X = (torch.randn(3, d, generator=g) + 0.5) * torch.rand(3, 1, generator=g) * 5
    Y = torch.randn(4, d, generator=g) - 0.3
    return X, Y, A, B


class WEATEffect(Question):
    name = "q5"
    _hint = (
        "Normalise every row to length 1 so dot products are cosines. For each target word w "
        "(a row of X or Y), s(w) = mean of cos(w, a) over A minus mean of cos(w, b) over B. "
        "The effect size is (mean of s over X - mean of s over Y) divided by the standard "
        "deviation of s over X and Y together (torch's default, the sample std)."
    )
    _solution = """
def weat_effect_size(X, Y, A, B):
    X, Y, A, B = (F.normalize(v, dim=1) for v in (X, Y, A, B))  # unit rows
    def s(W):  # (n,) association of each word with A rather than B
        return (W @ A.T).mean(dim=1) - (W @ B.T).mean(dim=1)
    sx, sy = s(X), s(Y)
    return ((sx.mean() - sy.mean()) / torch.cat([sx, sy]).std()).item()
"""
    shortcuts = (_BIAS,)

    def _check(self, fn):
        for seed in (0, 1, 2):
            case = _weat_case(seed)
            with forbid(*self.shortcuts):
                got = number(call(fn, *case), "the effect size")
            want = _weat_effect(*case)
            if abs(got - want) > 1e-4 * max(1.0, abs(want)):
                raise Incorrect(f"the effect size should be {want:.4f}, got {got:.4f}")

    def reference(self):
        return _weat_effect

    def wrong_answers(self):
        def dot_products(X, Y, A, B):
            s = lambda W: (W @ A.T).mean(1) - (W @ B.T).mean(1)
            sx, sy = s(X), s(Y)
            return float((sx.mean() - sy.mean()) / torch.cat([sx, sy]).std())

        def population_std(X, Y, A, B):
            X, Y, A, B = (F.normalize(v, dim=1) for v in (X, Y, A, B))
            s = lambda W: (W @ A.T).mean(1) - (W @ B.T).mean(1)
            sx, sy = s(X), s(Y)
            return float((sx.mean() - sy.mean()) / torch.cat([sx, sy]).std(unbiased=False))

        def std_of_x_only(X, Y, A, B):
            X, Y, A, B = (F.normalize(v, dim=1) for v in (X, Y, A, B))
            s = lambda W: (W @ A.T).mean(1) - (W @ B.T).mean(1)
            sx, sy = s(X), s(Y)
            return float((sx.mean() - sy.mean()) / sx.std())

        def no_division(X, Y, A, B):
            X, Y, A, B = (F.normalize(v, dim=1) for v in (X, Y, A, B))
            s = lambda W: (W @ A.T).mean(1) - (W @ B.T).mean(1)
            return float(s(X).mean() - s(Y).mean())

        def calls_the_package(X, Y, A, B):
            return bias.weat(X, Y, A, B, permutations=10).effect_size

        return [dot_products, population_std, std_of_x_only, no_division, calls_the_package]


q1 = PreviousTokenScore()
q2 = LogitLensStep()
q3 = PatchingLoop()
q5 = WEATEffect()
