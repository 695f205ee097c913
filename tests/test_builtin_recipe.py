"""The recipe's last steps (package in bf16, evaluation against xz, model card) on tiny models and a synthetic corpus."""

from __future__ import annotations

import json
import lzma

import pytest
import torch
from test_data_corpus import synthetic_sources

from torchblt.builtin.package import evaluate_package, write_package, xz_bpb
from torchblt.builtin.recipe import run_recipe
from torchblt.data.corpus import build_corpus
from torchblt.formats import load_model, save_model
from torchblt.formats.common import build_model
from torchblt.model.config import tiny_blt, tiny_entropy
from torchblt.patching import attached_entropy_model


def test_xz_bpb_is_xz_9e_of_the_concatenation():
    texts = [b"abc " * 500, "zürich ".encode() * 300]
    bpb, packed = xz_bpb(texts)
    assert packed == len(lzma.compress(b"".join(texts), preset=9 | lzma.PRESET_EXTREME))
    assert bpb == pytest.approx(8 * packed / sum(map(len, texts)))


def test_package_and_evaluate_write_bf16_weights_eval_and_card(tmp_path):
    torch.manual_seed(0)
    cache = tmp_path / "cache"
    corpus = tmp_path / "corpus"
    build_corpus(corpus, cache=cache, offline=True, source_table=synthetic_sources(cache))
    cfg = tiny_blt()
    cfg.patching.threshold = 5.0
    blt = build_model(cfg, "cpu")
    blt.init_weights()
    em = build_model(tiny_entropy(), "cpu")
    em.init_weights()
    save_model(blt, tmp_path / "run" / "blt" / "model")
    save_model(em, tmp_path / "run" / "blt" / "model" / "entropy_model")
    (tmp_path / "run" / "calibration").mkdir()
    (tmp_path / "run" / "calibration" / "threshold.json").write_text(json.dumps(
        {"threshold": 5.0, "mean_patch_size": 4.5, "target_patch_size": 4.5}))

    write_package(tmp_path / "run" / "blt" / "model", tmp_path / "run" / "package")
    shipped = load_model(tmp_path / "run" / "package", dtype=torch.bfloat16)
    ref = blt.to(torch.bfloat16).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in shipped.state_dict().items())
    assert attached_entropy_model(shipped) is not None

    res = evaluate_package(tmp_path / "run", corpus)
    assert set(res["per_language"]) == {"xx", "yy", "en"}
    assert set(res["per_source"]) == {"fortunes-xx", "book-yy", "docs-en"}
    for v in res["per_language"].values():
        assert 6.0 < v["bpb"] < 9.0  # random weights: about log2(260) = 8.02 bits per byte
        assert 0 < v["xz_9e_bpb"] < 8 and v["below_xz"] == pytest.approx(v["xz_9e_bpb"] - v["bpb"], abs=2e-4)
        assert v["mean_patch_tokens"] > 1
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["per_language"] == res["per_language"]
    card = (tmp_path / "run" / "package" / "README.md").read_text()
    assert "| xx |" in card and "fortunes-xx" in card and "xz -9e" in card
    assert json.loads((tmp_path / "run" / "package" / "card.json").read_text())["calibration"]["threshold"] == 5.0


def test_recipe_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="--stop-after: must be one of"):
        run_recipe(tmp_path, stop_after="nope")
    with pytest.raises(FileNotFoundError, match="builtin-entropy.yaml: missing"):
        run_recipe(tmp_path, configs=tmp_path)
