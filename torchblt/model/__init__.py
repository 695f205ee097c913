"""Model code: transformer blocks, masks, hash embeddings, cross-attention, local/global models, BLT."""

from torchblt.model.blt import BLT
from torchblt.model.config import (
    BLTConfig,
    CrossAttentionConfig,
    HashConfig,
    named_config,
)
from torchblt.model.entropy_model import EntropyModel, EntropyModelConfig, entropy
from torchblt.model.hash_embedding import ngram_hash_ids
from torchblt.model.transformer import StackConfig
from torchblt.patching import PatchingConfig

__all__ = [
    "BLT",
    "BLTConfig",
    "CrossAttentionConfig",
    "EntropyModel",
    "EntropyModelConfig",
    "HashConfig",
    "PatchingConfig",
    "StackConfig",
    "entropy",
    "named_config",
    "ngram_hash_ids",
]
