"""Removed: every layer of ``GPT`` is a plain ``torch.nn.Linear`` now.

The CPU fast path that lived here (oneDNN products) moved to ``minigpt.cpu``.
This stub only keeps ``from minigpt.linear import Linear`` working in modules that
have not been updated yet; ``Linear`` is ``torch.nn.Linear`` itself. Delete this
file once nothing imports it.
"""

from torch.nn import Linear

__all__ = ["Linear"]
