"""Documents from evaluation files: ``.txt`` (the whole file is one document), ``.jsonl`` / ``.jsonl.gz``
(one JSON object per line, the text in ``text_field``) and ``.parquet`` (a string or binary column).

Uses :func:`torchblt.data.iter_documents` when the data package provides it, so evaluation reads files
exactly as training does; this module is the fallback and the single place that decides it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet")

__all__ = ["SUFFIXES", "check_source", "iter_file_documents"]


def check_source(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p}: is a folder; pass the files (e.g. {p}/*.jsonl)")
    if not p.name.endswith(SUFFIXES):
        raise ValueError(f"{p}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    return p


def _from_data_package(path: Path, text_field: str) -> Iterator[bytes] | None:
    try:
        from torchblt.data import iter_documents  # type: ignore[attr-defined]
    except ImportError:
        return None
    return iter_documents([path], text_field=text_field)


def iter_file_documents(path: str | Path, text_field: str = "text") -> Iterator[bytes]:
    """The documents of one file, as UTF-8 bytes."""
    p = check_source(path)
    shared = _from_data_package(p, text_field)
    if shared is not None:
        yield from shared
        return
    name = p.name
    if name.endswith(".txt"):
        yield p.read_bytes()
    elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or text_field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(f"{p}:{line_no}: no field {text_field!r} (found {keys}); use --text-field")
                yield _as_bytes(row[text_field], f"{p}:{line_no}")
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading .parquet files needs pyarrow: pip install 'torchblt[eval]'") from None
        pf = pq.ParquetFile(p)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{p}: no column {text_field!r} (columns: {pf.schema_arrow.names}); use --text-field")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield _as_bytes(value, str(p))


def _as_bytes(value: object, where: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", errors="ignore")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"{where}: the text field holds a {type(value).__name__}, not a string")
