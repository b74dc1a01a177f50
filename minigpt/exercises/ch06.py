"""Chapter 06 exercises: sampling and generation.

q1  temperature scaling: logits -> probabilities at a temperature
q2  a top-k filter
q3  a top-p (nucleus) filter
q4  one cached decoding step of attention
q5  a repetition penalty
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    close,
    tensor,
)

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]


def _logits(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------- q1


def _softmax_t(logits, temperature):
    return torch.softmax(logits / temperature, dim=-1)


class Temperature(Question):
    name = "q1"
    _hint = (
        "Divide the logits by the temperature first, then take the softmax over the "
        "last dimension (the vocabulary)."
    )
    _solution = """
def softmax_with_temperature(logits, temperature):
    return torch.softmax(logits / temperature, dim=-1)
"""

    def _check(self, fn):
        for seed, shape in ((0, (7,)), (1, (3, 11))):
            logits = _logits(seed, *shape)
            for t in (0.5, 1.0, 2.0):
                got = call(fn, logits, t)
                if not isinstance(got, torch.Tensor):
                    raise Incorrect(f"expected a tensor, got {type(got).__name__}")
                if got.shape != logits.shape:
                    raise Incorrect(f"expected shape {tuple(logits.shape)}, got {tuple(got.shape)}")
                if not torch.allclose(got.sum(-1).double(), torch.ones(1, dtype=torch.float64)):
                    raise Incorrect(
                        f"at temperature {t} the probabilities of a row do not add up to 1: "
                        "softmax over the last dimension"
                    )
                close(got, _softmax_t(logits, t), what=f"probabilities at temperature {t}")
        # the idea behind it: a low temperature sharpens, a high one flattens
        low = tensor(call(fn, torch.tensor([1.0, 2.0, 3.0]), 0.1), "temperature 0.1")
        if float(low.max()) < 0.99:
            raise Incorrect("at temperature 0.1 the likeliest token should get almost all the mass")

    def reference(self):
        return _softmax_t

    def wrong_answers(self):
        return [
            lambda logits, t: torch.softmax(logits * t, dim=-1),  # multiplies
            lambda logits, t: torch.softmax(logits, dim=-1) / t,  # scales the probabilities
            lambda logits, t: torch.softmax(logits / t, dim=0),  # wrong dimension
            lambda logits, t: torch.softmax(logits, dim=-1) ** (1 / t),  # not renormalised
        ]


q1 = Temperature()


# ---------------------------------------------------------------- q2


def _top_k(logits, k):
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


class TopK(Question):
    name = "q2"
    _hint = (
        "torch.topk(logits, k, dim=-1) gives the k largest values and their indices; "
        "start from a tensor full of float('-inf') and scatter the values back in."
    )
    _solution = """
def top_k_filter(logits, k):
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
"""

    def _check(self, fn):
        for seed, shape, k in ((0, (10,), 3), (1, (4, 20), 5), (2, (2, 6), 1), (3, (3, 8), 8)):
            logits = _logits(seed, *shape)
            got = call(fn, logits, k)
            if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
                raise Incorrect(f"expected a tensor of shape {tuple(logits.shape)}")
            kept = torch.isfinite(got)
            want = torch.isfinite(_top_k(logits, k))
            if (got[~kept] != float("-inf")).any() or kept.sum(-1).ne(k).any():
                raise Incorrect(
                    f"with k={k} exactly {k} logits per row should stay as they are and the "
                    "others become float('-inf'), so that softmax gives them probability 0"
                )
            if not torch.equal(kept, want):
                raise Incorrect(f"with k={k} you kept the wrong tokens: keep the largest logits")
            close(got[kept], logits[kept], what="the kept logits (they must not change)")
        # ties at the k-th value: still exactly k (which of the tied ones does not matter)
        logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 4.0]])
        for k in (2, 3):
            got = call(fn, logits, k)
            if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
                raise Incorrect(f"expected a tensor of shape {tuple(logits.shape)}")
            kept = torch.isfinite(got)
            n_kept = kept.sum(-1).tolist()
            if (got[~kept] != float("-inf")).any() or n_kept != [k, k]:
                raise Incorrect(
                    f"logits {logits.tolist()} with k={k}: you kept {n_kept} per row, but exactly "
                    f"{k} must stay even when logits tie at the {k}-th place (keeping every logit "
                    ">= the k-th value keeps too many)"
                )
            for row, keep in zip(logits, kept):
                if row[keep].min() < row[~keep].max():
                    raise Incorrect(f"logits {row.tolist()} with k={k}: keep the largest logits")
            close(got[kept], logits[kept], what="the kept logits (they must not change)")

    def reference(self):
        return _top_k

    def wrong_answers(self):
        def zeros_not_inf(logits, k):
            values, indices = torch.topk(logits, k, dim=-1)
            return torch.zeros_like(logits).scatter(-1, indices, values)

        def smallest(logits, k):
            values, indices = torch.topk(logits, k, dim=-1, largest=False)
            return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)

        def off_by_one(logits, k):  # keeps what is strictly above the k-th value
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]
            return logits.masked_fill(logits <= kth, float("-inf"))

        def keeps_ties(logits, k):  # nanoGPT's threshold: every logit tied with the k-th stays
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]
            return logits.masked_fill(logits < kth, float("-inf"))

        return [zeros_not_inf, smallest, off_by_one, keeps_ties]


q2 = TopK()


# ---------------------------------------------------------------- q3


def _top_p(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def _dropped_are_minus_inf(got):
    if (got[~torch.isfinite(got)] != float("-inf")).any():
        raise Incorrect(
            "a dropped token's logit must be float('-inf') (not NaN or +inf), so that softmax "
            "gives it probability 0"
        )


class TopP(Question):
    name = "q3"
    _hint = (
        "Sort the logits in descending order, turn them into probabilities, and take the "
        "cumulative sum. Drop a token when the tokens ranked above it already hold at least "
        "p of the mass (cumsum - its own probability >= p); the likeliest token always stays. "
        "Scatter the result back to the original order."
    )
    _solution = """
def top_p_filter(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs    # mass of the tokens ranked above
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)
"""

    def _check(self, fn):
        # a worked case first: probabilities 0.5, 0.3, 0.15, 0.05 in a shuffled order
        logits = torch.tensor([0.05, 0.5, 0.3, 0.15]).log()
        for p, want in ((0.4, [1]), (0.6, [1, 2]), (0.9, [1, 2, 3]), (1.0, [0, 1, 2, 3])):
            got = call(fn, logits, p)
            if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
                raise Incorrect(f"expected a tensor of shape {tuple(logits.shape)}")
            _dropped_are_minus_inf(got)
            kept = torch.isfinite(got).nonzero().flatten().tolist()
            if kept != want:
                raise Incorrect(
                    f"probabilities [0.05, 0.5, 0.3, 0.15] with p={p}: you kept tokens {kept}, "
                    f"expected {want} (the fewest likeliest tokens whose mass reaches p)"
                )
        # equal logits give exact masses (V tokens of 1/V each): at p = n / V the first n
        # tokens hold exactly p, so the next one is dropped ("at least p", mass above >= p)
        for V, p, n in ((4, 0.5, 2), (4, 0.25, 1), (8, 0.375, 3), (4, 1.0, 4)):
            logits = torch.zeros(2, V)
            got = call(fn, logits, p)
            if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
                raise Incorrect(f"expected a tensor of shape {tuple(logits.shape)}")
            _dropped_are_minus_inf(got)
            n_kept = torch.isfinite(got).sum(-1).tolist()
            if n_kept != [n, n]:
                raise Incorrect(
                    f"{V} equal logits (each token has probability 1/{V}) with p={p}: you kept "
                    f"{n_kept} tokens per row, expected {n}: the first {n} already hold "
                    f"{n}/{V} = {p} of the mass, so the next is dropped (drop a token when the "
                    "mass above it is >= p)"
                )
            kept = torch.isfinite(got)
            close(got[kept], logits[kept], what="the kept logits (they must not change)")
        for seed, shape, p in ((0, (12,), 0.7), (1, (3, 30), 0.9), (2, (2, 9), 0.25)):
            logits = _logits(seed, *shape)
            got = call(fn, logits, p)
            if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
                raise Incorrect(f"expected a tensor of shape {tuple(logits.shape)}")
            _dropped_are_minus_inf(got)
            if not torch.equal(torch.isfinite(got), torch.isfinite(_top_p(logits, p))):
                raise Incorrect(f"random logits of shape {tuple(shape)}, p={p}: wrong tokens kept")
            kept = torch.isfinite(got)
            close(got[kept], logits[kept], what="the kept logits (they must not change)")

    def reference(self):
        return _top_p

    def wrong_answers(self):
        def drops_the_crossing_token(logits, p):
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            sorted_logits = sorted_logits.masked_fill(cum > p, float("-inf"))
            return torch.empty_like(logits).scatter(-1, order, sorted_logits)

        def unsorted(logits, p):
            cum = torch.softmax(logits, dim=-1).cumsum(dim=-1)
            return logits.masked_fill(cum - torch.softmax(logits, -1) >= p, float("-inf"))

        def forgets_to_unsort(logits, p):
            sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            return sorted_logits.masked_fill(probs.cumsum(-1) - probs >= p, float("-inf"))

        def keeps_one_past_p(logits, p):  # > instead of >=: keeps a token after reaching p
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs > p, float("-inf"))
            return torch.empty_like(logits).scatter(-1, order, sorted_logits)

        return [drops_the_crossing_token, unsorted, forgets_to_unsort, keeps_one_past_p]


q3 = TopP()


# ---------------------------------------------------------------- q4


def _step(q, k_new, v_new, k_cache, v_cache):
    k = torch.cat([k_cache, k_new], dim=-2)  # (B, H, L + 1, hs)
    v = torch.cat([v_cache, v_new], dim=-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, 1, L + 1)
    return torch.softmax(scores, dim=-1) @ v, k, v


class CachedStep(Question):
    name = "q4"
    _hint = (
        "Append the new key and value to the cache along the time dimension (dim=-2) with "
        "torch.cat, then attend with the single new query to every key: "
        "softmax(q @ k.transpose(-2, -1) / sqrt(hs)) @ v. No mask is needed: the newest "
        "token may look at everything before it and at itself."
    )
    _solution = """
def cached_attention_step(q, k_new, v_new, k_cache, v_cache):
    k = torch.cat([k_cache, k_new], dim=-2)           # (B, H, L + 1, hs)
    v = torch.cat([v_cache, v_new], dim=-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])   # (B, H, 1, L + 1)
    return torch.softmax(scores, dim=-1) @ v, k, v
"""

    def _check(self, fn):
        g = torch.Generator().manual_seed(0)
        B, H, T, hs = 2, 3, 6, 8
        q_all, k_all, v_all = (torch.randn(B, H, T, hs, generator=g) for _ in range(3))
        full = F.scaled_dot_product_attention(q_all, k_all, v_all, is_causal=True)
        k_cache, v_cache = k_all[:, :, :0], v_all[:, :, :0]
        for t in range(T):  # decode token by token; must equal full causal attention
            s = slice(t, t + 1)
            got = call(fn, q_all[:, :, s], k_all[:, :, s], v_all[:, :, s], k_cache, v_cache)
            if not isinstance(got, tuple) or len(got) != 3:
                raise Incorrect("return three things: (output, new k cache, new v cache)")
            out, k_cache, v_cache = (
                tensor(x, w) for x, w in zip(got, ("the output", "the k cache", "the v cache"))
            )
            if tuple(k_cache.shape) != (B, H, t + 1, hs) or tuple(v_cache.shape) != (
                B,
                H,
                t + 1,
                hs,
            ):
                raise Incorrect(
                    f"after step {t} the caches should have shape {(B, H, t + 1, hs)}, got "
                    f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}: append along dim -2"
                )
            close(k_cache, k_all[:, :, : t + 1], what=f"the k cache after step {t}")
            close(v_cache, v_all[:, :, : t + 1], what=f"the v cache after step {t}")
            close(out, full[:, :, s], what=f"the attention output at step {t}")

    def reference(self):
        return _step

    def wrong_answers(self):
        def forgets_the_new_key(q, k_new, v_new, k_cache, v_cache):
            k, v = torch.cat([k_cache, k_new], -2), torch.cat([v_cache, v_new], -2)
            if k_cache.shape[-2] == 0:
                return q * 0, k, v
            scores = q @ k_cache.transpose(-2, -1) / math.sqrt(q.shape[-1])
            return torch.softmax(scores, -1) @ v_cache, k, v

        def no_scaling(q, k_new, v_new, k_cache, v_cache):
            k, v = torch.cat([k_cache, k_new], -2), torch.cat([v_cache, v_new], -2)
            return torch.softmax(q @ k.transpose(-2, -1), -1) @ v, k, v

        def causal_mask_from_zero(q, k_new, v_new, k_cache, v_cache):
            # is_causal with one query lets it see only the first key
            k, v = torch.cat([k_cache, k_new], -2), torch.cat([v_cache, v_new], -2)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), k, v

        def prepends(q, k_new, v_new, k_cache, v_cache):
            k, v = torch.cat([k_new, k_cache], -2), torch.cat([v_new, v_cache], -2)
            return F.scaled_dot_product_attention(q, k, v), k, v

        return [forgets_the_new_key, no_scaling, causal_mask_from_zero, prepends]


q4 = CachedStep()


# ---------------------------------------------------------------- q5


def _penalty(logits, ids, penalty):
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


class RepetitionPenalty(Question):
    name = "q5"
    _hint = (
        "Mark the tokens that occur in ids (a bool tensor and scatter_ works; so does a loop). "
        "For those tokens divide a positive logit by the penalty and multiply a negative one "
        "by it, so that the token always becomes less likely. Leave the other tokens alone."
    )
    _solution = """
def repetition_penalty(logits, ids, penalty):
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)  # (B, V)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)
"""

    def _check(self, fn):
        logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
        ids = torch.tensor([[0, 1, 1]])
        got = call(fn, logits, ids, 2.0)
        close(
            got,
            torch.tensor([[1.0, -2.0, 0.5, 3.0, -2.0]]),
            what="penalty 2 on logits [2, -1, 0.5, 3, -2] with ids [0, 1, 1]",
        )
        for seed, (B, V, T) in ((0, (2, 12, 5)), (1, (3, 30, 9))):
            logits = _logits(seed, B, V)
            ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
            got = call(fn, logits, ids, 1.5)
            close(got, _penalty(logits, ids, 1.5), what=f"random logits ({B}, {V}), penalty 1.5")

    def reference(self):
        return _penalty

    def wrong_answers(self):
        def always_divides(logits, ids, penalty):
            out = logits.clone()
            out.scatter_(-1, ids, logits.gather(-1, ids) / penalty)
            return out

        def counts_repeats(logits, ids, penalty):  # penalises once per occurrence
            out = logits.clone()
            for b in range(ids.shape[0]):
                for t in ids[b].tolist():
                    x = out[b, t]
                    out[b, t] = x * penalty if x < 0 else x / penalty
            return out

        def penalises_the_others(logits, ids, penalty):
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)
            penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
            return torch.where(seen, logits, penalized)

        return [always_divides, counts_repeats, penalises_the_others]


q5 = RepetitionPenalty()


# ---------------------------------------------------------------- q6, q7: entropy, and T = 0


def _entropy(logits: torch.Tensor, temperature: float) -> float:
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return -(logp.exp() * logp).sum().item()


class EntropyAtTemperature(Experiment):
    name = "q6"
    question = """
`ch06.q6.logits()` returns the 65 logits of one next-character prediction (a seeded
stand-in for a model's output). Compute the **entropy** of the next-token distribution,
H = -Σ p log p in **nats** (natural log), at temperature **0.5** and at temperature **2**.
Report `{"T=0.5": ..., "T=2": ...}`, each within ±0.01.
"""
    keys = ("T=0.5", "T=2")
    atol = 0.01
    trivial = (0.0, 1.0, 0.5, 2.0, 65.0)
    _hint = """
p = torch.softmax(logits / T, dim=-1) is the distribution at temperature T; its entropy
is -(p * p.log()).sum().
"""
    _solution = """
def entropy(logits, T):
    p = torch.softmax(logits / T, dim=-1)
    return -(p * p.log()).sum().item()

logits = ch06.q6.logits()
entropies = {"T=0.5": entropy(logits, 0.5), "T=2": entropy(logits, 2.0)}
"""

    def logits(self) -> torch.Tensor:
        """The experiment's logits, shape (65,)."""
        return 2.5 * torch.randn(65, generator=torch.Generator().manual_seed(6))

    def measure(self):
        return {"T=0.5": _entropy(self.logits(), 0.5), "T=2": _entropy(self.logits(), 2.0)}

    def decoys(self):
        truth = self.truth()
        at_one = _entropy(self.logits(), 1.0)
        return {
            "the entropy at temperature 1": {"T=0.5": at_one, "T=2": at_one},
            "ln 65, the entropy of the uniform distribution (T → ∞)": {
                "T=0.5": math.log(65),
                "T=2": math.log(65),
            },
            "the entropy in bits, not nats": {k: v / math.log(2) for k, v in truth.items()},
            "the entropy of the lesson's four-logit example, not of these 65 logits": {
                k: _entropy(torch.tensor([2.0, 1.0, 0.5, -1.0]), t)
                for k, t in (("T=0.5", 0.5), ("T=2", 2.0))
            },
            "the logits multiplied by T instead of divided": {
                "T=0.5": truth["T=2"],
                "T=2": truth["T=0.5"],
            },
        }


q6 = EntropyAtTemperature()


class TemperatureZero(MultipleChoice):
    name = "q7"
    question = """
Your entropy fell as the temperature went down. What does sampling at **temperature 0**
mean?
"""
    options = (
        Option(
            "Sampling from the uniform distribution: every token equally likely.",
            "That is the other end, T → ∞, where the logits divided by T all go to 0 and the "
            "entropy rises to ln V.",
        ),
        Option(
            "Sampling from the model's own distribution, unchanged.",
            "That is temperature 1: dividing the logits by 1 leaves them as they are.",
        ),
        Option(
            "Generation stops: no token is produced at temperature 0.",
            "Generation goes on as usual; only the choice of each token changes.",
        ),
        Option(
            "The limit T → 0, where all probability goes to the largest logit: greedy "
            "decoding, the argmax at every step.",
            "Dividing by 0 itself is undefined, so samplers treat T = 0 as argmax (as "
            "minigpt.generate does). The entropy is 0: the same prompt always gives the "
            "same text.",
        ),
    )
    answer = "d"
    _hint = "Divide the logits by a smaller and smaller T: what happens to the gap between the largest and the rest?"


q7 = TemperatureZero()
