"""Chapter 08 exercises: from model to assistant (the Bradley-Terry loss, the DPO loss,
the chat template's loss mask, a KL estimate, and advantages with a group baseline); an
experiment (the k1 and k3 estimates of a KL from a few samples) and a conceptual question
(why RLHF keeps a KL penalty to the SFT model).

The three questions on the KL penalty, q4, q6 and q7, are in ``ch08_kl``; they are read
from here like the others (``ch08.q6`` is ``ch08_kl.q6``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minigpt import align, chat, preference
from minigpt.exercises.ch08_kl import q4, q6, q7
from minigpt.exercises.core import Incorrect, Question, call, close, number, tensor
from minigpt.exercises.shortcuts import Shortcut, forbid

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]


def _scalar(got, what: str) -> float:
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            raise Incorrect(f"{what}: return one number (the mean), got shape {tuple(got.shape)}")
        got = got.item()
    return number(got, what)


# ---------------------------------------------------------------- q1: Bradley-Terry


def _bradley_terry(r_chosen, r_rejected):
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class BradleyTerryLoss(Question):
    name = "q1"
    _hint = (
        "p(chosen > rejected) = sigmoid(r_chosen - r_rejected); the loss is the mean of "
        "its negative log. log(sigmoid(x)) overflows to -inf for a margin of -1000: "
        "F.logsigmoid(x) computes the same thing without it."
    )
    _solution = """
def bradley_terry_loss(r_chosen, r_rejected):
    margin = r_chosen - r_rejected  # (B,)
    return -F.logsigmoid(margin).mean()
"""
    shortcuts = (
        Shortcut(
            "minigpt.preference",
            "compute -log sigmoid(r_chosen - r_rejected) yourself and average it",
            (preference,),
        ),
    )

    def _check(self, fn):
        cases = [
            (torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])),
            (torch.tensor([3.0]), torch.tensor([-1.0])),
            (torch.tensor([0.0, -1000.0]), torch.tensor([0.0, 0.0])),  # a very wrong pair
        ]
        for chosen, rejected in cases:
            with forbid(*self.shortcuts):
                got = call(fn, chosen, rejected)
            what = f"bradley_terry_loss({chosen.tolist()}, {rejected.tolist()})"
            value = _scalar(got, what)
            want = _bradley_terry(chosen, rejected).item()
            if abs(value - want) > 1e-4 * max(1.0, abs(want)):
                if value == float("inf"):
                    raise Incorrect(f"{what} is inf: a margin of -1000 must cost 1000 (logsigmoid)")
                raise Incorrect(f"{what} should be {want:.6f}, got {value:.6f}")

    def reference(self):
        return _bradley_terry

    def wrong_answers(self):
        def unstable(c, r):
            return -torch.log(torch.sigmoid(c - r)).mean()

        def reversed_margin(c, r):
            return -F.logsigmoid(r - c).mean()

        def summed(c, r):
            return -F.logsigmoid(c - r).sum()

        def no_log(c, r):
            return (1 - torch.sigmoid(c - r)).mean()

        return [unstable, reversed_margin, summed, no_log]


# ---------------------------------------------------------------- q2: DPO


def _dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean()


class DPOLoss(Question):
    name = "q2"
    _hint = (
        "The implicit reward of a response is beta * (log pi(y) - log pi_ref(y)). Put the "
        "chosen and rejected implicit rewards into the Bradley-Terry loss: the mean of "
        "-logsigmoid(reward_chosen - reward_rejected)."
    )
    _solution = """
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen = beta * (policy_chosen - ref_chosen)  # (B,) implicit rewards
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean()
"""
    shortcuts = (
        Shortcut(
            "minigpt.align.dpo_loss",
            "write the implicit rewards beta * (log pi - log pi_ref) and the loss yourself",
            (align.dpo_loss,),
        ),
    )

    def _check(self, fn):
        g = torch.Generator().manual_seed(8)
        cases = [
            ((-1.0, -3.0), (-2.0, -1.0), (-1.5, -2.0), (-1.5, -2.0), 0.5),
            (*(tuple((-5 * torch.rand(4, generator=g)).tolist()) for _ in range(4)), 0.1),
            ((-10.0,), (-2.0,), (-12.0,), (-1.0,), 2.0),
        ]
        for *logps, beta in cases:
            tensors = [torch.tensor(x) for x in logps]
            with forbid(*self.shortcuts):
                got = call(fn, *tensors, beta)
            what = f"dpo_loss(..., beta={beta}) on {[list(x) for x in logps]}"
            value = _scalar(got, what)
            want = _dpo(*tensors, beta).item()
            if abs(value - want) > 1e-4 * max(1.0, abs(want)):
                raise Incorrect(f"{what} should be {want:.6f}, got {value:.6f}")

    def reference(self):
        return _dpo

    def wrong_answers(self):
        def no_reference(pc, pr, rc, rr, beta):
            return -F.logsigmoid(beta * (pc - pr)).mean()

        def no_beta(pc, pr, rc, rr, beta):
            return -F.logsigmoid((pc - rc) - (pr - rr)).mean()

        def reference_flipped(pc, pr, rc, rr, beta):
            return -F.logsigmoid(beta * ((rc - pc) - (rr - pr))).mean()

        def swaps_pairs(pc, pr, rc, rr, beta):  # the chosen's reference on the rejected side
            return -F.logsigmoid(beta * ((pc - rr) - (pr - rc))).mean()

        return [no_reference, no_beta, reference_flipped, swaps_pairs]


# ---------------------------------------------------------------- q3: the chat loss mask


def _loss_mask(turns):
    mask = []
    for role, content in turns:
        mask += [False] + [role == "assistant"] * (len(content) + 1)
    return mask


class ChatLossMask(Question):
    name = "q3"
    _hint = (
        "Each turn is [role marker] + content + [end marker]: 1 + len(content) + 1 "
        "tokens. The marker that opens a turn is always False (the template writes it); "
        "the content and the end marker are True only in an assistant turn."
    )
    _solution = """
def chat_loss_mask(turns):
    mask = []
    for role, content in turns:
        is_assistant = role == "assistant"
        mask += [False] + [is_assistant] * len(content) + [is_assistant]  # marker, words, end
    return mask
"""
    shortcuts = (
        Shortcut(
            "minigpt.chat",
            "walk the turns yourself: False for each opening marker, and the content and "
            "end marker True only in assistant turns",
            (chat,),
        ),
    )

    _CASES = [
        [("user", [5, 6]), ("assistant", [7])],
        [
            ("system", [1]),
            ("user", [2, 3, 4]),
            ("assistant", [5, 6]),
            ("user", [7]),
            ("assistant", [8, 9, 10]),
        ],
        [("user", []), ("assistant", [])],
    ]

    def _check(self, fn):
        for turns in self._CASES:
            with forbid(*self.shortcuts):
                got = call(fn, [(r, list(c)) for r, c in turns])
            if not isinstance(got, (list, tuple)) or not all(
                isinstance(m, bool) or (isinstance(m, int) and m in (0, 1)) for m in got
            ):
                raise Incorrect("return a list of True/False, one per token")
            got = [bool(m) for m in got]
            want = _loss_mask(turns)
            what = f"chat_loss_mask({turns})"
            if len(got) != len(want):
                raise Incorrect(
                    f"{what}: {len(want)} tokens (each turn is marker + content + end), "
                    f"got {len(got)} entries"
                )
            if got != want:
                raise Incorrect(f"{what} should be {want}, got {got}")

    def reference(self):
        return _loss_mask

    def wrong_answers(self):
        def with_opening_marker(turns):
            out = []
            for role, content in turns:
                out += [role == "assistant"] * (len(content) + 2)
            return out

        def without_end(turns):
            out = []
            for role, content in turns:
                out += [False] + [role == "assistant"] * len(content) + [False]
            return out

        def every_reply_but_the_system(turns):
            out = []
            for role, content in turns:
                out += [False] + [role != "system"] * (len(content) + 1)
            return out

        def last_turn_only(turns):
            out = []
            for k, (_role, content) in enumerate(turns):
                out += [False] + [k == len(turns) - 1] * (len(content) + 1)
            return out

        return [with_opening_marker, without_end, every_reply_but_the_system, last_turn_only]


# ---------------------------------------------------------------- q5: group advantages


def _advantages(rewards, eps=1e-6):
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, correction=0, keepdim=True) + eps)


class GroupAdvantages(Question):
    name = "q5"
    _hint = (
        "Row p holds the rewards of n responses to prompt p. Subtract each row's mean "
        "(keepdim=True), then divide by the row's population std (correction=0) plus eps, "
        "so a row whose rewards are all equal gives 0, not 0 / 0."
    )
    _solution = """
def group_advantages(rewards, eps=1e-6):
    rewards = rewards.float()  # (P, n)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, correction=0, keepdim=True) + eps)
"""
    shortcuts = (
        Shortcut(
            "minigpt.align.group_advantages",
            "subtract each row's mean and divide by its std (correction=0) plus eps yourself",
            (align.group_advantages,),
        ),
    )

    def _check(self, fn):
        rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
        with forbid(*self.shortcuts):
            got = tensor(call(fn, rewards), "group_advantages(rewards)")
        if tuple(got.shape) != (3, 4):
            raise Incorrect(
                f"return one advantage per response, shape (3, 4), got {tuple(got.shape)}"
            )
        if not torch.isfinite(got).all():
            raise Incorrect("a group whose rewards are all equal must give 0, not nan: add eps")
        if got[1].abs().max() > 1e-4:
            raise Incorrect("a group of equal rewards teaches nothing: its advantages must be 0")
        close(got, _advantages(rewards), atol=1e-4, what="group_advantages(rewards)")

    def reference(self):
        return _advantages

    def wrong_answers(self):
        def batch_mean(rewards, eps=1e-6):
            return (rewards - rewards.mean()) / (rewards.std(correction=0) + eps)

        def sample_std(rewards, eps=1e-6):
            centred = rewards - rewards.mean(dim=1, keepdim=True)
            return centred / (rewards.std(dim=1, keepdim=True) + eps)

        def no_eps(rewards, eps=1e-6):
            centred = rewards - rewards.mean(dim=1, keepdim=True)
            return centred / rewards.std(dim=1, correction=0, keepdim=True)

        def centred_only(rewards, eps=1e-6):
            return rewards - rewards.mean(dim=1, keepdim=True)

        return [batch_mean, sample_std, no_eps, centred_only]


q1 = BradleyTerryLoss()
q2 = DPOLoss()
q3 = ChatLossMask()
q5 = GroupAdvantages()
