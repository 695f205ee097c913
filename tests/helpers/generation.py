"""Tiny random BLTs and entropy models for the generation tests, and the checks several test modules
share (cached vs plain generation, every decoding path vs the full recompute)."""

from __future__ import annotations

import torch

from torchblt import ByteTokenizer
from torchblt.formats.common import build_model
from torchblt.generation import FullRecomputeEngine, GenerationConfig, IncrementalEngine, generate_tokens
from torchblt.model.config import HashConfig, tiny_blt, tiny_entropy

TOK = ByteTokenizer()
TEXT = "The quick brown fox jumps over the lazy dog. def f(x):\n    return x * 2  # Zürich 日本 🙂 ok."

# Architecture variants of :func:`tiny_model` (its ``changes``), by name: the exactness tests run each one
ARCHITECTURES: dict[str, dict] = {
    "enc-all-layers": {"cross_attn.all_layers_encoder": True, "encoder.n_layers": 2},
    "cross-windows": {"cross_attn.window_encoder": 2, "cross_attn.window_decoder": 3},
    "dec-first-layer": {"cross_attn.all_layers_decoder": False},
    "pool-max": {"cross_attn.encoder": False, "cross_attn.decoder": False, "pooling": "max"},
    "pool-3": {"cross_attn.encoder": False, "cross_attn.decoder": False, "pooling": "avg,min,max"},
    "concat": {"cross_attn.encoder": False, "cross_attn.decoder": False, "pooling": "", "patching.patch_size": 3},
    "no-hash": {"hash": None},
    "hash-2fn": {"hash": HashConfig(group_sizes=[3, 5], vocab_size=97, n_functions=2)},
    "causal": {"global_.attention": "causal", "encoder.attention": "block_causal", "decoder.attention": "causal"},
    "gqa": {"global_.n_kv_heads": 2, "decoder.n_kv_heads": 1},
}


def tiny_model(seed: int = 0, window: int = 12, changes: dict | None = None) -> torch.nn.Module:
    cfg = tiny_blt()
    cfg.encoder.window = window
    cfg.decoder.window = window
    for path, value in (changes or {}).items():
        obj = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    torch.manual_seed(seed)
    model = build_model(cfg, device="cpu")
    model.init_weights()
    model.local_decoder.output.weight.data *= 4
    return model.eval()


def tiny_em(seed: int = 1, window: int = 16) -> torch.nn.Module:
    cfg = tiny_entropy()
    cfg.transformer.window = window
    torch.manual_seed(seed)
    em = build_model(cfg, device="cpu")
    em.init_weights()
    em.output.weight.data *= 6  # entropies that vary a lot, so thresholds cut often
    return em.eval()


def median_entropy(em) -> float:
    ids = torch.tensor([TOK.encode(TEXT, add_eos=False)])
    return float(em.entropies(ids).median())


def prompts_ids(*texts: str) -> list[list[int]]:
    return [TOK.encode(t, add_bos=True, add_eos=False) for t in texts]


def assert_same(model, patcher, prompts, n_new=40, **cfg):
    """Cached vs plain, row by row; returns the cached output."""
    outs = {}
    for use_cache in (False, True):
        config = GenerationConfig(max_new_bytes=n_new, stop_at_eos=False, use_cache=use_cache, **cfg)
        outs[use_cache] = generate_tokens(model, prompts, patcher, config=config, return_logits=True)
    plain, cached = outs[False], outs[True]
    assert cached.prompt_starts == plain.prompt_starts
    for r in range(len(prompts)):
        assert cached.tokens[r] == plain.tokens[r], f"row {r}"
        assert cached.patch_starts[r] == plain.patch_starts[r], f"row {r}"
        diff = (cached.logits[r] - plain.logits[r]).abs().max().item()
        assert diff < 1e-4, f"row {r}: logits differ by {diff}"
    return cached


# ------------------------------------------------------------------ the reference's own outputs


def run_forced(engine, prompts, forced: list[list[int]]) -> torch.Tensor:
    """Logits ``(steps + 1, B, V)`` along a fixed byte sequence (teacher forcing: every engine sees the same bytes)."""
    out = [engine.start(prompts)]
    for step in forced:
        out.append(engine.advance(torch.tensor(step)))
    return torch.stack(out)


def paths_agree(model, patcher, prompts, n_steps=40, compile_steps=(False, True)):
    """The eager and the compiled step along the full recompute's greedy bytes: logits within 1e-4 at
    every step. Returns ``{compile: (engine, logits)}``."""
    full = FullRecomputeEngine(model, patcher)
    logits = [full.start(prompts)]
    forced = []
    for _ in range(n_steps):
        nxt = logits[-1].argmax(-1)
        forced.append(nxt.tolist())
        logits.append(full.advance(nxt))
    ref = torch.stack(logits)
    results = {}
    for compiled in compile_steps:
        engine = IncrementalEngine(model, patcher, n_steps + 1, compile=compiled)
        results[compiled] = (engine, run_forced(engine, prompts, forced))
        diff = (results[compiled][1] - ref).abs().max().item()
        assert diff < 1e-4, f"compile={compiled}: logits differ from the full recompute by {diff}"
    return results


def eager_compiled_parts(monkeypatch) -> None:
    """``compile=True`` engines take the compiled call's path (padded batch and close part, the first call of a
    shape on a copy, view markers, row-major cursor) with their parts run eager: no inductor minutes. Nothing
    really compiled, so the model is not recorded as compiled (later ``compile=None`` calls stay eager)."""
    import weakref

    from torchblt.generation import incremental

    monkeypatch.setattr(incremental.IncrementalEngine, "_compiled_part", lambda self, part, n: getattr(self, f"_{part}"))
    monkeypatch.setattr(incremental, "_compiled_models", weakref.WeakSet())
