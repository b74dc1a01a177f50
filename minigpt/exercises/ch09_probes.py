"""Chapter 09 exercises on probes (``ch09`` re-exports them): q4, a probe's accuracy; q6,
an experiment (a probe on a synthetic feature next to its shuffled-label control); q7, a
conceptual question (what a probe's accuracy does and does not show).
"""

from __future__ import annotations

import torch

from minigpt import inspect
from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    number,
)
from minigpt.exercises.shortcuts import Shortcut, forbid

__all__ = ["q4", "q6", "q7"]


# ---------------------------------------------------------------- q4: a probe's accuracy


def _probe_accuracy(features, labels, weight, bias_):
    return ((features @ weight.T + bias_).argmax(dim=-1) == labels).float().mean().item()


def _probe_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    N, d, K = 60, 5, 3
    features = torch.randn(N, d, generator=g)
    weight = torch.randn(K, d, generator=g)
    bias_ = torch.tensor([0.0, 2.5, -2.5])  # large enough that leaving it out changes answers
    labels = (features @ weight.T + bias_ + 0.8 * torch.randn(N, K, generator=g)).argmax(-1)
    return features, labels, weight, bias_


class ProbeAccuracy(Question):
    name = "q4"
    _hint = (
        "The probe's scores are features @ weight.T + bias, shape (N, K); its prediction "
        "for a row is the class with the largest score (argmax over the last dimension). "
        "The accuracy is the fraction of rows where it equals the label."
    )
    _solution = """
def probe_accuracy(features, labels, weight, bias):
    scores = features @ weight.T + bias  # (N, K)
    return (scores.argmax(dim=-1) == labels).float().mean().item()
"""
    shortcuts = (
        Shortcut(
            "minigpt.inspect.linear_probe",
            "score the given probe yourself: argmax of features @ weight.T + bias",
            (inspect,),
        ),
    )

    def _check(self, fn):
        for seed in (0, 1, 2):
            case = _probe_case(seed)
            with forbid(*self.shortcuts):
                got = number(call(fn, *case), "the accuracy")
            want = _probe_accuracy(*case)
            if got > 1:
                raise Incorrect(f"return a fraction between 0 and 1, got {got}")
            if abs(got - want) > 1e-6:
                raise Incorrect(f"the accuracy should be {want:.4f}, got {got:.4f}")

    def reference(self):
        return _probe_accuracy

    def wrong_answers(self):
        def no_bias(features, labels, weight, bias_):
            return ((features @ weight.T).argmax(-1) == labels).float().mean().item()

        def counts(features, labels, weight, bias_):
            return int(((features @ weight.T + bias_).argmax(-1) == labels).sum())

        def argmin(features, labels, weight, bias_):
            return ((features @ weight.T + bias_).argmin(-1) == labels).float().mean().item()

        def majority(features, labels, weight, bias_):
            return (labels == labels.mode().values).float().mean().item()

        def fits_a_new_probe(features, labels, weight, bias_):
            return inspect.linear_probe(features, labels).train_accuracy

        return [no_bias, counts, argmin, majority, fits_a_new_probe]


q4 = ProbeAccuracy()


# ---------------------------------------------------------------- q6: a probe and its control

# the lesson's name-line probe after block 1: its test accuracy, the shuffled control's, and
# the majority rate ("always not a name line")
_LESSON_PROBE, _LESSON_SHUFFLED, _LESSON_MAJORITY = 0.986, 0.914, 0.906


def _probe_run() -> dict[str, float]:
    """q6's numbers, and what misreadings give."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 16, generator=g)  # (N, d)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 1.0).long()  # (N,)
    shuffled = labels[torch.randperm(400, generator=torch.Generator().manual_seed(1))]
    real, control = inspect.linear_probe(features, labels), inspect.linear_probe(features, shuffled)
    ones = int(labels.sum())
    majority = max(ones, 400 - ones) / 400
    return {
        "probe": real.test_accuracy,
        "shuffled": control.test_accuracy,
        "majority": majority,
        "probe_train": real.train_accuracy,
        "shuffled_train": control.train_accuracy,
    }


class ProbeAgainstControl(Experiment):
    name = "q6"
    question = """
Give a probe a feature whose answer you know. Make 400 synthetic "activations"
`features = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))` and the label
`labels = (features[:, 0] + 0.5 * features[:, 1] > 1.0).long()`: a linear function of two
of the 16 directions. The control keeps the same labels in a random order:
`shuffled = labels[torch.randperm(400, generator=torch.Generator().manual_seed(1))]`. Fit
`minigpt.inspect.linear_probe(features, y)` (its defaults: a seeded 25% test split) for
`y = labels` and for `y = shuffled`. Report `{"probe": ..., "shuffled": ..., "majority":
...}`: the two probes' **test** accuracies, and the majority rate, the share of the 400
labels in the more common class (what "always guess that class" scores). Each within
±0.002.
"""
    keys = ("probe", "shuffled", "majority")
    atol = 0.002
    trivial = (0.0, 1.0, 0.5, 16.0, 400.0, 0.25)
    _hint = """
linear_probe returns a ProbeResult: report its .test_accuracy, not .train_accuracy. The
majority rate is max(ones, 400 - ones) / 400 with ones = int(labels.sum()).
"""
    _solution = """
from minigpt.inspect import linear_probe

features = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))  # (N, d)
labels = (features[:, 0] + 0.5 * features[:, 1] > 1.0).long()  # (N,)
shuffled = labels[torch.randperm(400, generator=torch.Generator().manual_seed(1))]
ones = int(labels.sum())  # how many rows have label 1
probe_numbers = {
    "probe": linear_probe(features, labels).test_accuracy,
    "shuffled": linear_probe(features, shuffled).test_accuracy,
    "majority": max(ones, 400 - ones) / 400,
}
"""

    def run_experiment(self) -> dict[str, float]:
        return _probe_run()

    def decoys(self):
        run = self.record()
        return {
            "the lesson's number for its name-line probe after block 1": {
                "probe": _LESSON_PROBE,
                "shuffled": _LESSON_SHUFFLED,
                "majority": _LESSON_MAJORITY,
            },
            "the accuracy on the training split, not the test split": {
                "probe": run["probe_train"],
                "shuffled": run["shuffled_train"],
            },
            "the share of the less common class, not the more common one": {
                "majority": 1 - run["majority"]
            },
        }


q6 = ProbeAgainstControl()


# ---------------------------------------------------------------- q7: a concept


class WhatAProbeShows(MultipleChoice):
    name = "q7"
    question = """
A linear probe reads "inside a speaker's name line" from the stream after block 1 with 98.6%
test accuracy, well above the same probe on shuffled labels (91.4%) and the majority rate
(90.6%). What does that show?
"""
    options = (
        Option(
            "The model uses this information: its next-character predictions depend on it.",
            "A probe only reads; it never asks the model to do anything with what it reads. "
            "Whether the prediction depends on it is a causal question: change the activation "
            "(patching, ablation, or removing the probe's direction) and measure the output.",
        ),
        Option(
            "The stream after block 1 holds the information in a form a linear classifier "
            "reads on positions it did not train on, beyond what class counts and fitting "
            "noise give.",
            "That is all it shows: present and linearly readable. The shuffled control, which "
            "keeps the class frequencies and breaks the link to the activations, measures what "
            "the probe scores with no information; the gap above it is the evidence.",
        ),
        Option(
            "Block 1 computes the property: the stream before block 1 does not hold it, or "
            "not in a form a probe reads.",
            "The probe scored only one layer. The lesson's probe on the embeddings alone "
            "already read 97.1% (a capital letter or a colon is a hint); what a layer adds is "
            "the difference from the layer below, not the accuracy at that layer.",
        ),
        Option(
            "Little: a probe of 128 weights per class fits almost any labels, and shuffled "
            "labels score 50%, so 98.6% is what it would score anyway.",
            "Shuffling keeps the counts (192 of 2,048 positions in a name line), so the control "
            "scores near the majority rate, 90.6%, not 50%; and a probe that fitted any labels "
            "would score as well on the shuffled ones. The real probe is well above them.",
        ),
    )
    answer = "b"
    _hint = (
        "Which of these claims does the probe test, and which need an intervention on the "
        "model? What do shuffled labels keep, and what do they break?"
    )


q7 = WhatAProbeShows()
