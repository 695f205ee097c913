"""Attention masks against a brute-force reference written with plain Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from torchblt.model.masks import (
    build_self_attention_mask,
    cross_attention_mask,
    document_ids,
    patch_ids_from_lengths,
    set_attention_backend,
)
from torchblt.model.transformer import Attention, RotaryEmbedding, rope_table

EOS = 2


def brute_allowed(row: list[int], kind: str, window: int | None) -> list[list[bool]]:
    T = len(row)
    doc, d = [], 0
    for t in row:
        doc.append(d)
        if t == EOS:
            d += 1
    out = []
    for i in range(T):
        line = []
        for j in range(T):
            ok = j <= i
            if kind in ("local_block_causal", "local_causal"):
                ok = ok and i - j < window
            if kind in ("block_causal", "local_block_causal"):
                ok = ok and doc[i] == doc[j]
            line.append(ok)
        out.append(line)
    return out


def random_tokens(B: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 260, (B, T), generator=g)
    tokens[torch.rand(B, T, generator=g) < 0.1] = EOS
    tokens[:, 0] = 1
    tokens[-1, T - 5 :] = 0  # right padding (BOE) joins the last document
    return tokens


@pytest.mark.parametrize("kind", ["causal", "block_causal", "local_block_causal", "local_causal"])
@pytest.mark.parametrize("window", [1, 3, 7])
def test_self_attention_mask_matches_brute_force(kind, window):
    tokens = random_tokens(3, 29, seed=window)
    mask = build_self_attention_mask(tokens, kind, window, EOS)
    T = tokens.shape[1]
    dense = mask.dense if mask.dense is not None else torch.ones(T, T, dtype=torch.bool).tril().expand(3, 1, T, T)
    for b in range(3):
        assert dense[b, 0].tolist() == brute_allowed(tokens[b].tolist(), kind, window)


def test_document_ids_eos_belongs_to_its_document():
    tokens = torch.tensor([[1, 10, EOS, 1, 11, EOS, 12]])
    assert document_ids(tokens).tolist() == [[0, 0, 0, 1, 1, 1, 2]]


def brute_attention(q, k, v, allowed):
    """float64 softmax attention, one query at a time."""
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // k.shape[2])
            for i in range(T):
                js = [j for j in range(T) if allowed[b][i][j]]
                scores = torch.tensor([float(q[b, i, h] @ k[b, j, kh]) / math.sqrt(D) for j in js], dtype=torch.float64)
                w = torch.softmax(scores, 0)
                out[b, i, h] = sum(w[n] * v[b, j, kh].double() for n, j in enumerate(js))
    return out


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_output_matches_brute_force(backend):
    """GQA attention with a document-masked sliding window, checked against explicit loops."""
    torch.manual_seed(0)
    B, T, dim, H, Hkv = 2, 17, 16, 4, 2
    attn = Attention(dim, H, Hkv, dim // H).double()
    rope = RotaryEmbedding(dim // H, 10000.0)
    x = torch.randn(B, T, dim, dtype=torch.float64)
    tokens = random_tokens(B, T, seed=3)
    set_attention_backend(backend)
    try:
        mask = build_self_attention_mask(tokens, "local_block_causal", 5, EOS)
        cos, sin = rope.cos_sin(torch.arange(T)[None])
        with torch.no_grad():  # FlexAttention has no CPU backward
            got = attn(x, rope_table(cos.double(), sin.double()), mask)
    finally:
        set_attention_backend("auto")
    with torch.no_grad():
        want = _brute_attention_layer(attn, x, tokens, cos.double(), sin.double(), H, Hkv)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def _brute_attention_layer(attn, x, tokens, cos, sin, H, Hkv):
    from torchblt.model.transformer import apply_rope

    B, T, _ = x.shape
    q = apply_rope(attn.wq(x).view(B, T, H, -1), cos, sin)
    k = apply_rope(attn.wk(x).view(B, T, Hkv, -1), cos, sin)
    v = attn.wv(x).view(B, T, Hkv, -1)
    allowed = [brute_allowed(tokens[b].tolist(), "local_block_causal", 5) for b in range(B)]
    return attn.wo(brute_attention(q, k, v, allowed).reshape(B, T, -1))


def test_patch_ids_and_cross_masks():
    lengths = torch.tensor([[1, 3, 2, 0], [1, 1, 2, 2]])
    ids = patch_ids_from_lengths(lengths, 6)
    assert ids.tolist() == [[0, 1, 1, 1, 2, 2], [0, 1, 2, 2, 3, 3]]
    enc = cross_attention_mask(ids, 4, 2, patches_as_queries=True)
    assert enc.shape == (2, 1, 8, 6)
    for b in range(2):
        for s in range(8):
            for j in range(6):
                assert bool(enc[b, 0, s, j]) == (ids[b, j].item() == s // 2)
    assert not enc[0, 0, 6:].any()  # slots of the empty (padding) patch see nothing
    dec = cross_attention_mask(ids, 4, 2, patches_as_queries=False, window=2)
    for b in range(2):
        for i in range(6):
            for s in range(8):
                p, d = s // 2, ids[b, i].item()
                assert bool(dec[b, 0, i, s]) == (p <= d < p + 2)
