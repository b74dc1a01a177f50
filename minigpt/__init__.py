"""minigpt: a GPT-style language model built from scratch in PyTorch.

Each chapter of the course graduates its code into one module here, named after
the concept it implements (``minigpt.data``, ``minigpt.tokenizer``, ...).
"""

__version__ = "0.1.0"

from minigpt.tokenizer import GPT2_PATTERN, BPETokenizer, CharTokenizer

__all__ = [
    "GPT2_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "__version__",
]
