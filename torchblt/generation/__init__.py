"""Byte generation with a BLT: incremental (KV-cached in all four networks) or plain full recompute.

``generate(model, prompts, ...) -> list[str]``, ``generate_stream(model, prompt, ...)`` (text pieces),
``generate_tokens(model, prompt_ids, ...) -> GenerationOutput`` (ids, logits, patch boundaries).
See ``docs/generation.md`` for the algorithm and its cost.
"""

from torchblt.generation.api import (
    GenerationConfig,
    GenerationOutput,
    generate,
    generate_stream,
    generate_tokens,
)
from torchblt.generation.incremental import IncrementalEngine
from torchblt.generation.reference import FullRecomputeEngine
from torchblt.generation.sampling import filter_logits, sample
from torchblt.generation.state import DecodeState
from torchblt.generation.stream import StreamPiece

__all__ = [
    "DecodeState",
    "FullRecomputeEngine",
    "GenerationConfig",
    "GenerationOutput",
    "IncrementalEngine",
    "StreamPiece",
    "filter_logits",
    "generate",
    "generate_stream",
    "generate_tokens",
    "sample",
]
