"""The decoding step's weight layouts (torchblt.generation.fused): the fused step, the oneDNN-packed step
and the module step all equal the full recompute; the automatic choice; the step's hash ids."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.generation import TEXT, median_entropy, paths_agree, prompts_ids, tiny_em, tiny_model
from torchblt import Patcher
from torchblt.generation import IncrementalEngine
from torchblt.generation import fused as fused_mod
from torchblt.generation.cache import Recorder
from torchblt.model.hash_embedding import HashNgramEmbedding
from torchblt.model.masks import SelfAttentionMask
from torchblt.model.transformer import RotaryEmbedding, StackConfig, TransformerBlock, rope_table

pytestmark = pytest.mark.usefixtures("one_thread")

ONEDNN = torch.backends.mkldnn.is_available()


@pytest.fixture
def pack_everything(monkeypatch):
    """Pack every fp32 CPU matrix in oneDNN's layout (the tiny models' are all below the size threshold)."""
    monkeypatch.setattr(fused_mod, "PACK_MIN_ELEMENTS", 0)


@pytest.mark.parametrize("changes", [
    {},
    {"global_.n_kv_heads": 2, "decoder.n_kv_heads": 1},
    {"cross_attn.all_layers_decoder": False},
    {"cross_attn.encoder": False, "cross_attn.decoder": False, "pooling": "max"},
], ids=["default", "gqa", "dec-first-layer", "no-cross-attn"])
def test_fused_and_module_steps_equal_full_recompute(changes):
    model, em = tiny_model(seed=3, window=10, changes=changes), tiny_em(seed=4, window=12)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    results = paths_agree(model, patcher, prompts_ids(TEXT[:23], TEXT[5:9]))
    engine = results[True][0]
    assert engine.step_weight_bytes() > 0 and results[False][0].step_weight_bytes() == 0


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_onednn_packed_step_equals_full_recompute(pack_everything):
    model, em = tiny_model(seed=6, window=9), tiny_em(seed=7, window=11)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    results = paths_agree(model, patcher, prompts_ids(TEXT[:31], TEXT[40:45], "x"))
    engine = results[True][0]
    packed = [b.qkv.packed for b in engine.dec_blocks + engine.g_blocks + engine.em_blocks]
    assert all(p is not None for p in packed), "every fp32 CPU matrix should have been packed"


def test_step_linear_layouts():
    torch.manual_seed(0)
    lins = [torch.nn.Linear(48, n, bias=False) for n in (32, 16, 16)]
    x = torch.randn(3, 1, 48)
    want = torch.cat([lin(x) for lin in lins], dim=-1)
    plain = fused_mod.StepLinear(*lins)  # small: input-major
    assert plain.packed is None and plain.weight.shape == (48, 64) and plain.weight.is_contiguous()
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
    bf16 = fused_mod.StepLinear(*(lin.to(torch.bfloat16) for lin in lins))  # never packed: fp32 only
    assert bf16.packed is None and bf16.weight.dtype == torch.bfloat16


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_step_linear_packs_large_fp32(pack_everything):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24, bias=False)
    step = fused_mod.StepLinear(lin)
    assert step.packed is not None and step.weight is None
    x = torch.randn(5, 1, 40)  # more rows than the packing hint (1): still right
    torch.testing.assert_close(step(x), lin(x), rtol=1e-5, atol=1e-5)


def test_step_block_equals_module_block():
    cfg = StackConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16)
    torch.manual_seed(1)
    block = TransformerBlock(cfg)
    block.init_weights()
    x = torch.randn(2, 1, 64)
    rope = rope_table(*RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta).cos_sin(torch.tensor([[7], [3]])))
    mask = SelfAttentionMask(dense=torch.ones(2, 1, 1, 1, dtype=torch.bool))
    rec_a, rec_b = Recorder(), Recorder()
    with torch.inference_mode():
        want = block(x, rope, mask, rec_a)
        got = fused_mod.StepBlock(block)(x, rope, mask, rec_b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rec_b.k, rec_a.k, rtol=1e-5, atol=1e-5)  # the cached keys (after RoPE) too
    torch.testing.assert_close(rec_b.v, rec_a.v, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense masks"):
        fused_mod.StepBlock(block)(x, rope, SelfAttentionMask(dense=None, block_mask=object()), Recorder())


def test_hooks_select_the_module_step():
    """A forward hook must see the decoding steps, so the engine falls back to the modules by itself."""
    model, em = tiny_model(seed=0), tiny_em(seed=1)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    assert IncrementalEngine(model, patcher, 4).fused
    calls = []
    handle = em.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        engine = IncrementalEngine(model, patcher, 4)
        assert not engine.fused
        logits = engine.start(prompts_ids("ab"))
        n_prefill = len(calls)
        engine.advance(logits.argmax(-1))
        assert len(calls) == n_prefill + 1  # the hook saw the step
        assert IncrementalEngine(model, patcher, 4, fused=True).fused  # explicit choice wins
    finally:
        handle.remove()


@pytest.mark.parametrize("group_sizes,n_functions", [([3, 4, 5, 6, 7, 8], 1), ([2, 5], 2)])
def test_last_hash_ids_equal_full_ids(group_sizes, n_functions):
    table = HashNgramEmbedding(group_sizes, vocab_size=1009, n_functions=n_functions, dim=4)
    torch.manual_seed(2)
    tail = torch.randint(0, 260, (3, max(group_sizes)))
    tail[0, :3] = 0  # a short prompt's zero padding on the left
    full = [ids[:, -1:] for ids in table.ids(tail)]
    for got, want in zip(table.last_ids(tail), full, strict=True):
        assert torch.equal(got, want)


def test_generation_config_chooses_the_step(monkeypatch):
    from torchblt.generation import GenerationConfig, api, generate_tokens

    built = []

    class Spy(IncrementalEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.fused)

    monkeypatch.setattr(api, "IncrementalEngine", Spy)
    model, em = tiny_model(seed=0), tiny_em(seed=1)
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    outs = [generate_tokens(model, prompts_ids(TEXT[:12]), patcher, return_logits=True,
                            config=GenerationConfig(max_new_bytes=12, stop_at_eos=False, fused_step=f))
            for f in (True, False)]
    assert built == [True, False]
    assert outs[0].tokens == outs[1].tokens
    assert (outs[0].logits[0] - outs[1].logits[0]).abs().max() < 1e-4
