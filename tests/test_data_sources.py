"""Document sources: every format, the bad-record policy and its counts, resumable positions."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchblt.data import DataConfig, DocumentReader, build_loader, iter_documents, new_stats, resolve_sources


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_text_folder_jsonl_parquet_arrow(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes(b"text one")
    (tmp_path / "t" / "sub").mkdir()
    (tmp_path / "t" / "sub" / "b.txt").write_bytes(b"text two")
    (tmp_path / "t" / "ignored.csv").write_bytes(b"x")
    _jsonl(tmp_path / "c.jsonl", [json.dumps({"body": "json one"}).encode(), json.dumps({"body": "json two"}).encode()])
    with gzip.open(tmp_path / "d.jsonl.gz", "wb") as f:
        f.write(json.dumps({"body": "gz one"}).encode() + b"\n")
    with gzip.open(tmp_path / "t" / "sub" / "c.txt.gz", "wb") as f:
        f.write(b"text gz")
    pq.write_table(pa.table({"body": ["pq one", "pq two"], "n": [1, 2]}), tmp_path / "e.parquet")
    pq.write_table(pa.table({"body": pa.array([b"pq \xff bin"], pa.binary())}), tmp_path / "f.parquet")
    table = pa.table({"body": ["arrow one", "arrow two"]})
    with pa.ipc.new_file(str(tmp_path / "g.arrow"), table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_stream(str(tmp_path / "h.arrow"), table.schema) as w:  # datasets.save_to_disk layout
        w.write_table(pa.table({"body": ["stream one"]}))
    stats = new_stats()
    docs = list(
        iter_documents(
            [str(tmp_path / "t"), str(tmp_path / "*.jsonl*"), str(tmp_path / "*.parquet"), str(tmp_path / "*.arrow")],
            "body",
            stats=stats,
        )
    )
    assert docs == [
        b"text one",
        b"text two",
        b"text gz",
        b"json one",
        b"json two",
        b"gz one",
        b"pq one",
        b"pq two",
        b"pq \xff bin",
        b"arrow one",
        b"arrow two",
        b"stream one",
    ]
    assert stats["documents"] == 12 and stats["bytes"] == sum(map(len, docs))
    assert stats["non_utf8"] == 1  # the binary cell is kept as it is, and counted


def test_bad_records_are_counted_and_skipped(tmp_path: Path) -> None:
    f = _jsonl(
        tmp_path / "bad.jsonl",
        [
            b'{"text": "good one"}',
            b'{"text": "caf\xe9 latin-1"}',  # invalid UTF-8: bytes kept
            b'{"text": ""}',  # empty
            b"",  # blank line
            b'{"other": "x"}',  # missing field
            b'{"text": null}',  # missing (null)
            b'{"text": 42}',  # not text
            b"{not json",  # bad json
            b'["a", "list"]',  # not an object
            b'{"text": "lone \\ud800 surrogate"}',  # dropped surrogate, counted
            b'{"text": "good two"}',
        ],
    )
    (tmp_path / "empty.txt").write_bytes(b"")
    stats = new_stats()
    docs = list(iter_documents([str(f), str(tmp_path / "empty.txt")], stats=stats))
    assert docs == [b"good one", b"caf\xe9 latin-1", b"lone  surrogate", b"good two"]
    assert stats == {
        "documents": 4,
        "bytes": sum(map(len, docs)),
        "non_utf8": 2,
        "empty": 3,
        "too_long": 0,
        "missing_field": 2,
        "not_text": 1,
        "bad_json": 2,
    }


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"text": "caf\xe9"}', "non_utf8"),
        (b'{"text": ""}', "empty"),
        (b'{"x": 1}', "missing_field"),
        (b"{", "bad_json"),
    ],
)
def test_on_bad_record_error_names_file_and_record(tmp_path: Path, line: bytes, reason: str) -> None:
    f = _jsonl(tmp_path / "x.jsonl", [b'{"text": "fine"}', line])
    with pytest.raises(ValueError, match=rf"x\.jsonl: record 1: bad record \({reason}"):
        list(iter_documents([str(f)], on_bad_record="error"))


def test_huge_documents_are_split_on_character_boundaries(tmp_path: Path) -> None:
    text = ("ab€" * 50).encode()  # 3-byte characters: cuts must move back to a boundary
    (tmp_path / "big.txt").write_bytes(text)
    _jsonl(tmp_path / "big.jsonl", [json.dumps({"text": text.decode()}, ensure_ascii=False).encode()])
    for name in ("big.txt", "big.jsonl"):
        stats = new_stats()
        pieces = list(iter_documents([str(tmp_path / name)], stats=stats, max_doc_bytes=32))
        assert b"".join(pieces) == text
        assert all(len(p) <= 32 for p in pieces) and len(pieces) >= 5
        assert all(p.decode("utf-8") for p in pieces)  # every piece is valid UTF-8
        assert stats["too_long"] == 1 and stats["documents"] == len(pieces)


def test_resume_inside_a_split_document(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_bytes(bytes(range(65, 91)) * 20)
    _jsonl(tmp_path / "j.jsonl", [json.dumps({"text": "y" * 100 + str(i)}).encode() for i in range(3)])
    pq.write_table(pa.table({"text": ["p" * 90 + str(i) for i in range(5)]}), tmp_path / "p.parquet", row_group_size=2)
    for name in ("big.txt", "j.jsonl", "p.parquet"):
        src = [str(tmp_path / name)]
        full = [d.data for d in DocumentReader(src, loop=False, max_doc_bytes=40)]
        for k in range(1, len(full)):
            r = DocumentReader(src, loop=False, max_doc_bytes=40)
            head = [r.next_document().data for _ in range(k)]
            r2 = DocumentReader(src, loop=False, max_doc_bytes=40)
            r2.load_state_dict(json.loads(json.dumps(r.state_dict())))
            assert head + [d.data for d in r2] == full, (name, k)


def test_unreadable_and_missing_sources(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match="broken.parquet: cannot read as Parquet"):
        list(iter_documents([str(tmp_path / "broken.parquet")]))
    (tmp_path / "broken.arrow").write_bytes(b"nor arrow")
    with pytest.raises(ValueError, match="broken.arrow: cannot read as Arrow"):
        list(iter_documents([str(tmp_path / "broken.arrow")]))
    with gzip.open(tmp_path / "t.jsonl.gz", "wb") as f:
        f.write(b'{"text": "x"}\n' * 100)
    (tmp_path / "trunc.jsonl.gz").write_bytes((tmp_path / "t.jsonl.gz").read_bytes()[:20])
    with pytest.raises(ValueError, match="trunc.jsonl.gz: cannot read file"):
        list(iter_documents([str(tmp_path / "trunc.jsonl.gz")]))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match="nocol.parquet: no column 'text' \\(columns: content\\)"):
        list(iter_documents([str(tmp_path / "nocol.parquet")]))
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_sources([str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="matches no"):
        resolve_sources([str(tmp_path / "*.zzz")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported file type"):
        resolve_sources([str(tmp_path / "x.csv")])


def test_a_shard_without_documents_fails_clearly(tmp_path: Path) -> None:
    _jsonl(tmp_path / "j.jsonl", [b'{"x": 1}', b'{"text": ""}'])
    cfg = DataConfig(sources=[str(tmp_path / "j.jsonl")], kind="bytes", seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="no usable document.*missing_field=1, empty=1|no usable document.*empty=1"):
        next(iter(build_loader(cfg)))


def test_parquet_nulls_and_row_group_resume(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"text": ["a1", None, "a3", "", "a5", "a6", "a7"]}), tmp_path / "p.parquet", row_group_size=3
    )
    stats = new_stats()
    assert list(iter_documents([str(tmp_path / "p.parquet")], stats=stats)) == [b"a1", b"a3", b"a5", b"a6", b"a7"]
    assert stats["missing_field"] == 1 and stats["empty"] == 1


def test_loader_reports_bad_records_and_error_mode(tmp_path: Path) -> None:
    lines = [b'{"text": ""}', b'{"title": "no text"}', b"{oops", b'{"text": "caf\xe9"}']
    lines += [json.dumps({"text": f"document number {i} " * 5}).encode() for i in range(4)]
    src = _jsonl(tmp_path / "mixed.jsonl", lines)
    cfg = DataConfig(sources=[str(src)], kind="bytes", seq_len=32, batch_size=2, shuffle_buffer=0, interleave=1)
    dl = build_loader(cfg)
    next(iter(dl))
    s = dl.stats
    assert (s["empty"], s["missing_field"], s["bad_json"], s["non_utf8"]) == (1, 1, 1, 1)
    assert s["documents"] == 2 and s["bytes"] == 4 + len("document number 0 " * 5)  # "caf\xe9" kept, then a good one
    cfg.on_bad_record = "error"
    with pytest.raises(ValueError, match=r"mixed\.jsonl: record 0: bad record \(empty"):
        next(iter(build_loader(cfg)))


_TRICKY = [
    {"text": "plain ascii", "id": 1},
    {"meta": {"a": [1, "}\"]", {"b": None}, [], {}], "t": True}, "text": "after nested values", "n": -1.5e3},
    {"text": "escapes \" \\ / \b \f \n \r \t and unicode é ✓ \U0001F600", "x": "y"},
    {"text": "a surrogate pair \ud83d\ude00 kept, a lone one \ud800 dropped \udc01 twice"},
    {"text": "first value", "other": 1, "text": "the repeated key keeps the last"},  # noqa: F601
    {"text": ""},
    {"text": None},
    {"text": 3},
    {"text": ["a", "list"]},
    {"no_text": "here"},
    {"te\u0078t": "an escaped key"},
    {"text": "x" * 300 + "é" * 40 + "long enough to be split in pieces"},
]


def test_jsonl_lines_streamed_equal_parsed_lines(tmp_path: Path, monkeypatch) -> None:
    """Every record read as a stream (threshold forced down to 8 bytes) gives the documents, pieces, stats
    and positions of json.loads: nested values, escapes, surrogates, repeated keys, bad records, raw
    invalid UTF-8, malformed lines."""
    from torchblt.data import sources

    def dump(i: int, r: dict) -> bytes:  # both ways of writing non-ASCII (lone surrogates only escaped)
        text = json.dumps(r, ensure_ascii=True)
        return (text if i % 2 == 0 or "\\ud8" in text.lower() else json.dumps(r, ensure_ascii=False)).encode()

    lines = [dump(i, r) for i, r in enumerate(_TRICKY)] + [b'{"text": "slash \\/ escaped"}']
    lines += [b'{"text": "raw invalid utf-8 \xff\xfe kept"}', b'{"text": "raw \xff kept, a lone \\ud800 dropped"}',
              b'{"text": "unterminated', b"[1, 2]", b"", b"   ",
              b'{"text": "tab\tinside"}', b'{"text": "ok" } trailing', b'{"text": "ok",}', b'{"text": NaN}',
              b'{"text": "bad \\x escape"}', b'{"text": "bad \\u12g4 escape"}', b'{"text": "last line"}']
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    def read():
        stats = sources.new_stats()
        reader = sources.DocumentReader([str(path)], loop=False, max_doc_bytes=100, stats=stats)
        out = []
        while (doc := reader.next_document()) is not None:
            out.append((doc.data, doc.row, reader.position()))
        return out, stats

    parsed, parsed_stats = read()
    monkeypatch.setattr(sources, "STREAM_LINE_BYTES", 8)
    streamed, streamed_stats = read()
    assert streamed == parsed
    assert streamed_stats == parsed_stats
    counts = {k: parsed_stats[k] for k in ("bad_json", "not_text", "empty", "missing_field", "too_long", "non_utf8")}
    assert counts == {"bad_json": 7, "not_text": 3, "empty": 3, "missing_field": 2, "too_long": 1, "non_utf8": 4}
    assert b"raw \xff kept, a lone  dropped" in [d for d, _, _ in parsed]  # (the raw byte survives the drop)
    # gzip: the same documents and positions, streamed without seeking back (the stream stops at the newline)
    import gzip

    path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
    path = path.with_suffix(".jsonl.gz")
    gz, gz_stats = read()
    assert [(d, r, p) for d, r, p in gz] == streamed and gz_stats == streamed_stats
    path = tmp_path / "tricky.jsonl"
    # resuming inside a streamed, split record re-reads it from its position
    reader = sources.DocumentReader([str(path)], loop=False, max_doc_bytes=100)
    pos = next(p for _, _, p in streamed if p["piece"] > 0)
    again = reader.at(pos)
    first = again.next_document()
    i = next(i for i, (_, _, p) in enumerate(streamed) if p == pos)
    assert first.data == streamed[i + 1][0]
