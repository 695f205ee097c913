"""FLOPs accounting (torchblt.flops) and ``blt flops``: hand-computed values and consistency with the
parameters each part applies per byte."""

from __future__ import annotations

import json

import pytest
from torch import nn

from torchblt import flops
from torchblt.cli import main as blt_main
from torchblt.formats.common import build_model
from torchblt.model.config import blt_1b, entropy_100m, tiny_blt, tiny_entropy
from torchblt.model.transformer import StackConfig


def _linear_params(module: nn.Module, exclude: tuple[str, ...] = ()) -> int:
    return sum(
        m.weight.numel()
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(name.startswith(e) for e in exclude)
    )


def test_layer_flops_by_hand():
    stack = StackConfig(dim=64, n_layers=3, n_heads=4, multiple_of=32)  # F = 192
    layer = flops.layer_flops_per_token(stack, 100)
    assert layer == {"qkvo": 8 * 64 * 64, "attention": 4 * 100 * 64, "ffn": 6 * 64 * 192}
    assert flops.transformer_flops_per_token(stack, 100, 260) == 3 * (32768 + 25600 + 73728) + 2 * 64 * 260
    gqa = StackConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=1, multiple_of=32)
    assert flops.layer_flops_per_token(gqa, 0)["qkvo"] == 2 * 64 * 64 + 4 * 64 * 16 + 2 * 64 * 64
    # a sliding window caps the attention context
    local = StackConfig(dim=64, n_layers=1, n_heads=4, multiple_of=32, attention="local_block_causal", window=8)
    assert flops.attention_context(local, 1000) == 8 and flops.attention_context(local, 5) == 5


def test_byte_model_without_attention_is_twice_its_linear_parameters():
    cfg = tiny_entropy()
    model = build_model(cfg, "meta")
    f = flops.byte_flops_per_byte(cfg, context=0)
    assert f["forward"] == 2 * _linear_params(model)  # embeddings are free lookups
    assert f["train"] == 3 * f["forward"]


def test_blt_parts_match_parameters_applied_per_byte():
    cfg = tiny_blt()
    model = build_model(cfg, "meta")
    ps = 3.0
    f = flops.blt_flops_per_byte(cfg, ps, context_bytes=1e-9)  # ~no self-attention term
    enc, glob, dec = model.local_encoder, model.global_transformer, model.local_decoder
    k, E, D = cfg.cross_attn.k, cfg.encoder.dim, cfg.decoder.dim
    assert f["local_encoder"] == pytest.approx(2 * _linear_params(enc.layers))
    assert f["global"] == pytest.approx(2 * _linear_params(glob) / ps)
    assert f["local_decoder"] == pytest.approx(2 * (_linear_params(dec.layers) + dec.output.weight.numel()))
    ca_enc, ca_dec = enc.cross_attn_layers[0], dec.cross_attn_layers
    expected_cross = (
        # encoder: k/ps slot queries per byte (wq, wo), every byte's keys/values, slot init per patch
        2 * (ca_enc.wq.weight.numel() + ca_enc.wo.weight.numel()) * k / ps
        + 2 * (ca_enc.wk.weight.numel() + ca_enc.wv.weight.numel())
        + 4 * E * k
        + 2 * enc.patch_embedding_projection.weight.numel() / ps
        # decoder (cross-attention in every layer): byte queries, k/ps slot keys/values, global projection
        + sum(2 * (c.wq.weight.numel() + c.wo.weight.numel()) for c in ca_dec)
        + sum(2 * (c.wk.weight.numel() + c.wv.weight.numel()) * k / ps for c in ca_dec)
        + len(ca_dec) * 4 * D * k
        + 2 * dec.patch_embedding_projection.weight.numel() / ps
    )
    assert f["cross_attention"] == pytest.approx(expected_cross)
    assert f["forward"] == pytest.approx(f["local_encoder"] + f["global"] + f["local_decoder"] + f["cross_attention"])
    assert "entropy_model" not in f and f["inference"] == f["forward"]


def test_global_term_shrinks_with_patch_size_and_entropy_is_forward_only():
    cfg, ecfg = blt_1b(), entropy_100m()
    a = flops.blt_flops_per_byte(cfg, 4.0, ecfg, context_bytes=16384)
    b = flops.blt_flops_per_byte(cfg, 8.0, ecfg, context_bytes=16384)
    assert a["local_encoder"] == b["local_encoder"] and a["local_decoder"] == b["local_decoder"]
    assert b["global"] < a["global"] / 2  # half the patches, each attending to half as many
    assert a["entropy_model"] == flops.entropy_flops_per_byte(ecfg, 16384)["forward"]
    assert a["train"] == pytest.approx(3 * a["forward"] + a["entropy_model"])
    assert a["inference"] == pytest.approx(a["forward"] + a["entropy_model"])


def test_bpe_per_byte_is_per_token_over_bytes_per_token():
    stack = StackConfig(dim=64, n_layers=2, n_heads=4, multiple_of=32)
    f = flops.bpe_flops_per_byte(stack, 1000, 4.0, context=128)
    assert f["per_token"] == flops.transformer_flops_per_token(stack, 128, 1000)
    assert f["forward"] == pytest.approx(f["per_token"] / 4.0)
    with pytest.raises(ValueError, match="bytes_per_token"):
        flops.bpe_flops_per_byte(stack, 1000, 0.0)


def test_param_counts():
    counts = flops.param_counts(tiny_blt())
    model = build_model(tiny_blt(), "meta")
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == counts["total"] - counts["hash_embeddings"] - model.local_encoder.tok_embeddings.weight.numel()
    e = flops.param_counts(tiny_entropy())
    assert e["non_embedding"] == e["total"] - e["embeddings"]


def test_cli_flops(tmp_path, capsys):
    assert blt_main(["flops", "blt-1b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    direct = flops.blt_flops_per_byte(blt_1b(), 4.5, entropy_100m())
    assert out["blt"] == pytest.approx(direct)
    assert out["bpe_transformer"]["forward"] == pytest.approx(
        flops.transformer_flops_per_token(blt_1b().global_, 4096 * 4.5 / 4.4, 128256) / 4.4
    )
    assert blt_main(["flops", "blt-7b", "--patch-size", "8", "--entropy-model", "none"]) == 0
    text = capsys.readouterr().out
    assert "global" in text and "BPE transformer" in text and "entropy_model" not in text
    # a training YAML: its arch and seq_len (patches) set the context
    yml = tmp_path / "run.yaml"
    yml.write_text("model:\n  kind: blt\n  arch: tiny-blt\ndata:\n  seq_len: 100\n")
    assert blt_main(["flops", str(yml), "--json", "--patch-size", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["context_bytes"] == 400
    assert out["blt"]["global"] == pytest.approx(flops.blt_flops_per_byte(tiny_blt(), 4, None, 400)["global"])
    assert blt_main(["flops", "entropy-100m", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "byte"
    assert blt_main(["flops", "no-such-thing"]) == 2
    assert "not a named config" in capsys.readouterr().err
    assert blt_main(["flops", "blt-1b", "--patch-size", "0"]) == 2
