"""The GPT model: token embeddings + positions + N transformer blocks + a head.

One model covers GPT-2 and the Llama-style variant; ``GPTConfig`` picks the parts:

| option       | GPT-2       | Llama-style |
| ------------ | ----------- | ----------- |
| norm         | layernorm   | rmsnorm     |
| mlp          | gelu        | swiglu      |
| positions    | learned     | rope        |
| bias         | True        | False       |
| tie_weights  | True        | False       |
| n_kv_head    | = n_head    | < n_head (GQA) |

Parameter names follow GPT-2's checkpoints (``wte``, ``wpe``, ``h.0.attn.c_attn``,
``ln_f``, ...) so that loading OpenAI's weights is a rename and a transpose.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.attention import CausalSelfAttention, KVCache
from minigpt.embeddings import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)
from minigpt.files import (
    CheckpointError,
    check_bool,
    check_float_tensors,
    check_int,
    check_number,
    config_from_dict,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
    verify_files,
    write_manifest,
)

__all__ = ["GPT", "MLP", "PRESETS", "Block", "GPTConfig", "RMSNorm", "SwiGLU"]

_CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "positions": ("learned", "sinusoidal", "rope", "none"),
}


@dataclass
class GPTConfig:
    """Everything that defines a model's shape. Validated at construction.

    Attributes:
        vocab_size: number of token ids V.
        block_size: the context length: the longest sequence the model accepts.
        n_layer, n_head, n_embd: depth, heads per layer, width C.
        n_kv_head: key/value heads for grouped-query attention (None = n_head).
        dropout: dropout probability (0 for pretraining small models and for inference).
        bias: biases in the linear layers and norms.
        norm: "layernorm" or "rmsnorm".
        mlp: "gelu" (GPT-2's 4x MLP) or "swiglu" (Llama's gated MLP).
        mlp_hidden: hidden width of the MLP (None = 4C for gelu, about 8C/3 for swiglu).
        positions: "learned", "sinusoidal", "rope" or "none".
        rope_base: frequency base of rotary embeddings.
        tie_weights: share the token embedding with the output head.
        norm_eps: epsilon of the norms.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    mlp: str = "gelu"
    mlp_hidden: int | None = None
    positions: str = "learned"
    rope_base: float = 10000.0
    tie_weights: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(self, name, 1)
        for name, allowed in _CHOICES.items():
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ValueError(
                    f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"for example n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or self.n_head % kv:
            raise ValueError(
                f"GPTConfig.n_kv_head ({self.n_kv_head}) must be a positive divisor of n_head "
                f"({self.n_head}), or None for plain multi-head attention"
            )
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"rope needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}"
            )
        if self.positions == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        check_number(self, "dropout", 0, 1, below=True)
        check_int(self, "mlp_hidden", 1, optional=True)
        check_number(self, "rope_base", 0, above=True)
        check_number(self, "norm_eps", 0, above=True)
        check_bool(self, "bias")
        check_bool(self, "tie_weights")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 32 * math.ceil(8 * self.n_embd / 3 / 32)  # Llama: 2/3 of 4C, rounded up

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, rejecting unknown keys (a typo should not pass silently)."""
        return config_from_dict(cls, d)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> GPTConfig:
        """Read a config written by ``GPT.save``; a bad file raises ``CheckpointError``."""
        try:
            return cls.from_dict(load_json(path))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is not a valid GPTConfig: {e}") from e

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named configuration (see ``PRESETS``) with optional overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


_LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_weights=False)

PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI's GPT-2 family
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # small models that train on a laptop CPU (set vocab_size to your tokenizer's)
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "cpu-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "cpu-medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "llama-tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, **_LLAMA),
    "llama-small": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, **_LLAMA),
}


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / sqrt(mean(x²) + eps) * weight. No centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., C) -> (..., C)."""
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """GPT-2's feed-forward network: Linear(C, 4C) -> GELU (tanh approximation) -> Linear(4C, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """Llama's gated feed-forward network: (SiLU(x W_gate) * x W_up) W_down."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # gate and up projections fused into one matmul, split afterwards
        self.c_fc = nn.Linear(config.n_embd, 2 * config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention.from_config(config, rope)  # checked by GPTConfig
        self.ln_2 = _norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C): each sub-layer reads the residual stream and adds to it."""
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


def _store_column_major(module: nn.Module, column_major: bool = True) -> None:
    """Store every ``nn.Linear`` weight column-major, in place: same (out, in) shape,
    values and state dict, in the memory order of GPT-2's Conv1D. Generating at batch
    1 multiplies one row by each matrix, and BLAS streams ``x @ W`` with W (in, out)
    row-major faster: GPT-2 124M's matrices took 21 ms instead of 29 per token on a
    2-core AMD EPYC (``benchmarks/generate.py``). Training takes about the same time
    and, with ``minigpt.optim.clip_grad_norm``, computes the same bits.
    ``column_major=False`` stores them row-major again (to compare the two orders)."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.weight.dim() == 2:
            if not column_major:
                m.weight.data = m.weight.data.contiguous()
            elif m.weight.is_contiguous():
                m.weight.data = m.weight.data.t().contiguous().t()


def _stored_numbers(module: nn.Module) -> int:
    """Numbers in ``module``'s state dict (parameters, int8 buffers), each tensor once."""
    tensors = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(t.numel() for t in tensors.values())


class GPT(nn.Module):
    """A decoder-only transformer language model.

    ``model(idx)`` maps token ids (B, T) to next-token logits (B, T, V);
    ``model(idx, targets)`` also returns the mean cross-entropy loss.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe: nn.Module | None = None
        if config.positions == "learned":
            self.wpe = LearnedPositionalEmbedding(config.block_size, C)
        elif config.positions == "sinusoidal":
            self.wpe = SinusoidalPositionalEncoding(config.block_size, C)
        # one rotary table shared by every layer (it has no parameters)
        rope = None
        if config.positions == "rope":
            rope = RotaryEmbedding(config.head_dim, config.block_size, base=config.rope_base)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, rope) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix reads and writes tokens
        self.reset_parameters()
        _store_column_major(self)  # column-major weights: faster batch-1 generation

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and residual
        projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance
        does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LearnedPositionalEmbedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std)

    def set_dropout(self, p: float) -> None:
        """Set every layer's dropout probability (and ``config.dropout``) to ``p``: for
        fine-tuning, which overfits without it. Dropout only acts in training mode."""
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p!r}")
        self.config.dropout = float(p)
        self.drop.p = float(p)
        for block in self.h:
            block.attn.dropout = float(p)  # on the attention weights
            block.attn.resid_dropout.p = float(p)
            block.mlp.dropout.p = float(p)

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Compute next-token logits (and the loss when targets are given).

        Args:
            idx: (B, T) integer token ids.
            targets: optional (B, T) ids of the next tokens; -100 marks positions
                that do not count in the loss.
            kv_cache: optional per-layer caches (``new_kv_cache``); ``idx`` then
                holds only the tokens after the cached ones.
            last_only: compute logits for the last position only, (B, 1, V): all that
                generation needs, and it skips most of the output head's work.
        Returns:
            logits (B, T, V) (or (B, 1, V) with ``last_only``) and the mean
            cross-entropy loss (a scalar) or None.
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True computes no loss: pass targets or last_only, not both")
        self._check_ids(idx, kv_cache)
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(
                f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}"
            )
        x = self.hidden_states(idx, kv_cache, last_only)  # (B, T, C) or (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            B, T = idx.shape
            loss = F.cross_entropy(
                logits.view(B * T, -1).float(), targets.reshape(B * T), ignore_index=-100
            )
        return logits, loss

    def hidden_states(
        self,
        idx: Tensor,
        kv_cache: list[KVCache] | None = None,
        last_only: bool = False,
        *,
        check: bool = True,
    ) -> Tensor:
        """What the output head reads: the final-norm hidden states.

        ``forward`` is this followed by ``lm_head``; the arguments are forward's.
        ``check=False`` skips the checks of ``idx`` for a caller that made them once
        (``minigpt.generate`` checks the prompt, then feeds only tokens it sampled).
        Returns (B, T, C), or (B, 1, C) with ``last_only``.
        """
        if check:
            self._check_ids(idx, kv_cache)
        T = idx.shape[1]
        offset = 0 if kv_cache is None else kv_cache[0].length
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(T, offset)  # (T, C) broadcast over the batch
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, None if kv_cache is None else kv_cache[i])
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): norm and head are per position
        return self.ln_f(x)

    def _check_ids(self, idx: Tensor, kv_cache: list[KVCache] | None) -> None:
        """The checks of forward's inputs. Only the shapes and, on the CPU, the id
        range: reading the ids' values on a GPU would wait for the GPU at every
        step, and there ``nn.Embedding`` refuses an id out of range by itself."""
        if not isinstance(idx, Tensor) or idx.dtype not in (
            torch.long,
            torch.int,
            torch.int16,
            torch.uint8,
        ):
            got = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
            raise TypeError(f"idx must be an integer tensor of token ids, got {got}")
        if idx.dim() != 2:
            raise ValueError(
                f"idx must have shape (B, T), got {tuple(idx.shape)}; use idx[None] for one sequence"
            )
        if idx.shape[1] < 1:
            raise ValueError("idx is empty: need at least one token")
        offset = 0 if kv_cache is None else kv_cache[0].length
        if kv_cache is not None and len(kv_cache) != self.config.n_layer:
            raise ValueError(
                f"kv_cache needs one entry per layer ({self.config.n_layer}), got {len(kv_cache)}"
            )
        if offset + idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence of {offset + idx.shape[1]} tokens is longer than the model's context "
                f"(block_size={self.config.block_size}); crop it to the last {self.config.block_size} tokens"
            )
        if idx.device.type == "cpu" and idx.numel():
            lo, hi = torch.aminmax(idx)
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {self.config.vocab_size}), got values in "
                    f"[{int(lo)}, {int(hi)}]"
                )

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """Empty per-layer KV caches on the model's device and dtype."""
        p = self.ln_f.weight  # float, also when the head is int8 (minigpt.quantize)
        c = self.config
        max_len = c.block_size if max_len is None else min(max_len, c.block_size)
        n_kv = c.n_head if c.n_kv_head is None else c.n_kv_head
        return [
            KVCache(batch_size, n_kv, c.head_dim, max_len, device=p.device, dtype=p.dtype)
            for _ in range(c.n_layer)
        ]

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (read off a float one: right for int8 layers too)."""
        return self.ln_f.weight.device

    # ---------------------------------------------------------------- counting

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied matrix counts once; in an int8 copy made by
        ``minigpt.quantize``, its int8 weights and their scales).

        With ``exclude_embeddings`` the token and position embeddings are left out
        (the "non-embedding" count N used in scaling laws); an untied output head
        is a matmul and stays in.
        """
        n = _stored_numbers(self)
        if exclude_embeddings:
            n -= _stored_numbers(self.wte)
            if isinstance(self.wpe, LearnedPositionalEmbedding):
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Approximate floating-point operations to process one token.

        A forward pass costs 2 FLOPs per weight in every matmul (the non-embedding
        weights plus the output head) and 4 * n_layer * seq_len * n_embd for the
        attention scores and the weighted sum of values; training (forward +
        backward) costs three times that (Kaplan et al. 2020; PaLM appendix B).
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        matmul_weights = self.num_parameters(exclude_embeddings=True)
        if c.tie_weights:
            matmul_weights += c.vocab_size * c.n_embd  # the head reuses the embedding
        forward = 2 * matmul_weights + 4 * c.n_layer * T * c.n_embd
        return 3 * forward if training else forward

    # ---------------------------------------------------------------- files

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically)."""
        directory = Path(directory)
        state = self.state_dict()
        if any(not t.dtype.is_floating_point for t in state.values()):  # minigpt.quantize
            raise TypeError("int8 copies are not saved: save the float model, quantize after load")
        if self.config.tie_weights:
            state.pop("lm_head.weight")  # the same tensor as wte.weight
        save_tensors(state, directory / "model.safetensors", metadata={"format": "minigpt"})
        save_json(self.config.to_dict(), directory / "config.json")
        write_manifest(directory)  # sizes and SHA-256s: a damaged file is caught on load
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> GPT:
        """Read a model written by ``save``. Raises ``CheckpointError`` naming a bad file."""
        directory = Path(directory)
        verify_files(directory, ["config.json", "model.safetensors"])
        model = cls(GPTConfig.from_json(directory / "config.json"))
        state = load_tensors(directory / "model.safetensors", device=device)
        model.load_weights(state, source=directory / "model.safetensors")
        return model.to(device)

    def load_weights(
        self, state: dict[str, Tensor], source: str | os.PathLike[str] = "state dict"
    ) -> None:
        """Copy weights in, with an error that names missing, unexpected or misshapen tensors.

        Weights must be floating point (a float16 or bfloat16 file is cast to the
        model's dtype); integer tensors are refused, never silently cast.
        """
        check_float_tensors(state, source)
        expected = self.state_dict()
        if self.config.tie_weights:
            expected.pop("lm_head.weight")
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or bad:
            details = []
            if missing:
                details.append(f"missing {missing[:5]}")
            if unexpected:
                details.append(f"unexpected {unexpected[:5]}")
            if bad:
                details.append(
                    "wrong shape "
                    + ", ".join(
                        f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                        for k in bad[:5]
                    )
                )
            raise CheckpointError(
                f"weights in {source} do not fit this model: " + "; ".join(details)
            )
        self.load_state_dict(state, strict=False)

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> GPT:
        """Grow the vocabulary to ``vocab_size`` ids, in place; returns the model.

        New embedding rows start at the mean of the existing ones (a neutral token,
        not a random direction the network never saw). A tied output head follows
        the embedding; an untied one gets new rows the same way. Shrinking is refused.
        """
        old = self.config.vocab_size
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < old:
            raise ValueError(f"can only grow the vocabulary: got {vocab_size!r}, have {old}")
        if vocab_size == old:
            return self

        def grow(weight: Tensor) -> Tensor:
            # summed row by row (contiguous): in another memory order the sum rounds differently
            extra = weight.contiguous().mean(dim=0, keepdim=True).expand(vocab_size - old, -1)
            return torch.cat([weight, extra])  # (vocab_size, C)

        device, dtype = self.wte.weight.device, self.wte.weight.dtype
        tied = self.lm_head.weight is self.wte.weight
        wte = nn.Embedding(vocab_size, self.config.n_embd, device=device, dtype=dtype)
        wte.weight.copy_(grow(self.wte.weight))
        wte.weight.requires_grad_(self.wte.weight.requires_grad)
        head = nn.Linear(self.config.n_embd, vocab_size, bias=False, device=device, dtype=dtype)
        if tied:
            head.weight = wte.weight
        else:
            head.weight.copy_(grow(self.lm_head.weight))
            head.weight.requires_grad_(self.lm_head.weight.requires_grad)
        self.wte, self.lm_head = wte, head
        _store_column_major(self.lm_head)
        self.config.vocab_size = vocab_size
        return self
