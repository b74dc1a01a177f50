"""Chapter 08 exercises on the KL penalty of RLHF (``ch08`` re-exports them): q4, the k3
estimate of KL(policy || ref) per token; q6, an experiment (the k1 and k3 estimates from 50
samples, next to the exact KL); q7, a conceptual question (why RLHF keeps the penalty).
"""

from __future__ import annotations

import math

import torch

from minigpt import align
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
from minigpt.exercises.shortcuts import Shortcut, forbid

__all__ = ["q4", "q6", "q7"]


# ---------------------------------------------------------------- q4: a KL estimate


def _k3(logp_policy, logp_ref):
    log_r = logp_ref - logp_policy
    return torch.exp(log_r) - 1 - log_r


class KLEstimate(Question):
    name = "q4"
    _hint = (
        "With log r = logp_ref - logp_policy at each sampled token, k3 = (r - 1) - log r "
        "= exp(log r) - 1 - log r: never negative, and its mean over tokens sampled from "
        "the policy estimates KL(policy || ref) without bias."
    )
    _solution = """
def kl_k3(logp_policy, logp_ref):
    log_r = logp_ref - logp_policy  # (..., T)
    return torch.exp(log_r) - 1 - log_r
"""
    shortcuts = (
        Shortcut(
            "minigpt.align.kl_estimate",
            "compute log r = logp_ref - logp_policy and (r - 1) - log r yourself",
            (align.kl_estimate,),
        ),
    )

    def _check(self, fn):
        g = torch.Generator().manual_seed(4)
        logp_policy = -3 * torch.rand(3, 5, generator=g)
        logp_ref = -3 * torch.rand(3, 5, generator=g)
        with forbid(*self.shortcuts):
            got = tensor(call(fn, logp_policy, logp_ref), "kl_k3(logp_policy, logp_ref)")
        if tuple(got.shape) != (3, 5):
            raise Incorrect(f"return one estimate per token, shape (3, 5), got {tuple(got.shape)}")
        if (got < -1e-6).any():
            raise Incorrect("k3 is never negative; yours is below 0 somewhere")
        close(got, _k3(logp_policy, logp_ref), what="kl_k3(logp_policy, logp_ref)")
        # the estimator's point: its mean over policy samples is the exact KL
        p = torch.tensor([0.6, 0.3, 0.1])
        q = torch.tensor([0.2, 0.5, 0.3])
        exact = (p * (p / q).log()).sum()
        tokens = torch.arange(3)
        with forbid(*self.shortcuts):
            per_token = tensor(call(fn, p.log()[tokens], q.log()[tokens]), "kl_k3 on 3 tokens")
        close((p * per_token).sum(), exact, what="E_policy[k3] against the exact KL")

    def reference(self):
        return _k3

    def wrong_answers(self):
        def k1(logp_policy, logp_ref):
            return logp_policy - logp_ref

        def ratio_flipped(logp_policy, logp_ref):
            log_r = logp_policy - logp_ref
            return torch.exp(log_r) - 1 - log_r

        def k2(logp_policy, logp_ref):
            return 0.5 * (logp_ref - logp_policy) ** 2

        def summed(logp_policy, logp_ref):
            return _k3(logp_policy, logp_ref).sum(dim=-1)

        return [k1, ratio_flipped, k2, summed]


q4 = KLEstimate()


# ---------------------------------------------------------------- q6: two KL estimators, measured

_POLICY = (0.40, 0.25, 0.15, 0.12, 0.08)  # q6's policy over 5 tokens
_N_SAMPLES = 50


def _kl_estimates() -> dict[str, float]:
    """q6's numbers (k1, k3, the share of negative k1) and what misreadings give."""
    policy = torch.tensor(_POLICY, dtype=torch.float64)
    ref = torch.full((5,), 0.2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(policy.float(), _N_SAMPLES, replacement=True, generator=g)
    from_ref = torch.multinomial(ref.float(), _N_SAMPLES, replacement=True, generator=g)

    def estimates(t: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
        log_r = q.log()[t] - p.log()[t]  # (N,) log ref / policy at each sample
        k1 = -log_r
        return {
            "k1": k1.mean().item(),
            "k3": (log_r.exp() - 1 - log_r).mean().item(),
            "negative": (k1 < 0).double().mean().item(),
            "k2": (0.5 * log_r**2).mean().item(),
        }

    return {
        **estimates(tokens, policy, ref),
        "exact": (policy * (policy / ref).log()).sum().item(),
        "exact_reversed": (ref * (ref / policy).log()).sum().item(),
        "flipped": estimates(tokens, ref, policy),  # r = policy / ref: the ratio upside down
        "from_ref": estimates(from_ref, policy, ref),
    }


class KLFromSamples(Experiment):
    name = "q6"
    question = """
The RL loop of the lesson estimates KL(policy || ref) from what the policy samples, one
estimate per sample. Try the two estimators on two small distributions over 5 tokens:
`policy = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08])` and `ref = torch.full((5,), 0.2)`.
Draw 50 tokens from the policy with `t = torch.multinomial(policy, 50, replacement=True,
generator=torch.Generator().manual_seed(0))`. At each sampled token,
`log_r = ref.log()[t] - policy.log()[t]`; the estimates are `k1 = -log_r` and
`k3 = (r - 1) - log r = log_r.exp() - 1 - log_r`. Report `{"k1": ..., "k3": ...,
"negative": ...}`: the mean of k1 and the mean of k3 over the 50 samples, and the fraction
of the 50 samples whose k1 is below 0. Each within ±0.001 (natural logs, nats).
"""
    keys = ("k1", "k3", "negative")
    atol = 0.001
    trivial = (0.0, 1.0, 0.2, 5.0, 50.0)
    _hint = """
Index the log-probabilities with the sampled tokens: ref.log()[t] and policy.log()[t] are
(50,) tensors. k1 and k3 are (50,) per-sample estimates; report their means, and
(k1 < 0).float().mean() for the fraction. Compare both means with the exact KL,
(policy * (policy / ref).log()).sum(): it needs the whole distribution, which an LLM's
sequences never give.
"""
    _solution = """
policy = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08])
ref = torch.full((5,), 0.2)
t = torch.multinomial(policy, 50, replacement=True, generator=torch.Generator().manual_seed(0))
log_r = ref.log()[t] - policy.log()[t]  # (50,) log ref / policy at each sample
k1 = -log_r  # unbiased, but negative wherever the policy is below the reference
k3 = log_r.exp() - 1 - log_r  # unbiased too, and never negative
kl_estimates = {"k1": k1.mean().item(), "k3": k3.mean().item(),
                "negative": (k1 < 0).float().mean().item()}
"""

    def run_experiment(self) -> dict[str, float]:
        return _kl_estimates()

    def decoys(self):
        run = self.record()
        flipped, from_ref = run["flipped"], run["from_ref"]
        return {
            "the exact KL(policy || ref), not the estimate from the 50 samples": {
                "k1": run["exact"],
                "k3": run["exact"],
            },
            "the exact KL(ref || policy), the other way round and not from the samples": {
                "k1": run["exact_reversed"],
                "k3": run["exact_reversed"],
            },
            "the estimate with the ratio upside down (r = policy / ref, not ref / policy)": {
                k: flipped[k] for k in self.keys
            },
            "the estimate on tokens drawn from ref, not from the policy": {
                k: from_ref[k] for k in self.keys
            },
            "the mean of k2 = log_r ** 2 / 2, not of k3": {"k3": run["k2"]},
            "the estimate in bits (log base 2), not nats": {
                "k1": run["k1"] / math.log(2),
                "k3": run["k3"] / math.log(2),
            },
            "the sum over the 50 samples, not the mean": {
                "k1": run["k1"] * _N_SAMPLES,
                "k3": run["k3"] * _N_SAMPLES,
            },
            "the fraction of samples where k1 is not negative": {"negative": 1 - run["negative"]},
            "the share of the 5 tokens that the policy makes less likely than ref (3 of 5), "
            "not of the 50 samples": {"negative": 0.6},
        }


q6 = KLFromSamples()


# ---------------------------------------------------------------- q7: a concept


class WhyKLPenalty(MultipleChoice):
    name = "q7"
    question = """
RLHF maximises the reward model's score minus beta times KL(policy || SFT model). Why
keep that KL penalty, when the reward is what we want?
"""
    options = (
        Option(
            "It keeps the reward model accurate: a judge that scores responses near the SFT "
            "model's keeps learning to score them better as the policy trains.",
            "The reward model is frozen during RL: the penalty is a term of the policy's "
            "objective and changes nothing about the judge. It changes where the policy is "
            "allowed to go.",
        ),
        Option(
            "Without it the policy-gradient estimate is biased, because the samples come from "
            "the very policy being trained; the KL term corrects for that.",
            "Sampling from the policy being trained is what makes REINFORCE unbiased (it is "
            "on-policy), and the group baseline keeps it so while cutting the variance. The "
            "penalty changes the objective that is optimised, not how well its gradient is "
            "estimated.",
        ),
        Option(
            "The reward model is an imperfect judge, fitted on responses like the SFT "
            "model's. A policy free to move drifts to text the judge over-scores (reward "
            "hacking) and forgets what SFT taught; the penalty keeps it near what the judge knows.",
            "In the lesson's runs, the one without the penalty moved further from the SFT "
            "model (held-out KL 8.05 nats against 0.77) and lost more task accuracy (38.3% "
            "against 74.4%, SFT 86.7%), while the judge scored it higher.",
        ),
        Option(
            "It makes each RL step cheaper: a policy that stays near the SFT model needs "
            "fewer samples per prompt for the same noise in the gradient.",
            "It makes a step dearer, if anything: every sampled response is also scored by "
            "the frozen reference model to get log pi_ref. The number of samples per prompt "
            "is a setting of its own.",
        ),
    )
    answer = "c"
    _hint = (
        "What was the reward model trained on, and how much can its score be trusted for a "
        "response unlike any it saw? Compare the two RLHF runs of the lesson's section 4."
    )


q7 = WhyKLPenalty()
