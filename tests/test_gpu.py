"""CUDA-only paths against the CPU-tested ones (``python -m pytest -m gpu``; deselected by default, CI has
no GPU): compiled FlexAttention vs SDPA, cached generation vs full recompute on the GPU (fp32 and bf16),
the compiled step (CUDA graphs) on the GPU. ``bench/gpu_checks.sh`` runs these with the GPU benchmarks."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.generation import TEXT, assert_same, median_entropy, prompts_ids, tiny_em, tiny_model
from tests.helpers.models import make, variants
from torchblt import ByteTokenizer, Patcher
from torchblt.generation import GenerationConfig, generate_tokens
from torchblt.model.masks import set_attention_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 in the fp32 comparisons; SDPA unless a test asks for FlexAttention."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    set_attention_backend("sdpa")
    yield
    set_attention_backend("auto")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_flex_compiled_equals_sdpa_and_cpu():
    model = make(variants()["all_layers_windows_gqa"])
    tokens = torch.tensor([ByteTokenizer().encode("Sliding windows, documents\nand padding. " * 6)])
    lengths, _ = Patcher(mode="space").patch(tokens, include_next_token=True)
    with torch.no_grad():
        cpu = model(tokens, patch_lengths=lengths)
        model, tokens, lengths = model.cuda(), tokens.cuda(), lengths.cuda()
        sdpa = model(tokens, patch_lengths=lengths)
        set_attention_backend("flex")  # compiled on CUDA
        flex = model(tokens, patch_lengths=lengths)
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=0)
    torch.testing.assert_close(sdpa.cpu(), cpu, atol=1e-4, rtol=0)


def _entropy_patcher(em: torch.nn.Module) -> Patcher:
    return Patcher("entropy", threshold=median_entropy(em), entropy_model=em)


def test_cached_generation_equals_full_recompute_on_cuda():
    model, em = tiny_model(seed=0, window=10), tiny_em(seed=1, window=12)
    patcher = _entropy_patcher(em)
    patcher.entropy_model = em.cuda()
    assert_same(model.cuda(), patcher, prompts_ids(TEXT[:33], TEXT[3:7], "x"), n_new=48)


def test_compiled_step_on_cuda():
    """The compiled step (``mode="reduce-overhead"``: CUDA graphs) equals the full recompute, rows finishing
    early included (the batch keeps its bucket), and a multi-byte step + roll-back works on the GPU."""
    model, em = tiny_model(seed=3, window=10), tiny_em(seed=4, window=12)
    patcher = _entropy_patcher(em)
    patcher.entropy_model = em.cuda()
    model = model.cuda()
    assert_same(model, patcher, prompts_ids(TEXT[:23], TEXT[5:9], "abc"), n_new=40, compile=True)
    from torchblt.generation import IncrementalEngine

    engine = IncrementalEngine(model, patcher, 16, compile=True, lookahead=4)
    state, _, _ = engine.prefill(prompts_ids(TEXT[:23]))
    clean = state.copy()
    real = torch.tensor([[101, 102, 103, 104]], device="cuda")
    want = engine.step(clean, real)
    engine.step(state, torch.tensor([[101, 102, 50, 51]], device="cuda"))
    state.truncate(2)
    torch.testing.assert_close(engine.step(state, real[:, 2:]), want[:, 2:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager", "compiled"])
def test_bf16_generation_on_cuda(compile_step):
    model, em = tiny_model(seed=0, window=8), tiny_em(seed=1, window=12)
    patcher = _entropy_patcher(em)
    model, patcher.entropy_model = model.cuda().to(torch.bfloat16), em.cuda().to(torch.bfloat16)
    outs = [generate_tokens(model, prompts_ids(TEXT[:40]), patcher, return_logits=True,
                            config=GenerationConfig(max_new_bytes=30, stop_at_eos=False, use_cache=c,
                                                    compile=compile_step))
            for c in (False, True)]
    assert outs[0].tokens == outs[1].tokens
    assert (outs[0].logits[0] - outs[1].logits[0]).abs().max() < 0.25


def test_checkpoint_fallback_and_safe_loading_on_cuda(tmp_path):
    """A run on the GPU: its checkpoints go through the safe DCP reader, a damaged latest one falls back to
    the previous one, and the run folder loads as a model on the GPU (bf16)."""
    from tests.helpers.train import overrides, read_metrics, write_corpus
    from torchblt import load_model
    from torchblt.cli import main as blt_main
    from torchblt.train import checkpoint as ckpt

    train, _ = write_corpus(tmp_path / "data")
    args = overrides(tmp_path / "run", train, steps=2) + ["train.device=cuda", "train.dtype=fp32",
                                                         "checkpoint.every=1", "checkpoint.keep=5"]
    assert blt_main(["train", *args]) == 0
    full = [r["loss"] for r in read_metrics(tmp_path / "run")]
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    (latest / "__0_0.distcp").write_bytes((latest / "__0_0.distcp").read_bytes()[:-64])
    assert blt_main(["train", *args]) == 0
    assert (latest.parent / "damaged-step_00000002").is_dir()
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == pytest.approx(full, rel=1e-5)
    model = load_model(tmp_path / "run", device="cuda", dtype="bf16")
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.bfloat16
