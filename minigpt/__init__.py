"""minigpt: a GPT-style language model built from scratch in PyTorch.

Each chapter of the course graduates its code into one module here, named after
the concept it implements (``minigpt.data``, ``minigpt.tokenizer``, ...). The most
used names are importable from the top level::

    from minigpt import GPT, GPTConfig
"""

from minigpt.attention import CausalSelfAttention, KVCache, scaled_dot_product_attention
from minigpt.checkpoint import CheckpointError
from minigpt.classify import GenerativeClassifier, GPTClassifier
from minigpt.data import DataError, load_text, train_val_split
from minigpt.embeddings import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)
from minigpt.finetune import FinetuneConfig
from minigpt.generate import generate, generate_text, stream
from minigpt.instruct import InstructionCollator
from minigpt.lora import LoRALinear, apply_lora, merge_lora
from minigpt.model import GPT, GPTConfig
from minigpt.sampling import SamplingConfig, sample_next_token
from minigpt.tokenizer import GPT2_PATTERN, BPETokenizer, CharTokenizer
from minigpt.tokens import TokenDataset
from minigpt.train import LossHistory, TrainConfig, Trainer, TrainingDivergedError

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPT2_PATTERN",
    "BPETokenizer",
    "CausalSelfAttention",
    "CharTokenizer",
    "CheckpointError",
    "DataError",
    "FinetuneConfig",
    "GPTClassifier",
    "GPTConfig",
    "GenerativeClassifier",
    "InstructionCollator",
    "KVCache",
    "LearnedPositionalEmbedding",
    "LoRALinear",
    "LossHistory",
    "RotaryEmbedding",
    "SamplingConfig",
    "SinusoidalPositionalEncoding",
    "TokenDataset",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "__version__",
    "apply_lora",
    "generate",
    "generate_text",
    "load_text",
    "merge_lora",
    "sample_next_token",
    "scaled_dot_product_attention",
    "stream",
    "train_val_split",
]
