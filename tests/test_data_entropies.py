"""Entropy preprocessing (``blt entropies``), training from the shards, and threshold calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from torchblt import Patcher, entropy, load_model
from torchblt.cli import main
from torchblt.data import DataConfig, build_loader, iter_documents
from torchblt.data.calibrate import _groups, _mean, calibrate_threshold, mean_patch_size
from torchblt.data.entropies import document_entropies, document_tokens, write_entropy_shards
from torchblt.patching import PatchingConfig

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
ENTROPY_MODEL = FIXTURES / "05_blt_forward" / "entropy_model"


@pytest.fixture(scope="module")
def em() -> torch.nn.Module:
    return load_model(ENTROPY_MODEL)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ecorpus")
    words = "the quick brown fox jumps over a lazy dog while 42 owls hoot".split()
    for f in range(3):
        with open(root / f"part{f}.jsonl", "w") as fh:
            for i in range(5):
                n = 5 + (7 * i + 3 * f) % 40
                fh.write(json.dumps({"text": " ".join(words[(i + k * f) % len(words)] for k in range(n))}) + "\n")
    (root / "bin.txt").write_bytes(b"raw \xff\xfe bytes kept " * 3)
    return root


def test_per_row_entropies_do_not_leak(em) -> None:
    docs = [document_tokens(b"first document, fairly long " * 4), document_tokens(b"second"), document_tokens(b"x")]
    together = document_entropies(em, docs)
    for d, e in zip(docs, together):
        alone = em.entropies(torch.from_numpy(d)[None])[0].numpy()
        np.testing.assert_allclose(e, alone, atol=1e-5)
    # tiny batches (one document per forward) give the same values
    for a, b in zip(together, document_entropies(em, docs, max_tokens=1)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_long_documents_in_overlapping_rows_equal_one_forward(em) -> None:
    rng = np.random.default_rng(0)
    doc = document_tokens(bytes(rng.integers(97, 123, size=3300).astype(np.uint8)))
    assert em.receptive_field is not None and len(doc) > 3 * em.receptive_field  # several rows
    with torch.no_grad():
        whole = entropy(em(torch.from_numpy(doc)[None]))[0].numpy()
    short = document_tokens(b"short one")
    got = document_entropies(em, [short, doc, short], max_tokens=4096)
    np.testing.assert_allclose(got[1], whole, atol=1e-4)
    np.testing.assert_allclose(got[0], got[2], atol=1e-5)


def test_blt_entropies_writes_resumable_shards(corpus: Path, em, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ent"
    argv = [
        "entropies",
        "--entropy-model",
        str(ENTROPY_MODEL),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "wrote 4 shards, skipped 0" in capsys.readouterr().out
    shards = sorted(p.name for p in out.glob("*.parquet"))
    assert shards == ["00000-bin.parquet", "00001-part0.parquet", "00002-part1.parquet", "00003-part2.parquet"]
    assert not list(out.glob("*.tmp"))
    table = pq.read_table(out / "00002-part1.parquet")
    assert (
        table.schema.field("text").type == "binary"
        and str(table.schema.field("entropies").type) == "list<element: halffloat>"
    )
    docs = list(iter_documents([str(corpus / "part1.jsonl")]))
    assert table.column("text").to_pylist() == docs and table.column("row").to_pylist() == list(range(5))
    for text, ent in zip(docs, table.column("entropies").to_pylist()):
        alone = em.entropies(torch.from_numpy(document_tokens(text))[None])[0].numpy()
        assert len(ent) == len(text) + 2
        np.testing.assert_allclose(np.array(ent, dtype=np.float32), alone, rtol=2e-3, atol=2e-3)  # float16
    assert pq.read_table(out / "00000-bin.parquet").column("text").to_pylist() == [b"raw \xff\xfe bytes kept " * 3]

    # rerun: everything finished is skipped; a lost shard (and a stale temporary) is redone alone
    (out / "00001-part0.parquet").unlink()
    (out / "00001-part0.parquet.tmp").write_bytes(b"half written")
    mtime = (out / "00003-part2.parquet").stat().st_mtime_ns
    assert main(argv) == 0
    assert "wrote 1 shards, skipped 3" in capsys.readouterr().out
    assert (out / "00001-part0.parquet").exists() and not (out / "00001-part0.parquet.tmp").exists()
    assert (out / "00003-part2.parquet").stat().st_mtime_ns == mtime

    # another corpus into the same folder is refused
    assert (
        main(
            [
                "entropies",
                "--entropy-model",
                str(ENTROPY_MODEL),
                "--data",
                str(corpus / "part0.jsonl"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "other sources" in capsys.readouterr().err


def test_ranks_split_the_shards(corpus: Path, em, tmp_path: Path, monkeypatch, capsys) -> None:
    a = write_entropy_shards(
        em, [str(corpus)], tmp_path / "e", rank=0, world_size=2, progress=False, model_name=str(ENTROPY_MODEL)
    )
    assert a.written == ["00000-bin.parquet", "00002-part1.parquet"]
    # under torchrun the command takes its share from RANK / WORLD_SIZE
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["entropies", "--entropy-model", str(ENTROPY_MODEL), "--data", str(corpus), "--out", str(tmp_path / "e")]
    assert main([*argv, "--no-progress"]) == 0
    assert "rank 1/2: wrote 2 shards" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "e").glob("*.parquet")) == [
        "00000-bin.parquet", "00001-part0.parquet", "00002-part1.parquet", "00003-part2.parquet"
    ]  # fmt: skip


def test_loader_trains_from_stored_entropies(corpus: Path, em, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ent"
    write_entropy_shards(em, [str(corpus)], out, progress=False)
    cfg = DataConfig(entropies=str(out), patching=PatchingConfig("entropy", threshold=1.2), seq_len=6, batch_size=1,
                     shuffle_buffer=0, max_bytes=512)
    dl = build_loader(cfg)
    b = next(iter(dl))
    # the first sequence is the start of the first document of the epoch, patched from its stored entropies
    first = pq.read_table(out / dl._pipelines[0].reader.files[dl._pipelines[0].reader.file_order(0)[0]].split("/")[-1])
    text, ent = first.column("text")[0].as_py(), np.array(first.column("entropies")[0].as_py(), dtype=np.float32)
    tokens = torch.from_numpy(document_tokens(text))[None]
    expected, _ = Patcher("entropy", threshold=1.2).patch(tokens, entropies=torch.from_numpy(ent)[None])
    n = int(b.patch_lengths[0].sum())
    assert torch.equal(b.x[0, : n - 1], tokens[0, : n - 1])
    assert b.patch_lengths[0, :-1].tolist() == expected[0, : b.patch_lengths.shape[1] - 1].tolist()
    # resume is exact from shards too
    state = json.loads(json.dumps(dl.state_dict()))
    ref = [next(iter(dl)) for _ in range(5)]
    again = build_loader(cfg)
    again.load_state_dict(state)
    assert all(
        torch.equal(p.x, q.x) and torch.equal(p.patch_lengths, q.patch_lengths) for p, q in zip(ref, iter(again))
    )
    # blt calibrate reads the shards too
    assert main(["calibrate", "--entropies", str(out), "--target-patch-size", "3.0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert abs(res["mean_patch_size"] - 3.0) < 0.15 and res["n_documents"] == 16
    # an incomplete folder is refused
    (out / "00002-part1.parquet").unlink()
    with pytest.raises(ValueError, match="1 of 4 shards missing"):
        build_loader(cfg)


def test_calibration_hits_the_target(em, corpus: Path) -> None:
    docs = list(iter_documents([str(corpus)]))
    ents = document_entropies(em, [document_tokens(d) for d in docs])
    for target in (2.0, 3.0, 4.5):
        res = calibrate_threshold(ents, target)
        assert abs(res.mean_patch_size - target) < 0.15, res
        assert res.mean_patch_size == pytest.approx(mean_patch_size(ents, res.threshold))
    assert mean_patch_size(ents, 0.5) <= mean_patch_size(ents, 1.5) <= mean_patch_size(ents, 3.0)
    # the counting shortcut of the default rule equals patching with the Patcher
    for t in (0.5, 1.3, 2.0, float(ents[0][5])):
        assert mean_patch_size(ents, t) == pytest.approx(_mean(_groups(ents), Patcher("entropy", t)), rel=1e-12)
    res = calibrate_threshold(ents, 3.0, threshold_add=0.0)  # general path (patching every step)
    assert abs(res.mean_patch_size - 3.0) < 0.3
    with pytest.raises(ValueError, match="reachable mean patch sizes"):
        calibrate_threshold(ents, 10_000.0)
    # with max_patch_length the reachable range shrinks
    with pytest.raises(ValueError, match="reachable"):
        calibrate_threshold(ents, 6.0, max_patch_length=4)


def test_loader_calibrates_from_target_patch_size(em, corpus: Path, capsys) -> None:
    cfg = DataConfig(sources=[str(corpus)], target_patch_size=3.0, seq_len=8, batch_size=2)
    dl = build_loader(cfg, entropy_model=em)
    docs = list(iter_documents([str(corpus)]))
    ents = document_entropies(em, [document_tokens(d) for d in docs])
    assert mean_patch_size(ents, dl.threshold) == pytest.approx(3.0, abs=0.15)
    # blt calibrate prints the same kind of result
    assert (
        main(["calibrate", "--entropy-model", str(ENTROPY_MODEL), "--data", str(corpus), "--target-patch-size", "3.0"])
        == 0
    )
    out = capsys.readouterr().out
    assert "threshold" in out and "mean patch size" in out


def test_rows_cover_documents_with_enough_context() -> None:
    from torchblt.data.entropies import _rows

    for n, field, max_seqlen in (
        (10, 4, 8192),
        (5000, 126, 8192),
        (20000, 1022, 8192),
        (100, None, 64),
        (50, None, 64),
    ):
        rows = _rows(n, field, max_seqlen)
        covered = [p for _, s, e in rows for p in range(s, e)]
        assert covered == list(range(n))  # every position exactly once, in order
        ctx = field if field is not None else max_seqlen // 2
        assert all(left == 0 or start - left >= ctx for left, start, _ in rows)
        if field is None:
            assert all(end - left <= max_seqlen for left, _, end in rows)


def test_entropy_model_from_a_blt_folder(tmp_path: Path) -> None:
    import shutil

    from torchblt.data.entropies import load_entropy_model
    from torchblt.model.entropy_model import EntropyModel

    blt = tmp_path / "blt"
    shutil.copytree(FIXTURES / "05_blt_forward" / "blt_model", blt)
    with pytest.raises(ValueError, match="not an entropy model"):
        load_entropy_model(str(blt))
    shutil.copytree(ENTROPY_MODEL, blt / "entropy_model")  # the released repos' layout
    assert isinstance(load_entropy_model(str(blt)), EntropyModel)


# ------------------------------------------------------------------ concurrent writers, damaged shards


def _hold_lock(folder: Path, byte: int):
    """A separate process holding the lock on shard ``byte`` of ``folder`` (as a running job does)."""
    import subprocess
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    code = (f"import fcntl, sys\nf = open({str(folder / '.lock')!r}, 'a+b')\n"
            f"fcntl.lockf(f, fcntl.LOCK_EX, 1, {byte})\nprint('locked', flush=True)\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_job_on_the_same_folder_is_refused(corpus: Path, em, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ent"
    holder = _hold_lock(out, 2)  # another job is writing shard 2
    try:
        argv = ["entropies", "--entropy-model", str(ENTROPY_MODEL), "--data", str(corpus), "--out", str(out),
                "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"blt entropies: error: another process is writing {out} (shard 00002-part1.parquet is "
                       "locked); wait for it to finish, or use another --out"]
        assert not list(out.glob("*.parquet"))  # nothing computed before the refusal
        # the ranks of one job lock disjoint shards: rank 1 of 2 works while shard 2 (rank 0's) is held
        res = write_entropy_shards(em, [str(corpus)], out, rank=1, world_size=2, progress=False,
                                   model_name=str(ENTROPY_MODEL))
        assert res.written == ["00001-part0.parquet", "00003-part2.parquet"]
    finally:
        holder.communicate("")
    assert main(argv) == 0  # the lock went with the process


def test_damaged_shards_are_verified_and_redone(corpus: Path, em, tmp_path: Path, capsys) -> None:
    import pyarrow as pa

    from torchblt.data.entropies import check_entropy_folder, verify_shard

    out = tmp_path / "ent"
    kw = dict(progress=False, model_name=str(ENTROPY_MODEL))
    write_entropy_shards(em, [str(corpus)], out, **kw)
    good = {p.name: pq.read_table(p) for p in out.glob("*.parquet")}
    assert all(verify_shard(out / n) is None for n in good)
    # a shard cut short, one with other columns, one whose source grew, and a killed run's temporary file
    cut = out / "00001-part0.parquet"
    cut.write_bytes(cut.read_bytes()[:-200])
    meta = pq.read_schema(out / "00002-part1.parquet").metadata
    pq.write_table(pa.table({"text": [b"x"]}).replace_schema_metadata(meta), out / "00002-part1.parquet")
    with pytest.raises(ValueError, match=r"00001-part0.parquet: not a readable Parquet file.*again"):
        check_entropy_folder(out)
    grown = tmp_path / "grown"
    grown.mkdir()
    for p in corpus.iterdir():
        (grown / p.name).write_bytes(p.read_bytes())
    stale = out / ".00000-bin.parquet.999-dead.tmp"
    stale.write_bytes(b"half")
    res = write_entropy_shards(em, [str(grown)], out, **kw)
    assert res.written == ["00001-part0.parquet", "00002-part1.parquet"] and not stale.exists()
    err = capsys.readouterr().err
    assert "00001-part0.parquet: not a readable Parquet file" in err and "computing it again" in err
    assert "00002-part1.parquet: unexpected columns ['text']" in err
    for name, table in good.items():  # (the copies' "source" column names the copy)
        assert pq.read_table(out / name).select(["text", "entropies", "row"]).equals(
            table.select(["text", "entropies", "row"])), name
    with open(grown / "part2.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    res = write_entropy_shards(em, [str(grown)], out, **kw)
    assert res.written == ["00003-part2.parquet"] and "its source file changed size" in capsys.readouterr().err
    assert pq.read_metadata(out / "00003-part2.parquet").num_rows == 6
    assert check_entropy_folder(out)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
