"""Bits per byte (torchblt.eval.bpb) and ``blt eval``: hand-computable answers, windows, batching, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchblt import Patcher, load_model
from torchblt.cli import main as blt_main
from torchblt.eval.bpb import BPBResult, document_tokens, evaluate_bpb, make_windows
from torchblt.formats.common import build_model
from torchblt.model.config import tiny_blt
from torchblt.model.entropy_model import EntropyModelConfig
from torchblt.model.transformer import StackConfig
from torchblt.patching import split_first_patch

FIX = Path(__file__).parent / "fixtures" / "reference" / "05_blt_forward"
DOCS = ["Hello world, this is a test.", b"bytes \xff\xfe here", "short", "", "x" * 70]
LOG2_260 = math.log2(260)


def _entropy_model(attention: str = "local_block_causal", window: int | None = 64, n_layers: int = 2):
    torch.manual_seed(0)
    cfg = EntropyModelConfig(
        transformer=StackConfig(dim=32, n_layers=n_layers, n_heads=2, multiple_of=32, attention=attention, window=window)
    )
    model = build_model(cfg, "cpu")
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def fixture_blt():
    return load_model(FIX / "blt_model", entropy_model=FIX / "entropy_model")


def _direct_nats(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[0, :-1].detach().float(), tokens[0, 1:], reduction="sum"))


def test_uniform_byte_model_scores_log2_260():
    em = _entropy_model()
    torch.nn.init.zeros_(em.output.weight)  # logits 0 -> uniform over 260 ids
    r = evaluate_bpb(em, DOCS, context_bytes=8, batch_size=3)
    n_bytes = sum(len(d.encode() if isinstance(d, str) else d) for d in DOCS)
    assert r.n_bytes == n_bytes and r.n_documents == len(DOCS)
    assert r.n_targets == n_bytes + len(DOCS)  # every byte + one EOS per document
    assert r.bpb == pytest.approx(LOG2_260, abs=1e-6)
    assert r.nats_per_byte == pytest.approx(math.log(260), abs=1e-6)
    assert r.mean_patch_length is None
    r2 = evaluate_bpb(em, DOCS, count_eos=False)
    assert r2.n_targets == n_bytes and r2.bpb == pytest.approx(LOG2_260, abs=1e-6)


def test_uniform_blt_scores_log2_260():
    torch.manual_seed(0)
    blt = build_model(tiny_blt(), "cpu")
    blt.init_weights()
    torch.nn.init.zeros_(blt.local_decoder.output.weight)
    r = evaluate_bpb(blt.eval(), DOCS, patcher=Patcher("static", patch_size=3), context_bytes=16)
    assert r.bpb == pytest.approx(LOG2_260, abs=1e-6)
    assert r.n_windows > len(DOCS)  # the long documents were windowed


def test_short_documents_equal_one_direct_forward():
    em = _entropy_model()
    r = evaluate_bpb(em, DOCS, batch_size=2)
    nats = 0.0
    for d in DOCS:
        toks = torch.tensor([document_tokens(d)[0]])
        nats += _direct_nats(em(toks), toks)
    assert r.nats == pytest.approx(nats, rel=1e-5)
    assert r.bpb == pytest.approx(nats / r.n_targets / math.log(2), rel=1e-5)


def test_windows_keep_enough_context():
    # one layer with a sliding window of 8 keys: a target's logit depends on its 8 previous tokens only,
    # so windows of 16 (>= 8 tokens of history for every target) must equal one forward over the document
    em = _entropy_model(window=8, n_layers=1)
    doc = bytes(range(32, 127)) * 2
    toks = torch.tensor([document_tokens(doc)[0]])
    expected = _direct_nats(em(toks), toks)
    r = evaluate_bpb(em, [doc], context_bytes=16)
    assert r.n_windows > 10
    assert r.nats == pytest.approx(expected, rel=1e-5)
    # too short a window loses context, so the result changes (the test above can fail)
    r_short = evaluate_bpb(em, [doc], context_bytes=4)
    assert abs(r_short.nats - expected) > 1e-3


@pytest.mark.parametrize("context", [2, 3, 4, 7, 8, 16])
def test_make_windows_score_every_target_once(context):
    for length in range(1, 60):
        ws = make_windows(0, length, context)
        targets = [t for w in ws for t in range(w.score_from, w.end)]
        assert targets == list(range(1, length))
        for w in ws:
            assert w.end - w.start <= context
            assert w.score_from > w.start
            assert w.start == 0 or w.score_from - w.start >= math.ceil(context / 2)
    with pytest.raises(ValueError, match="context_bytes"):
        make_windows(0, 10, 1)


def test_blt_matches_direct_forward_and_batching(fixture_blt):
    blt = fixture_blt
    r1 = evaluate_bpb(blt, DOCS, batch_size=1)
    r8 = evaluate_bpb(blt, DOCS, batch_size=8)  # right-padded batches
    assert r8.nats == pytest.approx(r1.nats, rel=1e-5)
    assert r8.mean_patch_length == pytest.approx(r1.mean_patch_length)
    nats = 0.0
    for d in DOCS:
        toks = torch.tensor([document_tokens(d)[0]])
        lengths, _ = Patcher.for_model(blt).patch(toks, include_next_token=True)
        nats += _direct_nats(blt(toks, split_first_patch(lengths)), toks)
    assert r1.nats == pytest.approx(nats, rel=1e-5)


def test_mean_patch_length_by_hand(fixture_blt):
    doc = "a" * 20  # 22 tokens: BOS + 20 bytes + EOS
    r = evaluate_bpb(fixture_blt, [doc], patcher=Patcher("byte"))
    assert r.mean_patch_length == 1.0
    # static 4 over 23 slots: [4,4,4,4,4,3] -> BOS split off: [1,3,4,4,4,4,3] = 7 patches for 22 tokens
    r = evaluate_bpb(fixture_blt, [doc], patcher=Patcher("static", patch_size=4))
    assert r.mean_patch_length == pytest.approx(22 / 7)


def test_entropy_blt_without_entropy_model_is_a_clear_error():
    blt = load_model(FIX / "blt_model")
    with pytest.raises(ValueError, match="entropy model"):
        evaluate_bpb(blt, ["abc"])


def test_max_documents_str_and_bytes_and_combine():
    em = _entropy_model()
    a = evaluate_bpb(em, ["héllo", "world"], max_documents=1)
    b = evaluate_bpb(em, ["héllo".encode()])
    assert a.n_documents == 1 and a.nats == pytest.approx(b.nats) and a.n_bytes == 6
    c = evaluate_bpb(em, ["world"])
    both = evaluate_bpb(em, ["héllo", "world"])
    total = BPBResult.combine([b, c])
    assert total.nats == pytest.approx(both.nats, rel=1e-6) and total.n_targets == both.n_targets
    assert total.bpb == pytest.approx(both.bpb, rel=1e-6)


def test_cli_eval_files_and_json(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("A whole file is one document.\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for t in ["first doc", "second document"]:
            f.write(json.dumps({"text": t}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["parquet one", "parquet two", "three"]}), tmp_path / "c.parquet")
    em_dir = str(FIX / "entropy_model")
    files = [str(tmp_path / n) for n in ("a.txt", "b.jsonl")]
    assert blt_main(["eval", str(FIX / "blt_model"), *files, "--entropy-model", em_dir, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["files"]) == set(files)
    assert out["n_bytes"] == len("A whole file is one document.\n") + len("first doc") + len("second document")
    assert out["n_documents"] == 3 and out["mean_patch_length"] > 1
    per = [out["files"][f] for f in files]
    assert out["nats"] == pytest.approx(sum(p["nats"] for p in per))
    blt = load_model(FIX / "blt_model", entropy_model=em_dir)
    direct = evaluate_bpb(blt, [b"first doc", b"second document"])
    assert out["files"][files[1]]["bpb"] == pytest.approx(direct.bpb, rel=1e-6)

    # parquet with another column name, byte model, plain-text output
    assert blt_main(["eval", em_dir, str(tmp_path / "c.parquet"), "--text-field", "content", "--max-docs", "2"]) == 0
    assert "docs 2" in capsys.readouterr().out

    # errors are one line, exit code 2
    assert blt_main(["eval", em_dir, str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    assert blt_main(["eval", em_dir, str(tmp_path / "b.jsonl"), "--text-field", "body"]) == 2
    err = capsys.readouterr().err
    assert "2 missing_field" in err and "no documents to evaluate" in err
    with open(tmp_path / "mixed.jsonl", "w") as f:
        f.write(json.dumps({"text": "kept"}) + "\n" + json.dumps({"other": 1}) + "\n")
    assert blt_main(["eval", em_dir, str(tmp_path / "mixed.jsonl"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_documents"] == 1 and "1 missing_field" in captured.err
    assert blt_main(["eval", em_dir, str(tmp_path / "mixed.jsonl"), "--on-bad-record", "error"]) == 2
    assert "record 1" in capsys.readouterr().err
    assert blt_main(["eval", em_dir, str(tmp_path / "a.txt"), "--context-bytes", "1"]) == 2
    assert blt_main(["eval", em_dir, str(tmp_path / "a.txt"), "--patching", "byte"]) == 2


def test_cli_eval_standard_input_is_one_document(tmp_path, capsys, stdin_bytes):
    """``blt eval MODEL -``: standard input is one document, its bytes as they are (the same numbers as that
    text in a .txt file), named ``<stdin>``; given once; empty is an error."""
    em_dir = str(FIX / "entropy_model")
    text = "Standard input is one document: ü.\n".encode()
    (tmp_path / "same.txt").write_bytes(text)
    stdin_bytes(text)
    assert blt_main(["eval", em_dir, "-", str(tmp_path / "same.txt"), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert set(files) == {"<stdin>", str(tmp_path / "same.txt")}
    assert files["<stdin>"] == files[str(tmp_path / "same.txt")] and files["<stdin>"]["n_documents"] == 1
    stdin_bytes(b"")
    assert blt_main(["eval", em_dir, "-"]) == 2
    assert "<stdin>: no document to evaluate (standard input is empty)" in capsys.readouterr().err
    assert blt_main(["eval", em_dir, "-", "-"]) == 2
    assert "- (standard input) can be given once" in capsys.readouterr().err
