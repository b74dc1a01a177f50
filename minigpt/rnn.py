"""A recurrent language model: a GRU that reads the text one token at a time.

Before transformers, language models were recurrent: a hidden state ``h`` (a vector)
carries what the model remembers, and each token updates it,
``h_t = cell(x_t, h_{t-1})``. The gated recurrent unit (GRU, Cho et al. 2014)
is the cell; in PyTorch's convention, for an input ``x`` and a state ``h``::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)        # reset gate: how much of h to read
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)        # update gate: how much of h to keep
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))      # the candidate state
    h' = (1 - z) * n + z * h

Step t needs step t - 1's state, so the T steps of a sequence run one after the
other, however many cores there are: the reason a transformer, which computes
all T positions at once, trains faster on long texts and large machines.

- ``GRUCell`` is the cell written out, with ``nn.GRUCell``'s parameter names and
  layout (its state dict loads into ``nn.GRUCell`` and back), and ``run_gru``
  loops it over a sequence: what chapter 10 builds by hand.
- ``GRULanguageModel`` is the model: token embedding -> ``nn.GRU`` (the fused
  library version of the same equations) -> a linear head. It has the GPT's
  interface, ``model(idx, targets) -> (logits, loss)`` and ``config.block_size``,
  so the same evaluation code (``minigpt.train.evaluate``, ``validation_loss``)
  measures both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.files import check_int

__all__ = ["GRUCell", "GRUConfig", "GRULanguageModel", "run_gru"]


class GRUCell(nn.Module):
    """One GRU step written out: ``cell(x, h) -> h'``, equal to ``nn.GRUCell``.

    Parameters as in ``nn.GRUCell``: ``weight_ih`` (3H, I) and ``weight_hh`` (3H, H)
    stack the reset, update and candidate rows in that order; ``bias_ih`` and
    ``bias_hh`` are (3H,). Initialised like ``nn.GRUCell`` (uniform in +-1/sqrt(H)).
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * H, H))
        self.bias_ih = nn.Parameter(torch.empty(3 * H))
        self.bias_hh = nn.Parameter(torch.empty(3 * H))
        bound = 1.0 / math.sqrt(H)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """x (B, I), h (B, H) -> the next state (B, H)."""
        gi = x @ self.weight_ih.T + self.bias_ih  # (B, 3H): the input's share of each gate
        gh = h @ self.weight_hh.T + self.bias_hh  # (B, 3H): the state's share
        i_r, i_z, i_n = gi.chunk(3, dim=-1)  # (B, H) each
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)  # reset gate
        z = torch.sigmoid(i_z + h_z)  # update gate
        n = torch.tanh(i_n + r * h_n)  # candidate state
        return (1 - z) * n + z * h

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def run_gru(cell: nn.Module, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run a GRU cell over a sequence, one step at a time.

    Args:
        cell: a ``GRUCell`` or ``nn.GRUCell`` (anything with ``cell(x_t, h) -> h``).
        x: (B, T, I) inputs.
        h: (B, H) initial state (zeros when None).
    Returns:
        the states at every step (B, T, H) and the last state (B, H): what a one-layer
        ``nn.GRU(batch_first=True)`` with the same weights returns (its last state
        without the leading layer dimension).
    """
    B, T, _ = x.shape
    if h is None:
        h = x.new_zeros(B, cell.hidden_size)
    states = []
    for t in range(T):  # sequential: step t waits for step t - 1
        h = cell(x[:, t], h)  # (B, H)
        states.append(h)
    return torch.stack(states, dim=1), h  # (B, T, H), (B, H)


@dataclass
class GRUConfig:
    """The shape of a ``GRULanguageModel``.

    Attributes:
        vocab_size: number of token ids.
        block_size: the training context T (the model itself can read any length;
            evaluation code reads windows of this length).
        n_embd: width of the token embedding (the GRU's input).
        n_hidden: width of the GRU's state H.
        n_layer: stacked GRU layers.
    """

    vocab_size: int = 65
    block_size: int = 128
    n_embd: int = 64
    n_hidden: int = 128
    n_layer: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layer"):
            check_int(self, name, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GRULanguageModel(nn.Module):
    """Embedding -> ``nn.GRU`` -> linear head: a next-token model with GPT's interface.

    ``model(idx)`` returns ``(logits, None)`` and ``model(idx, targets)`` returns
    ``(logits, loss)``, exactly like ``minigpt.model.GPT``: logits (B, T, V) and the
    mean cross-entropy over the positions whose target is not -100. Each window is
    read from a zero state, so a window's predictions depend only on that window.
    """

    def __init__(self, config: GRUConfig) -> None:
        super().__init__()
        if not isinstance(config, GRUConfig):
            raise TypeError(f"GRULanguageModel takes a GRUConfig, got {type(config).__name__}")
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.gru = nn.GRU(c.n_embd, c.n_hidden, num_layers=c.n_layer, batch_first=True)
        self.lm_head = nn.Linear(c.n_hidden, c.vocab_size)
        nn.init.normal_(self.wte.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids, optional targets (B, T) -> logits (B, T, V), loss or None."""
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx must be (B, T) integer token ids, got {idx.dtype} {idx.shape}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(
                f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}"
            )
        x = self.wte(idx)  # (B, T, E)
        states, _ = self.gru(x)  # (B, T, H)
        logits = self.lm_head(states)  # (B, T, V)
        loss = None
        if targets is not None:
            B, T = idx.shape
            loss = F.cross_entropy(
                logits.reshape(B * T, -1).float(), targets.reshape(B * T), ignore_index=-100
            )
        return logits, loss

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())
