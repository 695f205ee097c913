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

    res = evaluate_package(tmp_path / "run", corpus, max_bytes_per_source=8192)
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


TINY_ENTROPY = """
model:
  kind: entropy
  arch: {base: tiny-entropy, transformer: {dim: 32, n_layers: 1, n_heads: 2, multiple_of: 32, window: 32, max_seqlen: 256}}
data: {sources: [], validation: [], seq_len: 64, batch_size: 4, shuffle_buffer: 8}
optim: {lr: 3.0e-3, warmup_steps: 1}
train: {steps: 4}
checkpoint: {every: 100, keep: 1}
eval: {every: 0, batch_size: 4, max_documents: 2, context_bytes: 64}
log: {every: 2, progress: false, tensorboard: false}
"""

TINY_BLT = """
model:
  kind: blt
  arch:
    base: tiny-blt
    hash: {vocab_size: 64, group_sizes: [3, 4]}
  entropy_model: null
data: {sources: [], validation: [], patching: {mode: entropy, threshold: null}, seq_len: 16, max_bytes: 64,
       batch_size: 4, shuffle_buffer: 8}
optim: {lr: 2.0e-3, warmup_steps: 1}
train: {steps: 3}
checkpoint: {every: 100, keep: 1}
eval: {every: 0, batch_size: 4, max_documents: 2, context_bytes: 64}
log: {every: 1, progress: false, tensorboard: false}
"""


def test_recipe_runs_end_to_end_from_one_command_and_resumes(tmp_path, monkeypatch, capsys):
    # `blt builtin train --out DIR`, with the real recipe code on a synthetic corpus (its packages in the cache,
    # so nothing is fetched) and tiny configs: every step runs, stopping early and re-running resumes, and a
    # finished recipe re-run redoes nothing.
    import torchblt.data.corpus as corpus_mod
    from torchblt.cli import main

    cache = tmp_path / "cache"
    table = synthetic_sources(cache)
    monkeypatch.setattr(corpus_mod, "SOURCES", table)
    monkeypatch.setattr(corpus_mod, "_BY_NAME", {s.name: s for s in table})
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "builtin-entropy.yaml").write_text(TINY_ENTROPY)
    (configs / "builtin-blt.yaml").write_text(TINY_BLT)
    out = tmp_path / "out"
    argv = ["builtin", "train", "--out", str(out), "--cache", str(cache), "--configs", str(configs),
            "--mix-bytes", "40000", "--eval-bytes", "4096"]

    assert main([*argv, "--stop-after", "entropy_model"]) == 0
    assert (out / "entropy" / "finished.json").is_file() and not (out / "blt").exists()
    em_weights = (out / "entropy" / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()

    assert main(argv) == 0  # resumes: the entropy model is not trained again
    log = capsys.readouterr().out
    assert "3/8 train the entropy model" not in log and "6/8 train the BLT" in log
    assert (out / "entropy" / "model" / "model.safetensors").read_bytes() == em_weights
    res = json.loads((out / "eval.json").read_text())
    assert res["max_bytes_per_source"] == 4096
    assert set(res["per_language"]) == {"xx", "yy", "en"}
    assert all(0 < v["bpb"] < 9 and v["xz_9e_bpb"] > 0 and v["mean_patch_tokens"] > 1 for v in res["per_language"].values())
    threshold = json.loads((out / "calibration" / "threshold.json").read_text())["threshold"]
    shipped = load_model(out / "package", dtype=torch.bfloat16)
    assert shipped.config.patching.threshold == pytest.approx(threshold)
    assert attached_entropy_model(shipped) is not None
    card = json.loads((out / "package" / "card.json").read_text())
    assert card["finished"]["blt"]["step"] == 3 and card["finished"]["entropy"]["step"] == 4
    assert set(card["recipe_seconds"]) >= {"corpus", "mix", "entropy_model", "entropies", "calibrate", "blt", "evaluate"}

    stamp = {p: p.stat().st_mtime_ns for p in (out / "eval.json", out / "package" / "model.safetensors")}
    assert main(argv) == 0  # finished: nothing is trained, packaged or evaluated again
    log = capsys.readouterr().out
    assert "train the entropy model" not in log and "train the BLT" not in log
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
