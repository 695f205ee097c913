"""Long inputs: the banded sliding-window attention and the gathered cross-attention equal today's dense-mask
paths (values and gradients), no dense ``T x T`` or ``(P*K, T)`` mask is built for a long windowed
sequence, entropies do not drift with the position, and long documents cost bounded memory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torchblt.model.cross_attention as cross_mod
import torchblt.model.masks as masks
import torchblt.model.transformer as transformer_mod
from torchblt import BLT, Patcher
from torchblt.formats.common import build_model
from torchblt.model.config import CrossAttentionConfig, HashConfig, tiny_blt
from torchblt.model.cross_attention import CrossAttention
from torchblt.model.entropy_model import EntropyModel, EntropyModelConfig, entropy
from torchblt.model.masks import (
    banded_mask,
    build_self_attention_mask,
    cross_attention_mask,
    document_ids,
    patch_cross_mask,
    patch_ids_from_lengths,
    self_attention_mask_dense,
)
from torchblt.model.transformer import Attention, RotaryEmbedding, StackConfig, banded_attention, rope_table

EOS = 2


def tokens_with_documents(B: int, T: int, seed: int, eos_rate: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 260, (B, T), generator=g)
    tokens[torch.rand(B, T, generator=g) < eos_rate] = EOS  # every row gets its own documents
    return tokens


def grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)).sum(), leaves)
    return out.detach(), list(g)


# --------------------------------------------------------------------------- banded self-attention


@pytest.mark.parametrize(
    "B,T,W,block,H,Hkv,docs",
    [
        (2, 300, 7, 16, 4, 2, True),  # window shorter than the block; GQA; rows with different documents
        (2, 301, 40, 16, 4, 4, True),  # window longer than the block; T not a multiple of the block
        (1, 97, 150, 32, 2, 1, True),  # window longer than T
        (3, 250, 33, 64, 4, 2, False),  # no documents: one mask for every row
        (1, 64, 64, 64, 2, 2, False),  # T = block = window
    ],
)
def test_banded_attention_equals_dense_mask(B, T, W, block, H, Hkv, docs):
    torch.manual_seed(0)
    Dh = 8
    q, k, v = torch.randn(B, T, H, Dh, dtype=torch.float64), *(torch.randn(B, T, Hkv, Dh, dtype=torch.float64) for _ in range(2))
    doc = document_ids(tokens_with_documents(B, T, seed=T, eos_rate=0.05)) if docs else None
    pos = torch.arange(T).expand(B, T)
    dense = self_attention_mask_dense(pos, pos, doc, doc, W)
    band = banded_mask(T, W, doc, q.device, block=block)
    assert band.allowed.shape[-2:] == (block, block + W - 1)
    got, got_g = grads(lambda a, b, c: banded_attention(a, b, c, band), q, k, v)
    want, want_g = grads(lambda a, b, c: transformer_mod.scaled_dot_product(a, b, c, dense), q, k, v)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["local_block_causal", "local_causal"])
def test_attention_layer_banded_equals_dense_fp32(kind):
    """The layer as the stacks call it (fp32, RoPE, GQA): the mask builder picks the banded form for a long
    sequence, and values and gradients equal the dense mask's to float rounding."""
    torch.manual_seed(0)
    B, T, D, H, Hkv, W = 2, 1500, 32, 4, 2, 48
    tokens = tokens_with_documents(B, T, seed=1)
    attn = Attention(D, H, Hkv, D // H)
    rope = rope_table(*RotaryEmbedding(D // H, 1e4).cos_sin(torch.arange(T)[None]))
    banded = build_self_attention_mask(tokens, kind, W)
    dense = build_self_attention_mask(tokens, kind, W, dense=True)
    assert banded.banded is not None and banded.dense is None
    x = torch.randn(B, T, D)
    got, (gx,) = grads(lambda a: attn(a, rope, banded), x)
    want, (wx,) = grads(lambda a: attn(a, rope, dense), x)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    torch.testing.assert_close(gx, wx, atol=2e-5, rtol=0)


def test_short_or_unwindowed_sequences_keep_their_masks():
    tokens = tokens_with_documents(1, 100, seed=2)
    assert build_self_attention_mask(tokens, "local_block_causal", 16).dense is not None  # short: dense as before
    causal = build_self_attention_mask(tokens, "local_causal", 200)  # the window hides nothing
    assert causal.is_causal and causal.dense is None and causal.banded is None
    one_doc = torch.randint(4, 260, (2, 5000))
    one_doc[:, -1] = EOS  # an EOS at the very end leaves each row one document
    band = build_self_attention_mask(one_doc, "local_block_causal", 64).banded
    assert band is not None and band.allowed.shape[0] == 1  # one mask shared by the rows, no document rule


# --------------------------------------------------------------------------- cross-attention


@pytest.mark.parametrize("patches_as_queries", [True, False])
@pytest.mark.parametrize("window", [None, 1, 2, 3])
def test_gathered_cross_attention_equals_dense_mask(patches_as_queries, window):
    torch.manual_seed(0)
    # rows with different patches, a zero-length padding patch, and (decoder) bytes past the last patch
    lengths = torch.tensor([[1, 3, 2, 5, 0, 0], [1, 1, 2, 2, 4, 2]])
    T, P, K, D = 12, 6, 2, 16
    ids = patch_ids_from_lengths(lengths if patches_as_queries else lengths[:, 1:], T)
    ca = CrossAttention(D, 4).double()
    x = torch.randn(2, P * K if patches_as_queries else T, D, dtype=torch.float64)
    kv = torch.randn(2, T if patches_as_queries else P * K, D, dtype=torch.float64)
    linear = patch_cross_mask(ids, P, K, patches_as_queries=patches_as_queries, window=window)
    dense = cross_attention_mask(ids, P, K, patches_as_queries=patches_as_queries, window=window, dense=True)
    got, got_g = grads(lambda a, b: ca(a, b, linear), x, kv)
    want, want_g = grads(lambda a, b: ca(a, b, dense), x, kv)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # queries that see no key (slots of empty patches) get exactly zero (before wo), the others do not
    q = ca.wq(ca.cross_attn_norm_q(x)).view(2, x.shape[1], 4, -1)
    k, v = ca.project_kv(kv)
    out = cross_mod.gathered_cross_attention(q, k, v, linear)
    blind = ~dense.any(-1)[:, 0]  # (B, Tq)
    assert (out[blind] == 0).all() and (out[~blind] != 0).any(-1).all()
    assert bool(blind.any()) == (patches_as_queries and (window or 1) < 3)  # row 0 ends with 2 empty patches


# --------------------------------------------------------------------------- whole models


def long_blt() -> BLT:
    base = tiny_blt()
    local = StackConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, attention="local_block_causal",
                        window=24, max_seqlen=1 << 20)
    cfg = dataclasses.replace(
        base, encoder=local, decoder=local,
        global_=dataclasses.replace(base.global_, attention="block_causal", max_seqlen=1 << 20),
        cross_attn=CrossAttentionConfig(k=2, n_heads=2, all_layers_encoder=True, window_encoder=2, window_decoder=2),
        hash=HashConfig(group_sizes=[3, 4], vocab_size=97),
    )
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    model.init_weights()
    return model


def test_blt_training_step_banded_equals_dense(monkeypatch):
    """Logits and every parameter gradient of a BLT forward with windows, documents and cross-attention
    windows: linear paths (default) against the dense masks of e265e29."""
    model = long_blt().train()
    tokens = tokens_with_documents(2, 400, seed=3)
    lengths, _ = Patcher(mode="static", patch_size=3).patch(tokens, include_next_token=True)
    from torchblt.patching import split_first_patch

    lengths = split_first_patch(lengths)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        logits = model(tokens, lengths)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = record_attention_masks(monkeypatch)
    fast_logits, fast_grads = step()
    assert calls["banded"] > 0 and calls["gathered"] > 0
    monkeypatch.setattr(masks, "band_pays", lambda T, W: False)
    import torchblt.model.blt as blt_mod

    monkeypatch.setattr(blt_mod, "patch_cross_mask", lambda *a, **k: cross_attention_mask(*a, **k, dense=True))
    dense_logits, dense_grads = step()
    torch.testing.assert_close(fast_logits, dense_logits, atol=2e-5, rtol=0)
    assert fast_grads.keys() == dense_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], dense_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def record_attention_masks(monkeypatch) -> dict[str, int]:
    """Count the linear paths and record the largest SDPA mask (elements) for the test's bounds."""
    calls = {"banded": 0, "gathered": 0, "largest_mask": 0, "most_keys": 0}
    sdpa = F.scaled_dot_product_attention
    banded, gathered = transformer_mod.banded_attention, cross_mod.gathered_cross_attention

    def checked_sdpa(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            calls["largest_mask"] = max(calls["largest_mask"], attn_mask.numel())
            calls["most_keys"] = max(calls["most_keys"], attn_mask.shape[-1])
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def count(name, fn):
        def wrapped(*a):
            calls[name] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(transformer_mod.F, "scaled_dot_product_attention", checked_sdpa)
    monkeypatch.setattr(transformer_mod, "banded_attention", count("banded", banded))
    monkeypatch.setattr(cross_mod, "gathered_cross_attention", count("gathered", gathered))
    return calls


def test_no_dense_mask_for_a_20kb_input(monkeypatch):
    """A 20 KB row through a windowed BLT and an entropy model: every attention mask stays O(T * window)
    (a dense T x T mask would be 400 M elements, a dense (P*K, T) cross mask 270 M)."""
    T = 20_000
    tokens = tokens_with_documents(1, T, seed=4)
    calls = record_attention_masks(monkeypatch)
    em = EntropyModel(EntropyModelConfig(transformer=StackConfig(
        dim=16, n_layers=1, n_heads=2, multiple_of=16, attention="local_block_causal", window=32)))
    with torch.no_grad():
        em(tokens)
        bound = T * (masks.BAND_BLOCK + 32)
        assert 0 < calls["largest_mask"] <= bound, calls
        model = long_blt().eval()
        lengths, _ = Patcher(mode="static", patch_size=8).patch(tokens, include_next_token=True)
        from torchblt.patching import split_first_patch

        calls["largest_mask"] = 0
        logits = model(tokens, split_first_patch(lengths))
    assert logits.shape == (1, T, 260) and torch.isfinite(logits).all()
    assert calls["banded"] > 0 and calls["gathered"] > 0
    # the global model's block-causal mask over the 2500 patches is the largest left: P x P, not T x T
    P = lengths.shape[1]
    assert calls["largest_mask"] <= max(T * (masks.BAND_BLOCK + 24), (P + 1) ** 2), calls


# --------------------------------------------------------------------------- entropies


def tiny_entropy_model(window: int = 16, dim: int = 16, n_layers: int = 2) -> EntropyModel:
    torch.manual_seed(0)
    em = EntropyModel(EntropyModelConfig(transformer=StackConfig(
        dim=dim, n_layers=n_layers, n_heads=2, multiple_of=16, attention="local_block_causal", window=window)))
    em.init_weights()
    em.output.weight.data *= 4
    return em.eval()


def test_entropies_at_position_a_million_equal_position_zero():
    """RoPE drift: the entropies of a window ~10^6 positions in equal those of the same window (with the
    same left context) at position 0. With absolute positions in fp32 they differed by ~5e-4."""
    import torchblt.model.entropy_model as em_mod

    em = tiny_entropy_model(dim=8, n_layers=1)  # ~3 s for 10^6 positions
    chunk = em_mod.ENTROPY_CHUNK
    n, tail = (1_000_000 // chunk) * chunk, 500  # a chunk starts at n (~10^6)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, 260, (1, n + tail), generator=g)
    far = em.entropies(tokens)[0, n:]
    field = em.receptive_field
    near = em.entropies(tokens[:, n - field :])[0, field:]  # the same window at position 0
    torch.testing.assert_close(far, near, atol=1e-7, rtol=0)


def test_chunked_entropies_equal_one_forward_for_any_chunk():
    em = tiny_entropy_model(window=8)
    tokens = tokens_with_documents(2, 3000, seed=6)
    with torch.no_grad():
        whole = entropy(em(tokens))
    for chunk in (100, 777, 4096):
        # each chunk numbers its positions from 0: fp32 RoPE angles at positions up to 3000 round
        # differently (<= 1.2e-4 rad), which this deliberately sensitive model shows at the 1e-4 level
        torch.testing.assert_close(em.entropies(tokens, chunk_size=chunk), whole, atol=3e-4, rtol=0)
    assert Patcher(entropy_model=em, entropy_chunk_size=333).entropies(tokens).shape == tokens.shape
    with pytest.raises(ValueError, match="entropy_chunk_size"):
        Patcher(entropy_model=em, entropy_chunk_size=0)


def test_document_entropies_rows_of_any_length(monkeypatch):
    from torchblt.data.entropies import document_entropies, document_tokens

    em = tiny_entropy_model(window=8)
    rng = np.random.default_rng(0)
    doc = document_tokens(bytes(rng.integers(32, 127, size=5000).astype(np.uint8)))
    with torch.no_grad():
        whole = entropy(em(torch.from_numpy(doc)[None]))[0].numpy()
    import torchblt.model.entropy_model as em_mod

    monkeypatch.setattr(em_mod, "ENTROPY_CHUNK", 600)  # rows of 600 new tokens: several rows per document
    got = document_entropies(em, [doc, document_tokens(b"short")], max_tokens=1500)
    chunked = em.entropies(torch.from_numpy(doc)[None], chunk_size=600)[0].numpy()  # the same rows, one call
    np.testing.assert_allclose(got[0], chunked, atol=1e-6)
    np.testing.assert_allclose(got[0], whole, atol=3e-4)  # fp32 RoPE angles of positions 0..5000 vs 0..1000


def test_eval_and_patches_of_a_long_line_use_linear_attention(monkeypatch):
    """``blt eval`` windows and ``blt patches`` on one long line: same numbers as the dense path, masks
    bounded by the windows."""
    from torchblt.eval.bpb import evaluate_bpb
    from torchblt.eval.patches import compute_patches

    text = bytes(np.random.default_rng(1).integers(97, 123, size=6000).astype(np.uint8))
    model, em = long_blt().eval(), tiny_entropy_model()
    sample = em.entropies(torch.tensor([[1, *text[:800]]]))
    patcher = Patcher(entropy_model=em, threshold=float(sample.quantile(0.75)))  # patches of ~4 bytes
    calls = record_attention_masks(monkeypatch)
    fast = evaluate_bpb(model, [text], patcher=patcher, context_bytes=3000, batch_size=2)
    view = compute_patches(text, patcher, with_entropies=True)
    assert calls["banded"] > 0 and calls["gathered"] > 0
    # keys per mask row: the band's block + window - 1, or the global model's patches (~750 per window);
    # a dense self-attention mask would have 3000, a dense encoder cross mask 3000 too
    assert calls["most_keys"] < 1000, calls
    monkeypatch.setattr(masks, "band_pays", lambda T, W: False)
    import torchblt.model.blt as blt_mod

    monkeypatch.setattr(blt_mod, "patch_cross_mask", lambda *a, **k: cross_attention_mask(*a, **k, dense=True))
    dense = evaluate_bpb(model, [text], patcher=patcher, context_bytes=3000, batch_size=2)
    assert fast.n_windows == dense.n_windows > 1 and fast.mean_patch_length == dense.mean_patch_length
    assert abs(fast.bpb - dense.bpb) < 1e-5
    assert compute_patches(text, patcher).patch_lengths == view.patch_lengths


# --------------------------------------------------------------------------- tail rows, pieces of rows


@pytest.mark.parametrize("n_layers,window,docs", [(1, 40, False), (2, 40, True), (3, 25, False), (2, 200, True)])
def test_tail_rows_equal_the_full_forward(n_layers, window, docs, monkeypatch):
    """``run_layers(..., keep_from=k)`` (each banded layer computes only the query rows the next layer
    can see) equals the full forward's rows from ``k``, and computes fewer query rows."""
    em = tiny_entropy_model(window=window, n_layers=n_layers).double()
    T = 700
    tokens = tokens_with_documents(2, T, seed=8) if docs else torch.randint(4, 260, (2, T))
    queries: list[int] = []
    real = transformer_mod.banded_attention
    monkeypatch.setattr(transformer_mod, "banded_attention",
                        lambda q, k, v, band: queries.append(q.shape[1]) or real(q, k, v, band))
    with torch.no_grad():
        mask = em.self_attention_mask(tokens)
        assert mask.banded is not None
        full = em.run_layers(em.tok_embeddings(tokens), mask)
        assert queries == [T] * n_layers
        for keep_from in (1, 63, 64, 333, 650, T - 1):
            queries.clear()
            tail = em.run_layers(em.tok_embeddings(tokens), mask, keep_from=keep_from)
            torch.testing.assert_close(tail, full[:, keep_from:], atol=1e-12, rtol=0)
            block = mask.banded.block
            assert queries[-1] == T - keep_from // block * block  # the last layer: the kept rows' blocks
            assert sum(queries) < n_layers * T or keep_from < block
            assert queries == sorted(queries, reverse=True)  # each layer needs no more rows than the one before


def test_tail_rows_in_chunked_entropies_fp32():
    """The chunked entropies (each chunk's context rows only serve as keys) equal chunks computed in full
    and cut afterwards, in fp32."""
    em = tiny_entropy_model(window=30, dim=32)
    tokens = tokens_with_documents(2, 2000, seed=9)
    context = em.receptive_field
    got = em.entropies(tokens, chunk_size=500)
    with torch.no_grad():
        for start in range(0, 2000, 500):
            left = max(0, start - context)
            want = entropy(em(tokens[:, left : start + 500]))[:, start - left :]
            torch.testing.assert_close(got[:, start : start + 500], want, atol=2e-6, rtol=0)


def test_rows_in_pieces_equal_one_call(monkeypatch):
    """Without autograd a block's feed-forward half and the entropy head run in pieces of rows (in place);
    the values equal the recorded one-call forward."""
    em = tiny_entropy_model(window=16, dim=32)
    tokens = tokens_with_documents(2, 300, seed=10)
    one_piece = em.entropies(tokens)
    recorded = entropy(em.double()(tokens)).detach()  # autograd records: one call per layer
    monkeypatch.setattr(transformer_mod, "CPU_ROWS", 37)
    assert [p.stop - p.start for p in transformer_mod.row_pieces(80, torch.device("cpu"))] == [37, 37, 6]
    assert len(transformer_mod.row_pieces(80, torch.device("meta"))) == 1
    torch.testing.assert_close(em.entropies(tokens), recorded.float(), atol=1e-12, rtol=0)  # float64
    em.float()
    torch.testing.assert_close(em.entropies(tokens), one_piece, atol=1e-6, rtol=0)
    x = torch.randn(2, 90, 32)
    block = em.layers[0]
    rope = em.rope_for(torch.arange(90)[None])
    m = build_self_attention_mask(tokens[:, :90], "local_block_causal", 16)
    want = block(x, rope, m)
    assert want.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(block(x, rope, m), want.detach(), atol=1e-6, rtol=0)
