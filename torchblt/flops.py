"""FLOPs per byte for BLT, byte-level and BPE transformers, following the BLT paper's accounting (§4.5),
so that FLOP-matched comparisons are one call (or one ``blt flops``).

Accounting (Chinchilla-style, forward pass, per token; a multiply-add is 2 FLOPs)
--------------------------------------------------------------------------------
For one transformer layer of width ``d`` with ``H`` query heads, ``Hkv`` key/value heads of width ``Dh``,
a SwiGLU feed-forward of width ``F`` and attention over ``m`` keys::

    qkvo       = 2 d (H Dh) + 2 * 2 d (Hkv Dh) + 2 (H Dh) d        (8 d^2 without GQA)
    attention  = 2 m (H Dh) + 2 m (H Dh)                            (scores and the weighted sum)
    ffn        = 2 * 3 d F                                          (= 16 d^2 for the usual F = 8d/3)
    de-embed   = 2 d V                                              (the output head; input embeddings are 0-FLOP lookups)

``m`` is the attention context as in the paper (no halving for causality): the sliding window for local
models (``min(window, context)``), ``n_ctx / n_p`` patches for the global model, the sequence length
for a plain transformer. Normalisations, RoPE, softmax and pooling are not counted (they are a few FLOPs
per element). Cross-attention (paper eqs. 16-17), per byte, for each cross-attention layer:

* encoder (``k`` slots per patch attend to the patch's ``n_p`` bytes): queries and outputs of
  ``k / n_p`` slots per byte (``4 E^2 k / n_p``), keys and values of every byte (``4 E^2``), attention
  ``4 E k``; plus the slots' initial projection ``E -> k E`` once per patch (``2 k E^2 / n_p``).
* decoder (every byte attends to the ``k`` slots of the previous patch): queries and outputs of every
  byte (``4 D^2``), keys and values of ``k / n_p`` slots per byte (``4 D^2 k / n_p``), attention ``4 D k``;
  plus the global-output projection ``G -> k D`` once per patch (``2 G k D / n_p``).

The global transformer runs once per patch, so its FLOPs (with its input projection ``k E -> G``) are
divided by the mean patch size ``n_p``; only this term shrinks as patches grow. Training costs 3x the
forward (backward = 2x forward). The entropy model is frozen: it costs one forward per byte in training
(patching) and in inference, and is reported apart (``entropy_model``) so that it can be left out, as
the paper does when patching is precomputed.

A BPE transformer's FLOPs per byte are its FLOPs per token divided by the tokenizer's mean bytes per
token (Llama 2: 3.7, Llama 3: 4.4, paper §5.1).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchblt.model.config import BLTConfig
from torchblt.model.entropy_model import EntropyModelConfig
from torchblt.model.masks import uses_window
from torchblt.model.transformer import StackConfig
from torchblt.tokenizer import VOCAB_SIZE

__all__ = [
    "attention_context",
    "blt_flops_per_byte",
    "bpe_flops_per_byte",
    "byte_flops_per_byte",
    "entropy_flops_per_byte",
    "layer_flops_per_token",
    "param_counts",
    "transformer_flops_per_token",
]

BACKWARD_FACTOR = 2.0  # backward = 2x forward


def attention_context(stack: StackConfig, context: float) -> float:
    """Keys each query attends to: the sliding window if the stack has one (capped by ``context``)."""
    if uses_window(stack.attention) and stack.window is not None:
        return float(min(stack.window, context))
    return float(context)


def layer_flops_per_token(stack: StackConfig, context: float) -> dict[str, float]:
    """Forward FLOPs of one layer per token: ``qkvo``, ``attention`` (over ``context`` keys), ``ffn``."""
    d, dh = stack.dim, stack.resolved_head_dim
    q_width, kv_width = stack.n_heads * dh, stack.resolved_n_kv_heads * dh
    return {
        "qkvo": 2.0 * d * q_width + 4.0 * d * kv_width + 2.0 * q_width * d,
        "attention": 4.0 * context * q_width,
        "ffn": 6.0 * d * stack.ffn_hidden_dim,
    }


def transformer_flops_per_token(stack: StackConfig, context: float, vocab: int = 0) -> float:
    """Forward FLOPs per token of a transformer stack with attention over ``context`` keys (the window
    for sliding-window stacks) and an output head of ``vocab`` entries (0: none)."""
    m = attention_context(stack, context)
    per_layer = sum(layer_flops_per_token(stack, m).values())
    return stack.n_layers * per_layer + 2.0 * stack.dim * vocab


def _with_totals(parts: dict[str, float], frozen: dict[str, float]) -> dict[str, float]:
    """Add ``forward`` (trained parts), ``inference`` (everything) and ``train`` (3x trained + 1x frozen)."""
    forward = sum(parts.values())
    frozen_total = sum(frozen.values())
    return {
        **frozen,
        **parts,
        "forward": forward,
        "inference": forward + frozen_total,
        "train": (1.0 + BACKWARD_FACTOR) * forward + frozen_total,
    }


def entropy_flops_per_byte(cfg: EntropyModelConfig, context: float | None = None) -> dict[str, float]:
    """A byte-level transformer (the entropy model, or the byte baseline) per byte."""
    return byte_flops_per_byte(cfg, context)


def byte_flops_per_byte(cfg: EntropyModelConfig | StackConfig, context: float | None = None) -> dict[str, float]:
    """A byte-level transformer LM: ``{"transformer", "forward", "inference", "train"}`` FLOPs per byte.

    ``context`` (bytes) defaults to the stack's ``max_seqlen``.
    """
    stack = cfg.transformer if isinstance(cfg, EntropyModelConfig) else cfg
    vocab = cfg.vocab_size if isinstance(cfg, EntropyModelConfig) else VOCAB_SIZE
    ctx = stack.max_seqlen if context is None else context
    return _with_totals({"transformer": transformer_flops_per_token(stack, ctx, vocab)}, {})


def bpe_flops_per_byte(
    stack: StackConfig | EntropyModelConfig, vocab: int, bytes_per_token: float, context: float | None = None
) -> dict[str, float]:
    """A BPE transformer LM per *byte*: FLOPs per token (``context`` tokens, ``vocab`` entries) divided by
    ``bytes_per_token``. Keys: ``per_token``, ``transformer``, ``forward``, ``inference``, ``train``."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    if isinstance(stack, EntropyModelConfig):
        stack = stack.transformer
    ctx = stack.max_seqlen if context is None else context
    per_token = transformer_flops_per_token(stack, ctx, vocab)
    out = _with_totals({"transformer": per_token / bytes_per_token}, {})
    return {"per_token": per_token, **out}


def blt_flops_per_byte(
    cfg: BLTConfig,
    patch_size: float,
    entropy_cfg: EntropyModelConfig | None = None,
    context_bytes: float | None = None,
) -> dict[str, float]:
    """BLT FLOPs per byte at mean patch size ``patch_size`` (see the module docstring).

    Keys: ``entropy_model`` (only with ``entropy_cfg``), ``local_encoder``, ``global``, ``local_decoder``,
    ``cross_attention``, and the totals ``forward`` (the BLT itself), ``inference`` (+ entropy model)
    and ``train`` (3x forward + one entropy-model forward). ``context_bytes`` (the sequence length
    ``n_ctx``) defaults to ``global_.max_seqlen * patch_size``.
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    enc, glob, dec = cfg.encoder, cfg.global_, cfg.decoder
    ca = cfg.cross_attn
    n_ctx = glob.max_seqlen * patch_size if context_bytes is None else float(context_bytes)
    if n_ctx <= 0:
        raise ValueError(f"context_bytes must be positive, got {context_bytes}")
    E, G, D, k = enc.dim, glob.dim, dec.dim, ca.k

    # byte-level stacks: per byte (the encoder has no head; the decoder's head is 260-way)
    local_encoder = transformer_flops_per_token(enc, n_ctx, 0)
    local_decoder = transformer_flops_per_token(dec, n_ctx, cfg.vocab_size)

    # global: once per patch, with its input projection (k E -> G when widths differ)
    global_per_patch = transformer_flops_per_token(glob, n_ctx / patch_size, 0)
    if cfg.global_input_dim != G:
        global_per_patch += 2.0 * cfg.global_input_dim * G
    global_ = global_per_patch / patch_size

    cross = 0.0
    if ca.encoder:
        n_cross = enc.n_layers if ca.all_layers_encoder else 1
        per_layer = 4.0 * E * E * k / patch_size + 4.0 * E * E + 4.0 * E * k
        cross += n_cross * per_layer + 2.0 * E * (k * E) / patch_size  # + slot initialisation projection
    if ca.decoder:
        n_cross = dec.n_layers if ca.all_layers_decoder else 1
        per_layer = 4.0 * D * D + 4.0 * D * D * k / patch_size + 4.0 * D * k
        cross += n_cross * per_layer
    # the decoder's projection of the global output (G -> k D), once per patch
    if G != D:
        dec_k = k if ca.decoder else 1
        projection = 2.0 * G * dec_k * D / patch_size
        if ca.decoder:
            cross += projection
        else:
            local_decoder += projection

    parts = {"local_encoder": local_encoder, "global": global_, "local_decoder": local_decoder, "cross_attention": cross}
    frozen = {}
    if entropy_cfg is not None:
        frozen["entropy_model"] = entropy_flops_per_byte(entropy_cfg, n_ctx)["forward"]
    return _with_totals(parts, frozen)


def param_counts(model_or_cfg: nn.Module | BLTConfig | EntropyModelConfig) -> dict[str, int]:
    """Parameters per part (hash n-gram tables apart from the encoder), ``total`` and ``non_embedding``
    (without byte/hash embedding tables: the paper's and Chinchilla's N)."""
    from torchblt.formats.common import build_model
    from torchblt.model.blt import BLT

    model = model_or_cfg
    if isinstance(model_or_cfg, (BLTConfig, EntropyModelConfig)):
        model = build_model(model_or_cfg, device="meta")

    def n(module: Any) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    if isinstance(model, BLT):
        counts = {
            "local_encoder": n(model.local_encoder),
            "hash_embeddings": n(model.encoder_hash_tok_embedding),
            "global_transformer": n(model.global_transformer),
            "local_decoder": n(model.local_decoder),
        }
        embeddings = counts["hash_embeddings"] + n(model.local_encoder.tok_embeddings)
    else:
        counts = {
            "embeddings": n(model.tok_embeddings),
            "transformer": n(model.layers) + n(model.norm),
            "output": n(model.output),
        }
        embeddings = counts["embeddings"]
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - embeddings
    return counts


def human(x: float, digits: int = 3) -> str:
    """``1234567 -> '1.235M'``: compact counts for the CLI tables."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}f}{unit}"
    return f"{x:.0f}"
