"""Chapter 07 exercises: fine-tuning (classification head, loss masking, LoRA, scoring a
label, checking a task's answer, and the masked training row of a task), an experiment
(how much of a task's row the loss scores) and a conceptual question (why mask the prompt).

q7 and q8, the two questions on the instruction tasks, are in ``ch07_tasks``; they are
read from here like the others (``ch07.q7`` is ``ch07_tasks.q7``).
"""

from __future__ import annotations

import torch

from minigpt import tasks
from minigpt.exercises.ch07_tasks import q7, q8
from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    close,
    ints,
    number,
    tensor,
)

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8", "q9", "q10"]


class LastTokenStates(Question):
    name = "q1"
    _hint = (
        "Row b's last real token sits at position lengths[b] - 1. Index the batch and "
        "time dimensions together: hidden[torch.arange(B), lengths - 1]."
    )
    _solution = """
def last_token_states(hidden, lengths):
    B = hidden.shape[0]
    return hidden[torch.arange(B), lengths - 1]  # (B, C)
"""

    def _check(self, fn):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(4, 6, 3, generator=g)
        lengths = torch.tensor([6, 2, 1, 4])
        got = call(fn, hidden, lengths)
        if not isinstance(got, torch.Tensor):
            raise Incorrect(f"expected a tensor, got {type(got).__name__}")
        if tuple(got.shape) != (4, 3):
            raise Incorrect(f"expected shape (B, C) = (4, 3), got {tuple(got.shape)}")
        expected = hidden[torch.arange(4), lengths - 1]
        for b in range(4):
            if torch.allclose(got[b], expected[b]):
                continue
            if lengths[b] < 6 and torch.allclose(got[b], hidden[b, -1]):
                raise Incorrect(
                    f"row {b} has {int(lengths[b])} real tokens but you read position -1, "
                    "a padding position"
                )
            raise Incorrect(f"row {b} should be hidden[{b}, {int(lengths[b]) - 1}]")

    def reference(self):
        return lambda hidden, lengths: hidden[torch.arange(hidden.shape[0]), lengths - 1]

    def wrong_answers(self):
        return [
            lambda hidden, lengths: hidden[:, -1],  # ignores padding
            lambda hidden, lengths: hidden[
                torch.arange(hidden.shape[0]), lengths.clamp(max=hidden.shape[1] - 1)
            ],  # off by one
            lambda hidden, lengths: hidden.mean(dim=1),  # mean pooling over padding too
        ]


class MaskedTargets(Question):
    name = "q2"
    _hint = (
        "inputs = seq[:-1], targets = seq[1:]. Target j predicts token j + 1, which is "
        "part of the prompt while j + 1 < n_prompt, so the first n_prompt - 1 targets "
        "become -100. Pad inputs with pad_id and targets with -100 up to length T."
    )
    _solution = """
def make_example(seq, n_prompt, T, pad_id=0):
    inputs, targets = list(seq[:-1]), list(seq[1:])
    targets[: n_prompt - 1] = [-100] * (n_prompt - 1)
    pad = T - len(inputs)
    return inputs + [pad_id] * pad, targets + [-100] * pad
"""

    @staticmethod
    def _reference(seq, n_prompt, T, pad_id=0):
        inputs, targets = list(seq[:-1]), list(seq[1:])
        targets[: n_prompt - 1] = [-100] * (n_prompt - 1)
        pad = T - len(inputs)
        return inputs + [pad_id] * pad, targets + [-100] * pad

    def _check(self, fn):
        cases = [([5, 6, 7, 8, 9], 3, 6, 0), ([1, 2, 3], 1, 2, 4), ([3, 4, 5, 6], 2, 5, 9)]
        for seq, n_prompt, T, pad_id in cases:
            got = call(fn, list(seq), n_prompt, T, pad_id)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise Incorrect("return a pair (inputs, targets)")
            inputs, targets = ints(got[0], "inputs"), ints(got[1], "targets")
            want_in, want_tg = self._reference(seq, n_prompt, T, pad_id)
            what = f"make_example({seq}, n_prompt={n_prompt}, T={T}, pad_id={pad_id})"
            if inputs != want_in:
                raise Incorrect(f"{what}: inputs should be {want_in}, got {inputs}")
            if targets != want_tg:
                raise Incorrect(f"{what}: targets should be {want_tg}, got {targets}")

    def reference(self):
        return self._reference

    def wrong_answers(self):
        def no_prompt_mask(seq, n_prompt, T, pad_id=0):
            inputs, targets = list(seq[:-1]), list(seq[1:])
            pad = T - len(inputs)
            return inputs + [pad_id] * pad, targets + [-100] * pad

        def off_by_one(seq, n_prompt, T, pad_id=0):
            inputs, targets = list(seq[:-1]), list(seq[1:])
            targets[:n_prompt] = [-100] * n_prompt  # also hides the first response token
            pad = T - len(inputs)
            return inputs + [pad_id] * pad, targets + [-100] * pad

        def pads_targets(seq, n_prompt, T, pad_id=0):
            inputs, targets = list(seq[:-1]), list(seq[1:])
            targets[: n_prompt - 1] = [-100] * (n_prompt - 1)
            pad = T - len(inputs)
            return inputs + [pad_id] * pad, targets + [pad_id] * pad  # trains on padding

        return [no_prompt_mask, off_by_one, pads_targets]


class LoRAForward(Question):
    name = "q3"
    _hint = (
        "The frozen path is x @ W.T + bias. The adapter path is x @ A.T @ B.T, scaled "
        "by alpha / r where r = A.shape[0]."
    )
    _solution = """
def lora_forward(x, W, bias, A, B, alpha):
    r = A.shape[0]
    return x @ W.T + bias + (alpha / r) * (x @ A.T @ B.T)
"""

    @staticmethod
    def _reference(x, W, bias, A, B, alpha):
        return x @ W.T + bias + (alpha / A.shape[0]) * (x @ A.T @ B.T)

    def _check(self, fn):
        g = torch.Generator().manual_seed(1)
        for n_in, n_out, r, alpha in ((5, 3, 2, 4.0), (4, 6, 1, 1.0)):
            x = torch.randn(2, 3, n_in, generator=g)
            W, bias = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)
            A, B = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
            got = call(fn, x, W, bias, A, B, alpha)
            close(got, self._reference(x, W, bias, A, B, alpha), what=f"output (rank {r})")
            zero = call(fn, x, W, bias, A, torch.zeros_like(B), alpha)
            close(zero, x @ W.T + bias, what="output with B = 0 (must equal the frozen layer)")

    def reference(self):
        return self._reference

    def wrong_answers(self):
        return [
            lambda x, W, bias, A, B, alpha: x @ W.T + bias + x @ A.T @ B.T,  # no scaling
            lambda x, W, bias, A, B, alpha: x @ W.T + bias + alpha * A.shape[0] * (x @ A.T @ B.T),
            lambda x, W, bias, A, B, alpha: x @ W.T + (alpha / A.shape[0]) * (x @ A.T @ B.T),
        ]


class MergeLoRA(Question):
    name = "q4"
    _hint = (
        "x A^T B^T = x (B A)^T, so the adapter is the matrix (alpha / r) B @ A of "
        "shape (out, in): add it to W."
    )
    _solution = """
def merge(W, A, B, alpha):
    r = A.shape[0]
    return W + (alpha / r) * (B @ A)
"""

    def _check(self, fn):
        g = torch.Generator().manual_seed(2)
        for n_in, n_out, r, alpha in ((6, 4, 2, 8.0), (5, 5, 3, 3.0)):
            W = torch.randn(n_out, n_in, generator=g)
            A, B = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
            got = tensor(call(fn, W, A, B, alpha), "the merged weight")
            close(got, W + (alpha / r) * (B @ A), what=f"merged weight ({n_out}x{n_in}, rank {r})")
            x = torch.randn(3, n_in, generator=g)
            close(
                x @ got.T,
                x @ W.T + (alpha / r) * (x @ A.T @ B.T),
                what="x @ merged.T (must equal the unmerged layer)",
            )

    def reference(self):
        return lambda W, A, B, alpha: W + (alpha / A.shape[0]) * (B @ A)

    def wrong_answers(self):
        return [
            lambda W, A, B, alpha: W + B @ A,  # forgets the scale
            lambda W, A, B, alpha: W + (alpha / A.shape[0]) * (B @ A).T.reshape(W.shape),
            lambda W, A, B, alpha: (alpha / A.shape[0]) * (B @ A),  # drops the pretrained W
        ]


class LoRACount(Question):
    name = "q5"
    _hint = "A is (r, in) and B is (out, r): r * (in + out) numbers per adapted layer."
    _solution = """
def lora_parameters(layers, rank):
    return sum(rank * (n_in + n_out) for n_in, n_out in layers)
"""

    def _check(self, fn):
        cases = [([(64, 192), (64, 64)], 4), ([(128, 512), (512, 128)], 8), ([(10, 10)], 1)]
        for layers, rank in cases:
            got = number(call(fn, layers, rank), "lora_parameters(...)", integer=True)
            want = sum(rank * (a + b) for a, b in layers)
            if got != want:
                raise Incorrect(
                    f"lora_parameters({layers}, rank={rank}) should be {want}, got {got}"
                )

    def reference(self):
        return lambda layers, rank: sum(rank * (a + b) for a, b in layers)

    def wrong_answers(self):
        return [
            lambda layers, rank: sum(a * b for a, b in layers),  # the frozen weights
            lambda layers, rank: sum(rank * a * b for a, b in layers),
            lambda layers, rank: sum(rank * (a + b) for a, b in layers[:1]),  # first layer only
        ]


def _text_log_likelihood(logp, idx, lengths):
    token = logp.gather(-1, idx[..., None]).squeeze(-1)  # (B, T)
    real = torch.arange(idx.shape[1])[None, :] < lengths[:, None]
    return (token * real).sum(dim=1)


class TextLogLikelihood(Question):
    name = "q6"
    _hint = (
        "logp[b, t] is the distribution over the token at position t (the model read the "
        "label and x_1 .. x_t-1), so pick logp[b, t, idx[b, t]] with gather on the last "
        "dim, zero the positions t >= lengths[b] (padding), and sum over t."
    )
    _solution = """
def text_log_likelihood(logp, idx, lengths):
    token = logp.gather(-1, idx[..., None]).squeeze(-1)  # log p(x_t | label, x_<t), (B, T)
    real = torch.arange(idx.shape[1])[None, :] < lengths[:, None]  # False at padding
    return (token * real).sum(dim=1)  # (B,)
"""

    def _check(self, fn):
        g = torch.Generator().manual_seed(0)
        logp = torch.log_softmax(torch.randn(3, 5, 7, generator=g), dim=-1)
        idx = torch.randint(0, 7, (3, 5), generator=g)
        lengths = torch.tensor([5, 2, 3])
        got = call(fn, logp, idx, lengths)
        if not isinstance(got, torch.Tensor):
            raise Incorrect(f"expected a tensor, got {type(got).__name__}")
        if tuple(got.shape) != (3,):
            raise Incorrect(
                f"expected one log-likelihood per text, shape (3,), got {tuple(got.shape)}"
            )
        want = _text_log_likelihood(logp, idx, lengths)
        for b in range(3):
            if torch.allclose(got[b], want[b], atol=1e-5):
                continue
            every = logp[b].gather(-1, idx[b, :, None]).sum()
            if torch.allclose(got[b], every, atol=1e-5):
                raise Incorrect(
                    f"text {b} has {int(lengths[b])} real tokens, but you also added the "
                    "padding positions"
                )
            if torch.allclose(got[b], want[b] / lengths[b], atol=1e-5):
                raise Incorrect("that is the mean per token; the log-likelihood is the sum")
            raise Incorrect(f"text {b}: expected {want[b].item():.4f}, got {got[b].item():.4f}")

    def reference(self):
        return _text_log_likelihood

    def wrong_answers(self):
        return [
            lambda logp, idx, lengths: logp.gather(-1, idx[..., None]).squeeze(-1).sum(1),
            lambda logp, idx, lengths: _text_log_likelihood(logp, idx, lengths) / lengths,
            lambda logp, idx, lengths: _text_log_likelihood(  # read one position too late
                logp[:, 1:], idx[:, :-1], (lengths - 1).clamp(min=0)
            ),
        ]


q1 = LastTokenStates()
q2 = MaskedTargets()
q3 = LoRAForward()
q4 = MergeLoRA()
q5 = LoRACount()
q6 = TextLogLikelihood()


# ---------------------------------------------------------------- q9, q10: what the loss scores


def _scored_fractions() -> dict[str, float]:
    """Scored share of the target positions of the q9 tasks, pooled and in other readings."""
    from minigpt.assistant import task_prompt

    examples = tasks.make_tasks("held_out", 20, seed=5)
    prompts = [len(task_prompt(ex)) for ex in examples]  # one token per character
    answers = [len(ex.answer) for ex in examples]
    targets = [p + a for p, a in zip(prompts, answers)]  # prompt + answer + eos, minus one
    return {
        "pooled": sum(a + 1 for a in answers) / sum(targets),
        "mean_of_rows": sum((a + 1) / t for a, t in zip(answers, targets)) / len(examples),
        "no_eos": sum(answers) / (sum(targets) - len(examples)),
        "prompt": sum(p - 1 for p in prompts) / sum(targets),
    }


class ScoredFraction(Experiment):
    name = "q9"
    question = """
Build the masked training row of every task in `tasks.make_tasks("held_out", 20,
seed=5)` (180 tasks), as in question 8: prompt `task_prompt(example)`, answer
`example.answer`, one token per character, and an end-of-answer token after the answer.
Over all 180 rows together, what **fraction of the target positions** does the loss
score (targets that are not -100)? Report one number within ±0.001.
"""
    atol = 0.001
    trivial = (0.0, 1.0, 20.0, 180.0, 5.0)
    _hint = """
Your task_example_ids from question 8 with a character encoding (encode = lambda s: [ord(c)
for c in s] will do, eos_id = 0) gives each row; count the targets != -100 and all the
targets, summed over the rows, and divide the two sums.
"""
    _solution = """
from minigpt import tasks
from minigpt.assistant import task_prompt

scored = total = 0
for ex in tasks.make_tasks("held_out", 20, seed=5):
    inputs, targets = task_example_ids(task_prompt(ex), ex.answer, lambda s: [ord(c) for c in s], 0)
    scored += sum(t != -100 for t in targets)
    total += len(targets)
fraction = scored / total
"""

    def measure(self):
        return _scored_fractions()["pooled"]

    def decoys(self):
        f = _scored_fractions()
        return {
            "the mean of each row's fraction, not the fraction over all rows together": f[
                "mean_of_rows"
            ],
            "the fraction without the end-of-answer token": f["no_eos"],
            "the fraction of prompt targets, the ones the mask hides": f["prompt"],
            "the share of kept targets in the lesson's toy batch (3 of 8)": 3 / 8,
        }


q9 = ScoredFraction()


class WhyMaskThePrompt(MultipleChoice):
    name = "q10"
    question = """
Instruction tuning sets the targets of the prompt to -100, so the loss scores only the
answer (and its end token). Why?
"""
    options = (
        Option(
            "To make training faster: the masked positions are skipped in the forward pass.",
            "The forward pass still reads every position: the model needs the prompt to "
            "answer. Only the loss (and so the gradient) leaves those positions out.",
        ),
        Option(
            "Because the prompt tokens would otherwise let the model read the answer ahead of "
            "time.",
            "The causal mask already stops any position from seeing later tokens, and the "
            "prompt comes before the answer anyway.",
        ),
        Option(
            "At use the prompt is given, not written: the model must learn to answer it, and "
            "scoring the prompt would spend most of the training signal on predicting "
            "instructions it never has to produce.",
            "In your experiment about 9 targets in 10 are prompt: without the mask they would "
            "dominate the loss, and the model would get better at writing the template "
            "instead of the answers.",
        ),
        Option(
            "To make the model forget what it learned in pretraining.",
            "Masking removes terms from the loss; it asks nothing of the rest of what the "
            "model knows.",
        ),
    )
    answer = "c"
    _hint = "At inference, who writes the prompt and who writes the answer?"


q10 = WhyMaskThePrompt()
