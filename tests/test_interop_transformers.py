"""Hugging Face transformers interop against the installed ``transformers`` (``BltForCausalLM``): equal
logits on tiny random models, folder round trips, ``load_model`` on a transformers folder, ``blt convert``,
and where the two differ (an EOS inside the input)."""

from __future__ import annotations

import json

import pytest
import torch

from torchblt import load_model, save_model
from torchblt.cli import main as blt_main
from torchblt.formats import detect_format
from torchblt.formats.common import build_model
from torchblt.formats.transformers import (
    config_from_transformers,
    config_to_transformers,
    from_transformers_model,
    save_transformers,
    to_transformers_model,
)
from torchblt.model.config import tiny_blt, tiny_entropy
from torchblt.patching import Patcher, attach_entropy_model, split_first_patch

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _models(cfg=None, with_entropy=True, seed=0):
    torch.manual_seed(seed)
    cfg = cfg or tiny_blt()
    # a threshold inside the tiny random entropy model's range (about 4.8-5.2), so patches vary
    cfg.patching.threshold = 5.08
    blt = build_model(cfg, "cpu")
    blt.init_weights()
    blt.eval()
    if with_entropy:
        em = build_model(tiny_entropy(), "cpu")
        em.init_weights()
        attach_entropy_model(blt, em.eval())
    return blt


def _tokens(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, 260, (batch, n), generator=g)
    toks[:, 0] = 1
    return toks


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max())


@torch.no_grad()
def test_equal_logits_explicit_and_in_forward_patching():
    blt = _models()
    hf = to_transformers_model(blt)
    toks = _tokens(48)  # shorter than the local windows (64)
    lengths, _ = Patcher.for_model(blt).patch(toks, include_next_token=True)
    lengths = split_first_patch(lengths)
    assert lengths.shape[1] > 5 and len(set(lengths[lengths > 0].tolist())) > 1
    assert _max_diff(blt(toks, lengths), hf(toks, patch_lengths=lengths).logits) < TOL
    # the port's own patcher (its bundled entropy model) against ours
    assert _max_diff(blt(toks), hf(toks).logits) < TOL
    # and back again: identical weights
    back = from_transformers_model(hf)
    assert _max_diff(back(toks, lengths), blt(toks, lengths)) == 0.0


@pytest.mark.parametrize("variant", ["k1_same_width", "no_hash_gqa", "decoder_cross_first_layer_only"])
@torch.no_grad()
def test_equal_logits_on_config_variants(variant):
    cfg = tiny_blt()
    if variant == "k1_same_width":  # no decoder projection on our side: an identity in the port
        cfg.cross_attn.k, cfg.global_.dim, cfg.global_.n_heads = 1, 32, 2
    elif variant == "no_hash_gqa":  # no hash tables: one zero table in the port
        cfg.hash, cfg.global_.n_kv_heads = None, 2
    else:
        cfg.cross_attn.all_layers_decoder = False
    blt = _models(cfg, with_entropy=False)
    hf = to_transformers_model(blt)
    toks = _tokens(40)
    lengths = split_first_patch(Patcher("static", patch_size=3).patch(toks, include_next_token=True)[0])
    assert _max_diff(blt(toks, lengths), hf(toks, patch_lengths=lengths).logits) < TOL
    back = from_transformers_model(hf)
    assert back.config == blt.config or variant == "no_hash_gqa"
    assert _max_diff(back(toks, lengths), blt(toks, lengths)) < TOL


@torch.no_grad()
def test_beyond_the_windows_and_where_they_differ():
    blt = _models()
    hf = to_transformers_model(blt)
    toks = _tokens(150, batch=1)  # longer than the 64-byte local windows
    lengths = split_first_patch(Patcher.for_model(blt).patch(toks, include_next_token=True)[0])
    beyond = _max_diff(blt(toks, lengths), hf(toks, patch_lengths=lengths).logits)
    if hasattr(transformers.BltConfig(), "local_attention_window_len"):
        assert beyond < TOL  # ports with sliding-window local masks agree beyond the windows
    else:  # older ports: plain causal local masks, so bytes past the window see more than ours
        assert beyond > 1e-3
    # an EOS inside the input: ours are block-causal (documents do not see each other), the port's are not
    toks[0, 30] = 2
    lengths = split_first_patch(Patcher.for_model(blt).patch(toks, include_next_token=True)[0])
    ours, theirs = blt(toks, lengths), hf(toks, patch_lengths=lengths).logits
    assert _max_diff(ours[:, :30], theirs[:, :30]) < TOL
    assert _max_diff(ours[:, 31:], theirs[:, 31:]) > 1e-2


@torch.no_grad()
def test_folder_round_trip_and_load_model(tmp_path):
    blt = _models()
    out = save_transformers(blt, tmp_path / "hf")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "blt" and raw["architectures"] == ["BltForCausalLM"]
    assert detect_format(out) == "transformers"
    hf = transformers.BltForCausalLM.from_pretrained(out).eval()
    toks = _tokens(48)
    assert _max_diff(blt(toks), hf(toks).logits) < TOL
    # load_model reads the folder directly (entropy model from model.patcher attached)
    ours = load_model(out)
    assert Patcher.for_model(ours).entropy_model is not None
    assert _max_diff(ours(toks), blt(toks)) < TOL
    cfg, ecfg = config_from_transformers(raw)
    assert cfg == blt.config and ecfg == Patcher.for_model(blt).entropy_model.config
    with pytest.raises(FileExistsError, match="overwrite"):
        save_transformers(blt, out)


def test_unconvertible_configs_name_the_field():
    cfg = tiny_blt()
    cfg.cross_attn.n_heads = 1
    with pytest.raises(ValueError, match="cross_attn.n_heads"):
        config_to_transformers(cfg)
    cfg = tiny_blt()
    cfg.cross_attn.all_layers_encoder, cfg.encoder.n_layers = True, 2
    with pytest.raises(ValueError, match="all_layers_encoder"):
        config_to_transformers(cfg)
    cfg = tiny_blt()
    cfg.cross_attn.encoder = False
    with pytest.raises(ValueError, match="cross_attn.encoder"):
        config_to_transformers(cfg)


@torch.no_grad()
def test_cli_convert_both_ways(tmp_path, capsys):
    blt = _models()
    src = tmp_path / "ours"
    save_model(blt, src)
    save_model(Patcher.for_model(blt).entropy_model, src / "entropy_model")
    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert blt_main(["convert", str(src), str(hf_dir), "--to", "transformers"]) == 0
    assert "entropy model bundled" in capsys.readouterr().out
    assert blt_main(["convert", str(hf_dir), str(back_dir), "--from", "transformers"]) == 0
    back = load_model(back_dir)
    assert (back_dir / "entropy_model" / "config.json").is_file() and Patcher.for_model(back).entropy_model is not None
    for (k, a), (k2, b) in zip(sorted(blt.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b)
    assert blt_main(["convert", str(src), str(hf_dir), "--to", "transformers"]) == 2  # exists
    assert "overwrite" in capsys.readouterr().err
    assert blt_main(["convert", str(src), str(tmp_path / "x"), "--from", "transformers"]) == 2
    assert "not a transformers BLT folder" in capsys.readouterr().err
