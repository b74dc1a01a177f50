"""Chapter 04 exercises: the transformer block and the GPT model.

q1  LayerNorm by hand
q2  count GPT-2's parameters with a formula
q3  one pre-norm block's forward pass
q4  tie the output head to the token embedding
q5  RMSNorm by hand
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.exercises.core import (
    Experiment,
    Incorrect,
    MultipleChoice,
    Option,
    Question,
    call,
    call_modifying,
    close,
    number,
)
from minigpt.exercises.shortcuts import Shortcut, forbid
from minigpt.model import Block

__all__ = ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]


def _layer_norm_inputs() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    cases = []
    for shape in [(5,), (3, 8), (2, 4, 16)]:
        C = shape[-1]
        x = 3.0 * torch.randn(shape, generator=g) + 1.5  # not already centred
        cases.append((x, 1 + 0.5 * torch.randn(C, generator=g), torch.randn(C, generator=g)))
    return cases


class LayerNormByHand(Question):
    name = "q1"
    _hint = (
        "Over the last dimension: mean = x.mean(-1, keepdim=True), "
        "var = x.var(-1, keepdim=True, unbiased=False) (LayerNorm divides by C, not C - 1); "
        "then (x - mean) / sqrt(var + eps) * weight + bias."
    )
    _solution = """
def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)                  # (..., 1)
    var = x.var(dim=-1, keepdim=True, unbiased=False)    # (..., 1)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias
"""

    shortcuts = (
        Shortcut(
            "F.layer_norm (or nn.LayerNorm)",
            "compute the mean and the population variance over the last dimension yourself",
            ("layer_norm", "native_layer_norm"),
        ),
    )

    def _check(self, fn):
        for x, w, b in _layer_norm_inputs():
            with forbid(*self.shortcuts):
                got = call(fn, x, w, b, 1e-5)
            if not isinstance(got, torch.Tensor):
                raise Incorrect(f"expected a tensor, got {type(got).__name__}")
            close(
                got,
                F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
                what=f"layer_norm of {tuple(x.shape)}",
            )
        # eps matters when a row is (almost) constant
        x = torch.full((2, 4), 0.3)
        x[1] += torch.tensor([0.0, 1e-3, 0.0, -1e-3])
        w, b = torch.ones(4), torch.zeros(4)
        with forbid(*self.shortcuts):
            got = call(fn, x, w, b, 1e-2)
        close(got, F.layer_norm(x, (4,), w, b, 1e-2), what="layer_norm with eps=1e-2")

    def reference(self):
        def layer_norm(x, weight, bias, eps=1e-5):
            mean = x.mean(dim=-1, keepdim=True)
            var = x.var(dim=-1, keepdim=True, unbiased=False)
            return (x - mean) / torch.sqrt(var + eps) * weight + bias

        return layer_norm

    def wrong_answers(self):
        def unbiased(x, weight, bias, eps=1e-5):  # torch.var's default divides by C - 1
            return (x - x.mean(-1, keepdim=True)) / torch.sqrt(
                x.var(-1, keepdim=True) + eps
            ) * weight + bias

        def no_eps(x, weight, bias, eps=1e-5):
            var = x.var(-1, keepdim=True, unbiased=False)
            return (x - x.mean(-1, keepdim=True)) / torch.sqrt(var) * weight + bias

        def std_plus_eps(x, weight, bias, eps=1e-5):  # eps outside the square root
            std = x.std(-1, keepdim=True, unbiased=False)
            return (x - x.mean(-1, keepdim=True)) / (std + eps) * weight + bias

        def over_batch(x, weight, bias, eps=1e-5):  # normalizes each feature over the batch
            var = x.var(0, keepdim=True, unbiased=False)
            return (x - x.mean(0, keepdim=True)) / torch.sqrt(var + eps) * weight + bias

        def no_affine(x, weight, bias, eps=1e-5):
            var = x.var(-1, keepdim=True, unbiased=False)
            return (x - x.mean(-1, keepdim=True)) / torch.sqrt(var + eps)

        return [unbiased, no_eps, std_plus_eps, over_batch, no_affine]


def _gpt2_count(vocab_size: int, block_size: int, n_layer: int, n_embd: int) -> int:
    """The true count, by building the model on the meta device (shapes, no memory)."""
    from minigpt.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size, block_size, n_layer, 1, n_embd))
    return model.num_parameters()


class CountParameters(Question):
    name = "q2"
    _hint = (
        "Embeddings: V*C + T*C. Each block: attention c_attn (C x 3C weight + 3C bias) and "
        "c_proj (C*C + C); MLP c_fc (C*4C + 4C) and c_proj (4C*C + C); two LayerNorms "
        "(2C each). After the blocks: ln_f (2C). The head is tied: it adds nothing."
    )
    _solution = """
def gpt2_num_parameters(vocab_size, block_size, n_layer, n_embd):
    V, T, L, C = vocab_size, block_size, n_layer, n_embd
    attention = (C * 3 * C + 3 * C) + (C * C + C)
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)
    norms = 2 * (2 * C)
    block = attention + mlp + norms                      # = 12 C² + 13 C
    return V * C + T * C + L * block + 2 * C             # + final norm; tied head is free
"""

    shortcuts = (
        Shortcut(
            "building a model (any nn.Module)",
            "use a formula: count the weights and biases of each layer in terms of V, T, L and C",
            (nn.Module.__init__,),
        ),
    )

    def _check(self, fn):
        for V, T, L, C in [
            (50257, 1024, 12, 768),
            (65, 64, 4, 128),
            (1000, 32, 3, 48),
            (7, 5, 1, 8),
        ]:
            with forbid(*self.shortcuts):
                got = call(fn, V, T, L, C)
            got = number(got, "the parameter count", integer=True)
            want = _gpt2_count(V, T, L, C)
            if got != want:
                diff = got - want
                raise Incorrect(
                    f"for vocab_size={V}, block_size={T}, n_layer={L}, n_embd={C} you count {got:,}, "
                    f"the model has {want:,} ({'+' if diff > 0 else ''}{diff:,})"
                )

    def reference(self):
        def gpt2_num_parameters(vocab_size, block_size, n_layer, n_embd):
            V, T, L, C = vocab_size, block_size, n_layer, n_embd
            return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C

        return gpt2_num_parameters

    def wrong_answers(self):
        return [
            lambda V, T, L, C: V * C + T * C + L * 12 * C * C,  # weights only, no biases or norms
            lambda V, T, L, C: 2 * V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C,  # untied head
            lambda V, T, L, C: V * C + T * C + L * (12 * C * C + 13 * C),  # forgot ln_f
            lambda V, T, L, C: V * C + L * (12 * C * C + 13 * C) + 2 * C,  # forgot positions
        ]


def _blocks() -> list[nn.Module]:
    from minigpt.model import GPTConfig

    blocks = []
    for preset in ("tiny", "llama-tiny"):
        torch.manual_seed(0)
        block = Block(GPTConfig.preset(preset, vocab_size=10)).eval()
        with torch.no_grad():  # non-trivial norm weights, so the two norms differ
            for name, p in block.named_parameters():
                if "ln_" in name:
                    p.add_(0.3 * torch.randn_like(p))
        blocks.append(block)
    return blocks


class BlockForward(Question):
    name = "q3"
    _hint = (
        "Pre-norm: each sub-layer reads a normalized copy of the residual stream and adds its "
        "output back: x = x + block.attn(block.ln_1(x)), then x = x + block.mlp(block.ln_2(x))."
    )
    _solution = """
def block_forward(block, x):
    x = x + block.attn(block.ln_1(x))   # (B, T, C): attention writes into the stream
    x = x + block.mlp(block.ln_2(x))    # (B, T, C): the MLP writes into it too
    return x
"""

    shortcuts = (
        Shortcut(
            "calling the block itself (block(x), block.forward)",
            "use only its four parts: block.ln_1, block.attn, block.ln_2 and block.mlp",
            (Block.forward,),
        ),
    )

    def _check(self, fn):
        g = torch.Generator().manual_seed(3)
        for block in _blocks():
            x = torch.randn(2, 7, block.ln_1.weight.shape[0], generator=g)
            with torch.no_grad():
                with forbid(*self.shortcuts):
                    got = call(fn, block, x)
                want = block(x)
            if not isinstance(got, torch.Tensor):
                raise Incorrect(f"expected a tensor, got {type(got).__name__}")
            close(got, want, what=f"block_forward with {type(block.mlp).__name__}")

    def reference(self):
        def block_forward(block, x):
            x = x + block.attn(block.ln_1(x))
            return x + block.mlp(block.ln_2(x))

        return block_forward

    def wrong_answers(self):
        def post_norm(block, x):  # the original 2017 transformer's order
            x = block.ln_1(x + block.attn(x))
            return block.ln_2(x + block.mlp(x))

        def no_residual(block, x):
            x = block.attn(block.ln_1(x))
            return block.mlp(block.ln_2(x))

        def same_norm_twice(block, x):
            x = x + block.attn(block.ln_1(x))
            return x + block.mlp(block.ln_1(x))

        def parallel(block, x):  # GPT-J style: both read the same input
            return x + block.attn(block.ln_1(x)) + block.mlp(block.ln_2(x))

        return [post_norm, no_residual, same_norm_twice, parallel]


class TieWeights(Question):
    name = "q4"
    _hint = (
        "Make the head's weight the very same Parameter object as the embedding's: "
        "model.lm_head.weight = model.wte.weight. Both are (V, C), so no transpose is needed."
    )
    _solution = """
def tie_weights(model):
    model.lm_head.weight = model.wte.weight   # one (V, C) matrix reads and writes tokens
    return model
"""

    def _check(self, fn):
        from minigpt.model import GPT, GPTConfig

        torch.manual_seed(0)
        config = GPTConfig.preset("tiny", vocab_size=50, tie_weights=False)
        model = GPT(config)
        untied = model.num_parameters()
        before = {k: t.clone() for k, t in model.state_dict().items()}
        got = call_modifying(fn, model)  # tying changes the model: that is the exercise
        if not isinstance(got, GPT):
            raise Incorrect(f"return the model, got {type(got).__name__}")
        if got.lm_head.weight.shape != got.wte.weight.shape:
            raise Incorrect(
                f"lm_head.weight has shape {tuple(got.lm_head.weight.shape)}, it must stay "
                f"{tuple(got.wte.weight.shape)} (nn.Linear stores (out, in) = (V, C))"
            )
        if got.lm_head.weight is not got.wte.weight:
            raise Incorrect(
                "lm_head.weight and wte.weight are different tensors: copying values is not "
                "tying; training would update them apart. Assign the same Parameter"
            )
        if got.num_parameters() != untied - 50 * config.n_embd:
            raise Incorrect("the tied model should have V*C fewer parameters")
        after = got.state_dict()
        for k, t in before.items():
            want = before["wte.weight"] if k == "lm_head.weight" else t
            if k not in after or not torch.equal(after[k], want):
                raise Incorrect(
                    f"{k} changed its values: tying only makes lm_head share wte's weight, "
                    "every weight keeps the value it had"
                )
        idx = torch.randint(0, 50, (1, 8))
        _, loss = got(idx, idx)
        loss.backward()
        if got.wte.weight.grad is None:
            raise Incorrect("the embedding gets no gradient after tying")

    def reference(self):
        def tie_weights(model):
            model.lm_head.weight = model.wte.weight
            return model

        return tie_weights

    def wrong_answers(self):
        def copy_values(model):
            with torch.no_grad():
                model.lm_head.weight.copy_(model.wte.weight)
            return model

        def transposed(model):
            model.lm_head.weight = nn.Parameter(model.wte.weight.t())
            return model

        def new_parameter(model):  # same values, but a new tensor
            model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
            return model

        return [copy_values, transposed, new_parameter]


class RMSNormByHand(Question):
    name = "q5"
    _hint = (
        "No mean subtraction and no bias: x / sqrt(mean(x², last dim) + eps) * weight. "
        "Use x.pow(2).mean(-1, keepdim=True)."
    )
    _solution = """
def rms_norm(x, weight, eps=1e-5):
    rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)   # (..., 1)
    return x / rms * weight
"""

    shortcuts = (
        Shortcut(
            "F.rms_norm (or an RMSNorm module)",
            "divide x by sqrt(the mean of x² over the last dimension + eps) yourself",
            ("rms_norm", "_fused_rms_norm"),
        ),
    )

    def _check(self, fn):
        for x, w, _ in _layer_norm_inputs():
            with forbid(*self.shortcuts):
                got = call(fn, x, w, 1e-5)
            if not isinstance(got, torch.Tensor):
                raise Incorrect(f"expected a tensor, got {type(got).__name__}")
            close(got, F.rms_norm(x, (x.shape[-1],), w, 1e-5), what=f"rms_norm of {tuple(x.shape)}")
        x, w = torch.tensor([[1e-3, -1e-3, 2e-3, 0.0]]), torch.ones(4)
        with forbid(*self.shortcuts):
            got = call(fn, x, w, 1e-4)
        close(got, F.rms_norm(x, (4,), w, 1e-4), what="rms_norm with eps=1e-4")

    def reference(self):
        def rms_norm(x, weight, eps=1e-5):
            return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight

        return rms_norm

    def wrong_answers(self):
        return [
            # that is LayerNorm without the affine part: RMSNorm does not centre
            lambda x, w, eps=1e-5: F.layer_norm(x, (x.shape[-1],), w, None, eps),
            lambda x, w, eps=1e-5: x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w,  # sum
            lambda x, w, eps=1e-5: x / (x.abs().mean(-1, keepdim=True) + eps) * w,  # mean |x|
        ]


q1 = LayerNormByHand()
q2 = CountParameters()
q3 = BlockForward()
q4 = TieWeights()
q5 = RMSNormByHand()


# ---------------------------------------------------------------- q6, q7: counting a tied model


_CONFIG = dict(vocab_size=5000, block_size=128, n_layer=3, n_head=4, n_embd=96)


class CountTiedUntied(Experiment):
    name = "q6"
    question = """
Build `GPT(GPTConfig(vocab_size=5000, block_size=128, n_layer=3, n_head=4, n_embd=96))`
twice, with `tie_weights=True` (the default) and with `tie_weights=False`, and count the
parameters of each (a shared matrix counts once). Report
`{"tied": ..., "untied": ...}`, exactly.
"""
    keys = ("tied", "untied")
    integer = True
    trivial = (0, 1, *_CONFIG.values())
    _hint = """
model.num_parameters() counts them, and so does sum(p.numel() for p in model.parameters()):
model.parameters() yields a tied matrix once.
"""
    _solution = """
from minigpt.model import GPT, GPTConfig

config = dict(vocab_size=5000, block_size=128, n_layer=3, n_head=4, n_embd=96)
counts = {
    "tied": GPT(GPTConfig(**config)).num_parameters(),
    "untied": GPT(GPTConfig(**config, tie_weights=False)).num_parameters(),
}
"""

    def measure(self):
        from minigpt.model import GPT, GPTConfig

        with torch.device("meta"):  # shapes only: nothing is allocated
            return {
                "tied": GPT(GPTConfig(**_CONFIG)).num_parameters(),
                "untied": GPT(GPTConfig(**_CONFIG, tie_weights=False)).num_parameters(),
            }

    def decoys(self):
        truth = self.truth()
        T, C = _CONFIG["block_size"], _CONFIG["n_embd"]
        return {
            "the other count: tied and untied are swapped": {
                "tied": truth["untied"],
                "untied": truth["tied"],
            },
            "GPT-2 small's count from the lesson": {"tied": 124_439_808, "untied": 124_439_808},
            "the count without the position embeddings": {k: v - T * C for k, v in truth.items()},
        }


q6 = CountTiedUntied()


class WhatTyingShares(MultipleChoice):
    name = "q7"
    question = """
Your two counts differ by exactly `vocab_size × n_embd`. What does weight tying share?
"""
    options = (
        Option(
            "The weights of the blocks: every layer reuses the first block's attention and MLP.",
            "Sharing the blocks across layers is another idea (ALBERT's). It would change "
            "the count by a multiple of a block's size, not by vocab_size × n_embd.",
        ),
        Option(
            "The query and key projections, so that attention compares like with like.",
            "Queries and keys keep their own weights in GPT; tying them would save "
            "n_embd × n_embd per layer, not vocab_size × n_embd.",
        ),
        Option(
            "The token embedding and the position embedding tables.",
            "Those have different shapes, (vocab_size, n_embd) and (block_size, n_embd), so "
            "they cannot be one matrix.",
        ),
        Option(
            "The token embedding matrix is also the output head: the logit of token i is "
            "the final hidden state dotted with token i's embedding row.",
            "One (vocab_size, n_embd) matrix reads tokens in and scores them out. It saves "
            "that many parameters, and a token's input and output vectors learn together.",
        ),
    )
    answer = "d"
    _hint = "Which two layers of GPT have a weight of shape (vocab_size, n_embd)?"


q7 = WhatTyingShares()
