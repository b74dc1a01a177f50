"""Alignment: tuning a policy towards what a reward or a preference prefers.

The instruction-tuned model (the SFT model) is the starting policy and the reference
it must not drift far from. Two ways to move it, on (prompt, response) pairs in the
course template:

- Policy gradient, RLHF and RLVR: sample ``n`` responses per prompt
  (``sample_responses``), score each with a reward function (a reward model of
  ``minigpt.preference`` for RLHF, the task's checker ``task_reward`` for RLVR),
  subtract each group's mean (``group_advantages``), and raise the log-probability of
  the better-than-average responses, with a KL penalty to the reference
  (``policy_gradient_step``, ``kl_estimate``); ``rl_loop`` ties them together.
- DPO (``dpo_loss``, ``train_dpo``): the same KL-regularised objective solved in
  closed form and fit to preference pairs directly, with no reward model and no sampling.

Both score responses by ``sequence_logprobs``: log p(response | prompt), the sum of
the response tokens' log-probabilities.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt.assistant import task_prompt
from minigpt.classify import IGNORE_INDEX
from minigpt.files import check_bool, check_int, check_number
from minigpt.finetune import FinetuneConfig, History, fit
from minigpt.generate import Tokenizer, generate, same_length_rows
from minigpt.instruct import InstructionCollator
from minigpt.model import GPT
from minigpt.optim import OptimConfig, clip_grad_norm, configure_optimizer, set_lr
from minigpt.preference import PreferenceExample
from minigpt.tasks import TaskExample, check

__all__ = [
    "KL_KINDS",
    "RLConfig",
    "Rollouts",
    "dpo_loss",
    "group_advantages",
    "kl_estimate",
    "policy_gradient_step",
    "response_logprobs",
    "rl_loop",
    "sample_responses",
    "sequence_logprobs",
    "task_reward",
    "train_dpo",
]

# ---------------------------------------------------------------- log-probabilities


def response_logprobs(
    model: GPT, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor]:
    """Log-probability of each response token given the prompt and the tokens before it.

    Each row is ``prompt + response`` right-padded (``InstructionCollator``); column t
    scores token t + 1. Gradients flow into ``model``.

    Args:
        prompt_ids, response_ids: B token-id lists each, none empty, each pair
            fitting the model's context (len(prompt) + len(response) - 1 <= block_size).
    Returns:
        (B, T) log-probs, 0 where the target is not a response token, and the (B, T)
        bool mask of the response targets.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if not prompt_ids:
        raise ValueError("empty batch: give at least one (prompt, response) pair")
    block = model.config.block_size
    for p, r in zip(prompt_ids, response_ids, strict=True):
        if not len(p) or not len(r):
            raise ValueError("every prompt and every response needs at least one token")
        if len(p) + len(r) - 1 > block:
            raise ValueError(
                f"a prompt + response of {len(p) + len(r)} tokens does not fit the model's "
                f"context (block_size={block}); shorten it or leave the example out"
            )
    inputs, targets = InstructionCollator(pad_id=0)(list(zip(prompt_ids, response_ids)))
    device = model.device
    inputs, targets = inputs.to(device), targets.to(device)
    logits, _ = model(inputs)  # (B, T, V)
    logp = -F.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T), 0 at ignored targets
    return logp, targets != IGNORE_INDEX


def sequence_logprobs(
    model: GPT, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
) -> Tensor:
    """(B,) log p(response | prompt): the sum of ``response_logprobs`` over each row."""
    return response_logprobs(model, prompt_ids, response_ids)[0].sum(dim=1)


# ---------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation (Rafailov et al. 2023).

    RLHF maximises E_{y~pi}[r(x, y)] - beta KL(pi || pi_ref). Its optimum is
    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so any reward can be written
    r(x, y) = beta log pi*(y|x) / pi_ref(y|x) + beta log Z(x). In the Bradley-Terry
    likelihood only differences of rewards enter, so Z(x) cancels:
    p(y_w > y_l) = sigmoid(beta [log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)]),
    and its negative log-likelihood trains the policy itself: no reward model, no
    sampling.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) ``sequence_logprobs`` of the
            chosen and rejected responses under the policy (with gradients).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference.
        beta: > 0, the KL coefficient: small lets the policy move far from the reference.
    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the scalar mean loss and the (B,)
        implicit rewards beta log pi/pi_ref of each response (detached); a pair is
        ranked right when its chosen reward is the higher.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not all(isinstance(t, Tensor) for t in logps):
        raise TypeError("the four log-probs must be (B,) tensors (sequence_logprobs)")
    shapes = [tuple(t.shape) for t in logps]
    if len(set(shapes)) > 1 or len(shapes[0]) != 1 or not shapes[0][0]:
        raise ValueError(
            f"the four log-probs must be non-empty (B,) tensors of one shape, got {shapes}"
        )
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def train_dpo(
    policy: GPT,
    tokenizer: Tokenizer,
    pairs: Sequence[PreferenceExample],
    config: FinetuneConfig | None = None,
    beta: float = 0.1,
    ref: GPT | None = None,
    nll_weight: float = 0.0,
    stop: str = "\n",
) -> History:
    """Tune ``policy`` on preference pairs with ``dpo_loss``: no reward model, no sampling.

    Each pair scores ``ex.prompt()`` followed by ``ex.chosen + stop`` and by
    ``ex.rejected + stop`` (the assistant ends a response with its stop text) under
    the policy and under ``ref``, which defaults to a frozen copy of ``policy`` as it
    starts (the SFT model) and is not changed. The course's one fine-tuning loop
    (``minigpt.finetune.fit``) runs the steps; pairs that do not fit the context are
    left out. ``nll_weight`` > 0 adds that times the chosen responses' mean negative
    log-likelihood per token (RPO, Pang et al. 2024): DPO only ranks the pair, and a
    chosen response far below what the model writes can win the ranking without
    becoming likely. Returns ``fit``'s history plus, per step, the batch means of
    ``margin`` (chosen minus rejected implicit reward), ``chosen_logp`` and
    ``rejected_logp`` (the policy's ``sequence_logprobs``).
    """
    if not pairs:
        raise ValueError("no preference pairs: make some with minigpt.preference.task_preferences")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    if not isinstance(nll_weight, (int, float)) or not nll_weight >= 0:
        raise ValueError(f"nll_weight must be a number >= 0, got {nll_weight!r}")
    cfg = config or FinetuneConfig()
    if ref is None:
        ref = copy.deepcopy(policy).requires_grad_(False)
    ref.eval()  # scored under no_grad: a given reference keeps its requires_grad
    block = policy.config.block_size
    rows = []
    for ex in pairs:
        p = tokenizer.encode(ex.prompt())
        c, r = tokenizer.encode(ex.chosen + stop), tokenizer.encode(ex.rejected + stop)
        if p and len(p) + max(len(c), len(r)) - 1 <= block:
            rows.append((p, c, r))
    if not rows:
        raise ValueError(f"no pair fits the model's context (block_size={block})")
    extra: dict[str, list[float]] = {"margin": [], "chosen_logp": [], "rejected_logp": []}

    def loss_fn(batch: list[tuple[list[int], list[int], list[int]]]) -> Tensor:
        prompts = [p for p, _, _ in batch] * 2
        responses = [c for _, c, _ in batch] + [r for _, _, r in batch]
        logps = sequence_logprobs(policy, prompts, responses)  # (2B,): chosen, then rejected
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref, prompts, responses)
        chosen, rejected = logps.chunk(2)
        loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, *ref_logps.chunk(2), beta)
        if nll_weight:
            n_tokens = torch.tensor([len(c) for _, c, _ in batch], device=chosen.device)
            loss = loss - nll_weight * (chosen / n_tokens).mean()
        extra["margin"].append((r_chosen - r_rejected).mean().item())
        extra["chosen_logp"].append(chosen.mean().item())
        extra["rejected_logp"].append(rejected.mean().item())
        return loss

    lengths = [len(p) + max(len(c), len(r)) for p, c, r in rows]
    history = fit(policy, loss_fn, rows, cfg, lengths=lengths)
    return {**history, **extra}


# ---------------------------------------------------------------- policy gradient


@dataclass
class Rollouts:
    """``n`` sampled responses to each of ``P`` prompts (``sample_responses``).

    Attributes:
        prompt_ids: the P prompts' token ids.
        response_ids: (P, n) token lists, each ending with the stop token if it stopped.
        texts: (P, n) the responses as text, without the stop token.
        rewards: (P, n) float tensor once scored (``rl_loop`` scores them), else None.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    texts: list[list[str]]
    rewards: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(P, n)."""
        return len(self.texts), len(self.texts[0]) if self.texts else 0

    def pairs(self) -> tuple[list[list[int]], list[list[int]]]:
        """``(prompt_ids, response_ids)``, P * n of each, row by row: ``sequence_logprobs``'s input."""
        n = self.shape[1]
        prompts = [p for p in self.prompt_ids for _ in range(n)]
        return prompts, [r for row in self.response_ids for r in row]


def sample_responses(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    n: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 40,
    seed: int = 0,
    stop: str | None = "\n",
) -> Rollouts:
    """``n`` sampled responses to each prompt, batched.

    Prompts of one length in tokens are sampled together (``generate`` takes rows of
    one length), each repeated ``n`` times, with a seed drawn from ``seed`` and the
    group, so the same call gives the same responses. A response ends after its
    first ``stop`` token (the assistant's newline; None: always ``max_new_tokens``).
    ``temperature=1`` samples the policy itself, what the policy gradient assumes.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; wrap a single prompt in a list")
    if not prompts:
        raise ValueError("no prompts to sample responses for")
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    stops = [] if stop is None else tokenizer.encode(stop)
    if stop is not None and len(stops) != 1:
        raise ValueError(f"the stop text {stop!r} must encode to exactly one token")
    encoded = [tokenizer.encode(p) for p in prompts]
    block = model.config.block_size
    for ids in encoded:
        if not ids or len(ids) + max_new_tokens - 1 > block:
            raise ValueError(
                f"a prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} does not "
                f"fit the model's context (block_size={block}); every prompt needs a token"
            )
    device = model.device
    responses: list[list[list[int]]] = [[] for _ in prompts]
    texts: list[list[str]] = [[] for _ in prompts]
    for g, (length, rows) in enumerate(same_length_rows(encoded).items()):
        idx = torch.tensor([encoded[i] for i in rows for _ in range(n)], device=device)
        group_seed = random.Random(f"{seed}/{g}").getrandbits(62)
        out = generate(
            model, idx, max_new_tokens, temperature=temperature, stop_tokens=stops, seed=group_seed
        )[:, length:].tolist()
        for k, i in enumerate(rows):
            for ids in out[k * n : (k + 1) * n]:
                stopped = bool(stops) and stops[0] in ids
                ids = ids[: ids.index(stops[0]) + 1] if stopped else ids
                responses[i].append(ids)
                texts[i].append(tokenizer.decode(ids[:-1] if stopped else ids))
    return Rollouts(encoded, responses, texts)


def task_reward(example: TaskExample, response: str) -> float:
    """RLVR's reward: 1.0 when ``minigpt.tasks.check`` accepts the response, else 0.0."""
    return float(check(example, response))


def group_advantages(rewards: Tensor, normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """(P, n) rewards of n responses per prompt -> (P, n) advantages.

    Each reward minus the mean of its group (the same prompt's n responses, a
    baseline that needs no value network), divided by the group's standard deviation
    (population std, ``correction=0``) plus ``eps`` when ``normalize``. ``eps`` keeps
    a group whose rewards are all equal at 0 / eps = 0 instead of 0 / 0: it teaches
    nothing, rightly.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 2 or not rewards.numel():
        got = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a non-empty (P, n) tensor, got {got}")
    if rewards.shape[1] < 2:
        raise ValueError(
            f"a group baseline needs n >= 2 responses per prompt, got n={rewards.shape[1]}"
        )
    rewards = rewards.float()
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize:
        advantages = advantages / (rewards.std(dim=1, correction=0, keepdim=True) + eps)
    return advantages


KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp_policy: Tensor, logp_ref: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimates of KL(policy || ref) at tokens sampled from the policy.

    With log r = logp_ref - logp_policy at each sampled token (Schulman,
    "Approximating KL divergence", 2020): ``k1`` = -log r, unbiased but often
    negative and noisy; ``k2`` = (log r)^2 / 2, biased, low variance; ``k3`` =
    (r - 1) - log r, unbiased (E_policy[r] = 1) and never negative. Their mean over
    tokens drawn from the policy estimates the KL; summed over a response's tokens,
    the KL of the whole sequence. Returns a tensor of the inputs' shape.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    if not isinstance(logp_policy, Tensor) or not isinstance(logp_ref, Tensor):
        raise TypeError("logp_policy and logp_ref must be tensors of log-probabilities")
    if logp_policy.shape != logp_ref.shape:
        raise ValueError(
            f"logp_policy {tuple(logp_policy.shape)} and logp_ref {tuple(logp_ref.shape)} differ"
        )
    log_r = logp_ref - logp_policy
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    return torch.expm1(log_r) - log_r


def policy_gradient_step(
    policy: GPT,
    ref: GPT,
    optimizer: torch.optim.Optimizer,
    batch: Rollouts,
    advantages: Tensor,
    kl_coef: float = 0.05,
    *,
    kl_kind: str = "k3",
    grad_clip: float = 1.0,
) -> dict[str, float]:
    """One REINFORCE step with a baseline and a KL penalty to the reference.

    Over the B = P * n responses y_i, with A_i their (P, n) ``advantages`` and
    k1_i = log pi(y_i) - log pi_ref(y_i) (stop-gradient), the loss is
        -mean_i[A_i log pi(y_i)] + kl_coef * mean_i[k1_i log pi(y_i)],
    whose gradient is the policy gradient of E[A] - kl_coef KL(pi || pi_ref): the
    KL's gradient is E_pi[k1 grad log pi], exact in expectation. (Differentiating an
    estimate of the KL instead is not: k1's mean has zero expected gradient with
    the samples fixed, and k3's follows the reverse KL(pi_ref || pi) token by token.)
    The policy scores in eval mode (no dropout, as it sampled); ``ref`` scores as it is
    (keep it in eval mode) and is not changed.

    Returns:
        ``{"loss", "reward", "kl"}``: the loss, the mean of ``batch.rewards`` (nan when
        unscored) and the mean over responses of the summed ``kl_kind`` estimate.
    """
    P, n = batch.shape
    if not P or not n:
        raise ValueError("empty batch: sample responses first (sample_responses)")
    if not isinstance(advantages, Tensor) or advantages.shape != (P, n):
        got = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages)
        raise ValueError(f"advantages must have the rollouts' shape ({P}, {n}), got {got}")
    if not isinstance(kl_coef, (int, float)) or not kl_coef >= 0:
        raise ValueError(f"kl_coef must be a number >= 0, got {kl_coef!r}")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}, got {kl_kind!r}")
    prompts, responses = batch.pairs()
    was_training = policy.training
    policy.eval()
    try:
        logp, mask = response_logprobs(policy, prompts, responses)  # (B, T)
        with torch.no_grad():
            ref_logp, _ = response_logprobs(ref, prompts, responses)
        seq = logp.sum(dim=1)  # (B,) log pi(y_i)
        k1 = (logp - ref_logp).detach().sum(dim=1)  # (B,); both are 0 off the response
        loss = -(advantages.reshape(-1).to(seq) * seq).mean() + kl_coef * (k1 * seq).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            clip_grad_norm([p for p in policy.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
    finally:
        policy.train(was_training)
    kl = (kl_estimate(logp.detach(), ref_logp, kl_kind) * mask).sum(dim=1).mean()
    reward = float("nan") if batch.rewards is None else batch.rewards.float().mean().item()
    return {"loss": loss.item(), "reward": reward, "kl": kl.item()}


@dataclass
class RLConfig(OptimConfig):
    """Settings of ``rl_loop``: ``OptimConfig``'s (``max_steps``, ``lr``, the schedule,
    ``grad_clip``, ``time_limit``, ``seed``; ``batch_size`` is prompts per step), and:

    Attributes:
        group_size: responses sampled per prompt, n >= 2 (the group baseline).
        temperature, max_new_tokens: the sampling (``sample_responses``).
        kl_coef: weight of the KL penalty to the reference.
        kl_kind: the estimator logged as ``kl`` (``kl_estimate``).
        normalize: divide the advantages by the group's std (``group_advantages``).
    """

    max_steps: int = 50
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    eval_interval: int = 0
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 40
    kl_coef: float = 0.05
    kl_kind: str = "k3"
    normalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "group_size", 2)
        check_int(self, "max_new_tokens", 1)
        check_number(self, "temperature", 0, above=True)
        check_number(self, "kl_coef", 0)
        check_bool(self, "normalize")
        if self.kl_kind not in KL_KINDS:
            raise ValueError(f"RLConfig.kl_kind must be one of {KL_KINDS}, got {self.kl_kind!r}")


def rl_loop(
    policy: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[Any],
    reward_fn: Callable[[Any, str], float],
    config: RLConfig | None = None,
    ref: GPT | None = None,
    prompt_fn: Callable[[Any], str] = task_prompt,
) -> History:
    """Policy-gradient training: RLHF with a reward model, RLVR with a checker.

    Each step takes ``batch_size`` examples (shuffled epochs), samples
    ``group_size`` responses to ``prompt_fn(example)``, scores each with
    ``reward_fn(example, response_text)`` (``task_reward`` for RLVR; for RLHF, e.g.
    ``lambda ex, text: reward_model.score(encode, [task_prompt(ex) + text]).item()``),
    and takes a ``policy_gradient_step`` with ``group_advantages``. ``ref`` defaults
    to a frozen copy of ``policy`` as it starts (the SFT model). Deterministic for a
    seed. Returns ``{"step", "reward", "kl", "loss"}`` lists, one entry per step.
    """
    cfg = config or RLConfig()
    if not examples:
        raise ValueError("no examples to make prompts from")
    if ref is None:
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = configure_optimizer(
        policy, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    rng = random.Random(cfg.seed)
    order: list[int] = []
    history: History = {"step": [], "reward": [], "kl": [], "loss": []}
    start = time.perf_counter()
    for step in range(cfg.max_steps):
        elapsed = time.perf_counter() - start
        if cfg.time_limit is not None and elapsed > cfg.time_limit:
            break
        batch = []
        for _ in range(cfg.batch_size):
            if not order:
                order = rng.sample(range(len(examples)), len(examples))
            batch.append(examples[order.pop()])
        fraction = None if cfg.time_limit is None else elapsed / cfg.time_limit
        set_lr(opt, cfg.lr_at(step, fraction))
        prompts = [prompt_fn(e) for e in batch]
        rollouts = sample_responses(
            policy,
            tokenizer,
            prompts,
            cfg.group_size,
            cfg.temperature,
            cfg.max_new_tokens,
            seed=rng.getrandbits(62),
        )
        rollouts.rewards = torch.tensor(
            [[float(reward_fn(e, t)) for t in row] for e, row in zip(batch, rollouts.texts)]
        )
        advantages = group_advantages(rollouts.rewards, cfg.normalize)
        stats = policy_gradient_step(
            policy,
            ref,
            opt,
            rollouts,
            advantages,
            cfg.kl_coef,
            kl_kind=cfg.kl_kind,
            grad_clip=cfg.grad_clip,
        )
        history["step"].append(step)
        for key, value in stats.items():
            history[key].append(value)
    return history
