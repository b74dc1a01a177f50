"""The linear layer the model is made of: ``nn.Linear`` with a faster CPU path.

``y = x Wᵀ + b`` is most of a GPT's arithmetic (chapter 04 counts it): the Q/K/V
and output projections, the MLP and the output head. PyTorch's CPU ``F.linear``
hands it to the BLAS library PyTorch was built with, Intel's MKL, which on CPUs it
does not recognise as Intel's (AMD's EPYC and Ryzen among them) runs its AVX2 code
even where the CPU has AVX-512. oneDNN, which every x86 build of PyTorch also
carries, picks its kernels from the CPU's instruction set, not its vendor. On a
Zen 5 EPYC with AVX-512 it runs the same float32 products about twice as fast; with
AVX2 only, the two libraries are within a few percent of each other.

``linear(x, weight, bias)`` is ``F.linear`` with one difference: a float32 product
on the CPU that is big enough to pay for the call goes to oneDNN, for the forward
pass and for both products of the backward pass (``x`` grad and ``weight`` grad).
Everything else (GPUs, other dtypes, autocast, ``torch.compile``, functorch
transforms, a handful of rows) takes ``F.linear``. The results are float32
products summed in another order: equal to ``F.linear``'s within float32 rounding
(about 1e-6 relative), not bit for bit, and the same from run to run.

``Linear`` is ``nn.Linear`` with that forward: the same parameters, the same
state dict, ``isinstance(layer, nn.Linear)`` still true.

Which products go to oneDNN is chosen once per process from the CPU (see
``linear_backend``); ``set_linear_backend("torch")`` or the environment variable
``MINIGPT_LINEAR=torch`` turns it off, ``"onednn"`` forces it on.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BACKENDS", "Linear", "linear", "linear_backend", "set_linear_backend"]

BACKENDS = ("auto", "onednn", "torch")

# Below this many multiply-adds (rows * in * out) a product is too small to gain
# from oneDNN: the call costs more than it saves. Generation's one-row products
# also stay on F.linear, where minigpt.generate's row-block mode can see them.
_MIN_MACS = 1 << 20
_MIN_ROWS = 16

_requested: str = "auto"
_resolved: tuple[bool, bool] | None = None  # (use oneDNN at all, for the weight grad too)


@functools.cache
def _onednn_op():  # type: ignore[no-untyped-def]
    """``torch.ops.mkldnn._linear_pointwise`` (used by Inductor), or None if absent.

    Looked up once per process: ``_mm`` calls it for every product."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def set_linear_backend(name: str) -> None:
    """Choose how ``linear`` runs float32 CPU products.

    ``"auto"`` (the default): oneDNN where it was measured faster, by the CPU's
    instruction set; ``"onednn"``: oneDNN for every large enough product;
    ``"torch"``: always ``F.linear``.
    """
    global _requested, _resolved
    if name not in BACKENDS:
        raise ValueError(f"linear backend must be one of {BACKENDS}, got {name!r}")
    if name == "onednn" and _onednn_op() is None:
        raise RuntimeError(
            "this PyTorch build has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise); "
            "use set_linear_backend('torch') or 'auto'"
        )
    _requested, _resolved = name, None


def linear_backend() -> str:
    """What ``linear`` does with large float32 CPU products in this process.

    ``"onednn"``: the forward and both backward products go to oneDNN (a CPU with
    AVX-512, or forced); ``"onednn-forward"``: the forward and input-grad products
    go to oneDNN and the weight grad to ``F.linear``'s BLAS (AVX2 CPUs, where
    MKL's transposed product was measured faster); ``"torch"``: all ``F.linear``.
    """
    use, for_weight = _choice()
    return "torch" if not use else ("onednn" if for_weight else "onednn-forward")


def _choice() -> tuple[bool, bool]:
    global _resolved
    if _resolved is None:
        name = _requested
        env = os.environ.get("MINIGPT_LINEAR", "").strip().lower()
        if name == "auto" and env:
            if env not in BACKENDS:
                raise ValueError(f"MINIGPT_LINEAR must be one of {BACKENDS}, got {env!r}")
            name = env
        if name == "torch" or _onednn_op() is None:
            _resolved = (False, False)
        elif name == "onednn":
            _resolved = (True, True)
        else:
            capability = torch.backends.cpu.get_cpu_capability()
            if capability.startswith("AVX512") or "AMX" in capability:
                _resolved = (True, True)
            elif capability == "AVX2":
                _resolved = (True, False)
            else:  # other architectures (ARM, POWER) keep PyTorch's own BLAS
                _resolved = (False, False)
    return _resolved


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(N, in) @ (out, in)ᵀ + (out,) -> (N, out) by oneDNN; either operand may be strided."""
    return _onednn_op()(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b on 2-D ``x``, every product by oneDNN (the weight grad optionally by torch)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, onednn_wgrad: bool) -> Tensor:  # type: ignore[override]
        # keep only what backward will use: a frozen weight needs no copy of x
        ctx.save_for_backward(
            x if ctx.needs_input_grad[1] else None,
            weight if ctx.needs_input_grad[0] else None,
        )
        ctx.has_bias, ctx.onednn_wgrad = bias is not None, onednn_wgrad
        return _mm(x, weight, bias)  # (N, out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad, weight.t(), None)  # (N, out) @ (out, in) -> (N, in)
        if ctx.needs_input_grad[1]:
            if ctx.onednn_wgrad:  # (out, N) @ (N, in) -> (out, in), no transposed copies
                grad_w = _mm(grad.t(), x.t(), None)
            else:
                grad_w = grad.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


def _fast_path(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if not _choice()[0]:
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if (
        x.dim() < 2
        or weight.dim() != 2
        or x.layout != torch.strided
        or weight.layout != torch.strided
    ):
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1):
        return False
    if weight.device.type != "cpu" or x.shape[-1] != weight.shape[1]:
        return False  # F.linear raises its usual error for a shape mismatch
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < _MIN_ROWS or rows * weight.numel() < _MIN_MACS:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    # vmap / grad transforms from torch.func need F.linear's own derivative rules
    return not torch._C._are_functorch_transforms_active()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with large float32 CPU products run by oneDNN (see the module docs).

    Args:
        x: (..., in) inputs.
        weight: (out, in), ``nn.Linear``'s layout.
        bias: optional (out,).
    Returns:
        (..., out) = x Wᵀ + b, differentiable in all three.
    """
    if not _fast_path(x, weight, bias):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in): a view when x is contiguous
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    weight = weight if weight.is_contiguous() else weight.contiguous()
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        y = _OneDNNLinear.apply(x2, weight, bias, _choice()[1])
    else:
        y = _mm(x2, weight, bias)
    return y.view(*lead, weight.shape[0])  # (..., out)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``minigpt.linear.linear``.

    Same constructor, parameters (weight (out, in), bias (out,)) and state dict as
    ``nn.Linear``; (..., in) -> (..., out).
    """

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
