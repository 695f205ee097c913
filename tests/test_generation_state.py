"""The decoding state and the engine's functional API: multi-byte steps, roll-back, rows that join or
leave a batch, chunked prefill (bounded attention), and the compiled step against the full recompute.

Tiny random models with local windows of 8-12 bytes (prompts run past every window); every check
compares logits along a fixed byte sequence (teacher forcing), so each engine sees the same bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers.generation import TEXT, TOK, assert_same, median_entropy, prompts_ids, tiny_em, tiny_model
from torchblt import Patcher
from torchblt.generation import DecodeState, FullRecomputeEngine, GenerationConfig, IncrementalEngine, generate_tokens
from torchblt.generation.boundaries import decide_starts

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4


def entropy_setup(seed: int = 0, window: int = 10, changes: dict | None = None):
    """A tiny BLT with entropy patching; the threshold is off every entropy of the test text, so float
    rounding (chunked vs whole computations) cannot flip a boundary."""
    model, em = tiny_model(seed=seed, window=window, changes=changes), tiny_em(seed=seed + 1, window=window + 2)
    return model, Patcher("entropy", threshold=median_entropy(em) + 1e-3, entropy_model=em)


SETUPS = {
    "entropy": lambda: entropy_setup(0),
    "cross-windows": lambda: entropy_setup(2, changes={"cross_attn.window_encoder": 2, "cross_attn.window_decoder": 3,
                                                      "cross_attn.all_layers_encoder": True, "encoder.n_layers": 2}),
    "pooling": lambda: (tiny_model(seed=4, changes={"cross_attn.encoder": False, "cross_attn.decoder": False,
                                                    "pooling": "avg,min,max"}), Patcher("space", max_patch_length=3)),
    "concat-static": lambda: (tiny_model(seed=5, changes={"cross_attn.encoder": False, "cross_attn.decoder": False,
                                                          "pooling": "", "patching.patch_size": 3}),
                              Patcher("static", patch_size=3)),
    "causal": lambda: (tiny_model(seed=6, changes={"global_.attention": "causal", "encoder.attention": "block_causal",
                                                   "decoder.attention": "causal"}), Patcher("space")),
}


def text_bytes(text: str) -> list[int]:
    return TOK.encode(text, add_bos=False, add_eos=False)


def forced_bytes(n: int, seed: int = 0, eos_every: int = 0) -> list[int]:
    """A fixed byte sequence (some spaces, and an EOS every ``eos_every`` bytes) to step through."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(4, 260, (n,), generator=g)
    out[torch.randint(0, n, (n // 4,), generator=g)] = ord(" ") + 4
    if eos_every:
        out[eos_every - 1 :: eos_every] = 2
    return out.tolist()


def full_logits(model, patcher, prompts: list[list[int]], forced: list[list[int]]) -> torch.Tensor:
    """The oracle: logits ``(steps + 1, B, V)`` of the full recompute along ``forced[step][row]``."""
    full = FullRecomputeEngine(model, patcher)
    out = [full.start(prompts)]
    for step in forced:
        out.append(full.advance(torch.tensor(step)))
    return torch.stack(out)


@pytest.mark.parametrize("name", list(SETUPS))
def test_multi_byte_step_equals_single_steps_and_full_recompute(name):
    model, patcher = SETUPS[name]()
    prompts = prompts_ids(TEXT[:21], TEXT[30:34])
    forced = [list(col) for col in zip(forced_bytes(14, 1, eos_every=9), forced_bytes(14, 2))]
    ref = full_logits(model, patcher, prompts, forced)
    engine = IncrementalEngine(model, patcher, max_new_bytes=16, lookahead=5)
    single, first, _ = engine.prefill(prompts)
    multi = single.copy()
    one = [first] + [engine.step(single, torch.tensor(step)) for step in forced]
    torch.testing.assert_close(torch.stack(one), ref, atol=ATOL, rtol=0)
    tokens = torch.tensor(forced).T  # (B, 14)
    got = [engine.step(multi, tokens[:, a:b]) for a, b in ((0, 3), (3, 4), (4, 9), (9, 14))]  # n = 3, 1, 5, 5
    torch.testing.assert_close(torch.cat(got, 1).transpose(0, 1), ref[1:], atol=ATOL, rtol=0)
    for name_, a, b in zip(("pos", "n_closed", "doc", "global_doc", "patch_starts", "tail"),
                           (single.cursor.pos, single.cursor.n_closed, single.cursor.doc, single.cursor.global_doc,
                            single.cursor.patch_starts, single.cursor.tail),
                           (multi.cursor.pos, multi.cursor.n_closed, multi.cursor.doc, multi.cursor.global_doc,
                            multi.cursor.patch_starts, multi.cursor.tail)):
        assert torch.equal(a, b), name_


@pytest.mark.parametrize("name", ["entropy", "cross-windows", "pooling", "causal"])
def test_truncate_and_restep_equals_never_stepped(name):
    model, patcher = SETUPS[name]()
    prompts = prompts_ids(TEXT[:25], "Zü")
    real = torch.tensor([forced_bytes(16, 3, eos_every=7), forced_bytes(16, 4)])  # (B, 16)
    draft = torch.tensor([forced_bytes(16, 5), forced_bytes(16, 6, eos_every=4)])
    engine = IncrementalEngine(model, patcher, max_new_bytes=24, lookahead=6)
    clean, first, _ = engine.prefill(prompts)
    spec, again = clean.copy(), clean.copy()
    want = engine.step(clean, real)  # (B, 16, V)
    # speculative pattern: step 6 drafted bytes at once, keep 0..6 of them, roll the rest back
    done = 0
    for keep in (2, 0, 6, 1):
        guess = torch.where(torch.arange(6) < keep, real[:, done : done + 6], draft[:, done : done + 6])
        engine.step(spec, guess)
        spec.truncate(6 - keep)
        done += keep
    got = engine.step(spec, real[:, done:])
    torch.testing.assert_close(got, want[:, done:], atol=ATOL, rtol=0)
    # per-row roll-back amounts
    engine.step(again, draft[:, :4])
    again.truncate(torch.tensor([4, 4]))
    engine.step(again, real[:, :2])
    engine.step(again, draft[:, :3])
    again.truncate(torch.tensor([3, 0]))  # row 1 keeps the draft
    assert (again.cursor.pos - clean.cursor.pos).tolist() == [2 - 16, 5 - 16]
    torch.testing.assert_close(engine.step(again, real[:, 2:3])[0, 0], want[0, 2], atol=ATOL, rtol=0)


def test_truncate_limits():
    model, patcher = entropy_setup(0)
    engine = IncrementalEngine(model, patcher, max_new_bytes=8)
    state, _, _ = engine.prefill(prompts_ids(TEXT[:9]))
    with pytest.raises(ValueError, match="lookahead"):
        state.truncate(1)
    engine = IncrementalEngine(model, patcher, max_new_bytes=8, lookahead=2)
    state, _, _ = engine.prefill(prompts_ids(TEXT[:9]))
    engine.step(state, torch.tensor([text_bytes("abc")]))
    with pytest.raises(ValueError, match="lookahead=2"):
        state.truncate(3)
    state.truncate(2)
    with pytest.raises(ValueError, match="more than lookahead"):
        state.truncate(1)  # 3 back from the furthest position stepped


def test_extend_joins_a_running_batch_and_select_keeps_rows():
    model, patcher = entropy_setup(7)
    engine = IncrementalEngine(model, patcher, max_new_bytes=40)
    p1, p2, p3 = prompts_ids(TEXT[:30], "hi", TEXT[40:75])
    alone = {}
    for key, p in (("a", p1), ("b", p2), ("c", p3)):
        s, lg, _ = engine.prefill([p])
        out = [lg]
        for t in text_bytes(TEXT[:20]):
            out.append(engine.step(s, torch.tensor([t])))
        alone[key] = torch.stack(out)[:, 0]
    run, lg, _ = engine.prefill([p1])
    feed = text_bytes(TEXT[:20])
    got = {"a": [lg[0]], "b": [], "c": []}
    for t in feed[:8]:  # row a runs alone for 8 bytes
        got["a"].append(engine.step(run, torch.tensor([t]))[0])
    joined, lg2, _ = engine.prefill([p2, p3])  # two requests join the running batch
    run.extend(joined)
    got["b"].append(lg2[0])
    got["c"].append(lg2[1])
    for i in range(12):
        lg = engine.step(run, torch.tensor([feed[8 + i], feed[i], feed[i]]))
        got["a"].append(lg[0])
        got["b"].append(lg[1])
        got["c"].append(lg[2])
    run.select([2, 0])  # b leaves; c first now
    for i in range(12, 20):
        lg = engine.step(run, torch.tensor([feed[i], feed[min(8 + i, 19)]]))
        got["c"].append(lg[0])
        if 8 + i < 20:
            got["a"].append(lg[1])
    for key in "abc":
        seq = torch.stack(got[key])
        torch.testing.assert_close(seq, alone[key][: len(seq)], atol=ATOL, rtol=0)
        assert torch.equal(seq.argmax(-1), alone[key][: len(seq)].argmax(-1)), key  # the same greedy bytes
    with pytest.raises(ValueError, match="same engine"):
        run.extend(IncrementalEngine(model, patcher, 8, lookahead=2).prefill([p1])[0])


def test_extend_by_many_states_equals_one_at_a_time_in_one_copy(monkeypatch):
    """``extend(*others)`` / ``DecodeState.cat`` join every state in one concatenation (each row copied once,
    not once per state after it): the same state as pairwise extends, rings of different capacities
    included, the key/value rings still head-major, and the same next logits."""
    from torchblt.generation.cache import StackKV

    model, patcher = entropy_setup(7)
    engine = IncrementalEngine(model, patcher, max_new_bytes=40)

    def states() -> list[DecodeState]:
        out = []
        for p, extra in zip(prompts_ids(TEXT[:30], "hi", TEXT[40:75]), (8, 64, 300), strict=True):
            s = engine.new_state(1)
            engine.prefill_row(s, p)
            engine.presize(s, extra)  # different capacities of the rings that grow
            out.append(s)
        return out

    pairwise = states()
    assert len({r.capacity for r in (s.global_ for s in pairwise)}) > 1
    for s in pairwise[1:]:
        pairwise[0].extend(s)
    joining, copied = states(), []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        out = real_cat(tensors, *args, **kwargs)
        copied.append(out.numel())
        return out

    monkeypatch.setattr(torch, "cat", counting_cat)
    at_once = DecodeState.cat(joining)
    monkeypatch.undo()
    a, b = pairwise[0], at_once
    held = sum(t.numel() for r in b.rings() for t in (*r.tensors, r.pos, r.tag))
    held += sum(getattr(b.cursor, f.name).numel() for f in dataclasses.fields(b.cursor))
    assert sum(copied) == held  # every element copied once (pairwise: the first row once per join)
    for name in ("pos", "tail", "entropies", "n_closed", "patch_starts", "doc"):
        assert torch.equal(getattr(a.cursor, name), getattr(b.cursor, name)), name
    for ra, rb in zip(a.rings(), b.rings(), strict=True):
        assert ra.capacity == rb.capacity and torch.equal(ra.pos, rb.pos) and torch.equal(ra.tag, rb.tag)
        for ta, tb in zip(ra.tensors, rb.tensors, strict=True):
            assert torch.equal(ta, tb)
            if isinstance(rb, StackKV):
                assert tb.transpose(1, 2).is_contiguous()  # head-major underneath, as every ring is stored
    nxt = torch.tensor([ord("a") + 4] * 3)
    assert torch.equal(engine.step(a, nxt), engine.step(b, nxt))
    b.select([2, 0])
    assert b.batch == 2 and all(t.transpose(1, 2).is_contiguous() for t in b.encoder.tensors)


def test_take_copies_only_the_rows_taken_and_equals_copy_then_select():
    model, patcher = entropy_setup(7)
    engine = IncrementalEngine(model, patcher, max_new_bytes=40, lookahead=2)
    state, _, _ = engine.prefill(prompts_ids(TEXT[:30], "hi", TEXT[40:75]))
    nxt = torch.tensor([ord("a") + 4] * 3)
    engine.step(state, nxt)
    taken, ref = state.take([2, 0]), state.copy().select([2, 0])
    assert taken.batch == 2 and state.batch == 3  # the source is unchanged
    for r_taken, r_ref, r_src in zip(taken.rings(), ref.rings(), state.rings(), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(r_taken.tensors, r_ref.tensors, strict=True))
        assert all(a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                   for a, b in zip(r_taken.tensors, r_src.tensors, strict=True))  # copies, not views
    assert sum(taken.cache_bytes().values()) < sum(state.cache_bytes().values())
    assert torch.equal(engine.step(taken, nxt[:2]), engine.step(ref, nxt[:2]))


def test_prefill_runs_a_repeated_prompt_once_and_its_rows_decode_as_alone(monkeypatch):
    model, patcher = entropy_setup(7)
    engine = IncrementalEngine(model, patcher, max_new_bytes=24)
    p, q = prompts_ids(TEXT[:30], "hi")
    calls = []
    real = engine.prefill_row
    monkeypatch.setattr(engine, "prefill_row", lambda state, ids, *a, **k: calls.append(ids) or real(state, ids, *a, **k))
    state, logits, starts = engine.prefill([p, q, p, p])
    assert calls == [p, q] and state.batch == 4 and logits.shape[0] == 4
    assert starts[0] == starts[2] == starts[3] and starts[0] is not starts[2]  # equal, not one shared list
    alone_p, lp, sp = engine.prefill([p])
    alone_q, lq, sq = engine.prefill([q])
    assert starts[0] == sp[0] and starts[1] == sq[0]
    for i, ref in ((0, lp), (1, lq), (2, lp), (3, lp)):
        assert torch.equal(logits[i : i + 1], ref)
    feed = text_bytes(TEXT[:12])
    for t in feed:
        got = engine.step(state, torch.tensor([t] * 4))
        ref_p, ref_q = engine.step(alone_p, torch.tensor([t])), engine.step(alone_q, torch.tensor([t]))
        torch.testing.assert_close(got[[0, 2, 3]], ref_p.expand(3, -1), atol=ATOL, rtol=0)
        torch.testing.assert_close(got[1:2], ref_q, atol=ATOL, rtol=0)


def test_put_replaces_a_row_in_place_and_the_newcomer_decodes_as_alone():
    """``DecodeState.put``: a request takes the row of one that finished (no copy of the others'
    caches); the newcomer (a longer prompt: its rings are larger) and the running row decode as alone."""
    model, patcher = entropy_setup(7)
    engine = IncrementalEngine(model, patcher, max_new_bytes=40)
    p1, p2, p3 = prompts_ids(TEXT[:12], "hi", TEXT[40:95])
    feed = text_bytes(TEXT[:16])
    alone = {}
    for key, p in (("a", p1), ("c", p3)):
        s, lg, _ = engine.prefill([p])
        out = [lg]
        for t in feed:
            out.append(engine.step(s, torch.tensor([t])))
        alone[key] = torch.stack(out)[:, 0]
    run, lg, _ = engine.prefill([p1, p2])
    got = {"a": [lg[0]], "c": []}
    for t in feed[:6]:
        got["a"].append(engine.step(run, torch.tensor([t, t]))[0])
    row_a = run.encoder.tensors[0][0].clone()
    newcomer, lg3, _ = engine.prefill([p3])
    run.put([1], newcomer)  # b finished: c takes its row
    assert torch.equal(run.encoder.tensors[0][0], row_a)  # the running row is untouched
    got["c"].append(lg3[0])
    for i in range(10):
        lg = engine.step(run, torch.tensor([feed[6 + i], feed[i]]))
        got["a"].append(lg[0])
        got["c"].append(lg[1])
    for key in "ac":
        seq = torch.stack(got[key])
        torch.testing.assert_close(seq, alone[key][: len(seq)], atol=ATOL, rtol=0)
        assert torch.equal(seq.argmax(-1), alone[key][: len(seq)].argmax(-1)), key
    with pytest.raises(ValueError, match="put of 1 rows into 2"):
        run.put([0, 1], newcomer)


@pytest.mark.parametrize("name", ["entropy", "cross-windows", "concat-static", "causal"])
def test_chunked_prefill_equals_one_chunk(name):
    model, patcher = SETUPS[name]()
    prompts = prompts_ids(TEXT * 2, TEXT[:17])  # ~200 bytes, many windows long
    whole = IncrementalEngine(model, patcher, max_new_bytes=8, prefill_chunk=4096)
    small = IncrementalEngine(model, patcher, max_new_bytes=8, prefill_chunk=7)
    (s1, l1, p1), (s2, l2, p2) = whole.prefill(prompts), small.prefill(prompts)
    assert p1 == p2
    torch.testing.assert_close(l2, l1, atol=ATOL, rtol=0)
    for t in text_bytes("so it goes"):
        torch.testing.assert_close(small.step(s2, torch.tensor([t, t])), whole.step(s1, torch.tensor([t, t])),
                                   atol=ATOL, rtol=0)


def test_prefill_attention_is_bounded_by_windows_and_chunks(monkeypatch):
    """A 6 KB prompt: every local attention call sees at most window + chunk + 1 keys (no T x T mask), the
    rings stay one window long, and the result equals the full recompute's."""
    from torchblt.model import transformer

    model, patcher = entropy_setup(9, window=12)
    widest = {"local": 0}
    real = transformer.scaled_dot_product

    def spy(q, k, v, mask, is_causal=False):
        if q.shape[-1] * q.shape[-2] == 32:  # a local stack or the entropy model (width 32), not the global (64)
            widest["local"] = max(widest["local"], k.shape[1])
        return real(q, k, v, mask, is_causal)

    prompt = prompts_ids((TEXT + " ") * 60)  # ~6 KB
    engine = IncrementalEngine(model, patcher, max_new_bytes=4, prefill_chunk=64)
    monkeypatch.setattr(transformer, "scaled_dot_product", spy)
    state, logits, starts = engine.prefill(prompt)
    monkeypatch.setattr(transformer, "scaled_dot_product", real)
    assert 0 < widest["local"] <= 14 + 64 + 1, widest
    assert state.encoder.capacity == state.decoder.capacity == 12 and state.entropy.capacity == 14
    full = FullRecomputeEngine(model, patcher)
    want = full.start(prompt)
    assert starts == full.prompt_starts
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


def test_long_prompt_prefill_is_banded_with_bounded_masks(monkeypatch):
    """A 5 KB prompt prefilled in chunks much longer than the windows: the local stacks and the entropy
    model attend banded (:class:`~torchblt.model.masks.BandedMask` after the cached window), the encoder's
    closing slots gather their bytes (:class:`~torchblt.model.masks.PatchCrossMask`), so the largest
    attention mask is bounded by the chunk and the windows (and the global model's patches), not the
    prompt; the logits, boundaries and the next steps equal the full recompute's."""
    from tests.test_long_inputs import record_attention_masks
    from torchblt.generation import incremental
    from torchblt.model import masks

    model, patcher = entropy_setup(9, window=12)
    prompt = prompts_ids((TEXT + " ") * 50)  # ~5 KB
    chunk = 512
    monkeypatch.setattr(incremental, "DENSE_CROSS_MAX", 1 << 12)
    calls = record_attention_masks(monkeypatch)
    engine = IncrementalEngine(model, patcher, max_new_bytes=8, prefill_chunk=chunk)
    state, logits, starts = engine.prefill(prompt)
    assert calls["banded"] > 0 and calls["gathered"] > 0, calls
    # the banded blocks' masks, the decoder's and the global model's per-chunk masks; never prompt x prompt
    P = sum(starts[0])
    bound = max(chunk * (masks.BAND_BLOCK + 14), chunk * 4 * (state.patch_slots.capacity + chunk), chunk * (P + chunk))
    assert calls["largest_mask"] <= bound < len(prompt[0]) ** 2 // 4, (calls, bound)
    assert state.encoder.capacity == state.decoder.capacity == 12 and state.entropy.capacity == 14
    monkeypatch.undo()
    full = FullRecomputeEngine(model, patcher)
    torch.testing.assert_close(logits, full.start(prompt), atol=ATOL, rtol=0)
    assert starts == full.prompt_starts
    for t in text_bytes("!"):
        torch.testing.assert_close(engine.step(state, torch.tensor([t])), full.advance(torch.tensor([t])),
                                   atol=ATOL, rtol=0)


def test_decide_starts_many_positions_equals_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    j = torch.arange(2, 40)[None]
    ent = torch.rand(1, 40, generator=g) * 2
    x = torch.randint(4, 260, (1, 40), generator=g)
    for patcher in (Patcher("entropy", threshold=1.0, max_patch_length=3), Patcher("space", max_patch_length=4),
                    Patcher("entropy", threshold=0.1, monotonicity=True), Patcher("static", patch_size=2.7)):
        many, last = decide_starts(patcher, j, ent[:, 1:39], ent[:, 0:38], x[:, 1:39], x[:, 0:38], torch.tensor([1]))
        lr, one = torch.tensor([1]), []
        for i in range(j.shape[1]):
            s, lr2 = decide_starts(patcher, j[:, i : i + 1], ent[:, 1 + i : 2 + i], ent[:, i : i + 1],
                                   x[:, 1 + i : 2 + i], x[:, i : i + 1], lr)
            lr = lr2[:, 0]
            one.append(bool(s[0, 0]))
        assert many[0].tolist() == one, patcher


def test_state_is_a_typed_tree_with_cache_sizes():
    model, patcher = entropy_setup(0)
    engine = IncrementalEngine(model, patcher, max_new_bytes=8)
    state, _, _ = engine.prefill(prompts_ids(TEXT[:40], TEXT[:3]))
    assert isinstance(state, DecodeState) and state.batch == 2
    sizes = state.cache_bytes()
    assert set(sizes) >= {"entropy_model", "local_encoder", "global", "local_decoder", "decoder_patch_slots"}
    assert all(v > 0 for v in sizes.values())
    assert state.copy().select([1]).batch == 1 and state.batch == 2


def test_compiled_step_equals_full_recompute():
    """The compiled (inductor) step, on a model small enough to compile in seconds: same bytes, same
    boundaries and logits within 1e-4 of the full recompute, batch rows included; plus a roll-back."""
    from torch._dynamo.utils import counters

    model = tiny_model(seed=12, window=8, changes={"hash": None, "decoder.n_layers": 1, "global_.n_layers": 1})
    patcher = Patcher("space", max_patch_length=4)
    counters.clear()
    out = assert_same(model, patcher, prompts_ids(TEXT[:19], "Ok"), n_new=14, compile=True)
    assert sum(out.patch_starts[0]) >= 3
    # each part (front, close, back) compiled once: no recompile when the prefill's state (views of its
    # per-byte results) meets a compiled step's (row-major: state.row_major)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    # a later engine on the model reuses the graphs, fed bytes made inside and outside inference mode (a
    # guard on the tensor's kind once recompiled every part when a server's bytes were of the other kind)
    engine = IncrementalEngine(model, patcher, 14, compile=True)
    logits = engine.start(prompts_ids(TEXT[:19], "Ok"))
    for i in range(4):
        with torch.inference_mode(i % 2 == 0):
            ids = torch.tensor(logits.argmax(-1).tolist())
        assert ids.is_inference() == (i % 2 == 0)
        logits = engine.advance(ids)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


def test_compile_failure_falls_back_to_eager_logged_once(monkeypatch, caplog):
    """A compiler that fails (e.g. inductor without a C++ compiler): the step runs eager with the same
    results, the state is untouched by the failed try, and the fallback is logged once per process."""
    from torchblt.generation import incremental

    def broken(self, part, n):
        def fail(*args):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")
        return fail

    monkeypatch.setattr(incremental, "_compile_failure", None)
    monkeypatch.setattr(incremental.IncrementalEngine, "_compiled_part", broken)
    model, patcher = SETUPS["pooling"]()
    runs = []
    with caplog.at_level("WARNING", logger=incremental.__name__):
        for compiled in (True, True, False):
            cfg = GenerationConfig(max_new_bytes=12, stop_at_eos=False, compile=compiled)
            runs.append(generate_tokens(model, prompts_ids(TEXT[:20], "ab c"), patcher, config=cfg, return_logits=True))
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    for r in range(2):
        torch.testing.assert_close(runs[0].logits[r], runs[2].logits[r], atol=ATOL, rtol=0)
    warned = [rec for rec in caplog.records if "eager step" in rec.getMessage()]
    assert len(warned) == 1 and "no C++ compiler" in warned[0].getMessage()


def test_generation_config_compile_and_deprecated_fused_step(monkeypatch):
    from torchblt.generation import api

    built = []
    real = api.IncrementalEngine

    def spy(*args, **kwargs):
        built.append(kwargs.get("compile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "IncrementalEngine", spy)
    model, patcher = entropy_setup(0)
    cfg = GenerationConfig(max_new_bytes=4, stop_at_eos=False)
    generate_tokens(model, prompts_ids("ab"), patcher, config=cfg)
    assert built == [api.compile_pays(model, 1, 4)] and built[0] is False  # a few bytes: not worth compiling
    with pytest.warns(DeprecationWarning, match="fused_step"):
        generate_tokens(model, prompts_ids("ab"), patcher, config=GenerationConfig(max_new_bytes=2, fused_step=True))


def test_compiled_small_query_attention_equals_sdpa():
    """A compiled CPU call with few queries writes attention out as products and a softmax (see
    ``scaled_dot_product``): it must equal SDPA, with boolean and additive masks and grouped-query heads,
    and call SDPA for more queries than ``SMALL_QUERIES``."""
    from torchblt.model import transformer

    torch.manual_seed(0)
    compiled = torch.compile(transformer.scaled_dot_product, fullgraph=True, dynamic=False)
    k, v = torch.randn(2, 11, 2, 8), torch.randn(2, 11, 2, 8)
    for tq, kind in ((1, "bool"), (3, "additive"), (transformer.SMALL_QUERIES + 1, "bool")):
        q = torch.randn(2, tq, 4, 8)
        allowed = torch.rand(2, 1, tq, 11) > 0.4
        allowed[..., 0] = True  # every query sees a key
        mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        want = transformer.scaled_dot_product(q, k, v, mask)
        torch.testing.assert_close(compiled(q, k, v, mask), want, rtol=1e-5, atol=1e-5)
    # the written-out form is what the compiled graph runs for few queries: no flash-attention kernel
    from torch._inductor.utils import run_and_get_code

    fresh = torch.compile(transformer.scaled_dot_product, fullgraph=True, dynamic=False)
    _, code = run_and_get_code(fresh, q[:, :2], k, v, allowed[:, :, :2])
    assert "flash_attention" not in "".join(code)


def test_stack_rows_prepare_equals_a_call_on_the_rows_taken_out():
    """``StackKV.rows_of(rows).prepare`` (the global step of a batch's closing rows, caches in place) stores
    and returns what the same call on a copy of those rows does, and leaves the other rows untouched."""
    from torchblt.generation.cache import StackKV

    torch.manual_seed(0)
    B, C, H, D, layers = 5, 16, 2, 4, 2
    stack = StackKV.for_stack(layers, B, C, H, D, None, True, torch.float32, torch.device("cpu"))
    filled = torch.arange(6)[None].expand(B, 6)  # six stored entries per row, one document
    stack.write(filled, [torch.randn(B, 6, H, D) for _ in range(2 * layers)], torch.zeros(B, 6, dtype=torch.int64))
    before = stack.copy()
    rows = torch.tensor([3, 1])
    positions = torch.tensor([[6], [6]])
    docs = torch.zeros(2, 1, dtype=torch.int64)
    keep = torch.tensor([[True], [False]])  # row 1's entry is computed and discarded
    new = [(torch.randn(2, 1, H, D), torch.randn(2, 1, H, D)) for _ in range(layers)]

    taken = before.take(rows)
    ref = taken.prepare(positions, docs, keep, view=8)
    in_place = stack.rows_of(rows).prepare(positions, docs, keep, view=8)
    assert torch.equal(ref.mask.dense, in_place.mask.dense)
    for i, (k, v) in enumerate(new):
        for got, want in zip(in_place.layers[i].update(k, v), ref.layers[i].update(k, v), strict=True):
            assert torch.equal(got, want)
    for j, t in enumerate(stack.tensors):
        assert torch.equal(t[rows], taken.tensors[j])
        others = torch.tensor([0, 2, 4])
        assert torch.equal(t[others], before.tensors[j][others])
    assert torch.equal(stack.pos[rows], taken.pos) and torch.equal(stack.tag[rows], taken.tag)
    assert stack.pos[3, 6] == 6 and stack.pos[1, 6] == -1
