"""The BPE baseline (torchblt.baselines.bpe): tokenizer training, bits per byte on one scale with byte
models (hand-computed for a uniform model), ``blt eval`` on a BPE folder, and training with ``blt train``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tokenizers")

from torchblt.baselines.bpe import (  # noqa: E402
    BOS,
    EOS,
    BPEConfig,
    BPELoader,
    load_bpe_model,
    save_bpe_model,
    train_bpe_tokenizer,
)
from torchblt.cli import main as blt_main  # noqa: E402
from torchblt.eval.bpb import evaluate_bpb  # noqa: E402
from torchblt.formats.common import build_model  # noqa: E402
from torchblt.model.config import tiny_entropy  # noqa: E402

TEXT = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "And by opposing end them. To die: to sleep; no more; and by a sleep to say we end.",
] * 4
DOCS = ["To be or not to be.", "Ünïcödé and the sea of troubles — 東京", b"raw \xff bytes"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return train_bpe_tokenizer(TEXT, 300, path)


def _model(tokenizer, zero_head: bool = False):
    torch.manual_seed(0)
    base = tiny_entropy()
    cfg = BPEConfig(transformer=base.transformer, vocab_size=tokenizer.vocab_size, tokenizer=str(tokenizer.path))
    model = build_model(cfg, "cpu")
    model.init_weights()
    if zero_head:
        torch.nn.init.zeros_(model.output.weight)
    return model.eval()


def test_tokenizer(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 300
    assert [tokenizer.tok.token_to_id(s) for s in ("<boe>", "<bos>", "<eos>")] == [0, 1, 2]
    for text in ["To be, or not to be", "Ünïcödé 東京 — ok", ""]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert sum(tokenizer.token_bytes(i) for i in ids) == len(text.encode())
    assert len(tokenizer.encode(TEXT[0])) < len(TEXT[0].encode()) / 1.5  # merges were learned
    assert tokenizer.bytes_per_token(TEXT) > 1.5
    with pytest.raises(FileExistsError):
        train_bpe_tokenizer(TEXT, 300, tokenizer.path)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(TEXT, 100, tmp_path / "t.json")


def test_uniform_bpe_model_bits_per_byte_by_hand(tokenizer):
    model = _model(tokenizer, zero_head=True)
    r = evaluate_bpb(model, DOCS, context_bytes=8)  # windows too
    n_bytes = [len(d.encode() if isinstance(d, str) else d) for d in DOCS]
    n_tokens = [len(tokenizer.encode(d)) + 1 for d in DOCS]  # + EOS
    expected = sum(n_tokens) * math.log2(tokenizer.vocab_size) / (sum(n_bytes) + len(DOCS))
    assert r.n_bytes == sum(n_bytes) and r.n_targets == sum(n_bytes) + len(DOCS)
    assert r.bpb == pytest.approx(expected, rel=1e-6)


@torch.no_grad()
def test_bpe_bpb_equals_direct_forward(tokenizer):
    model = _model(tokenizer)
    r = evaluate_bpb(model, DOCS)
    nats = 0.0
    for d in DOCS:
        ids = torch.tensor([[BOS, *tokenizer.encode(d), EOS]])
        nats += float(F.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="sum"))
    assert r.nats == pytest.approx(nats, rel=1e-5)


def test_save_load_and_blt_eval(tokenizer, tmp_path, capsys):
    model = _model(tokenizer)
    out = save_bpe_model(model, tmp_path / "bpe", extra={"bpe": {"bytes_per_token": 3.0}})
    assert (out / "tokenizer.json").is_file()
    loaded = load_bpe_model(out)
    ids = torch.tensor([[BOS, 40, 50]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:2]))
    assert blt_main(["eval", str(out), str(data), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["bpb"] == pytest.approx(evaluate_bpb(model, DOCS[:2]).bpb, rel=1e-6)
    assert blt_main(["flops", str(out), "--json"]) == 0
    flops_out = json.loads(capsys.readouterr().out)
    assert flops_out["kind"] == "bpe" and flops_out["bytes_per_token"] == 3.0
    # the generic loader and blt info read BPE folders too (their config carries the tokenizer)
    from torchblt import load_model

    generic = load_model(out)
    assert generic.config.tokenizer.endswith("tokenizer.json")
    with torch.no_grad():
        assert torch.equal(generic(ids), model(ids))
    assert blt_main(["info", str(out)]) == 0


def test_cli_tokenizer(tmp_path, capsys):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    out = tmp_path / "tok.json"
    assert blt_main(["bpe-tokenizer", str(src), "--vocab-size", "280", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 280 and info["bytes_per_token"] > 1.0 and out.is_file()
    assert blt_main(["bpe-tokenizer", str(src), "--vocab-size", "280", "--out", str(out)]) == 2


def test_loader_packs_and_resumes(tokenizer, tmp_path):
    from torchblt.data import DataConfig

    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    cfg = DataConfig(sources=[str(src)], kind="bytes", seq_len=16, batch_size=2)
    loader = BPELoader(cfg, tokenizer=str(tokenizer.path))
    first = loader.next_batch()
    assert first.x.shape == (2, 16) and torch.equal(first.x[0, 1:], first.y[0, :-1])
    assert torch.equal(first.x[1, 0], first.y[0, -1])  # rows continue the stream: no target skipped
    assert not first.mask[first.y == BOS].any()
    state = loader.state_dict()
    a = [loader.next_batch() for _ in range(3)]
    again = BPELoader(cfg, tokenizer=str(tokenizer.path))
    again.load_state_dict(json.loads(json.dumps(state)))
    b = [again.next_batch() for _ in range(3)]
    for x, y in zip(a, b):
        assert torch.equal(x.x, y.x) and torch.equal(x.target_bytes, y.target_bytes)
    # the byte count of the targets is the text's
    assert first.n_bytes == int(first.target_bytes[first.mask].sum())


def test_blt_train_bpe_kind_then_eval(tokenizer, tmp_path, capsys):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    cfg = tmp_path / "bpe.yaml"
    cfg.write_text(
        "model:\n  kind: torchblt.baselines.bpe:bpe\n  arch:\n    base: tiny-entropy\n"  # the first release's name
        f"    tokenizer: {tokenizer.path}\n"
        f"data:\n  sources: [{src}]\n  validation: [{src}]\n  seq_len: 32\n  batch_size: 2\n"
        "optim:\n  warmup_steps: 1\ntrain:\n  steps: 3\ncheckpoint:\n  every: 3\n"
        "log:\n  every: 1\n  tensorboard: false\n"
    )
    run = tmp_path / "run"
    assert blt_main(["train", str(cfg), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    model = load_bpe_model(run / "model")
    assert isinstance(model.config, BPEConfig) and model.config.vocab_size == tokenizer.vocab_size
    assert blt_main(["eval", str(run / "model"), str(src), "--json"]) == 0
    bpb = json.loads(capsys.readouterr().out)["bpb"]
    assert bpb == pytest.approx(evaluate_bpb(model, TEXT).bpb, rel=1e-6)
    assert bpb < math.log2(tokenizer.vocab_size) * 2  # a few steps of training, finite and sane


def test_bpe_is_a_model_type_of_our_format(tokenizer, tmp_path):
    """save_model / load_model handle BPE folders (model_type "bpe", tokenizer.json inside); folders of the
    first release (model_type "entropy_model" with a tokenizer path in the config) still load."""
    from torchblt import load_model, save_model
    from torchblt.formats.native import folder_model_type

    model = _model(tokenizer)
    out = save_model(model, tmp_path / "m")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "bpe" and raw["config"]["tokenizer"] == "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == tokenizer.path.read_bytes()
    ids = torch.tensor([[BOS, 40, 50]])
    moved = tmp_path / "moved"
    out.rename(moved)  # self-contained: the tokenizer travels with the folder
    loaded = load_model(moved)
    assert isinstance(loaded.config, BPEConfig) and loaded.config.tokenizer == str((moved / "tokenizer.json").resolve())
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((moved / "model.safetensors").read_bytes())
    raw["model_type"], raw["config"]["tokenizer"] = "entropy_model", str(tokenizer.path)
    (old / "config.json").write_text(json.dumps(raw))
    assert folder_model_type(old) == "bpe"
    with torch.no_grad():
        assert torch.equal(load_model(old)(ids), model(ids))


def test_bpe_loader_gets_the_tokenizer_of_the_model_it_feeds(tokenizer, tmp_path):
    """The tokenizer reaches the loader through the model config, not through the last config built."""
    from torchblt.data import DataConfig
    from torchblt.train.kinds import get_kind

    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    other = train_bpe_tokenizer(TEXT[:3], 280, tmp_path / "other.json")
    kind = get_kind("bpe")
    cfg = DataConfig(sources=[str(src)], kind="bytes", seq_len=16, batch_size=2)
    model_config = kind.make_config({"base": "tiny-entropy", "tokenizer": str(tokenizer.path)})
    loader = kind.make_loader(cfg, rank=0, world_size=1, entropy_model=None, model_config=model_config)
    kind.make_config({"base": "tiny-entropy", "tokenizer": str(other.path)})  # another run's config
    assert loader.tokenizer.path == tokenizer.path.resolve() and loader.tokenizer.vocab_size == 300
    assert int(loader.next_batch().x.max()) < 300
