"""Entropies for training: computing them per document, and the preprocessed shards ``blt entropies`` writes.

:func:`document_entropies` runs an entropy model over documents (``BOS + bytes + EOS``), a few at a time:
rows are right-padded with BOE and each row's entropies are taken from its own positions only. Every
model here is causal, so padding on the right never changes a row's entropies, and
:meth:`~torchblt.model.entropy_model.EntropyModel.entropies` keeps rows apart (the reference concatenates
them). A long document is cut into overlapping rows, each with the model's full receptive field
(``n_layers * (window - 1)``) of left context, so the result equals one forward over the whole document
(RoPE depends only on distances, so each row may start at position 0). Memory is bounded by the rows of
one batch (the sliding windows run banded), however long the document.

Shard format (Parquet, one file per input file, ``<out>/<NNNNN>-<input name>.parquet``):

=============  ===========================  ================================================
``text``       ``binary``                   the document's bytes exactly as read
``entropies``  ``list<float16>``            one per token: ``len(text) + 2`` (BOS, bytes, EOS)
``source``     ``string``                   the input file
``row``        ``int64``                    the record in that file (pieces of a split document share it)
=============  ===========================  ================================================

The file's key-value metadata records the entropy model, the dtype and the format, and, written when the
shard is closed, its row count and the size of its source file. A shard is written under a unique
temporary name and renamed when complete, so a finished shard is never half written. Each process holds a
lock on the shards it writes (byte ``i`` of ``<out>/.lock``), so two jobs on one folder never write the
same shard: the second stops with "another process is writing DIR". A rerun skips a shard only after
checking its footer (:func:`verify_shard`: readable, our schema, the row count written at close, the
same source size), and computes a damaged one again. Under ``torchrun`` each rank writes the shards ``i``
with ``i % WORLD_SIZE == RANK``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchblt.tokenizer import BOS_ID, EOS_ID, OFFSET

__all__ = [
    "EntropyJobResult",
    "document_entropies",
    "document_tokens",
    "load_entropy_model",
    "shard_name",
    "write_entropy_shards",
]

ENTROPIES_FIELD = "entropies"
_MAX_BATCH_TOKENS = 1 << 15
_MAX_BATCH_ROWS = 64


def load_entropy_model(path: str, device: str | torch.device = "cpu", dtype: str = "fp32") -> torch.nn.Module:
    """An entropy model from its folder / hub id, or the one that comes with a BLT (e.g. ``facebook/blt-1b``)."""
    from torchblt.formats import load_model
    from torchblt.model.blt import BLT
    from torchblt.model.entropy_model import EntropyModel
    from torchblt.patching import attached_entropy_model

    model = load_model(path, device=device, dtype=dtype)
    if isinstance(model, BLT) and isinstance(attached_entropy_model(model), EntropyModel):
        model = attached_entropy_model(model)
    if not isinstance(model, EntropyModel):
        raise ValueError(f"{path}: not an entropy model (nor a BLT that comes with one)")
    return model.eval()


def document_tokens(data: bytes) -> np.ndarray:
    """``BOS + bytes + EOS`` as int64 token ids."""
    out = np.empty(len(data) + 2, dtype=np.int64)
    out[0] = BOS_ID
    out[1:-1] = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + OFFSET
    out[-1] = EOS_ID
    return out


def batch_groups(
    lengths: list[int], max_tokens: int = _MAX_BATCH_TOKENS, max_rows: int = _MAX_BATCH_ROWS
) -> list[list[int]]:
    """Consecutive groups of documents whose padded size stays under ``max_tokens`` (one long doc alone)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        if cur and (new_longest * (len(cur) + 1) > max_tokens or len(cur) >= max_rows):
            groups.append(cur)
            cur, new_longest = [], n
        cur.append(i)
        longest = new_longest
    if cur:
        groups.append(cur)
    return groups


def _rows(n: int, receptive_field: int | None, max_seqlen: int = 8192) -> list[tuple[int, int, int]]:
    """Cut a document of ``n`` tokens into rows ``(left, start, end)``: the row holds tokens
    ``[left, end)`` and yields the entropies of ``[start, end)``; ``start - left`` is at least the model's
    receptive field (or ``left = 0``), so each value equals that of one forward over the whole document.
    Rows hold :data:`~torchblt.model.entropy_model.ENTROPY_CHUNK` new tokens (banded attention makes a row
    linear in its length, so long rows only save the repeated context).

    A model without a sliding window (unbounded receptive field) gets ``max_seqlen // 2`` tokens of
    context and rows of at most ``max_seqlen`` (the length it was trained on) instead of one quadratic
    forward over a whole long document: an approximation, exact for documents up to ``max_seqlen``."""
    from torchblt.model.entropy_model import ENTROPY_CHUNK

    if receptive_field is None:
        if n <= max_seqlen:
            return [(0, 0, n)]
        receptive_field = chunk = max(1, max_seqlen // 2)
    else:
        chunk = ENTROPY_CHUNK
    if n <= chunk + receptive_field:
        return [(0, 0, n)]
    return [(max(0, s - receptive_field), s, min(n, s + chunk)) for s in range(0, n, chunk)]


@torch.no_grad()
def document_entropies(
    model: torch.nn.Module, tokens: list[np.ndarray], max_tokens: int = _MAX_BATCH_TOKENS
) -> list[np.ndarray]:
    """Per-document entropies (float32 numpy, one per token) of ``tokens`` under ``model``.

    Long documents are cut into overlapping rows (each with the model's full receptive field of left
    context, so sliding-window models cost O(n) instead of O(n^2)); rows of all documents are batched up
    to ``max_tokens`` padded tokens and run on the model's device and dtype.
    """
    device = next(model.parameters()).device
    field = getattr(model, "receptive_field", None)
    config = getattr(model, "config", None)
    max_seqlen = int(getattr(getattr(config, "transformer", None), "max_seqlen", 8192))
    out = [np.zeros(len(t), np.float32) for t in tokens]
    rows = [
        (i, left, start, end) for i, t in enumerate(tokens) for left, start, end in _rows(len(t), field, max_seqlen)
    ]
    for group in batch_groups([end - left for _, left, _, end in rows], max_tokens):
        S = max(rows[g][3] - rows[g][1] for g in group)
        batch = torch.zeros(len(group), S, dtype=torch.int64)
        for r, g in enumerate(group):
            i, left, _, end = rows[g]
            batch[r, : end - left] = torch.from_numpy(tokens[i][left:end])
        # rows already carry their context: one forward per batch (no second chunking inside)
        ent = model.entropies(batch.to(device), chunk_size=S).float().cpu()  # type: ignore[operator]
        for r, g in enumerate(group):
            i, left, start, end = rows[g]
            out[i][start:end] = ent[r, start - left : end - left].numpy()
    return out


def shard_name(index: int, path: str) -> str:
    stem = os.path.basename(path)
    for suf in (".gz", ".jsonl", ".txt", ".parquet", ".arrow"):
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "data"
    return f"{index:05d}-{stem}.parquet"


@dataclass
class EntropyJobResult:
    written: list[str]
    skipped: list[str]
    n_documents: int
    n_bytes: int
    seconds: float
    stats: dict[str, int]


def write_entropy_shards(
    model: torch.nn.Module,
    sources: list[str],
    out: str | os.PathLike[str],
    text_field: str = "text",
    rank: int = 0,
    world_size: int = 1,
    max_doc_bytes: int = 64 * 2**20,
    on_bad_record: str = "skip",
    batch_tokens: int = _MAX_BATCH_TOKENS,
    model_name: str = "",
    progress: bool = True,
) -> EntropyJobResult:
    """Write one entropy shard per input file (this rank's share), skipping finished shards.

    This rank's shards are locked for the whole job (another process on them: "another process is writing
    DIR"); a shard already there is verified (:func:`verify_shard`) before it is skipped, and computed again
    (with a warning) when it is damaged or its source file changed size.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from torchblt.data.sources import DocumentReader, new_stats, resolve_sources
    from torchblt.outputs import staged

    files = resolve_sources(sources)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [shard_name(i, f) for i, f in enumerate(files)]
    if not (out_dir / MANIFEST).exists():  # a new job: files named like its shards are not ours to replace
        from torchblt.outputs import refuse_existing

        refuse_existing([out_dir / n for n in names], False,
                        remedy=f"{out_dir} holds no {MANIFEST} (not a blt entropies folder): choose another --out")
    write_manifest(out_dir, {"shards": names, "sources": files, "entropy_model": model_name, "text_field": text_field})
    if len(set(names)) != len(names):  # pragma: no cover - indices make names unique
        raise ValueError("entropy shards: duplicate shard names")
    mine = [i for i in range(len(files)) if i % world_size == rank]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    schema = shard_schema({"torchblt.entropy_model": model_name, "torchblt.dtype": dtype})
    stats = new_stats()
    written = []
    n_docs = n_bytes = 0
    t0 = time.perf_counter()
    with _locked(out_dir, mine, names):
        todo, skipped = [], []
        for i in mine:
            _remove_stale_temporaries(out_dir, names[i])
            problem = verify_shard(out_dir / names[i], os.path.getsize(files[i]))
            if problem is None:
                skipped.append(names[i])
                continue
            if (out_dir / names[i]).exists():
                print(f"warning: {out_dir / names[i]}: {problem}; computing it again", file=sys.stderr, flush=True)
            todo.append(i)
        total_bytes = sum(os.path.getsize(files[i]) for i in todo)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"entropies rank {rank}", disable=not progress)
        try:
            for i in todo:
                final = out_dir / names[i]
                reader = DocumentReader(
                    [files[i]],
                    text_field,
                    shuffle_files=False,
                    loop=False,
                    max_doc_bytes=max_doc_bytes,
                    on_bad_record=on_bad_record,
                    stats=stats,
                )
                source_bytes = file_left = os.path.getsize(files[i])
                n_rows = 0
                with staged(overwrite=True) as staging:  # a unique temporary name, renamed when complete
                    writer = pq.ParquetWriter(str(staging.path(final)), schema)
                    try:
                        for docs in _chunks(reader, max_docs=256):
                            toks = [document_tokens(d.data) for d in docs]
                            ents = document_entropies(model, toks, batch_tokens)
                            table = pa.table(
                                {
                                    "text": pa.array([d.data for d in docs], pa.binary()),
                                    ENTROPIES_FIELD: pa.array([e.astype(np.float16) for e in ents], pa.list_(pa.float16())),
                                    "source": pa.array([d.source for d in docs], pa.string()),
                                    "row": pa.array([d.row for d in docs], pa.int64()),
                                },
                                schema=schema,
                            )
                            writer.write_table(table)
                            nb = sum(len(d.data) for d in docs)
                            n_rows += len(docs)
                            n_docs += len(docs)
                            n_bytes += nb
                            step = min(nb, file_left)  # the bar counts input-file bytes (JSON overhead included)
                            bar.update(step)
                            file_left -= step
                        # the proof of a finished shard, checked before a rerun skips it
                        writer.add_key_value_metadata({ROWS_KEY: str(n_rows), SOURCE_BYTES_KEY: str(source_bytes)})
                    finally:
                        writer.close()
                bar.update(file_left)
                written.append(names[i])
        finally:
            bar.close()
    return EntropyJobResult(written, skipped, n_docs, n_bytes, time.perf_counter() - t0, stats)


FORMAT = "entropies-v1"
ROWS_KEY, SOURCE_BYTES_KEY = "torchblt.rows", "torchblt.source_bytes"


def shard_schema(metadata: dict[str, str] | None = None) -> Any:
    """The Arrow schema of an entropy shard (see the module docstring); ``metadata`` values are JSON-encoded."""
    import pyarrow as pa

    meta = {**(metadata or {}), "torchblt.format": FORMAT}
    return pa.schema(
        [
            ("text", pa.binary()),
            (ENTROPIES_FIELD, pa.list_(pa.float16())),
            ("source", pa.string()),
            ("row", pa.int64()),
        ],
        metadata={k: json.dumps(v) for k, v in meta.items()},
    )


def verify_shard(path: Path, source_bytes: int | None = None) -> str | None:
    """None when ``path`` is a finished entropy shard, else what is wrong with it.

    Reads only the Parquet footer: it must be there (a cut file has none), carry our format, the schema
    and the row count written when the shard was closed (equal to the footer's), and, when given, the
    size of the source file it was computed from.
    """
    import pyarrow.parquet as pq

    if not path.is_file():
        return "missing"
    try:
        md = pq.read_metadata(path)
        schema = md.schema.to_arrow_schema()
    except Exception as e:  # noqa: BLE001 - any unreadable footer is a damaged shard
        return f"not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    kv = md.metadata or {}
    if kv.get(b"torchblt.format") != json.dumps(FORMAT).encode():
        return "not an entropy shard written by blt entropies"
    if not schema.remove_metadata().equals(shard_schema().remove_metadata()):
        return f"unexpected columns {schema.names} ({', '.join(str(t) for t in schema.types)})"
    rows = kv.get(ROWS_KEY.encode())
    if rows is not None and int(rows) != md.num_rows:
        return f"holds {md.num_rows} rows, {int(rows)} were written"
    recorded = kv.get(SOURCE_BYTES_KEY.encode())
    if source_bytes is not None and recorded is not None and int(recorded) != source_bytes:
        return f"its source file changed size ({int(recorded)} -> {source_bytes} bytes) since it was written"
    return None


def _remove_stale_temporaries(out_dir: Path, name: str) -> None:
    """Temporary files of ``name`` left by a killed run (safe: we hold the shard's lock)."""
    for stale in [out_dir / f"{name}.tmp", *out_dir.glob(f".{name}.*.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


@contextlib.contextmanager
def _locked(out_dir: Path, indices: list[int], names: list[str]) -> Iterator[None]:
    """Hold an exclusive lock on shards ``indices`` of ``out_dir`` (one byte each of ``out_dir/.lock``:
    POSIX record locks, released by the kernel when the process ends, however it ends)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    with open(out_dir / ".lock", "a+b") as f:
        for i in indices:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, i)
            except OSError:
                raise FileExistsError(
                    f"another process is writing {out_dir} (shard {names[i]} is locked); wait for it to finish, "
                    "or use another --out"
                ) from None
        yield  # closing the file releases the locks


MANIFEST = "entropies.json"


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Record which shards make the complete set (written first, atomically, by every rank alike)."""
    from torchblt.outputs import staged

    path = out_dir / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{path}: not readable JSON; use a new --out folder") from None
        if old.get("shards") != manifest["shards"] or old.get("entropy_model") != manifest["entropy_model"]:
            raise FileExistsError(
                f"{out_dir}: holds entropies of other sources or another entropy model ({path}); use a new --out folder"
            )
        return
    with staged(overwrite=True) as files:  # every rank writes the same content: the last rename wins
        files.write_text(path, json.dumps(manifest, indent=1))


def check_entropy_folder(folder: str | os.PathLike[str]) -> list[str]:
    """The shard files of a complete entropy folder; ``ValueError`` if shards are missing."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"data.entropies: {folder}: no such folder")
    path = d / MANIFEST
    if not path.exists():
        raise ValueError(f"data.entropies: {folder}: no {MANIFEST}; not a folder written by `blt entropies`")
    shards = json.loads(path.read_text())["shards"]
    missing = [s for s in shards if not (d / s).exists()]
    if missing:
        raise ValueError(
            f"data.entropies: {folder}: {len(missing)} of {len(shards)} shards missing (first: {missing[0]}); "
            "finish them by running the same `blt entropies` command again"
        )
    for s in shards:
        problem = verify_shard(d / s)
        if problem is not None:
            raise ValueError(f"data.entropies: {d / s}: {problem}; run the same `blt entropies` command again "
                             "to compute it again")
    return [str(d / s) for s in shards]


def _chunks(reader: Iterable[Any], max_docs: int) -> Iterator[list[Any]]:
    cur: list[Any] = []
    for d in reader:
        cur.append(d)
        if len(cur) >= max_docs:
            yield cur
            cur = []
    if cur:
        yield cur
