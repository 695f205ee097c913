"""Golden outputs of Meta's reference implementation (tests/fixtures/reference, see its README).

Integers (ids, hashes, patch lengths) must match exactly; fp32 logits and entropies within ATOL.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.fixtures import FIXTURES, load_json, load_tensors
from torchblt import ByteTokenizer, Patcher, load_model, ngram_hash_ids
from torchblt.formats.common import build_model, load_state_dict_strict
from torchblt.formats.native import read_safetensors
from torchblt.formats.reference import blt_config_from_reference_args

ATOL = 1e-4  # measured max abs error: 4.8e-6 (BLT logits), see README "Exactness"


# ----------------------------------------------------------------------------- 01 tokenizer
TOK = load_json("01_tokenizer/tokenizer_cases.json")


@pytest.mark.parametrize("case", TOK["encode_cases"], ids=lambda c: repr(c.get("text", c["codepoints"]))[:30])
def test_tokenizer_encode(case):
    tok = ByteTokenizer()
    text = "".join(map(chr, case["codepoints"]))
    ids = case["ids"]
    assert tok.encode(text) == ids["default"]
    assert tok.encode(text, add_bos=True, add_eos=True) == ids["bos_eos"]
    assert tok.encode(text, add_bos=True, add_eos=False) == ids["bos_only"]
    assert tok.encode(text, add_bos=False, add_eos=True) == ids["eos_only"]
    assert tok.encode(text, add_bos=False, add_eos=False) == ids["none"]
    assert [ord(c) for c in tok.decode(ids["bos_eos"])] == case["decode"]["bos_eos"]
    assert [ord(c) for c in tok.decode(ids["bos_eos"], cut_at_eos=True)] == case["decode"]["bos_eos_cut_at_eos"]


@pytest.mark.parametrize("case", TOK["decode_cases"], ids=lambda c: c["name"])
def test_tokenizer_decode(case):
    tok = ByteTokenizer()
    assert [ord(c) for c in tok.decode(case["ids"])] == case["decode_codepoints"]
    cut = [ord(c) for c in tok.decode(case["ids"], cut_at_eos=True)]
    assert cut == case["decode_cut_at_eos_codepoints"]


# ----------------------------------------------------------------------------- 02 hash ids
HASH = load_tensors("02_hash_ngram_ids/hash_cases.safetensors")


def test_hash_ngram_ids_all_cases():
    checked = 0
    for name, expected in HASH.items():
        if not name.startswith("hash."):
            continue
        _, seq, g, f, m = name.split(".")
        got = ngram_hash_ids(HASH[f"tokens.{seq}"], int(g[1:]), int(f[1:]), int(m[1:]))
        assert torch.equal(got, expected), name
        checked += 1
    assert checked > 150



def test_hash_embedding_ids_equal_the_reference_ids_with_and_without_context():
    """HashNgramEmbedding.ids hashes every table in one product; it must give the reference's ids per table,
    also when the earlier tokens come as context (a decoding step) shorter or longer than the n-grams."""
    from torchblt.model.hash_embedding import HashNgramEmbedding

    cases: dict[tuple[str, int], dict[tuple[int, int], torch.Tensor]] = {}
    for name, expected in HASH.items():
        if name.startswith("hash."):
            _, seq, g, f, m = name.split(".")
            cases.setdefault((seq, int(m[1:])), {})[(int(f[1:]), int(g[1:]))] = expected
    checked = 0
    for (seq, vocab), by_table in cases.items():
        functions = sorted({f for f, _ in by_table})
        sizes = sorted({g for _, g in by_table})
        if functions != list(range(len(functions))) or len(by_table) != len(functions) * len(sizes):
            continue
        emb = HashNgramEmbedding(sizes, vocab, len(functions), 2)
        tokens = HASH[f"tokens.{seq}"]
        want = [by_table[(f, g)] for f in functions for g in sizes]
        assert [t.shape for t in emb.ids(tokens[:, :0])] == [tokens[:, :0].shape] * len(want)
        for got, exp in zip(emb.ids(tokens), want, strict=True):
            assert torch.equal(got, exp), seq
        for k in {1, 2, tokens.shape[1] // 2, tokens.shape[1] - 1} & set(range(1, tokens.shape[1])):
            for got, exp in zip(emb.ids(tokens[:, k:], context=tokens[:, :k]), want, strict=True):
                assert torch.equal(got, exp[:, k:]), (seq, k)
        checked += 1
    assert checked >= 3

# ----------------------------------------------------------------------------- 03 entropy model
ENT = load_tensors("03_entropy_model/entropy_cases.safetensors")


@pytest.fixture(scope="module")
def entropy_model():
    return load_model(FIXTURES / "03_entropy_model" / "entropy_model")


@pytest.mark.parametrize("name", ["short", "multilingual", "two_docs_with_eos"])
def test_entropy_model_logits(entropy_model, name):
    with torch.no_grad():
        logits = entropy_model(ENT[f"tokens.{name}"])
    torch.testing.assert_close(logits, ENT[f"logits.{name}"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["short", "english", "multilingual", "two_docs_with_eos", "long_700"])
def test_entropies(entropy_model, name):
    got = entropy_model.entropies(ENT[f"tokens.{name}"])
    torch.testing.assert_close(got, ENT[f"entropies.{name}"], atol=ATOL, rtol=0)


def test_entropies_over_8192(entropy_model):
    """Below 8192 we equal the reference; beyond, the reference restarts with no context while we keep
    the sliding window's context: our chunked result equals one forward over the whole sequence."""
    tokens = ENT["tokens.over_8192"]
    got = entropy_model.entropies(tokens, chunk_size=8192)
    torch.testing.assert_close(got[:, :8192], ENT["entropies.over_8192"][:, :8192], atol=ATOL, rtol=0)
    whole = entropy_model.entropies(tokens, chunk_size=10**9)
    torch.testing.assert_close(got, whole, atol=ATOL, rtol=0)
    small_chunks = entropy_model.entropies(tokens, chunk_size=1000)
    torch.testing.assert_close(small_chunks, whole, atol=ATOL, rtol=0)
    # positions just past 8192 have context here and none in the reference: they differ
    assert (got[:, 8192:8200] - ENT["entropies.over_8192"][:, 8192:8200]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 04 patcher
PCASES = load_json("04_patcher/patcher_cases.json")
PIN = load_tensors("04_patcher/patcher_inputs.safetensors")


def _patcher(variant: str, **kw) -> Patcher:
    v = PCASES["variants"][variant]
    return Patcher(
        mode=v["patching_mode"],
        threshold=v["threshold"],
        threshold_add=v["threshold_add"],
        monotonicity=v["monotonicity"],
        max_patch_length=v["max_patch_length"],
        patch_size=v["patch_size"],
        **kw,
    )


def _case_id(c):
    return f"{c['variant']}-{c['input']}-{'next' if c['include_next_token'] else 'nonext'}"


@pytest.mark.parametrize("case", PCASES["cases"], ids=_case_id)
def test_patcher_cases(case):
    patcher = _patcher(case["variant"])
    tokens = PIN[f"tokens.{case['input']}"]
    entropies = PIN[f"entropies.{case['input']}"] if patcher.mode == "entropy" else None
    lengths, _ = patcher.patch(tokens, include_next_token=case["include_next_token"], entropies=entropies)
    total = tokens.shape[1] + case["include_next_token"]
    assert (lengths.sum(1) == total).all()
    if case["patch_lengths"] is not None:
        assert lengths.tolist() == case["patch_lengths"]
    else:
        # the reference crashes here (space mode, B > 1, unequal patch counts): each row must equal its own run
        for b in range(tokens.shape[0]):
            alone, _ = patcher.patch(tokens[b : b + 1], include_next_token=case["include_next_token"])
            row = lengths[b][: alone.shape[1]]
            assert row.tolist() == alone[0].tolist()
            assert (lengths[b][alone.shape[1] :] == 0).all()


@pytest.mark.parametrize("case", PCASES["topk_cases"], ids=lambda c: c["input"])
def test_patcher_topk(case):
    patcher = Patcher(mode="entropy", threshold=None, patch_size=case["patch_size"])
    lengths, _ = patcher.patch(
        PIN[f"tokens.{case['input']}"], include_next_token=True, entropies=PIN[f"entropies.{case['input']}"]
    )
    assert lengths.tolist() == case["patch_lengths"]


@pytest.mark.parametrize("case", PCASES["realtime_cases"], ids=lambda c: c["input"])
def test_patcher_realtime(case):
    em = load_model(FIXTURES / "04_patcher" / "entropy_model")
    args = PCASES["realtime_patcher_args"]
    patcher = Patcher(mode="entropy", threshold=args["threshold"], entropy_model=em)
    lengths, scores = patcher.patch(PIN[f"tokens.{case['input']}"], include_next_token=True)
    assert lengths.tolist() == case["patch_lengths"]
    torch.testing.assert_close(scores, PIN[f"realtime_scores.{case['input']}"], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- 05 BLT forward
FWD = load_tensors("05_blt_forward/blt_forward_cases.safetensors")
FWD_CASES = ["single_random_patches", "utf8_random_patches", "two_docs_eos", "batch2_padded_patches", "long_window"]


@pytest.fixture(scope="module")
def blt():
    return load_model(FIXTURES / "05_blt_forward" / "blt_model")


@pytest.mark.parametrize("case", FWD_CASES + ["patcher_english", "patcher_code"])
def test_blt_forward(blt, case):
    with torch.no_grad():
        logits = blt(FWD[f"tokens.{case}"], patch_lengths=FWD[f"patch_lengths.{case}"])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, FWD[f"logits.{case}"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["patcher_english", "patcher_code"])
def test_blt_patcher_in_the_loop(case):
    """``patch_lengths=None``: the model patches with its attached entropy model (broken in the reference)."""
    model = load_model(FIXTURES / "05_blt_forward" / "blt_model", entropy_model=FIXTURES / "05_blt_forward" / "entropy_model")
    tokens = FWD[f"tokens.{case}"]
    lengths, scores = Patcher.for_model(model).patch(tokens, include_next_token=True)
    assert torch.equal(lengths, FWD[f"patch_lengths.{case}"])
    torch.testing.assert_close(scores, FWD[f"entropies.{case}"], atol=ATOL, rtol=0)
    with torch.no_grad():
        logits = model(tokens)
    torch.testing.assert_close(logits, FWD[f"logits.{case}"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["single_random_patches", "two_docs_eos"])
def test_blt_forward_sdpa_semantics(case):
    """A model configured with ``attn_impl="sdpa"`` runs plain causal attention, as the reference does."""
    from torchblt.formats.reference import read_json

    args = read_json(FIXTURES / "05_blt_forward" / "blt_model" / "config.json")["args"]
    args = {**args, "attn_impl": "sdpa", "attn_bias_type": "causal"}
    cfg = blt_config_from_reference_args(args)
    assert cfg.encoder.attention == cfg.decoder.attention == cfg.global_.attention == "causal"
    model = build_model(cfg)
    load_state_dict_strict(model, read_safetensors(FIXTURES / "05_blt_forward" / "blt_model" / "model.safetensors"), "fixture")
    with torch.no_grad():
        logits = model.eval()(FWD[f"tokens.{case}"], patch_lengths=FWD[f"patch_lengths.{case}"])
    torch.testing.assert_close(logits, FWD[f"logits_sdpa.{case}"], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- 07 consolidated
CONS = load_tensors("07_consolidated/consolidated_cases.safetensors")


def test_consolidated_blt_matches():
    model = load_model(FIXTURES / "07_consolidated" / "hf-weights" / "blt_tiny")
    with torch.no_grad():
        logits = model(CONS["tokens.single_random_patches"], patch_lengths=CONS["patch_lengths.single_random_patches"])
    torch.testing.assert_close(logits, CONS["logits.loaded_consolidated_blt"], atol=ATOL, rtol=0)
    # the patcher settings of params.json travel with the model
    assert model.config.patching.mode == "entropy"
    assert model.config.patching.threshold == pytest.approx(3.166949987411499)


def test_consolidated_entropy_model_fp32_and_bf16():
    folder = FIXTURES / "07_consolidated" / "hf-weights" / "entropy_model"
    tokens = CONS["tokens.entropy_english"]
    with torch.no_grad():
        fp32 = load_model(folder)(tokens)
        bf16_model = load_model(folder, dtype="bf16")
        bf16 = bf16_model(tokens)
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # unlike the reference loader, no global side effect
    torch.testing.assert_close(fp32, CONS["logits.entropy_model_fp32_reference"], atol=ATOL, rtol=0)
    # bf16 rounding differs from the reference's (which also computes entropies in bf16): loose tolerance
    torch.testing.assert_close(bf16, CONS["logits.loaded_entropy_model_bf16"], atol=0.3, rtol=0)
