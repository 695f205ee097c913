"""The memory one training rank needs, computed from a model config on the meta device (no memory used).

Exact, from the parameters' shapes and how :func:`~torchblt.train.distributed.parallelize` shards them
(FSDP2 pads dim 0 of every parameter to a multiple of the world size; hash tables are split by rows):

* parameters: fp32, this rank's shards;
* gradients: fp32, this rank's shards of every parameter except the row-sharded hash tables, whose
  gradients are kept as the rows a step touched (:mod:`torchblt.train.hash_sharding`; counted with the
  activations below);
* AdamW: two fp32 moments per parameter shard;
* gathered weights: bf16 copies of the weights a rank computes with: under FSDP the largest unit
  gathered, twice (the one computing and the one prefetched); on one GPU the ``autocast`` copies of every
  matrix weight, which the backward keeps, unless activation checkpointing recomputes the blocks (the
  trainer then disables autocast's cache: only the blocks in flight hold copies, counted like FSDP's).

Estimated (bf16 activations, per rank, ``batch_size`` rows of ``bytes_per_row`` bytes at the mean patch
size): every transformer or cross-attention layer keeps ``34 * dim`` bytes per token without activation
checkpointing (Korthikanti et al., 2022, with memory-efficient attention); with it, ``2 * dim`` (the
layer's input) plus one layer's ``34 * dim`` while it is recomputed. Plus the fp32 hash lookups and
their row gradients (``4 * dim * n_tables`` bytes per byte) and the fp32 logits with their softmax
gradient (``3 * 4 * 260`` bytes per byte). Allocator fragmentation and kernels' workspaces come on top:
measure the real peak with ``bench/train.py``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["training_memory"]

_ACT_BYTES_PER_DIM = 34  # bytes per token per unit of width a layer keeps for its backward (bf16)


def _shard_numel(p: nn.Parameter, world_size: int) -> int:
    """Elements of one rank's (padded) dim-0 shard of ``p``."""
    if world_size == 1 or p.dim() == 0:
        return p.numel()
    return math.ceil(p.shape[0] / world_size) * (p.numel() // max(p.shape[0], 1))


def training_memory(config: Any, world_size: int = 1, batch_size: int = 2, bytes_per_row: int = 8192,
                    patch_size: float | None = None, activation_checkpointing: bool = True,
                    hash_sharding: str = "rows") -> dict[str, Any]:
    """Bytes per rank by part (see the module docstring), for a BLT or entropy-model config."""
    from torchblt.formats.common import build_model
    from torchblt.model.blt import BLT
    from torchblt.train.distributed import blocks

    model = build_model(config, device="meta")
    tables = list(model.encoder_hash_tok_embedding or []) if isinstance(model, BLT) else []
    table_ids = {id(t.weight) for t in tables} if hash_sharding == "rows" else set()
    params = list(model.parameters())
    shard = {id(p): _shard_numel(p, world_size) for p in params}
    n_local = sum(shard.values())
    out: dict[str, Any] = {
        "parameters": 4 * n_local,
        "gradients": 4 * sum(n for i, n in shard.items() if i not in table_ids),
        "adamw": 8 * n_local,
    }
    units = [sum(p.numel() for p in b.parameters()) for b in blocks(model)]
    in_blocks = {id(p) for b in blocks(model) for p in b.parameters()}
    root = [p for p in params if id(p) not in in_blocks and id(p) not in table_ids]
    if world_size > 1:
        out["gathered_weights"] = 2 * 2 * max([*units, sum(p.numel() for p in root)])
    elif activation_checkpointing:  # root matrices kept for the backward + the blocks in flight
        out["gathered_weights"] = 2 * (sum(p.numel() for p in root if p.dim() >= 2) + 2 * max(units, default=0))
    else:
        out["gathered_weights"] = 2 * sum(p.numel() for p in params if p.dim() >= 2 and id(p) not in table_ids)

    tokens = batch_size * bytes_per_row
    acts = []  # (tokens, dim) per layer that keeps activations
    if isinstance(model, BLT):
        ps = float(patch_size if patch_size is not None else config.patching.patch_size)
        enc, glob, dec, ca = config.encoder, config.global_, config.decoder, config.cross_attn
        n_enc_cross = (enc.n_layers if ca.all_layers_encoder else 1) if ca.encoder else 0
        n_dec_cross = (dec.n_layers if ca.all_layers_decoder else 1) if ca.decoder else 0
        acts += [(tokens, enc.dim)] * enc.n_layers + [(tokens / ps * ca.k, enc.dim)] * n_enc_cross
        acts += [(tokens / ps, glob.dim)] * glob.n_layers
        acts += [(tokens, dec.dim)] * (dec.n_layers + n_dec_cross)
        out["embeddings_and_logits"] = tokens * (4 * enc.dim * (len(tables) + 1) + 3 * 4 * config.vocab_size)
    else:
        t = config.transformer
        acts += [(tokens, t.dim)] * t.n_layers
        out["embeddings_and_logits"] = tokens * (4 * t.dim + 3 * 4 * config.vocab_size)
    per_layer = [n * d * _ACT_BYTES_PER_DIM for n, d in acts]
    if activation_checkpointing:
        out["activations"] = int(sum(n * d * 2 for n, d in acts) + max(per_layer, default=0))
    else:
        out["activations"] = int(sum(per_layer))
    states = out["parameters"] + out["gradients"] + out["adamw"] + out["gathered_weights"]
    out["total"] = int(states + out["activations"] + out["embeddings_and_logits"])
    out["setting"] = {"world_size": world_size, "batch_size": batch_size, "bytes_per_row": bytes_per_row,
                      "activation_checkpointing": activation_checkpointing, "hash_sharding": hash_sharding}
    return out
