"""Chapter 10 exercises: scale (6ND arithmetic, a power-law fit with a floor, int8
quantization, the memory of Adam's state, and the all-reduce average); an experiment
(the activation bytes per token a GPT saves for backward, plain and with activation
checkpointing) and two conceptual questions (why fp16 needs loss scaling and bf16 does
not; why a recurrent network cannot spread its training over the sequence).

The two questions on where training memory goes, q4 and q6, are in ``ch10_memory``; they
are read from here like the others (``ch10.q6`` is ``ch10_memory.q6``).
"""

from __future__ import annotations

import numpy as np
import torch

from minigpt import quantize as package_quantize
from minigpt import scaling as package_scaling
from minigpt.exercises.ch10_memory import q4, q6
from minigpt.exercises.core import (
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    close,
    number,
    tensor,
)
from minigpt.exercises.shortcuts import Shortcut, forbid
from minigpt.model import GPT

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"]

_DAY = 86_400


class TrainingDays(Question):
    name = "q1"
    _hint = (
        "Training costs about 6 FLOPs per parameter per token (2 forward, 4 backward): "
        "C = 6 * n_params * n_tokens. Divide by the FLOPs the hardware really does per second "
        "(flops_per_second * utilization) to get seconds, then by 86,400 for days."
    )
    _solution = """
def training_days(n_params, n_tokens, flops_per_second, utilization):
    flops = 6 * n_params * n_tokens                          # forward + backward
    seconds = flops / (flops_per_second * utilization)
    return seconds / 86_400
"""

    shortcuts = (
        Shortcut(
            "minigpt's FLOP counters (GPT, minigpt.scaling)",
            "multiply 6 by the parameters and the tokens yourself",
            (GPT, package_scaling),
        ),
    )

    @staticmethod
    def _reference(n_params, n_tokens, flops_per_second, utilization):
        return 6 * n_params * n_tokens / (flops_per_second * utilization) / _DAY

    def _check(self, fn) -> None:
        cases = [
            (175e9, 300e9, 312e12, 0.4),  # GPT-3 on one A100
            (124e6, 10e9, 1e12, 0.5),
            (7e9, 2e12, 989e12, 0.35),
        ]
        for args in cases:
            with forbid(*self.shortcuts):
                got = number(call(fn, *args), "the number of days")
            want = self._reference(*args)
            what = f"training_days({', '.join(f'{a:g}' for a in args)})"
            if abs(got - want / 3) <= 1e-6 * want:
                raise Incorrect(
                    f"{what}: that counts 2 N D, the forward pass only; training is 6 N D"
                )
            if abs(got - want * _DAY) <= 1e-6 * want * _DAY:
                raise Incorrect(f"{what}: that is in seconds; divide by 86,400 for days")
            close(got, want, rtol=1e-6, what=what)

    def reference(self):
        return self._reference

    def wrong_answers(self):
        return [
            lambda n, d, f, u: 2 * n * d / (f * u) / _DAY,  # forward only
            lambda n, d, f, u: 6 * n * d / (f * u),  # seconds
            lambda n, d, f, u: 6 * n * d / f / _DAY,  # ignores the utilization
        ]


class FitPowerLaw(Question):
    name = "q2"
    _hint = (
        "For a fixed alpha, L = E * 1 + A * N**-alpha is linear in (E, A): stack the columns "
        "[1, N**-alpha] and solve with np.linalg.lstsq. Try many alphas (np.linspace(0.01, 2, "
        "2000)) and keep the one with the smallest squared error. Dividing N by a typical "
        "value first keeps the columns well scaled (then A = A_scaled * scale**alpha)."
    )
    _solution = """
def fit_power_law(N, L):
    import numpy as np
    N, L = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    scale = np.exp(np.log(N).mean())
    best = None
    for alpha in np.linspace(0.01, 2.0, 2000):
        X = np.stack([np.ones_like(N), (N / scale) ** -alpha], axis=1)  # (points, 2)
        (E, A), *_ = np.linalg.lstsq(X, L, rcond=None)
        err = np.sum((X @ [E, A] - L) ** 2)
        if best is None or err < best[0]:
            best = (err, E, A * scale**alpha, alpha)
    return best[1], best[2], best[3]   # E, A, alpha
"""

    shortcuts = (
        Shortcut(
            "minigpt.scaling's fits (or np.polyfit)",
            "for each alpha solve the linear least squares for E and A yourself "
            "(np.linalg.lstsq), and keep the best alpha",
            (package_scaling, getattr(np.polyfit, "_implementation", np.polyfit)),
        ),
    )

    PLANTED = ((1.5, 20.0, 0.45), (2.0, 8.0, 0.3), (0.8, 300.0, 0.7))

    def _check(self, fn) -> None:
        N = np.geomspace(2e3, 2e6, 7)
        for E, A, alpha in self.PLANTED:
            L = E + A / N**alpha
            with forbid(*self.shortcuts):
                got = call(fn, N.copy(), L.copy())
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                raise Incorrect("return three numbers (E, A, alpha)")
            gE, gA, galpha = (number(x, name) for x, name in zip(got, ("E", "A", "alpha")))
            planted = f"data planted with E={E}, A={A}, alpha={alpha}"
            if abs(gE) < 1e-9 and E > 0:
                raise Incorrect(
                    f"{planted}: you returned E = 0, a line in log-log: fit the floor E"
                )
            if abs(gE - E) > 0.02 or abs(galpha - alpha) > 0.02:
                raise Incorrect(
                    f"{planted}: got E={gE:.4g}, alpha={galpha:.4g}; both should be within 0.02"
                )
            if abs(gA - A) > 0.1 * A:
                raise Incorrect(
                    f"{planted}: got A={gA:.4g} (off by more than 10%): if you fitted N / scale, "
                    "A is A_scaled * scale**alpha"
                )

    def reference(self):
        namespace: dict = {}
        exec(self._solution, namespace)
        return namespace["fit_power_law"]

    def wrong_answers(self):
        def log_log_line(N, L):  # no floor
            slope, intercept = np.linalg.lstsq(
                np.stack([np.log(N), np.ones_like(N)], 1), np.log(L), rcond=None
            )[0]
            return 0.0, float(np.exp(intercept)), float(-slope)

        def fixed_alpha(N, L):  # only E and A fitted
            X = np.stack([np.ones_like(N), N**-0.5], axis=1)
            (E, A), *_ = np.linalg.lstsq(X, L, rcond=None)
            return E, A, 0.5

        def forgets_the_scale(N, L):
            scale = np.exp(np.log(N).mean())
            E, A, alpha = self.reference()(N, L)
            return E, A / scale**alpha, alpha

        return [log_log_line, fixed_alpha, forgets_the_scale]


class QuantizeInt8(Question):
    name = "q3"
    _hint = (
        "One scale per row: scales = w.abs().amax(dim=1) / 127, shape (out,). Then "
        "q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), and the "
        "dequantized weight is q.float() * scales[:, None]. A row of zeros needs a scale "
        "that does not divide by zero (any positive number gives q = 0)."
    )
    _solution = """
def quantize_int8(w):
    scales = w.abs().amax(dim=1) / 127                                       # (out,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))          # zero rows
    q = torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8)       # (out, in)
    return q, scales
"""

    shortcuts = (
        Shortcut(
            "minigpt.quantize (or torch's quantization)",
            "compute one scale per row and round w / scale to int8 yourself",
            (
                package_quantize,
                "quantize_per_channel",
                "quantize_per_tensor",
                "fake_quantize_per_channel_affine",
            ),
        ),
    )

    def _check(self, fn) -> None:
        g = torch.Generator().manual_seed(3)
        w = torch.randn(6, 10, generator=g) * torch.tensor([0.01, 0.1, 1, 10, 3, 1])[:, None]
        w[4] = 0.0  # a row of zeros
        w[5, 2] = -4.0  # a row whose largest magnitude is negative
        with forbid(*self.shortcuts):
            got = call(fn, w)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Incorrect("return a pair (q, scales)")
        q, scales = tensor(got[0], "q"), tensor(got[1], "scales")
        if q.dtype != torch.int8:
            raise Incorrect(f"q must be int8 (.to(torch.int8)), got {q.dtype}")
        if tuple(q.shape) != tuple(w.shape):
            raise Incorrect(f"q must have w's shape {tuple(w.shape)}, got {tuple(q.shape)}")
        if tuple(scales.shape) != (w.shape[0],):
            raise Incorrect(
                f"scales must hold one number per row, shape ({w.shape[0]},), got "
                f"{tuple(scales.shape)}"
            )
        if q.min() < -127:
            raise Incorrect("q holds -128: clamp to [-127, 127] so the grid is symmetric")
        scales = scales.float()
        want_scales = w.abs().amax(dim=1) / 127
        close(scales, want_scales, what="scales (max |row| / 127)")
        error = (q.float() * scales[:, None] - w).abs()
        worst = (error - scales[:, None] / 2).max().item()
        if worst > 1e-5:
            raise Incorrect(
                "some dequantized weight is more than half a step from w: round to the nearest "
                "integer (torch.round), do not truncate"
            )
        if torch.isnan(error).any():
            raise Incorrect("a row of zeros gives NaN: avoid dividing by a zero scale")

    def reference(self):
        def quantize_int8(w):
            scales = w.abs().amax(dim=1) / 127
            safe = torch.where(scales > 0, scales, torch.ones_like(scales))
            q = torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8)
            return q, scales

        return quantize_int8

    def wrong_answers(self):
        def per_tensor(w):
            s = w.abs().max() / 127
            return torch.round(w / s).clamp(-127, 127).to(torch.int8), s.repeat(w.shape[0])

        def truncates(w):
            s = w.abs().amax(dim=1) / 127
            safe = torch.where(s > 0, s, torch.ones_like(s))
            return (w / safe[:, None]).to(torch.int8), s  # rounds toward zero

        def scale_128(w):
            s = w.abs().amax(dim=1) / 128
            safe = torch.where(s > 0, s, torch.ones_like(s))
            return torch.round(w / safe[:, None]).clamp(-128, 127).to(torch.int8), s

        return [per_tensor, truncates, scale_128]


class AllReduceMean(Question):
    name = "q5"
    _hint = (
        "After an all-reduce every process holds the same tensor: the sum of all the "
        "processes' tensors, here divided by how many there are. Add them up with + in a loop "
        "(a ring all-reduce adds one neighbour's chunk at a time), divide by len(grads), and "
        "return one new tensor per process."
    )
    _solution = """
def all_reduce_mean(grads):
    total = grads[0].clone()
    for g in grads[1:]:
        total = total + g
    mean = total / len(grads)
    return [mean.clone() for _ in grads]   # every process gets its own copy
"""

    shortcuts = (
        Shortcut(
            "torch.stack / torch.mean / torch.sum",
            "add the processes' tensors one by one with + and divide by their number",
            ("stack", "mean", "sum", "nansum", "nanmean"),
        ),
    )

    def _check(self, fn) -> None:
        g = torch.Generator().manual_seed(4)
        for P, shape in ((2, (3,)), (4, (2, 5)), (3, (7,))):
            grads = [torch.randn(*shape, generator=g) for _ in range(P)]
            with forbid(*self.shortcuts):
                got = call(fn, grads)
            if not isinstance(got, (list, tuple)) or len(got) != P:
                raise Incorrect(f"return a list of {P} tensors, one per process")
            want = grads[0].clone()
            for x in grads[1:]:
                want = want + x
            for rank, t in enumerate(got):
                t = tensor(t, f"process {rank}'s tensor")
                if tuple(t.shape) == tuple(want.shape) and torch.allclose(t, want, atol=1e-5):
                    raise Incorrect(f"{P} processes: that is the sum; divide by {P} for the mean")
                close(t, want / P, what=f"process {rank}'s tensor ({P} processes)")
            if len({t.data_ptr() for t in got}) < P:
                raise Incorrect("each process needs its own tensor, not the same one P times")

    def reference(self):
        namespace: dict = {"torch": torch}
        exec(self._solution, namespace)
        return namespace["all_reduce_mean"]

    def wrong_answers(self):
        def sums(grads):
            total = grads[0].clone()
            for x in grads[1:]:
                total = total + x
            return [total.clone() for _ in grads]

        def own_only(grads):  # no communication at all
            return [x.clone() for x in grads]

        def pairwise(grads):  # averages with one neighbour only
            P = len(grads)
            return [(grads[i] + grads[(i + 1) % P]) / 2 for i in range(P)]

        return [sums, own_only, pairwise]


q1 = TrainingDays()
q2 = FitPowerLaw()
q3 = QuantizeInt8()
q5 = AllReduceMean()


# ---------------------------------------------------------------- q7, q8: concepts


class WhyLossScaling(MultipleChoice):
    name = "q7"
    question = """
Mixed-precision training in fp16 multiplies the loss by a large factor S before the
backward pass and divides the gradients by S afterwards (loss scaling); in bf16 it does
not. Why?
"""
    options = (
        Option(
            "bf16 has more mantissa bits than fp16, so its gradients round less.",
            "It is the other way round: bf16 keeps 7 mantissa bits and fp16 10, so bf16 rounds "
            "more coarsely (eps 0.0078 against 0.00098). Precision is not what scaling fixes.",
        ),
        Option(
            "fp16 has only 5 exponent bits: numbers below about 6e-5 lose digits and below "
            "about 6e-8 become 0, and small gradients live there. Scaling the loss by S scales "
            "every gradient by S (the chain rule), lifting them into range; dividing by S in "
            "fp32 undoes it. bf16 has fp32's 8 exponent bits and its range, down to about "
            "1e-38, so its gradients do not underflow.",
            "Range, not precision: the two 16-bit formats spend their bits differently, and "
            "only fp16 runs out of small numbers (the lesson's 9.5% of the course model's "
            "gradients sat below fp16's smallest normal number).",
        ),
        Option(
            "Multiplying by S adds log2(S) bits of precision to every fp16 gradient, so "
            "scaling by 2^16 makes fp16 about as precise as fp32.",
            "Multiplying by a power of two changes only the exponent: a number in fp16's "
            "normal range keeps its 10 mantissa bits and the same relative error. Only the "
            "numbers too small for the normal range gain digits, because they move into it.",
        ),
        Option(
            "fp16's largest number is 65,504, so large gradients overflow; the scale keeps "
            "them in range, and bf16 has no such limit.",
            "Loss scaling multiplies by a large S, which makes overflow more likely, not less "
            "(GradScaler lowers S when it sees an inf and skips that step). bf16 does overflow "
            "too, near 3.4e38, like fp32.",
        ),
    )
    answer = "b"
    _hint = (
        "Compare torch.finfo(torch.float16).tiny with torch.finfo(torch.bfloat16).tiny, and "
        "think about what multiplying by 2^16 does to a number's exponent and to its mantissa."
    )


class WhyRecurrenceIsSequential(MultipleChoice):
    name = "q8"
    question = """
On a sequence of T tokens, a transformer's training step can spread the T positions of
a layer over T processors at once; a GRU's cannot, however many processors it is given.
Why?
"""
    options = (
        Option(
            "The GRU must predict token t before it can read it, so the inputs of later "
            "steps are not known until the earlier steps have run.",
            "In training every input and target is known in advance: the text is given "
            "(teacher forcing), for the GRU as for the transformer. What later steps wait "
            "for is not a token.",
        ),
        Option(
            "Backpropagation through time runs a separate backward pass for each of the T "
            "steps, T backward passes in all.",
            "There is one backward pass, through the unrolled graph, costing about twice the "
            "forward, as for any network. It is sequential too, but not because it is "
            "repeated.",
        ),
        Option(
            "Its state holds a fixed number of values, too few to keep all T tokens at once.",
            "That is the GRU's other weakness, what it can remember: everything about the "
            "past squeezed into n_hidden numbers. It limits the loss, not how the work can "
            "be split over processors.",
        ),
        Option(
            "Each state needs the one before it, h_t = cell(x_t, h_{t-1}), so the T steps "
            "are a chain of T operations one after the other, forward and backward. A "
            "transformer layer computes every position from the layer below at once (the "
            "causal mask only hides the future), so its chain is as long as the number of "
            "layers, not T.",
            "The dependency is the state: nn.GRU can apply the input matrices to all steps at "
            "once, but not the recurrence. That is why the field moved to transformers once "
            "GPUs with thousands of cores did the training.",
        ),
    )
    answer = "d"
    _hint = (
        "Write down what the GRU needs to compute h_t, and what a transformer layer needs to "
        "compute position t. Which of those is known before the layer starts?"
    )


q7 = WhyLossScaling()
q8 = WhyRecurrenceIsSequential()
