"""torchblt: the Byte Latent Transformer in PyTorch — exact to the released models."""

from torchblt.formats import load_model, save_model
from torchblt.generation import generate, generate_stream
from torchblt.model import (
    BLT,
    BLTConfig,
    EntropyModel,
    EntropyModelConfig,
    StackConfig,
    entropy,
    named_config,
    ngram_hash_ids,
)
from torchblt.patching import Patcher, PatchingConfig
from torchblt.tokenizer import BPEDelimitedTokenizer, ByteTokenizer

__version__ = "0.1.0"

__all__ = [
    "BLT",
    "BLTConfig",
    "BPEDelimitedTokenizer",
    "ByteTokenizer",
    "EntropyModel",
    "EntropyModelConfig",
    "Patcher",
    "PatchingConfig",
    "StackConfig",
    "entropy",
    "generate",
    "generate_stream",
    "load_model",
    "named_config",
    "ngram_hash_ids",
    "save_model",
]
