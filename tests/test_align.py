"""Tests for minigpt.align: log-probs, DPO, group advantages, KL estimators, policy gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minigpt import GPT, CharTokenizer, GPTConfig
from minigpt.align import (
    RLConfig,
    Rollouts,
    dpo_loss,
    group_advantages,
    kl_estimate,
    policy_gradient_step,
    response_logprobs,
    rl_loop,
    sample_responses,
    sequence_logprobs,
    task_reward,
    train_dpo,
)
from minigpt.finetune import FinetuneConfig
from minigpt.preference import PreferenceExample
from minigpt.tasks import TaskExample, write_response

TOKENIZER = CharTokenizer("abcdx\n")  # a: 0, b: 1, c: 2, d: 3, x: 4, newline: 5


def tiny_gpt(seed: int = 0, vocab_size: int = 6) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))


# ---------------------------------------------------------------- log-probabilities


def test_sequence_logprobs_match_a_token_by_token_loop():
    model = tiny_gpt(vocab_size=20)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    responses = [[10, 11], [12, 13, 14, 15], [16]]
    got = sequence_logprobs(model, prompts, responses)
    assert got.shape == (3,)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        brute = 0.0
        for t in range(len(r)):  # log p(r_t | prompt, r_<t), one forward pass each
            logits, _ = model(torch.tensor([p + r[:t]]))
            brute += F.log_softmax(logits[0, -1], dim=-1)[r[t]].item()
        assert got[i].item() == pytest.approx(brute, abs=1e-5)
    per_token, mask = response_logprobs(model, prompts, responses)
    assert per_token.shape == mask.shape == (3, 5)  # inputs: all but the last of 6 tokens
    assert mask.sum(dim=1).tolist() == [2, 4, 1]
    assert (per_token[~mask] == 0).all()


def test_sequence_logprobs_reject_bad_batches():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="empty batch"):
        sequence_logprobs(model, [], [])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        sequence_logprobs(model, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="at least one token"):
        sequence_logprobs(model, [[1]], [[]])
    with pytest.raises(ValueError, match="does not fit the model's context"):
        sequence_logprobs(model, [[1] * 60], [[2] * 10])


# ---------------------------------------------------------------- DPO


def test_dpo_loss_by_hand():
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0, -3.0]),  # policy, chosen
        torch.tensor([-2.0, -1.0]),  # policy, rejected
        torch.tensor([-1.5, -2.0]),  # reference, chosen
        torch.tensor([-1.5, -2.0]),  # reference, rejected
        beta=0.5,
    )
    # pair 1: 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5 -> -log sigmoid(0.5) = 0.4740770
    # pair 2: 0.5 * ((-3 + 2) - (-1 + 2)) = -1 -> -log sigmoid(-1) = 1.3132617
    assert loss.item() == pytest.approx((0.4740769841801067 + 1.3132616875182228) / 2)
    torch.testing.assert_close(chosen, torch.tensor([0.25, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25, 0.5]))


def test_a_dpo_step_raises_the_chosen_log_prob_over_the_rejected():
    policy = tiny_gpt()
    ref = copy.deepcopy(policy)
    prompts, chosen, rejected = [[0, 1], [2, 3, 0]], [[4, 4], [1, 5]], [[3, 2], [2, 5]]

    def margin() -> float:
        with torch.no_grad():
            return (
                (
                    sequence_logprobs(policy, prompts, chosen)
                    - sequence_logprobs(policy, prompts, rejected)
                )
                .mean()
                .item()
            )

    before = margin()
    with torch.no_grad():
        ref_c, ref_r = (
            sequence_logprobs(ref, prompts, chosen),
            sequence_logprobs(ref, prompts, rejected),
        )
    pol_c, pol_r = (
        sequence_logprobs(policy, prompts, chosen),
        sequence_logprobs(policy, prompts, rejected),
    )
    loss, _, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))  # policy = reference: every margin 0
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss.backward()
    opt.step()
    assert margin() > before + 0.01


def test_dpo_loss_rejects_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(x, x, x, torch.zeros(2))
    with pytest.raises(ValueError, match="non-empty"):
        dpo_loss(*[torch.zeros(0)] * 4)
    with pytest.raises(TypeError, match="tensors"):
        dpo_loss(x, x, x, [0.0, 0.0, 0.0])


PAIRS = [
    PreferenceExample("Say yes.", "", "yes", "yes", "no"),
    PreferenceExample("Say it.", "", "yes", "yes", "nope"),
]
PROMPT_TOKENIZER = CharTokenizer(sorted(set("".join(p.prompt() for p in PAIRS) + "yesnop\n")))


def _margin(policy: GPT, pairs=PAIRS) -> tuple[float, float]:
    """Mean log p(chosen) and log p(rejected) over the pairs, with the stop newline."""
    enc = PROMPT_TOKENIZER.encode
    prompts = [enc(p.prompt()) for p in pairs]
    with torch.no_grad():
        c = sequence_logprobs(policy, prompts, [enc(p.chosen + "\n") for p in pairs])
        r = sequence_logprobs(policy, prompts, [enc(p.rejected + "\n") for p in pairs])
    return c.mean().item(), r.mean().item()


def test_train_dpo_raises_the_chosen_over_the_rejected_and_keeps_the_reference():
    policy = tiny_gpt(vocab_size=PROMPT_TOKENIZER.vocab_size)
    ref = copy.deepcopy(policy)
    ref_weights = copy.deepcopy(ref.state_dict())
    c0, r0 = _margin(policy)
    cfg = FinetuneConfig(max_steps=15, batch_size=2, lr=3e-3, warmup_steps=0)
    history = train_dpo(policy, PROMPT_TOKENIZER, PAIRS, cfg, beta=0.1, ref=ref)
    c1, r1 = _margin(policy)
    assert (c1 - r1) > (c0 - r0) + 1.0
    assert set(history) >= {"step", "loss", "margin", "chosen_logp", "rejected_logp"}
    assert len(history["margin"]) == len(history["loss"]) == 15
    assert history["loss"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert history["margin"][0] == pytest.approx(0.0, abs=1e-6)
    assert history["chosen_logp"][0] == pytest.approx(c0, abs=1e-4)
    assert history["loss"][-1] < history["loss"][0] and history["margin"][-1] > 0.05
    assert all(p.requires_grad for p in ref.parameters())  # the caller's model is left as it was
    for k, v in ref.state_dict().items():  # the reference did not move
        torch.testing.assert_close(v, ref_weights[k])


def test_train_dpo_with_nll_makes_the_chosen_likely_itself():
    cfg = FinetuneConfig(max_steps=15, batch_size=2, lr=3e-3, warmup_steps=0)
    chosen = []
    for weight in (0.0, 3.0):
        policy = tiny_gpt(vocab_size=PROMPT_TOKENIZER.vocab_size)
        train_dpo(policy, PROMPT_TOKENIZER, PAIRS, cfg, beta=0.1, nll_weight=weight)
        chosen.append(_margin(policy)[0])
    assert chosen[1] > chosen[0] + 0.5


def test_train_dpo_rejects_bad_arguments():
    policy = tiny_gpt(vocab_size=PROMPT_TOKENIZER.vocab_size)
    with pytest.raises(ValueError, match="no preference pairs"):
        train_dpo(policy, PROMPT_TOKENIZER, [])
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        train_dpo(policy, PROMPT_TOKENIZER, PAIRS, beta=0)
    with pytest.raises(ValueError, match="nll_weight must be a number >= 0"):
        train_dpo(policy, PROMPT_TOKENIZER, PAIRS, nll_weight=-1)
    long = [PreferenceExample("y" * 80, "", "", "yes", "no")]
    with pytest.raises(ValueError, match="no pair fits the model's context"):
        train_dpo(policy, PROMPT_TOKENIZER, long)


# ---------------------------------------------------------------- advantages and KL


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    centred = group_advantages(rewards, normalize=False)
    expected = [[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(centred, torch.tensor(expected))
    scaled = group_advantages(rewards)
    # stds (population): 0.5, sqrt(6.75 / 4) = 1.2990381, 0
    third = 1 / math.sqrt(3)  # 0.75 / 1.2990381
    expected = [[1.0, -1.0, -1.0, 1.0], [-third, -third, -third, 3 * third], [0.0] * 4]
    torch.testing.assert_close(scaled, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_group_advantages_need_groups():
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"\(P, n\)"):
        group_advantages(torch.ones(4))


def test_kl_estimators_against_the_exact_kl_of_two_categoricals():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.25, 0.25, 0.3, 0.2])
    exact = (p * (p / q).log()).sum().item()  # KL(p || q) = 0.1311...
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[x], q.log()[x]  # samples of the policy p
    k1, k2, k3 = (kl_estimate(logp, logq, kind) for kind in ("k1", "k2", "k3"))
    assert k1.mean().item() == pytest.approx(exact, abs=0.005)
    assert k3.mean().item() == pytest.approx(exact, abs=0.005)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k3 is never negative, k1 often is
    assert k3.var() < k1.var()
    assert k2.mean().item() == pytest.approx(0.5 * ((p / q).log() ** 2 * p).sum().item(), rel=0.02)
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_estimate(logp, logq, "k4")
    with pytest.raises(ValueError, match="differ"):
        kl_estimate(logp, logq[:5])


# ---------------------------------------------------------------- sampling and the policy gradient


def test_sample_responses_are_groups_that_stop_at_the_newline():
    model = tiny_gpt()
    prompts = ["ab", "c", "da"]
    out = sample_responses(model, TOKENIZER, prompts, n=3, max_new_tokens=8, seed=1)
    assert out.shape == (3, 3) and out.rewards is None
    assert out.prompt_ids == [TOKENIZER.encode(p) for p in prompts]
    for ids_row, text_row in zip(out.response_ids, out.texts, strict=True):
        for ids, text in zip(ids_row, text_row, strict=True):
            newline = TOKENIZER.encode("\n")[0]
            assert 1 <= len(ids) <= 8 and newline not in ids[:-1]
            assert TOKENIZER.decode(ids) == text + ("\n" if ids[-1] == newline else "")
    again = sample_responses(model, TOKENIZER, prompts, n=3, max_new_tokens=8, seed=1)
    assert again.response_ids == out.response_ids
    other = sample_responses(model, TOKENIZER, prompts, n=3, max_new_tokens=8, seed=2)
    assert other.response_ids != out.response_ids
    prompt_ids, response_ids = out.pairs()
    assert (
        prompt_ids[:3] == [TOKENIZER.encode("ab")] * 3 and response_ids[3] == out.response_ids[1][0]
    )


def test_sample_responses_reject_bad_arguments():
    model = tiny_gpt()
    with pytest.raises(TypeError, match="list of strings"):
        sample_responses(model, TOKENIZER, "ab")
    with pytest.raises(ValueError, match="no prompts"):
        sample_responses(model, TOKENIZER, [])
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_responses(model, TOKENIZER, ["a"], n=0)
    with pytest.raises(ValueError, match="does not fit"):
        sample_responses(model, TOKENIZER, ["a" * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="exactly one token"):
        sample_responses(model, TOKENIZER, ["a"], stop="ab")


def _p_of_x(model: GPT) -> float:
    """The exact expected reward of the bandit: p(x | "a")."""
    with torch.no_grad():
        return F.softmax(model(torch.tensor([[0]]))[0][0, -1], dim=-1)[4].item()


def test_policy_gradient_raises_the_expected_reward_of_a_bandit():
    policy = tiny_gpt()
    start = _p_of_x(policy)
    cfg = RLConfig(
        max_steps=20, batch_size=2, group_size=8, lr=1e-2, max_new_tokens=1, kl_coef=0.05
    )
    reward = lambda prompt, text: float(text == "x")
    history = rl_loop(policy, TOKENIZER, ["a"], reward, cfg, prompt_fn=lambda e: e)
    assert history["step"] == list(range(20))
    assert _p_of_x(policy) > start + 0.5
    assert sum(history["reward"][-5:]) / 5 > sum(history["reward"][:5]) / 5 + 0.3
    assert history["kl"][0] == pytest.approx(0.0, abs=1e-6)  # policy = reference at first
    assert 0 < history["kl"][-1] < 10 and all(math.isfinite(v) for v in history["loss"])
    again = tiny_gpt()
    assert rl_loop(again, TOKENIZER, ["a"], reward, cfg, prompt_fn=lambda e: e) == history


def test_the_kl_penalty_holds_the_policy_near_the_reference():
    cfg = dict(max_steps=15, batch_size=2, group_size=8, lr=1e-2, max_new_tokens=1)
    reward = lambda prompt, text: float(text == "x")
    kls = []
    for kl_coef in (0.0, 2.0):
        policy = tiny_gpt()
        history = rl_loop(
            policy,
            TOKENIZER,
            ["a"],
            reward,
            RLConfig(**cfg, kl_coef=kl_coef),
            prompt_fn=lambda e: e,
        )
        kls.append(history["kl"][-1])
    assert kls[1] < kls[0] / 2


def test_policy_gradient_step_reports_loss_reward_and_kl():
    policy, ref = tiny_gpt(), tiny_gpt(seed=1)
    batch = sample_responses(policy, TOKENIZER, ["ab", "c"], n=2, max_new_tokens=4, seed=0)
    batch.rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # no change: check the numbers
    stats = policy_gradient_step(policy, ref, opt, batch, group_advantages(batch.rewards), 0.1)
    assert set(stats) == {"loss", "reward", "kl"} and stats["reward"] == 0.25
    prompts, responses = batch.pairs()
    with torch.no_grad():
        lp, mask = response_logprobs(policy, prompts, responses)
        lq, _ = response_logprobs(ref, prompts, responses)
    k3 = ((lq - lp).exp() - 1 - (lq - lp))[mask]  # the exact estimator, summed per response
    per_response = torch.zeros(4).index_add_(0, mask.nonzero()[:, 0], k3)
    assert stats["kl"] == pytest.approx(per_response.mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        policy_gradient_step(policy, ref, opt, batch, torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="kl_coef must be a number >= 0"):
        policy_gradient_step(policy, ref, opt, batch, torch.zeros(2, 2), -1.0)
    with pytest.raises(ValueError, match="empty batch"):
        policy_gradient_step(policy, ref, opt, Rollouts([], [], []), torch.zeros(0, 0), 0.1)


def test_rl_config_and_loop_check_their_settings():
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        RLConfig(group_size=1)
    with pytest.raises(ValueError, match="kl_kind"):
        RLConfig(kl_kind="k9")
    with pytest.raises(ValueError, match="no examples"):
        rl_loop(tiny_gpt(), TOKENIZER, [], lambda e, t: 0.0)


def test_task_reward_is_the_checker():
    ex = TaskExample("uppercase", 'Write "night" in capital letters.', "NIGHT", ("night",))
    assert task_reward(ex, write_response(ex, "polite")) == 1.0
    assert task_reward(ex, write_response(ex, correct=False)) == 0.0
