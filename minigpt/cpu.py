"""Opt-in CPU fast paths, kept outside the layers a reader studies.

Every layer of ``GPT`` is a plain ``nn.Linear``. This module holds the tricks that
make some CPUs faster and others not, applied explicitly and undone afterwards:

- ``accelerated(model)``: a context in which the model's float32 CPU products
  (forward and both backward products) run through oneDNN
  (``torch.ops.mkldnn._linear_pointwise``) instead of ``F.linear``'s BLAS. The
  layers are switched in place to a subclass of ``nn.Linear`` and back on exit,
  so the parameters and the state dict never change.
- ``decoding()``: a context in which a single-row ``F.linear`` on a big CPU weight
  (decoding one sequence with a KV cache) runs as a batched matmul over blocks of
  the weight's rows, which shares the work out over the threads.

``fastpath_enabled()`` says whether to use them: the environment variable
``MINIGPT_CPU_FASTPATH=0`` turns both off, and each context takes ``enabled=``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["ENV_VAR", "accelerated", "decoding", "fastpath_enabled", "linear"]

ENV_VAR = "MINIGPT_CPU_FASTPATH"
_OFF, _ON = ("0", "false", "no", "off"), ("", "1", "true", "yes", "on")


def fastpath_enabled() -> bool:
    """Whether the CPU fast paths are on: ``MINIGPT_CPU_FASTPATH`` (default on).

    Read at each call, so setting the variable in a running process takes effect.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        raise ValueError(f"{ENV_VAR} must be 1 (on) or 0 (off), got {value!r}")
    return True


def _resolve(enabled: bool | None) -> bool:
    return fastpath_enabled() if enabled is None else bool(enabled)


# ---------------------------------------------------------------- oneDNN products


@functools.cache
def _onednn_op():  # type: ignore[no-untyped-def]
    """``torch.ops.mkldnn._linear_pointwise`` (used by Inductor), or None if absent."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


# Below this many multiply-adds (rows * in * out) the call costs more than it saves;
# decoding's one-row products stay on F.linear, where ``decoding`` can see them.
_MIN_MACS = 1 << 20
_MIN_ROWS = 16


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(N, in) @ (out, in)ᵀ + (out,) -> (N, out) by oneDNN; either operand may be strided."""
    return _onednn_op()(x, weight, bias, "none", [], "")


class _OneDNNProduct(torch.autograd.Function):
    """y = x Wᵀ + b on 2-D ``x``, forward and both backward products by oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        # keep only what backward will use: a frozen weight needs no copy of x
        ctx.save_for_backward(
            x if ctx.needs_input_grad[1] else None,
            weight if ctx.needs_input_grad[0] else None,
        )
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)  # (N, out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad, weight.t(), None)  # (N, out) @ (out, in) -> (N, in)
        if ctx.needs_input_grad[1]:
            grad_w = _mm(grad.t(), x.t(), None)  # (out, N) @ (N, in) -> (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _onednn_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if _onednn_op() is None:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() < 2 or weight.dim() != 2 or x.layout != torch.strided:
        return False
    if weight.layout != torch.strided or x.shape[-1] != weight.shape[1]:
        return False  # F.linear raises its usual error for a shape mismatch
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1):
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < _MIN_ROWS or rows * weight.numel() < _MIN_MACS:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    # vmap / grad transforms from torch.func need F.linear's own derivative rules
    return not torch._C._are_functorch_transforms_active()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with large float32 CPU products run by oneDNN.

    Everything else (GPUs, other dtypes, autocast, ``torch.compile``, functorch
    transforms, a handful of rows) takes ``F.linear``. The results equal
    ``F.linear``'s within float32 rounding (the same products summed in another
    order), not bit for bit, and are the same from run to run.

    Args:
        x: (..., in) inputs.
        weight: (out, in), ``nn.Linear``'s layout.
        bias: optional (out,).
    Returns:
        (..., out) = x Wᵀ + b, differentiable in all three.
    """
    if not _onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in): a view when x is contiguous
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    weight = weight if weight.is_contiguous() else weight.contiguous()
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        y = _OneDNNProduct.apply(x2, weight, bias)
    else:
        y = _mm(x2, weight, bias)
    return y.view(*lead, weight.shape[0])  # (..., out)


class _AcceleratedLinear(nn.Linear):
    """What a plain ``nn.Linear`` becomes inside ``accelerated``: the same object,
    parameters and state dict, with ``linear`` as its forward."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


@contextmanager
def accelerated(model: nn.Module, enabled: bool | None = None) -> Iterator[nn.Module]:
    """Run ``model``'s plain ``nn.Linear`` layers through ``linear`` inside the block.

    Each layer whose type is exactly ``nn.Linear`` is switched in place to a
    subclass with that forward and switched back on exit, also when the block
    raises, so the model, its parameters and its state dict are never left
    changed (``GPT.save`` inside the block writes the same files). Nested uses
    are harmless: the inner one finds no plain layers and restores none.

    Args:
        model: any module (a ``GPT``, a wrapper around one, a single layer).
        enabled: True or False to choose; None (the default) asks
            ``fastpath_enabled()``. When off, or without oneDNN, nothing changes.
    Yields:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerated needs an nn.Module, got {type(model).__name__}")
    if not _resolve(enabled) or _onednn_op() is None:
        yield model
        return
    switched = [m for m in model.modules() if type(m) is nn.Linear]
    for m in switched:
        m.__class__ = _AcceleratedLinear
    try:
        yield model
    finally:
        for m in switched:
            m.__class__ = nn.Linear


# ---------------------------------------------------------------- row-block decode


class _RowBlockLinear(TorchFunctionMode):
    """While active, ``F.linear`` on a single row on the CPU runs as a batched matmul.

    Decoding one sequence with a KV cache multiplies one vector by every weight
    matrix at each step. The matrix-vector kernel behind ``F.linear`` barely uses a
    second thread; cutting the weight into ``blocks`` groups of rows and handing
    them to ``torch.bmm``, which shares a batch out over the threads, computes the
    same dot products with no copy of the weights. Smaller matrices (the extra call
    costs more than it saves) and every other call pass through unchanged.
    """

    def __init__(self, blocks: int = 8, min_size: int = 1 << 19) -> None:
        super().__init__()
        self.blocks, self.min_size = blocks, min_size

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            one_row = x.numel() == x.shape[-1]
            big = weight.dim() == 2 and weight.numel() >= self.min_size
            if one_row and big and x.device.type == "cpu" and weight.is_contiguous():
                return self._linear(x, weight, bias)
        return func(*args, **kwargs)

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """(..., in) with one row, (out, in), (out,) -> (..., out); equal to F.linear."""
        out_features, in_features = weight.shape
        k = self.blocks
        rows = out_features // k * k  # the rows that fill k equal blocks
        w = weight[:rows].reshape(k, rows // k, in_features).transpose(1, 2)  # (k, in, rows/k)
        v = x.reshape(1, 1, in_features).expand(k, 1, in_features)  # (k, 1, in)
        if bias is None:
            y = torch.bmm(v, w)
        else:
            y = torch.baddbmm(bias[:rows].view(k, 1, rows // k), v, w)
        y = y.reshape(1, rows)
        if rows < out_features:  # the few rows left over
            rest = F.linear(v[0], weight[rows:], None if bias is None else bias[rows:])
            y = torch.cat([y, rest], dim=1)
        return y.view(*x.shape[:-1], out_features)


@contextmanager
def decoding(enabled: bool | None = None) -> Iterator[None]:
    """Inside the block, one-row ``F.linear`` calls on big CPU weights run by row blocks.

    ``minigpt.generate`` enters it around each one-token model call when it
    decodes a single sequence on the CPU. It is a ``TorchFunctionMode``: keep the
    block tight around the model call and never ``yield`` from inside it (the
    mode would stay active in the caller's code). With one thread there is
    nothing to share out and the block changes nothing.

    Args:
        enabled: True or False to choose; None (the default) asks ``fastpath_enabled()``.
    """
    if not _resolve(enabled) or torch.get_num_threads() < 2:
        yield
        return
    with _RowBlockLinear():
        yield
