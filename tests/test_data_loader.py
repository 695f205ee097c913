"""The training loader: packing conventions, determinism, sharding and exact resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from torchblt import load_model
from torchblt.data import DataConfig, DataLoader, build_loader, iter_documents
from torchblt.data.packing import Batch
from torchblt.patching import PatchingConfig
from torchblt.tokenizer import BOS_ID, EOS_ID, OFFSET

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
ENTROPY_MODEL = FIXTURES / "05_blt_forward" / "entropy_model"


def _text(i: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "épée", "x", "longerword", "z9"]
    return " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(10 + 13 * (i % 5))) + f" #{i}."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "txt").mkdir()
    for i in range(6):
        (root / "txt" / f"d{i}.txt").write_text(_text(i), encoding="utf-8")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for i in range(6, 12):
            f.write(json.dumps({"text": _text(i), "id": i}) + "\n")
    return root


@pytest.fixture(scope="module")
def entropy_model() -> torch.nn.Module:
    return load_model(ENTROPY_MODEL)


def _docs(corpus: Path) -> list[bytes]:
    return list(iter_documents([str(corpus / "txt"), str(corpus / "b.jsonl")]))


def _take(it, n: int) -> list[Batch]:
    return [next(it) for _ in range(n)]


def _check_batch(b: Batch, kind: str, seq_len: int, max_bytes: int | None) -> None:
    B, L = b.x.shape
    assert b.y.shape == b.mask.shape == (B, L)
    assert b.x.dtype == b.y.dtype == torch.int64 and b.mask.dtype == torch.bool
    assert not bool(((b.y == 0) & b.mask).any()), "a padding target is trained"
    assert not bool(((b.y == BOS_ID) & b.mask).any()), "a BOS target is trained"
    if kind == "bytes":
        assert b.patch_lengths is None and L == seq_len
        return
    pl = b.patch_lengths
    assert pl is not None and pl.dtype == torch.int64
    assert bool((pl[:, 0] == 1).all())
    assert bool((pl.sum(1) == L + 1).all())
    assert pl.shape[1] <= seq_len
    if max_bytes is not None:
        assert L <= max_bytes
    for row in pl:  # zero right-padding only
        nz = (row > 0).nonzero().flatten()
        assert int(nz.max()) + 1 == int(nz.numel())
    # y is x shifted by one inside each row
    for i in range(B):
        n = int(b.mask[i].nonzero().max()) + 1 if b.mask[i].any() else 0  # (0: e.g. a row [EOS] -> BOS)
        assert torch.equal(b.y[i, : max(n - 1, 0)], b.x[i, 1:n])


CONFIGS = {
    "space": dict(kind="blt", patching=PatchingConfig("space"), seq_len=12, batch_size=3, shuffle_buffer=5),
    "static_capped": dict(kind="blt", patching=PatchingConfig("static", patch_size=4.5), seq_len=12, max_bytes=30,
                          batch_size=2),
    "byte": dict(kind="blt", patching=PatchingConfig("byte"), seq_len=48, batch_size=3, shuffle_buffer=3),
    "bytes": dict(kind="bytes", patching=PatchingConfig("byte"), seq_len=32, batch_size=4, shuffle_buffer=7),
    "entropy_fly": dict(kind="blt", patching=PatchingConfig("entropy", threshold=1.5), seq_len=10, max_bytes=48,
                        batch_size=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batches_follow_the_conventions(corpus: Path, entropy_model, name: str) -> None:
    kw = CONFIGS[name]
    cfg = DataConfig(sources=[str(corpus / "txt"), str(corpus / "b.jsonl")], **kw)
    dl = build_loader(cfg, entropy_model=entropy_model if kw["patching"].mode == "entropy" else None)
    for b in _take(iter(dl), 12):
        _check_batch(b, cfg.kind, cfg.seq_len, cfg.max_bytes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exact_resume_across_epochs(corpus: Path, entropy_model, name: str) -> None:
    """N batches, state_dict (through JSON), a new loader, load_state_dict: the next M batches equal an
    uninterrupted run's. The corpus is small, so this crosses epochs with a full shuffle buffer."""
    kw = CONFIGS[name]
    cfg = DataConfig(sources=[str(corpus / "txt"), str(corpus / "b.jsonl")], seed=3, **kw)
    em = entropy_model if kw["patching"].mode == "entropy" else None
    full = build_loader(cfg, entropy_model=em)
    reference = _take(iter(full), 30)
    assert full._pipelines[0].reader.position()["epoch"] >= 1, "the test must cross epochs"

    first = build_loader(cfg, entropy_model=em)
    it = iter(first)
    _take(it, 17)
    state = json.loads(json.dumps(first.state_dict()))
    stats = first.stats
    resumed = build_loader(cfg, entropy_model=em)
    resumed.load_state_dict(state)
    assert resumed.stats == stats
    for a, b in zip(reference[17:], _take(iter(resumed), 13)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.mask, b.mask)
        if a.patch_lengths is not None:
            assert torch.equal(a.patch_lengths, b.patch_lengths)


def test_iterating_again_continues(corpus: Path) -> None:
    cfg = DataConfig(sources=[str(corpus / "txt")], kind="bytes", seq_len=16, batch_size=2)
    ref = _take(iter(build_loader(cfg)), 6)
    dl = build_loader(cfg)
    got = _take(iter(dl), 3) + _take(iter(dl), 3)
    assert all(torch.equal(a.x, b.x) for a, b in zip(ref, got))
    assert dl.state_dict()["n_batches"] == 6


def test_every_next_byte_pair_is_trained_once(corpus: Path) -> None:
    """Without shuffling, rows overlap by one token: the targets are exactly the stream minus BOS."""
    docs = _docs(corpus)
    for kind, patching in (("bytes", "byte"), ("blt", "space")):
        cfg = DataConfig(
            sources=[str(corpus / "txt"), str(corpus / "b.jsonl")],
            kind=kind,
            patching=PatchingConfig(patching),
            seq_len=9,
            batch_size=1,
            shuffle_buffer=0,
            max_bytes=40,
            interleave=1,
        )
        it = iter(build_loader(cfg))
        targets: list[int] = []
        prev_last = None
        while len(targets) < 3 * sum(len(d) for d in docs):
            b = next(it)
            n = int((b.x[0] != 0).sum()) if kind == "blt" else b.x.shape[1]
            x, y = b.x[0, :n].tolist(), b.y[0, :n].tolist()
            if prev_last is not None:
                assert x[0] == prev_last  # the overlap token
            prev_last = y[-1]
            targets += [t for t, m in zip(y, b.mask[0, :n].tolist()) if m]
        assert targets.count(EOS_ID) >= 2 * len(docs)
        # every document occurs whole, in order, between EOS targets
        cur: list[int] = []
        seen = []
        for t in targets:
            if t == EOS_ID:
                seen.append(bytes(v - OFFSET for v in cur))
                cur = []
            else:
                cur.append(t)
        assert set(seen) == set(docs)  # whole documents, nothing lost, nothing invented
        assert sorted(seen[: len(docs)]) == sorted(docs)  # the first epoch holds each document once


def test_interleaved_streams_each_continue_their_documents(corpus: Path) -> None:
    """With interleave=K, sequence i continues sequence i-K (overlap token) and whole documents still
    come out of each stream; the first K sequences start K different documents."""
    cfg = DataConfig(
        sources=[str(corpus / "txt"), str(corpus / "b.jsonl")],
        kind="bytes",
        seq_len=24,
        batch_size=1,
        shuffle_buffer=0,
        interleave=3,
    )
    it = iter(build_loader(cfg))
    rows = [next(it) for _ in range(60)]
    assert len({int(r.x[0, 1]) for r in rows[:3]}) > 1 and all(int(r.x[0, 0]) == BOS_ID for r in rows[:3])
    docs = set(_docs(corpus))
    for k in range(3):
        stream = rows[k::3]
        for prev, cur in zip(stream, stream[1:]):
            assert int(cur.x[0, 0]) == int(prev.y[0, -1])
        targets = [t for r in stream for t, m in zip(r.y[0].tolist(), r.mask[0].tolist()) if m]
        pieces = bytes(t - OFFSET if t >= OFFSET else 0 for t in targets).split(bytes([0]))  # EOS -> 0
        assert all(p in docs for p in pieces[:-1])  # whole documents between EOS targets


def test_determinism_and_rank_sharding(corpus: Path) -> None:
    cfg = DataConfig(sources=[str(corpus / "txt"), str(corpus / "b.jsonl")], kind="bytes", seq_len=16, batch_size=2)
    a = _take(iter(build_loader(cfg, rank=0, world_size=2)), 4)
    b = _take(iter(build_loader(cfg, rank=0, world_size=2)), 4)
    c = _take(iter(build_loader(cfg, rank=1, world_size=2)), 4)
    assert all(torch.equal(p.x, q.x) for p, q in zip(a, b))
    assert not all(torch.equal(p.x, q.x) for p, q in zip(a, c))
    sources = [str(corpus / "txt"), str(corpus / "b.jsonl")]
    all_docs = list(iter_documents(sources))
    parts = [list(iter_documents(sources, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(all_docs)
    assert all(parts)
    with pytest.raises(ValueError, match="rank"):
        build_loader(cfg, rank=2, world_size=2)


def test_workers_resume_exactly(corpus: Path) -> None:
    cfg = DataConfig(
        sources=[str(corpus / "txt"), str(corpus / "b.jsonl")],
        kind="blt",
        patching=PatchingConfig("space"),
        seq_len=8,
        batch_size=2,
        shuffle_buffer=3,
        num_workers=2,
    )
    reference = _take(iter(build_loader(cfg)), 9)
    first = build_loader(cfg)
    _take(iter(first), 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    got = _take(iter(resumed), 4)
    assert all(
        torch.equal(a.x, b.x) and torch.equal(a.patch_lengths, b.patch_lengths) for a, b in zip(reference[5:], got)
    )
    # the workers read disjoint shards: their first batches differ
    assert not torch.equal(reference[0].x, reference[1].x)


def test_resume_rejects_a_different_layout(corpus: Path) -> None:
    """A saved position only continues the same pipeline: another seq_len, or a rank whose shards the state
    does not hold, or more processes than shards, is refused naming the cause."""
    cfg = DataConfig(sources=[str(corpus / "txt")], kind="bytes", seq_len=16, batch_size=2)
    state = build_loader(cfg, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="shard"):
        build_loader(cfg, rank=0, world_size=1).load_state_dict(state)  # shard 1 lives in rank 1's state
    with pytest.raises(ValueError, match=r"data\.seq_len=16, resuming with data\.seq_len=12"):
        build_loader(dataclasses.replace(cfg, seq_len=12), rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="data.shards: the data is split into 2 shard"):
        build_loader(cfg, rank=0, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        build_loader(cfg, rank=0, world_size=2).load_state_dict({**state, "version": 1})


def _rows(batches: list[Batch]) -> list[tuple]:
    """The sequences of some batches, as hashable rows (padding dropped)."""
    out = []
    for b in batches:
        L = b.x.shape[1]
        for i in range(b.x.shape[0]):
            n = int((b.x[i] != 0).sum())  # BOE (0) is only padding, which joins the last patch
            pl: list[int] = [] if b.patch_lengths is None else [v for v in b.patch_lengths[i].tolist() if v]
            if pl:
                pl[-1] -= L - n
            out.append((tuple(b.x[i, :n].tolist()), tuple(b.y[i, :n].tolist()), tuple(pl)))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_another_world_size_continues_every_shard(corpus: Path, workers: int) -> None:
    """2 ranks -> 1 process (another batch size, with or without workers) -> 2 ranks: each shard's
    sequences are exactly those of an uninterrupted 2-rank run (nothing skipped, nothing repeated)."""
    cfg = DataConfig(sources=[str(corpus / "txt"), str(corpus / "b.jsonl")], kind="blt", patching=PatchingConfig("space"),
                     seq_len=8, max_bytes=30, batch_size=2, shuffle_buffer=5, interleave=3, seed=1)
    uninterrupted = [_rows(_take(iter(build_loader(cfg, rank=r, world_size=2)), 10)) for r in range(2)]

    ranks = [build_loader(cfg, rank=r, world_size=2) for r in range(2)]
    got = [_rows(_take(iter(dl), 3)) for dl in ranks]  # 3 batches of 2 rows per shard
    merged = DataLoader.merge_states([json.loads(json.dumps(dl.state_dict())) for dl in ranks])
    one_cfg = dataclasses.replace(cfg, batch_size=1, num_workers=workers)
    one = build_loader(one_cfg)
    one.load_state_dict(merged)
    assert one.n_shards == 2 and one.shards == [0, 1]
    rows = _rows(_take(iter(one), 8))  # shards in turn, 1 row each: 4 rows per shard
    got[0] += rows[0::2]
    got[1] += rows[1::2]
    state = json.loads(json.dumps(one.state_dict()))
    for r in range(2):
        again = build_loader(cfg, rank=r, world_size=2)
        again.load_state_dict(DataLoader.merge_states([state]))
        got[r] += _rows(_take(iter(again), 3))
    for r in range(2):
        assert got[r] == uninterrupted[r][: len(got[r])]
        assert len(got[r]) == 6 + 4 + 6


def test_default_shards_follow_processes_and_workers(corpus: Path) -> None:
    cfg = DataConfig(sources=[str(corpus / "txt")], kind="bytes", seq_len=16, batch_size=2, num_workers=2)
    dl = build_loader(cfg, rank=1, world_size=3)
    assert dl.n_shards == 6 and dl.shards == [1, 4] and dl.n_workers == 2
    dl = build_loader(dataclasses.replace(cfg, shards=5, num_workers=2), rank=0, world_size=2)
    assert dl.shards == [0, 2, 4] and dl.n_workers == 1  # workers divide the rank's shards


@pytest.mark.parametrize("seed", range(6))
def test_documents_longer_than_a_segment_resume_exactly(corpus: Path, entropy_model, monkeypatch, seed: int) -> None:
    """With tiny segments every document is patched and packed in pieces (on-the-fly entropies with their
    left context): the conventions hold, and a resume anywhere continues exactly."""
    import random

    from torchblt.data import loader as loader_module

    monkeypatch.setattr(loader_module, "SEGMENT_TOKENS", 37)
    r = random.Random(seed)
    mode = r.choice(["space", "static", "entropy"])
    kind = r.choice(["blt", "bytes"]) if mode != "entropy" else "blt"
    patching = PatchingConfig(mode, threshold=1.5 if mode == "entropy" else None,
                              max_patch_length=r.choice([None, 3]))
    cfg = DataConfig(
        sources=[str(corpus / "txt"), str(corpus / "b.jsonl")],
        kind=kind,
        patching=patching,
        seq_len=r.randint(2, 20),
        batch_size=r.randint(1, 3),
        shuffle_buffer=r.choice([0, 3, 7]),
        interleave=r.choice([1, 3]),
        max_bytes=r.choice([None, 3, 30]),
        max_doc_bytes=r.choice([16, 1000]),
    )
    em = entropy_model if mode == "entropy" else None
    n, m = r.randint(1, 12), r.randint(1, 8)
    reference = _take(iter(build_loader(cfg, entropy_model=em)), n + m)
    for b in reference:
        _check_batch(b, cfg.kind, cfg.seq_len, cfg.max_bytes)
    first = build_loader(cfg, entropy_model=em)
    _take(iter(first), n)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, entropy_model=em)
    resumed.load_state_dict(state)
    assert json.loads(json.dumps(resumed.state_dict())) == state
    assert resumed.stats == first.stats
    for a, b in zip(reference[n:], _take(iter(resumed), m)):
        assert torch.equal(a.x, b.x) and torch.equal(a.mask, b.mask)
        if a.patch_lengths is not None:
            assert torch.equal(a.patch_lengths, b.patch_lengths)


def _one_line_document(path: Path, n_bytes: int) -> bytes:
    """A one-line document of about ``n_bytes`` (some non-ASCII, a newline every ~100 bytes: JSON escapes),
    written as a text file or as one JSONL record (``ensure_ascii``: escapes, or gzipped); returns its text."""
    import gzip

    words = "alpha beta gamma délta x longerword «quoted» \"q\" tab\tend".split(" ")
    line = " ".join(words[(i * 7) % len(words)] for i in range(16)) + "\n"
    text = (line * (n_bytes // len(line.encode()) + 1)).encode("utf-8")
    if path.suffix == ".txt":
        path.write_bytes(text)
    else:
        record = (json.dumps({"id": 7, "meta": {"a": [1, 2]}, "text": text.decode()}) + "\n").encode()
        path.write_bytes(gzip.compress(record) if path.name.endswith(".gz") else record)
    return text


@pytest.mark.parametrize("name", ["doc.txt", "doc.jsonl", "doc.jsonl.gz"])
def test_a_huge_one_line_document_streams_in_bounded_memory(tmp_path: Path, monkeypatch, name: str) -> None:
    """A 4 MB one-line document (text file, JSONL record with escapes, gzipped JSONL), with every bound
    scaled down (pieces of 64 KB, segments of 4 K tokens, JSONL lines streamed from 64 KB in blocks of
    16 KB): the pieces are the document's bytes; the loader state is a few KB and resumes exactly inside
    the document; reading all of it, a resume included, never holds more than 1/4 of it (traced
    allocations). The same code paths read a 200 MB document with the default bounds (docs/data.md:
    measured peak RSS and state size)."""
    import tracemalloc

    from torchblt.data import jsonl_stream, sources
    from torchblt.data import loader as loader_module

    monkeypatch.setattr(loader_module, "SEGMENT_TOKENS", 4096)
    monkeypatch.setattr(sources, "STREAM_LINE_BYTES", 1 << 16)
    monkeypatch.setattr(jsonl_stream, "_BLOCK", 1 << 14)
    path = tmp_path / name
    text = _one_line_document(path, 4 << 20)
    max_doc = 1 << 16
    reader = sources.DocumentReader([str(path)], loop=False, max_doc_bytes=max_doc)
    pieces = [d.data for d in reader]
    assert b"".join(pieces) == text and len(pieces) > 60 and max(map(len, pieces)) <= max_doc
    assert reader.stats["too_long"] == 1 and reader.stats["non_utf8"] == 0
    del reader, pieces
    cfg = DataConfig(sources=[str(path)], kind="blt", patching=PatchingConfig("space"), seq_len=512, max_bytes=2048,
                     batch_size=4, shuffle_buffer=4, interleave=2, max_doc_bytes=max_doc)
    next(iter(build_loader(cfg)))  # (what a first batch imports is not the document's)
    tracemalloc.start()
    try:
        dl = build_loader(cfg)
        it = iter(dl)
        _take(it, 5)
        state = json.dumps(dl.state_dict())
        streams = []
        stream = sources.stream_record
        monkeypatch.setattr(sources, "stream_record", lambda *a: streams.append(1) or stream(*a))
        again = build_loader(cfg)
        again.load_state_dict(json.loads(state))  # (both packers are in the document: one stream serves both)
        assert len(streams) == (0 if name.endswith(".txt") else 1)
        after = _take(it, 3)
        assert all(torch.equal(a.x, b.x) and torch.equal(a.patch_lengths, b.patch_lengths)
                   for a, b in zip(after, _take(iter(again), 3)))
        del again
        while dl.stats["documents"] <= len(text) // max_doc:  # through the whole document and into the next epoch
            next(it)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(state) < 16 * 1024, len(state)  # measured: ~1.1 KB
    assert peak < len(text) / 4, (peak, len(text))  # measured: 0.70 MB (txt), 0.80 MB (jsonl) for 4 MB


def test_batch_to_and_counts(corpus: Path) -> None:
    cfg = DataConfig(sources=[str(corpus / "txt")], kind="blt", patching=PatchingConfig("space"), seq_len=8,
                     batch_size=2)
    dl = build_loader(cfg)
    b = next(iter(dl)).to("cpu")
    assert b.n_bytes == int(b.mask.sum())
    assert 0 < b.n_patches <= b.patch_lengths.numel()
    assert dl.stats["documents"] >= 1 and dl.stats["bytes"] > 0


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(kind="tokens"), "kind"),
        (dict(seq_len=0), "seq_len"),
        (dict(patching=PatchingConfig("bpe")), "patching.mode"),
        (dict(patching=PatchingConfig("entropy", threshold=None)), "patching.threshold"),
        (dict(patching=PatchingConfig("entropy", threshold=1.0), target_patch_size=4.0), "target_patch_size"),
        (dict(patching=PatchingConfig("space", max_patch_length=0)), "patching.max_patch_length"),
        (dict(max_bytes=1), "max_bytes"),
        (dict(on_bad_record="ignore"), "on_bad_record"),
        (dict(batch_size="8"), "batch_size"),
        (dict(interleave=0), "interleave"),
        (dict(sources=[]), "sources"),
    ],
)
def test_config_errors_name_the_field(corpus: Path, kw: dict, field: str) -> None:
    base = dict(sources=[str(corpus / "txt")], patching=PatchingConfig("space"))
    base.update(kw)
    with pytest.raises(ValueError, match=f"data.{field}"):
        build_loader(DataConfig(**base))


def test_entropy_patching_needs_entropies(corpus: Path) -> None:
    with pytest.raises(ValueError, match="entropy_model"):
        build_loader(DataConfig(sources=[str(corpus / "txt")], patching=PatchingConfig("entropy", threshold=1.0)))


@pytest.mark.parametrize("seed", range(12))
def test_random_configs_resume_exactly(corpus: Path, seed: int) -> None:
    """Random corners (tiny caps, one-byte patches, split documents, streams, buffers): conventions hold
    and a resume at a random batch continues exactly."""
    import random

    r = random.Random(seed)
    kw = dict(
        kind=r.choice(["blt", "bytes"]),
        mode=r.choice(["space", "static", "byte"]),
        seq_len=r.randint(2, 40),
        batch_size=r.randint(1, 5),
        shuffle_buffer=r.choice([0, 1, 2, 7, 30]),
        seed=r.randint(0, 5),
        interleave=r.choice([1, 2, 5, 8]),
        max_bytes=r.choice([None, 2, 3, 10, 50, 200]),
        max_patch_length=r.choice([None, 1, 3, 8]),
        patch_size=r.choice([1.0, 2.5, 4.5, 7.0]),
        max_doc_bytes=r.choice([16, 50, 1000, 64 * 2**20]),
    )
    patching = PatchingConfig(kw.pop("mode"), max_patch_length=kw.pop("max_patch_length"),
                              patch_size=kw.pop("patch_size"))
    cfg = DataConfig(sources=[str(corpus / "txt"), str(corpus / "b.jsonl")], patching=patching, **kw)
    n, m = r.randint(1, 20), r.randint(1, 15)
    reference = _take(iter(build_loader(cfg)), n + m)
    for b in reference:
        _check_batch(b, cfg.kind, cfg.seq_len, cfg.max_bytes)
    first = build_loader(cfg)
    _take(iter(first), n)
    resumed = build_loader(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(reference[n:], _take(iter(resumed), m)):
        assert torch.equal(a.x, b.x) and torch.equal(a.mask, b.mask)
        if a.patch_lengths is not None:
            assert torch.equal(a.patch_lengths, b.patch_lengths)


def test_flat_patching_keywords_of_the_first_release_still_work(corpus: Path) -> None:
    sources = [str(corpus / "txt")]
    with pytest.warns(FutureWarning, match=r"DataConfig\(patching='static', patch_size=3\).*"
                                           r"patching=PatchingConfig\(mode='static', patch_size=3\)"):
        old = DataConfig(sources=sources, patching="static", patch_size=3, seq_len=8, batch_size=2)
    new = DataConfig(sources=sources, patching=PatchingConfig("static", threshold=None, patch_size=3), seq_len=8,
                     batch_size=2)
    assert old == new
    assert all(torch.equal(a.patch_lengths, b.patch_lengths)
               for a, b in zip(_take(iter(build_loader(old)), 3), _take(iter(build_loader(new)), 3)))
    with pytest.warns(FutureWarning, match="threshold=1.5"):
        entropy = DataConfig(sources=sources, threshold=1.5, max_patch_length=4)
    assert entropy.patching == PatchingConfig("entropy", threshold=1.5, max_patch_length=4)
