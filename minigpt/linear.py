"""Removed: every layer of ``GPT`` is a plain ``torch.nn.Linear`` now.

The oneDNN CPU path that lived here was measured and removed (``minigpt.cpu``
says why). This stub only keeps ``from minigpt.linear import Linear`` working in
modules not yet updated; ``Linear`` is ``torch.nn.Linear`` itself. Delete it once
nothing imports it.
"""

from torch.nn import Linear

__all__ = ["Linear"]
