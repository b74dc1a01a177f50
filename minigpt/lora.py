"""LoRA: fine-tune a few low-rank matrices instead of every weight.

A pretrained linear layer computes ``y = x Wᵀ + b`` with ``W`` of shape (out, in).
LoRA (Hu et al., 2021) freezes ``W`` and learns a low-rank update beside it::

    y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ        A: (r, in), B: (out, r), r << in, out

``B`` starts at zero, so a freshly wrapped layer computes exactly what the
pretrained one did, and training only moves ``r · (in + out)`` numbers per layer
instead of ``in · out``. Once trained, ``W + (alpha / r) · B A`` is a plain
matrix again: ``merge_lora`` folds the adapters back in, and the model runs as
fast as the original with no trace of LoRA left.

- ``LoRALinear`` wraps one ``nn.Linear``.
- ``apply_lora(model, targets, rank, alpha)`` wraps every linear layer whose
  name ends with one of ``targets`` (GPT-2 names: ``"c_attn"``, ``"c_proj"``,
  ``"c_fc"``) and freezes everything else.
- ``merge_lora(model)`` replaces each ``LoRALinear`` by its merged ``nn.Linear``.
- ``count_parameters(model)`` says how many parameters are trainable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "apply_lora", "count_parameters", "lora_modules", "merge_lora"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the pretrained layer; its weight and bias are frozen.
        rank: r, the rank of the update (the inner size of ``B @ A``).
        alpha: scale of the update; the update is multiplied by ``alpha / rank``
            so that changing ``rank`` does not change the effective learning rate.
        dropout: dropout on the adapter's input (0 = none).

    Shapes: ``forward`` maps (..., in_features) to (..., out_features), like ``base``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        w = base.weight
        # A gets the same init as nn.Linear, B is zero: the update starts at exactly zero.
        self.lora_A = nn.Parameter(
            torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The frozen pretrained weight (out, in); see ``delta_weight`` for the update."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta_weight(self) -> Tensor:
        """The learned update (alpha / r) · B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out): the frozen layer plus the low-rank path."""
        # x Aᵀ Bᵀ costs r·(in + out) per token, much less than forming B A (out·in).
        update = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T  # (..., r) -> (..., out)
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (weight W + (alpha/r) B A)."""
        base = self.base
        out = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        # the base's memory order (column-major in GPT, the faster one for generation)
        out.weight.data = torch.empty_like(base.weight)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight())
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """``name`` ends with a target at a dot boundary: "h.0.attn.c_proj" matches "c_proj"
    and "attn.c_proj", never "proj"."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` in ``model``, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    targets: Iterable[str] = ("c_attn", "c_proj", "c_fc"),
    rank: int = 8,
    alpha: float = 16.0,
    *,
    dropout: float = 0.0,
    trainable: Iterable[str] = (),
) -> nn.Module:
    """Wrap the linear layers named by ``targets`` in ``LoRALinear``, in place.

    Args:
        model: any module, e.g. a ``GPT`` or a ``GPTClassifier``.
        targets: name suffixes of the ``nn.Linear`` layers to adapt, matched at a
            dot boundary: ``"c_proj"`` adapts ``h.0.attn.c_proj`` and ``h.0.mlp.c_proj``,
            ``"attn.c_proj"`` only the first.
        rank, alpha: the adapters' rank r and scale alpha (update = alpha / r · B A).
        dropout: dropout on the adapters' input.
        trainable: name prefixes of parameters that stay trainable besides the
            adapters, e.g. ``("head",)`` for a new classification head.

    Every other parameter is frozen (``requires_grad=False``). Returns ``model``.

    Raises:
        ValueError: no linear layer matches ``targets`` (the message lists the
            linear layers there are), or the model already has adapters.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    if not targets:
        raise ValueError("targets is empty: name at least one layer suffix, e.g. ('c_attn',)")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [n for n in linears if _matches(n, targets)]
    if not chosen:
        names = sorted({n.rpartition(".")[2] for n in linears})
        raise ValueError(
            f"no nn.Linear in the model matches targets {targets}; its linear layers end with {names}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _set_submodule(model, name, LoRALinear(linears[name], rank, alpha, dropout))
    for name, p in model.named_parameters():
        if any(name == t or name.startswith(t + ".") for t in trainable):
            p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear`` with the update folded in.

    The merged model computes the same outputs (up to float rounding) with the
    original architecture and parameter names. The merged weights keep the frozen
    base's ``requires_grad``. Returns ``model`` (changed in place).
    """
    for name, module in lora_modules(model).items():
        merged = module.merged()
        for p, q in zip(merged.parameters(), module.base.parameters()):
            p.requires_grad_(q.requires_grad)
        _set_submodule(model, name, merged)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a shared (tied) tensor counts once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
