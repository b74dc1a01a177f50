"""minigpt: a GPT-style language model built from scratch in PyTorch.

Each chapter of the course graduates its code into one module here, named after
the concept it implements (``minigpt.data``, ``minigpt.tokenizer``, ...).
"""

from minigpt.data import load_text, train_val_split

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_text",
    "train_val_split",
]
