"""Tiny BLT variants covering every architecture option, and how the model tests build them."""

from __future__ import annotations

import dataclasses

import torch

from torchblt import BLT
from torchblt.formats.common import build_model
from torchblt.model.config import BLTConfig, CrossAttentionConfig, HashConfig, tiny_blt
from torchblt.model.transformer import StackConfig


def make(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, device="cpu")
    model.init_weights()
    if isinstance(model, BLT):
        model.local_decoder.output.weight.data *= 4
    return model.eval()


def variants() -> dict[str, BLTConfig]:
    base = tiny_blt()
    local = StackConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, attention="local_block_causal", window=6)
    return {
        "tiny": base,
        "all_layers_windows_gqa": dataclasses.replace(
            base,
            encoder=local,
            decoder=local,
            global_=dataclasses.replace(base.global_, n_kv_heads=2, attention="causal"),
            cross_attn=CrossAttentionConfig(k=2, n_heads=2, all_layers_encoder=True, window_encoder=2, window_decoder=3),
            hash=HashConfig(group_sizes=[3, 5], vocab_size=97, n_functions=2),
        ),
        "pooling_no_cross_attn": dataclasses.replace(
            base, cross_attn=CrossAttentionConfig(encoder=False, decoder=False), pooling="avg,min,max", hash=None
        ),
        "concat_static": dataclasses.replace(
            base,
            cross_attn=CrossAttentionConfig(encoder=False, decoder=False),
            pooling="",
            patching=dataclasses.replace(base.patching, mode="static", patch_size=4),
        ),
        "k4_global_projection": dataclasses.replace(base, cross_attn=CrossAttentionConfig(k=4, n_heads=2)),
    }
