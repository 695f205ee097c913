"""Incremental (cached) generation == plain full recompute: same greedy bytes, logits within 1e-4.

Tiny random models (width 16-32) with local windows of 8-16 bytes, so prompts and generations run far
past every window; the decoder head is scaled so greedy argmax gaps are not ties.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.helpers.generation import (
    ARCHITECTURES,
    TEXT,
    TOK,
    assert_same,
    median_entropy,
    prompts_ids,
    tiny_em,
    tiny_model,
)
from torchblt import Patcher, load_model
from torchblt.generation import GenerationConfig, generate_tokens
from torchblt.tokenizer import EOS_ID

FIX = "tests/fixtures/reference/06_generation/"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fixture_greedy_matches_reference_both_engines():
    model, em = load_model(FIX + "blt_model"), load_model(FIX + "entropy_model")
    cases = json.load(open(FIX + "generation_cases.json"))["per_prompt_batch1"]
    patcher = Patcher.from_config(model.config.patching, em)
    prompts = [c["prompt_ids"] for c in cases]
    out = assert_same(model, patcher, prompts, n_new=40)
    for c, ids in zip(cases, out.tokens):
        assert ids == c["generated_ids"], c["prompt"]
    # batched: every row equals its single run (not the reference's cross-row leak)
    cfg = GenerationConfig(max_new_bytes=40, stop_at_eos=False)
    batched = generate_tokens(model, prompts, patcher, config=cfg)
    assert batched.tokens == [c["generated_ids"] for c in cases]


# ------------------------------------------------------------------ patching modes


def test_entropy_mode_windows_shorter_than_text():
    model, em = tiny_model(window=8), tiny_em(window=12)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    out = assert_same(model, patcher, prompts_ids(TEXT[:50], "Zü"), n_new=40)
    assert sum(out.patch_starts[0]) >= 5  # many patch boundaries during generation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"monotonicity": True, "threshold": 0.05},
        {"threshold_add": 0.05},
        {"max_patch_length": 3},
    ],
    ids=["monotonicity", "threshold_add", "max_patch_length"],
)
def test_entropy_variants(kwargs):
    model, em = tiny_model(seed=2), tiny_em(seed=3)
    kw = {"threshold": median_entropy(em), **kwargs}
    patcher = Patcher("entropy", entropy_model=em, **kw)
    assert_same(model, patcher, prompts_ids(TEXT[:33]), n_new=30)


@pytest.mark.parametrize(
    "patcher",
    [
        Patcher("space"),
        Patcher("static", patch_size=4.5),
        Patcher("static", patch_size=3, max_patch_length=2),
        Patcher("byte"),
        Patcher("space", max_patch_length=4),
    ],
    ids=["space", "static-4.5", "static-3-max2", "byte", "space-max4"],
)
def test_other_modes(patcher):
    model = tiny_model(seed=4)
    assert_same(model, patcher, prompts_ids("Hello, wor", TEXT[:41]), n_new=30)


# ------------------------------------------------------------------ architecture variants


@pytest.mark.parametrize("changes", list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def test_architectures(changes):
    model = tiny_model(seed=5, changes=changes)
    patcher = Patcher("space", max_patch_length=5)
    assert_same(model, patcher, prompts_ids(TEXT[:29], "a b"), n_new=30)


# ------------------------------------------------------------------ documents, batches, sampling


class _EosBias:
    """Forward hook: push the EOS logit up so EOS is sometimes generated (documents inside the text)."""

    def __init__(self, bias: float) -> None:
        self.bias = bias

    def __call__(self, module, inputs, output):
        out = output.clone()
        out[..., EOS_ID] += self.bias
        return out


def test_multi_document_text_and_generated_eos():
    model, em = tiny_model(seed=6, window=10), tiny_em(seed=7, window=10)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    doc1 = TOK.encode("first doc here.", add_bos=True, add_eos=True)
    doc2 = TOK.encode("second one", add_bos=True, add_eos=False)
    model.local_decoder.output.register_forward_hook(_EosBias(4.0))
    out = assert_same(model, patcher, [doc1 + doc2], n_new=40)
    assert EOS_ID in out.tokens[0]  # documents end during generation too


def test_batch_rows_equal_single_runs_and_finish_early():
    model, em = tiny_model(seed=8), tiny_em(seed=9)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    prompts = prompts_ids("x", TEXT[:45], "Zürich 日本", TEXT[10:20])
    cfg = GenerationConfig(max_new_bytes=25, stop_at_eos=False)
    batched = generate_tokens(model, prompts, patcher, config=cfg, return_logits=True)
    for r, p in enumerate(prompts):
        single = generate_tokens(model, [p], patcher, config=cfg, return_logits=True)
        assert single.tokens[0] == batched.tokens[r]
        assert (single.logits[0] - batched.logits[r]).abs().max() < 1e-4
    # a row stopped by a stop string leaves the batch; the others are unaffected
    stop_text = TOK.decode(batched.tokens[1][3:5])
    if stop_text:
        cfg2 = GenerationConfig(max_new_bytes=25, stop_at_eos=False, stop=[stop_text])
        out = generate_tokens(model, prompts, patcher, config=cfg2)
        assert out.finish_reasons[1] == "stop" and len(out.tokens[1]) <= 5
        for r in (0, 2, 3):
            n = len(out.tokens[r])
            assert out.tokens[r] == batched.tokens[r][:n]


def test_sampling_cached_equals_plain_and_is_reproducible():
    model = tiny_model(seed=10)
    patcher = Patcher("space")
    prompts = prompts_ids("Hello there", "abc")
    out = assert_same(model, patcher, prompts, n_new=30, temperature=0.8, top_k=20, top_p=0.95, seed=123)
    again = generate_tokens(model, prompts, patcher,
                            config=GenerationConfig(max_new_bytes=30, stop_at_eos=False, temperature=0.8,
                                                    top_k=20, top_p=0.95, seed=123))
    assert again.tokens == out.tokens
    other = generate_tokens(model, prompts, patcher,
                            config=GenerationConfig(max_new_bytes=30, stop_at_eos=False, temperature=0.8,
                                                    top_k=20, top_p=0.95, seed=124))
    assert other.tokens != out.tokens


def test_prompt_longer_than_every_window_and_cache_bounded():
    model, em = tiny_model(seed=11, window=8), tiny_em(seed=12, window=8)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    long_prompt = prompts_ids(TEXT * 2)  # ~200 bytes, 25x the window
    assert_same(model, patcher, long_prompt, n_new=12)
    from torchblt.generation import IncrementalEngine

    engine = IncrementalEngine(model, patcher, max_new_bytes=12)
    engine.start(long_prompt)
    for _ in range(12):
        engine.advance(torch.tensor([TOK.encode("a", add_bos=False, add_eos=False)[0]]))
    for name in ("encoder", "decoder", "entropy"):
        assert getattr(engine.state, name).capacity == 8, name  # ring buffers of one window
    assert copy.copy(engine.cache_bytes())["local_encoder"] > 0


def test_batched_full_recompute_equals_per_row():
    from torchblt.generation import FullRecomputeEngine

    model, em = tiny_model(seed=13), tiny_em(seed=14)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    prompts = prompts_ids(TEXT[:20], TEXT[30:50], TEXT[60:80])
    per_row, batched = FullRecomputeEngine(model, patcher), FullRecomputeEngine(model, patcher, True)
    a, b = per_row.start(prompts), batched.start(prompts)
    for _ in range(10):
        assert (a - b).abs().max() < 1e-4 and per_row.next_starts == batched.next_starts
        nxt = a.argmax(-1)
        a, b = per_row.advance(nxt), batched.advance(nxt)


@pytest.mark.parametrize(
    "patcher",
    [
        Patcher("entropy", threshold=1.0),
        Patcher("entropy", threshold=0.2, monotonicity=True),
        Patcher("entropy", threshold=1.0, threshold_add=0.1),
        Patcher("entropy", threshold=1.5, max_patch_length=3),
        Patcher("entropy", threshold=0.1, monotonicity=True, max_patch_length=2),
        Patcher("space"),
        Patcher("space", max_patch_length=3),
        Patcher("bpe"),
        Patcher("static", patch_size=2.7),
        Patcher("static", patch_size=4, max_patch_length=3),
        Patcher("byte"),
    ],
    ids=lambda p: repr(p),
)
def test_incremental_starts_equal_patcher_on_every_prefix(patcher):
    """The one-position-at-a-time rule == Patcher.patch(include_next_token=True) + split_first_patch."""
    from torchblt.generation.boundaries import IncrementalStarts, finish_starts, last_raw_start, raw_prompt_starts
    from torchblt.patching import split_first_patch

    g = torch.Generator().manual_seed(0)
    T = 60
    tokens = torch.randint(4, 260, (1, T), generator=g)
    tokens[0, 0] = 1
    tokens[0, torch.randint(2, T, (12,), generator=g)] = ord(" ") + 4
    tokens[0, torch.randint(2, T, (4,), generator=g)] = torch.tensor([2, 3, 3, 2])
    ent = torch.rand(1, T, generator=g) * 2
    L0 = 3
    raw = raw_prompt_starts(patcher, tokens[:, :L0], ent[:, :L0])
    inc = IncrementalStarts(patcher, last_raw_start(raw))
    got = finish_starts(patcher, raw)[0].tolist()
    for j in range(L0 + 1, T + 1):
        s = inc.step(torch.tensor([j]), ent[:, j - 1], ent[:, j - 2], tokens[:, j - 1], tokens[:, j - 2])
        got.append(bool(s[0]))
    for j in range(1, T + 1):  # the patcher on the prefix of j bytes decides position j (the next byte)
        lengths, _ = patcher.patch(tokens[:, :j], include_next_token=True, entropies=ent[:, :j])
        lengths = split_first_patch(lengths)[0]
        last = int(lengths[lengths > 0][-1])
        assert got[j] == (last == 1), f"position {j}"
    assert got[0] and got[1]


def test_bf16_runs_and_agrees():
    """bf16 (the released models' inference dtype): same greedy bytes; logits differ only by bf16 rounding."""
    model, em = tiny_model(seed=0, window=8), tiny_em(seed=1, window=12)
    threshold = median_entropy(em)
    model, em = model.to(torch.bfloat16), em.to(torch.bfloat16)
    patcher = Patcher("entropy", threshold=threshold, entropy_model=em)
    outs = [generate_tokens(model, prompts_ids(TEXT[:40]), patcher, return_logits=True,
                            config=GenerationConfig(max_new_bytes=30, stop_at_eos=False, use_cache=c))
            for c in (False, True)]
    assert outs[0].tokens == outs[1].tokens
    assert (outs[0].logits[0] - outs[1].logits[0]).abs().max() < 0.25


def test_benchmark_smoke(tmp_path):
    """bench/generation.py runs end to end (8 new bytes, eager and full recompute; a 2 KB prefill row) and
    the paths agree."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_generation", Path("bench/generation.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "g.json"
    assert bench.main(["--configs", "light", "--threads", "1", "--new-bytes", "8", "--repeats", "1", "--no-compile",
                       "--prefill", "2048", "--prefill-doc-bytes", "1024", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["decode"]
    assert row["identical_bytes"] and row["eager_vs_full"] > 0 and row["eager"]["bytes_per_second"] > 0
    assert row["arithmetic"]["flops_per_byte"] > 0 and row["arithmetic"]["ms_bytes"] > 0
    (pre,) = result["prefill"]
    assert pre["bytes"] == 2048 and pre["documents"] == 2 and pre["seconds"] > 0
