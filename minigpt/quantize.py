"""Weight-only int8 quantization: store each weight in one byte instead of four.

Generating one token at batch 1 multiplies a single vector by every weight matrix
of the model, so each step reads all the weights from memory once and does only
two floating-point operations per weight it reads: the speed is set by how many
bytes the weights take, not by arithmetic. Storing the weights as 8-bit integers
reads a quarter of the bytes of float32.

Symmetric per-channel quantization gives every output channel (every row of an
``nn.Linear`` weight W of shape (out, in)) its own scale::

    scale[o] = max_i |W[o, i]| / 127        q[o, i] = round(W[o, i] / scale[o])  in [-127, 127]
    W[o, i] ~ q[o, i] * scale[o]            |W[o, i] - q[o, i] * scale[o]| <= scale[o] / 2

A row's largest weight maps to ±127 and rounding moves no weight by more than half
a step. One scale per row, not one per matrix, so that a row of small weights is
not rounded to zeros by the scale of a row of large ones; a row of zeros gets
scale 0 and is stored exactly. Only the weights are quantized: activations stay in
floating point ("weight-only"), so no calibration data is needed.

- ``quantize_per_channel`` / ``dequantize`` convert a weight matrix and back.
- ``Int8Linear`` is an ``nn.Linear`` with int8 weights and float scales; ``forward``
  computes ``(x @ qᵀ) * scale + bias``.
- ``Int8Embedding`` looks up int8 rows; it shares the tied output head's matrix.
- ``quantize(model)`` returns an int8 copy of a model, ready for
  ``minigpt.generate.generate`` and ``stream`` (KV cache included);
  ``model_size_bytes`` measures the memory it saves.

On the CPU, ``Int8Linear`` uses PyTorch's int8 weight-only matmul
(``torch._weight_int8pack_mm``) for a few rows at a time, which is what generation
does: it reads the int8 weights directly and multiplies them by the activations
rounded to bfloat16, accumulating in float32. For many rows at once (a long prompt,
a validation pass) a float32 matrix multiply on the converted weights is faster.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KERNEL_MAX_ROWS",
    "Int8Embedding",
    "Int8Linear",
    "dequantize",
    "int8_kernel_available",
    "model_size_bytes",
    "quantize",
    "quantize_per_channel",
]

M = TypeVar("M", bound=nn.Module)

QMAX = 127  # symmetric: -127..127 (-128 is never used, so negating a weight is exact)
# The kernel wins for a few rows (decoding); past this many a float32 matmul does.
KERNEL_MAX_ROWS = 16
_KERNEL = getattr(torch, "_weight_int8pack_mm", None)


def int8_kernel_available() -> bool:
    """Whether this PyTorch has the CPU int8 weight-only matmul ``Int8Linear`` uses."""
    return _KERNEL is not None


# ---------------------------------------------------------------- the number format


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(
            f"weight must be floating point, got {weight.dtype}; it is already quantized "
            "if it is int8"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}; "
            "reshape it, e.g. weight.flatten(1)"
        )
    if not torch.isfinite(weight).all():
        raise ValueError("weight holds NaN or infinite values: quantize a finite weight")


@torch.no_grad()
def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization with one scale per output channel (row).

    Args:
        weight: (out, in) floating-point matrix, e.g. ``nn.Linear.weight``.
    Returns:
        ``(q, scales)``: q (out, in) int8 in [-127, 127], scales (out,) in the
        weight's dtype, with ``scales[o] = max |weight[o]| / 127`` (0 for a row of
        zeros). ``dequantize(q, scales)`` is within ``scales[o] / 2`` of
        ``weight[o, i]`` at every element (up to float rounding), and equal to it
        for a weight already on the grid (every element a multiple of its row's
        scale, the row's largest ±127 times it).
    """
    _check_weight(weight)
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / QMAX).to(weight.dtype)  # (out,), rounded to the dtype
    s = scales.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))  # a zero row: 0 / 1 = 0
    q = torch.round(w / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (out, in)
    return q, scales


def _check_pair(q: Tensor, scales: Tensor) -> None:
    if not isinstance(q, Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        got = f"{q.dtype} {tuple(q.shape)}" if isinstance(q, Tensor) else type(q).__name__
        raise TypeError(f"q must be a 2-D int8 tensor from quantize_per_channel, got {got}")
    if not isinstance(scales, Tensor) or not scales.is_floating_point():
        got = scales.dtype if isinstance(scales, Tensor) else type(scales).__name__
        raise TypeError(f"scales must be a floating-point tensor, got {got}")
    if scales.shape != (q.shape[0],):
        raise ValueError(
            f"scales must have one entry per row of q, shape ({q.shape[0]},), got "
            f"{tuple(scales.shape)}"
        )


def dequantize(q: Tensor, scales: Tensor) -> Tensor:
    """The float weight that ``(q, scales)`` stands for: ``q * scales[:, None]``.

    Args:
        q: (out, in) int8; scales: (out,) floating point.
    Returns:
        (out, in) in the scales' dtype.
    """
    _check_pair(q, scales)
    return q.to(scales.dtype) * scales[:, None]


# ---------------------------------------------------------------- layers


class Int8Linear(nn.Module):
    """A linear layer with int8 weights: ``y = (x @ qᵀ) * scales + bias``.

    Args:
        q: (out, in) int8 weights; scales: (out,) float, one per output channel
            (``quantize_per_channel``); bias: optional (out,).
        use_kernel: ``None`` (default) uses the CPU int8 kernel where it applies
            (float32 or bfloat16 input on the CPU, at most ``KERNEL_MAX_ROWS`` rows,
            no gradient needed) and the plain matmul elsewhere; ``False`` always
            the plain matmul; ``True`` like ``None`` but refuses a layer the kernel
            cannot run (``in`` not a multiple of 16, or no kernel in this PyTorch).

    ``q``, ``scales`` and ``bias`` are buffers: they move with ``.to()`` and are in
    the state dict, but are not parameters (nothing here trains).
    Shapes: ``forward`` maps (..., in) to (..., out), like ``nn.Linear``.
    """

    def __init__(
        self,
        q: Tensor,
        scales: Tensor,
        bias: Tensor | None = None,
        *,
        use_kernel: bool | None = None,
    ) -> None:
        super().__init__()
        _check_pair(q, scales)
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != scales.shape):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({q.shape[0]},) or be None, got {got}")
        if use_kernel not in (None, True, False):
            raise TypeError(f"use_kernel must be None, True or False, got {use_kernel!r}")
        if use_kernel and (_KERNEL is None or q.shape[1] % 16):
            why = "this PyTorch has no torch._weight_int8pack_mm"
            if _KERNEL is not None:
                why = f"in_features ({q.shape[1]}) is not a multiple of 16"
            raise ValueError(f"use_kernel=True, but {why}; pass use_kernel=None to fall back")
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.use_kernel = use_kernel
        self.kernel_fits = use_kernel is not False and _KERNEL is not None and q.shape[1] % 16 == 0
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        # the kernel's own scales: ones, so that the float scales apply after it, unrounded
        ones = torch.ones(self.out_features, dtype=torch.bfloat16, device=q.device)
        self.register_buffer("kernel_scales", ones, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, use_kernel: bool | None = None) -> Int8Linear:
        """Quantize an ``nn.Linear`` (its weight per output channel; the bias is kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        q, scales = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias, use_kernel=use_kernel)

    @property
    def weight(self) -> Tensor:
        """The dequantized (out, in) weight, a new float tensor at each access (for
        reading; the layer itself never forms it)."""
        return dequantize(self.q, self.scales)

    def _kernel_applies(self, x: Tensor) -> bool:
        return (
            self.kernel_fits  # the layer: the AVX-512 kernel reads 16 columns at a time
            and x.numel() <= KERNEL_MAX_ROWS * self.in_features
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())  # it has no backward
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        if self._kernel_applies(x):
            a = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (rows, in)
            if a.data_ptr() % 64:  # the kernel loads aligned vectors
                a = a.clone()
            y = _KERNEL(a, self.q, self.kernel_scales)  # (rows, out) bfloat16: x @ qᵀ
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = x @ self.q.T.to(x.dtype)  # (..., out)
        # each output channel times its own scale (a bfloat16 y is promoted to the scales' dtype)
        y = y * self.scales if self.bias is None else torch.addcmul(self.bias, y, self.scales)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, use_kernel={self.use_kernel}"
        )


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 rows with one scale per row (per token).

    Built on an ``Int8Linear`` output head whose weight was tied to the embedding:
    both read the same ``q`` and ``scales`` tensors, so the model keeps one matrix.
    ``forward`` maps integer ids (...) to vectors (..., dim) in the scales' dtype.
    """

    def __init__(self, q: Tensor, scales: Tensor) -> None:
        super().__init__()
        _check_pair(q, scales)
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)

    @property
    def weight(self) -> Tensor:
        """The dequantized (num_embeddings, dim) table, a new tensor at each access."""
        return dequantize(self.q, self.scales)

    def forward(self, idx: Tensor) -> Tensor:
        """(...) int ids -> (..., dim): only the looked-up rows are dequantized."""
        rows = F.embedding(idx, self.q)  # (..., dim) int8
        return rows.to(self.scales.dtype) * F.embedding(idx, self.scales[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


# ---------------------------------------------------------------- whole models


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """``name`` ends with a pattern at a dot boundary ("h.0.mlp.c_fc" matches "c_fc")."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize(model: M, skip: Iterable[str] = (), *, use_kernel: bool | None = None) -> M:
    """An int8 copy of ``model``: every ``nn.Linear`` becomes an ``Int8Linear``.

    Args:
        model: a ``GPT`` (or any module); it is copied, never changed.
        skip: names of linear layers to keep in floating point, matched at a dot
            boundary like ``minigpt.lora``'s targets: ``"lm_head"`` keeps the output
            head (and the embedding tied to it), ``"attn.c_proj"`` every attention
            output projection.
        use_kernel: passed to every ``Int8Linear``.

    The output head is quantized too, by default: at batch 1 it is a matmul like the
    others (GPT-2's head, 50257 x 768, holds a third of the model's weights and
    takes a third of the time of a token), and its per-row int8 error moves the
    logits no more than the blocks' error does. When the head is tied to the token
    embedding (``GPTConfig.tie_weights``), the embedding becomes an
    ``Int8Embedding`` on the same int8 matrix, so the copy still holds one matrix
    for both; an untied embedding stays in floating point (a lookup reads one row
    per token, so int8 would save memory but no time). Norms, biases and position
    tables stay in floating point; activations and the KV cache too.

    The copy runs with ``minigpt.generate`` unchanged. It is for inference: save
    the floating-point model (``GPT.save``) and quantize after loading.

    Raises:
        ValueError: a ``skip`` name matches no linear layer (the message lists
            them), or no linear layer is left to quantize.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize needs an nn.Module such as a GPT, got {type(model).__name__}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pattern in skip:
        if not any(_matches(n, (pattern,)) for n in linears):
            names = sorted({n.rpartition(".")[2] for n in linears})
            raise ValueError(f"skip={pattern!r} matches no nn.Linear; the model's end with {names}")
    chosen = [n for n in linears if not _matches(n, skip)]
    if not chosen:
        raise ValueError(
            "no nn.Linear left to quantize (is the model quantized already, or is every "
            "layer in skip?)"
        )
    out = copy.deepcopy(model)  # deepcopy keeps tied tensors tied
    embeddings = {n: m for n, m in out.named_modules() if isinstance(m, nn.Embedding)}
    for name in chosen:
        linear = out.get_submodule(name)
        layer = Int8Linear.from_linear(linear, use_kernel=use_kernel)
        for emb_name, emb in embeddings.items():
            if emb.weight is linear.weight:  # tied: the embedding reads the same int8 matrix
                _replace(out, emb_name, Int8Embedding(layer.q, layer.scales))
        _replace(out, name, layer)
    return out


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers; a shared (tied) tensor counts once."""
    seen: dict[int, Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())
