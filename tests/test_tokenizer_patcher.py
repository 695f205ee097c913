"""Tokenizer round trips, BPE-delimited tokenizer, and patcher behaviour beyond the fixtures."""

from __future__ import annotations

import pytest
import torch

from torchblt import BPEDelimitedTokenizer, ByteTokenizer, Patcher, load_model
from torchblt.patching import split_first_patch

FIX = "tests/fixtures/reference"


def test_bytes_round_trip_keeps_invalid_utf8():
    tok = ByteTokenizer()
    raw = b"ok \xff\xfe \xc3 \xe2\x82 end\x00"
    ids = tok.encode(raw)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len(raw) + 2
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(ids) == "ok    end\x00"  # invalid sequences dropped, as the reference
    assert tok.decode(ids, errors="replace").count("\ufffd") == 4


def test_decode_never_raises():
    tok = ByteTokenizer()
    assert tok.decode([1, -5, 300, 104, 105, 2, 99999]) == "de"
    assert tok.decode([]) == ""
    with pytest.raises(TypeError):
        tok.encode(123)  # type: ignore[arg-type]


def test_bpe_delimited_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat on the mat", "a byte latent transformer", "patches scale better"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60, model_type="bpe", minloglevel=2
    )
    tok = BPEDelimitedTokenizer(str(tmp_path / "sp.model"))
    text = "the cat sat on a mat"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[1] == 3 and ids[-1] == 2
    assert tok.decode(ids) == " " + text or tok.decode(ids) == text
    pieces = tok.pieces(text)
    assert sum(p.count("\u2581") for p in pieces) == 0
    assert ids.count(3) == len(pieces)
    # bpe patching: every delimiter ends a patch, so patches are [BOS] [BPE] [piece bytes + BPE] ...
    lengths, _ = Patcher(mode="bpe").patch(torch.tensor([ids]), include_next_token=False)
    assert lengths.sum() == len(ids) and lengths[0, 0] == 1
    with pytest.raises(FileNotFoundError):
        BPEDelimitedTokenizer(str(tmp_path / "missing.model"))


def test_entropies_are_per_row():
    """Rows of a batch get exactly the entropies they get alone (the reference leaks across rows)."""
    em = load_model(f"{FIX}/03_entropy_model/entropy_model")
    tok = ByteTokenizer()
    a = tok.encode("first row of the batch", add_eos=False)
    b = tok.encode("second, different row", add_eos=False)
    batch = torch.tensor([a, b[: len(a)] + [0] * (len(a) - len(b[: len(a)]))])
    ent = em.entropies(batch)
    torch.testing.assert_close(ent[0:1], em.entropies(torch.tensor([a])), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[1:2], em.entropies(batch[1:2]), atol=1e-5, rtol=0)


def test_static_fractional_patch_size_and_integer():
    tokens = torch.zeros(2, 18, dtype=torch.long)
    lengths, _ = Patcher(mode="static", patch_size=4.5).patch(tokens)
    assert lengths.tolist() == [[4, 5, 4, 5]] * 2  # boundaries at floor(i * 4.5): mean exactly 4.5
    lengths, _ = Patcher(mode="static", patch_size=4).patch(tokens, include_next_token=True)
    assert lengths.tolist() == [[4, 4, 4, 4, 3]] * 2
    with pytest.raises(ValueError, match="patch_size"):
        Patcher(mode="static")


def test_space_batch_without_next_token_and_max_length():
    tok = ByteTokenizer()
    rows = ["a bb ccc dddd", "xxxxxxxxxxx y"]
    tokens = torch.tensor([tok.encode(r, add_eos=False) for r in rows])
    lengths, _ = Patcher(mode="space", max_patch_length=3).patch(tokens)
    assert (lengths.sum(1) == tokens.shape[1]).all()
    assert lengths.max() <= 3
    for b in range(2):
        alone, _ = Patcher(mode="space", max_patch_length=3).patch(tokens[b : b + 1])
        assert lengths[b, : alone.shape[1]].tolist() == alone[0].tolist()


def test_seq_lens_for_right_padded_rows():
    tokens = torch.tensor([[1, 10, 11, 12, 13], [1, 10, 11, 0, 0]])
    lengths, _ = Patcher(mode="byte").patch(tokens, include_next_token=True, seq_lens=torch.tensor([5, 3]))
    assert lengths.sum(1).tolist() == [6, 4]


def test_split_first_patch():
    assert split_first_patch(torch.tensor([[4, 4, 3], [1, 5, 5]])).tolist() == [[1, 3, 4, 3], [1, 5, 5, 0]]


def test_patcher_errors():
    with pytest.raises(ValueError, match="mode"):
        Patcher(mode="words")
    with pytest.raises(ValueError, match="entropy_model"):
        Patcher(mode="entropy").patch(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_patch_length"):
        Patcher(mode="byte", max_patch_length=0)
