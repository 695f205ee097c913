"""Documents of evaluation files, read exactly as training reads them (:func:`torchblt.data.iter_documents`:
``.txt`` = one document per file, ``.jsonl[.gz]`` one per line, ``.parquet`` / ``.arrow`` one per row;
empty documents skipped, bad records skipped and counted, or an error with ``on_bad_record="error"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_source", "iter_file_documents", "skipped_summary"]


def check_source(path: str | Path) -> Path:
    """A readable evaluation file (folders and globs are for training sources; evaluation is per file)."""
    from torchblt.data.sources import SUPPORTED_SUFFIXES

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p}: is a folder; pass its files (e.g. {p}/*.jsonl)")
    if not p.name.endswith(SUPPORTED_SUFFIXES):
        raise ValueError(f"{p}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    return p


def iter_file_documents(
    path: str | Path, text_field: str = "text", stats: dict[str, int] | None = None, on_bad_record: str = "skip"
) -> Iterator[bytes]:
    """The documents of one file as bytes; bad records are counted in ``stats`` (see :mod:`torchblt.data.sources`)."""
    from torchblt.data import iter_documents

    p = check_source(path)
    yield from iter_documents([str(p)], text_field=text_field, stats=stats, on_bad_record=on_bad_record)


def skipped_summary(stats: dict[str, int]) -> str:
    """The bad records in ``stats`` in one line ('' if there were none): :func:`torchblt.data.sources.bad_record_summary`."""
    from torchblt.data.sources import bad_record_summary

    return bad_record_summary(stats)
