"""The entropy model: a small byte-level causal LM (the reference's ``LMTransformer``) whose next-byte
entropies decide where patches start.

Shape legend: B batch, T bytes, V vocabulary (260), D width.

``EntropyModel(tokens) -> logits (B, T, V)`` (fp32). :func:`entropy` is the natural-log entropy of the
next-byte distribution. :meth:`EntropyModel.entropies` computes it **per row**: every row of a batch gets
exactly the entropies it would get alone (the reference concatenates a batch's rows into one stream,
so rows leak into each other). Sequences longer than ``chunk_size`` are processed in chunks that carry
enough left context (``n_layers * (window - 1)`` keys, the model's full receptive field under a sliding
window) for the result to equal one forward over the whole sequence. Each chunk numbers its positions
from 0 (RoPE is relative: only distances matter, and fp32 angles of large positions would drift), so the
entropies of a window are the same at position 10^6 as at 0. The reference instead cuts its input into
independent 8192-byte chunks with no context across them: below position 8192 both agree.

Memory is bounded by the chunk: the sliding window runs banded (:mod:`torchblt.model.masks`), so one
chunk costs ``O((chunk_size + context) * window)``, and only the ``(B, T)`` entropies are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from torchblt.model.masks import uses_window
from torchblt.model.transformer import (
    Linear,
    RMSNorm,
    StackCache,
    StackConfig,
    Transformer,
    embedding,
    row_pieces,
    trunc_normal_,
)
from torchblt.tokenizer import EOS_ID, VOCAB_SIZE

# Positions per forward of :meth:`EntropyModel.entropies` (plus the receptive field of left context):
# the fastest measured on CPU with the banded attention (bench/patching.py, docs/long-inputs.md)
ENTROPY_CHUNK = 8192


def _default_entropy_stack() -> StackConfig:
    return StackConfig(dim=768, n_layers=14, n_heads=12, attention="local_block_causal", window=512)


@dataclass
class EntropyModelConfig:
    """Architecture of the entropy model (a plain byte-level transformer LM)."""

    transformer: StackConfig = field(default_factory=_default_entropy_stack)
    vocab_size: int = VOCAB_SIZE
    eos_id: int = EOS_ID

    def validate(self) -> None:
        self.transformer.validate("transformer")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of ``softmax(logits)`` over the last dimension, in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyModel(Transformer):
    """Byte LM: embedding -> transformer blocks -> RMSNorm -> output head. Also the paper's byte baseline.

    Parameter names are those of the reference (``tok_embeddings``, ``layers.i``, ``norm``, ``output``).
    """

    def __init__(self, config: EntropyModelConfig) -> None:
        config.validate()
        super().__init__(config.transformer)
        self.config = config
        self.eos_id = config.eos_id
        t = config.transformer
        self.tok_embeddings = embedding(config.vocab_size, t.dim)
        self.norm = RMSNorm(t.dim, t.norm_eps)
        self.output = Linear(t.dim, config.vocab_size, bias=False)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: StackCache | None = None
    ) -> torch.Tensor:
        """``tokens (B, T) int64 -> logits (B, T, V) float32``. With ``cache`` the tokens are new positions
        after the cached ones (a prefill chunk or a decoding step, see
        :class:`~torchblt.model.transformer.StackCache`); ``positions`` is then ignored."""
        if cache is not None:
            mask, rope, caches = self.attention_inputs(tokens, cache)
            return self.logits(self.run_layers(self.tok_embeddings(tokens), mask, caches=caches, rope=rope))
        return self.logits(self.hidden_states(tokens, positions))

    def hidden_states(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, keep_from: int = 0
    ) -> torch.Tensor:
        """``tokens (B, T)`` -> the last block's states ``(B, T - keep_from, D)`` of the positions from
        ``keep_from`` (before the final norm; see :meth:`Transformer.run_layers`)."""
        mask = self.self_attention_mask(tokens)
        return self.run_layers(self.tok_embeddings(tokens), mask, positions, keep_from=keep_from)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head: ``(B, T, D) -> (B, T, V)`` float32."""
        return self.output(self.norm(h)).float()

    @property
    def receptive_field(self) -> int | None:
        """How many earlier positions can influence a position's output (None: unbounded)."""
        t = self.config.transformer
        if not uses_window(t.attention):
            return None
        return t.n_layers * (t.window - 1)  # type: ignore[operator]

    @torch.no_grad()
    def entropies(self, tokens: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Per-row next-byte entropies ``(B, T) -> (B, T)`` float32 (see the module docstring).

        ``chunk_size``: new positions per forward (default :data:`ENTROPY_CHUNK`)."""
        chunk_size = chunk_size or ENTROPY_CHUNK
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        B, T = tokens.shape
        context = self.receptive_field
        out = torch.empty(B, T, dtype=torch.float32, device=tokens.device)
        if T <= chunk_size or context is None:
            return self._entropies_of(self.hidden_states(tokens), out)
        for start in range(0, T, chunk_size):
            end = min(start + chunk_size, T)
            left = max(0, start - context)
            # positions from 0 (RoPE is relative); the context rows only serve as keys
            h = self.hidden_states(tokens[:, left:end], keep_from=start - left)
            self._entropies_of(h, out[:, start:end])
        return out

    def _entropies_of(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Head and entropy of hidden states ``h (B, T, D)`` into ``out (B, T)``, in pieces of rows
        (:func:`~torchblt.model.transformer.row_pieces`: the ``(rows, V)`` logits stay in cache)."""
        for piece in row_pieces(h.shape[1], h.device):
            out[:, piece] = entropy(self.logits(h[:, piece]))
        return out

    def init_weights(self) -> None:
        """Truncated normal: embeddings and head ``dim^-0.5``; blocks as :meth:`Transformer.init_weights`
        without depth scaling (the reference entropy model's ``init_std_factor="disabled"``); norms 1."""
        d = self.config.transformer.dim
        trunc_normal_(self.tok_embeddings.weight, d**-0.5)
        trunc_normal_(self.output.weight, d**-0.5)
        super().init_weights(depth_scaled=False)
        self.norm.reset_parameters()
