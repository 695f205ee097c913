"""Fetching a Hugging Face dataset into Parquet shards the loader reads (``blt data hf``).

Two ways, both ending in files that ``data.sources`` can name:

* with the ``datasets`` package (``pip install 'torchblt[data]'``): the split is **streamed**
  (``load_dataset(..., streaming=True)``), so ``max_docs`` of FineWeb-Edu or DCLM never download the whole
  corpus; the ``text_field`` of each row is written to ``OUT/<split>-NNNNN.parquet`` (column ``text``,
  ``docs_per_shard`` rows each, written to a temporary name and renamed when complete);
* with ``files=GLOB`` (only ``huggingface_hub``, a core dependency): the matching files of the dataset
  repository (e.g. ``sample/10BT/*.parquet``) are downloaded as they are into ``OUT``.

``OUT/hf.json`` records what was fetched. Offline (``HF_HUB_OFFLINE=1`` or no network) the error says so
in one line instead of a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HubFetchResult", "fetch_hf_dataset"]


@dataclass
class HubFetchResult:
    out: Path
    files: list[str]
    n_documents: int
    n_bytes: int
    skipped: int  # rows without a usable text field


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).strip().lower() in ("1", "true", "yes", "on")


def _hub_error(dataset: str, e: BaseException) -> ValueError:
    why = "HF_HUB_OFFLINE=1 is set" if _offline() else "the Hub could not be reached or refused the request"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ValueError(
        f"cannot fetch dataset {dataset!r} from the Hugging Face Hub ({why}): {type(e).__name__}: {msg[:300]}. "
        "Run where the Hub is reachable, or point data.sources at local files"
    )


def _check_out(out: Path, overwrite: bool) -> None:
    from torchblt.outputs import refuse_existing

    refuse_existing([out], overwrite)  # a folder that is not empty
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    from torchblt.outputs import staged

    with staged(overwrite=True) as files:  # our own record in the folder checked above
        files.write_text(path, json.dumps(meta, indent=1))


def fetch_hf_dataset(
    dataset: str,
    out: str | os.PathLike[str],
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_docs: int | None = None,
    docs_per_shard: int = 50_000,
    files: str | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> HubFetchResult:
    """Fetch ``dataset`` into ``out`` (see the module docstring)."""
    out = Path(out)
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs must be positive, got {max_docs}")
    if docs_per_shard < 1:
        raise ValueError(f"--docs-per-shard must be positive, got {docs_per_shard}")
    if files is not None:
        if max_docs is not None:
            raise ValueError("--max-docs needs the streaming path (datasets); it cannot be combined with --files")
        return _fetch_files(dataset, out, files, revision, overwrite)
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            "blt data hf needs the `datasets` package to stream a split (pip install 'torchblt[data]'), "
            "or --files GLOB to download the repository's files with huggingface_hub"
        ) from e
    _check_out(out, overwrite)
    try:
        ds = datasets.load_dataset(dataset, config, split=split, streaming=True, revision=revision)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # noqa: BLE001 - any failure of the remote call is reported in one line
        raise _hub_error(dataset, e) from e
    return _write_stream(dataset, config, split, text_field, first, rows, out, max_docs, docs_per_shard, progress)


def _write_stream(
    dataset: str,
    config: str | None,
    split: str,
    text_field: str,
    first: dict[str, Any] | None,
    rows: Any,
    out: Path,
    max_docs: int | None,
    docs_per_shard: int,
    progress: bool,
) -> HubFetchResult:
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if first is not None and text_field not in first:
        raise ValueError(
            f"dataset {dataset!r}: rows have no field {text_field!r} (fields: {', '.join(first)}); set --text-field"
        )
    stream = itertools.chain([] if first is None else [first], rows)
    written: list[str] = []
    n_docs = n_bytes = skipped = 0
    buf: list[str] = []
    bar = tqdm(total=max_docs, unit="doc", desc=f"{dataset}:{split}", disable=not progress)

    def flush() -> None:
        name = f"{split}-{len(written):05d}.parquet"
        tmp = out / (name + ".tmp")
        pq.write_table(pa.table({"text": pa.array(buf, pa.string())}), tmp)
        os.replace(tmp, out / name)
        written.append(name)
        buf.clear()

    try:
        for row in stream:
            value = row.get(text_field)
            if not isinstance(value, str) or not value:
                skipped += 1
                continue
            buf.append(value)
            n_docs += 1
            n_bytes += len(value.encode("utf-8", errors="ignore"))
            bar.update(1)
            if len(buf) >= docs_per_shard:
                flush()
            if max_docs is not None and n_docs >= max_docs:
                break
    except Exception as e:  # noqa: BLE001 - a network failure mid-stream: keep what is complete
        if buf:
            flush()
        raise _hub_error(dataset, e) from e
    finally:
        bar.close()
    if buf:
        flush()
    if not written:
        raise ValueError(f"dataset {dataset!r} split {split!r}: no rows with text in {text_field!r}")
    meta = {
        "dataset": dataset, "config": config, "split": split, "text_field": text_field, "max_docs": max_docs,
        "files": written, "documents": n_docs, "bytes": n_bytes, "skipped_rows": skipped,
    }  # fmt: skip
    _write_json(out / "hf.json", meta)
    return HubFetchResult(out, written, n_docs, n_bytes, skipped)


def _fetch_files(dataset: str, out: Path, pattern: str, revision: str | None, overwrite: bool) -> HubFetchResult:
    from huggingface_hub import snapshot_download

    _check_out(out, overwrite)
    try:
        snapshot_download(
            repo_id=dataset, repo_type="dataset", allow_patterns=pattern, local_dir=str(out), revision=revision
        )
    except Exception as e:  # noqa: BLE001
        raise _hub_error(dataset, e) from e
    from torchblt.data.sources import SUPPORTED_SUFFIXES

    found = sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and str(p).lower().endswith(SUPPORTED_SUFFIXES)
    )
    if not found:
        raise ValueError(f"dataset {dataset!r}: no {'/'.join(SUPPORTED_SUFFIXES)} file matches --files {pattern!r}")
    size = sum((out / f).stat().st_size for f in found)
    meta = {"dataset": dataset, "files_pattern": pattern, "revision": revision, "files": found}
    _write_json(out / "hf.json", meta)
    return HubFetchResult(out, found, 0, size, 0)
