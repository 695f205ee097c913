"""Reading documents from text, JSONL, Parquet and Arrow files, with a resumable position.

A *source* is a file, a folder (searched recursively for supported files) or a glob. Supported files:

* ``.txt`` (and ``.txt.gz``): the whole file is one document, taken as raw bytes;
* ``.jsonl`` (and ``.jsonl.gz``): one JSON object per line, the document in ``text_field``;
* ``.parquet`` (the Hugging Face datasets layout): one row per document, column ``text_field``
  (``string`` or ``binary``);
* ``.arrow``: Arrow IPC file or stream (what ``datasets.save_to_disk`` writes), same column rule.

Bad records are handled by one policy and counted in ``stats`` (never silently lost):

===============  ===============================================================================
``non_utf8``     bytes that are not valid UTF-8 are **kept as they are** (the model reads bytes);
                 JSON strings holding lone surrogates (``"\\ud800"``) lose them (as the tokenizer
                 does). Counted per document.
``empty``        a document with no bytes (or a blank JSONL line) is skipped.
``too_long``     a document longer than ``max_doc_bytes`` is split into pieces of at most that many
                 bytes (cut on a UTF-8 character boundary); each piece becomes a document. Counted
                 once per split document. Text files are read piece by piece, so a 1 GB file never
                 sits in memory whole; so is a JSONL line longer than 16 MiB (``STREAM_LINE_BYTES``):
                 its text is decoded as a stream into a temporary file (:mod:`.jsonl_stream`).
``missing_field`` a JSONL object without ``text_field`` (or with null), a null Parquet/Arrow cell:
                 skipped.
``not_text``     a field that is neither a string nor bytes (e.g. a number): skipped.
``bad_json``     a JSONL line that is not a JSON object: skipped.
===============  ===============================================================================

With ``on_bad_record="error"`` any of these raises ``ValueError`` naming the file and record instead.
A file that cannot be opened or parsed as its format raises ``ValueError`` naming it; a Parquet/Arrow
file without the ``text_field`` column is a configuration error (``ValueError`` listing the columns).

Sharding (``shard`` of ``n_shards``, i.e. rank x data-loader worker): when the number of files is a
multiple of ``n_shards`` or at least ``8 * n_shards``, whole files are dealt round-robin (no shard reads
another's files); otherwise every shard walks all files and takes every ``n_shards``-th record (by a
record counter that counts bad records too, so all shards agree). The order of files is shuffled at each
epoch from ``seed`` (the same order on every shard).

The reader's position (epoch, file, record offset, offset inside a split document, record counter; the
line number for JSONL) is a small JSON-serialisable dict: :meth:`DocumentReader.state_dict` /
:meth:`DocumentReader.load_state_dict` resume exactly after the last document returned, and
:meth:`DocumentReader.at` opens a second reader at any saved position (the loader re-reads documents
that way instead of saving their bytes).
"""

from __future__ import annotations

import codecs
import copy
import glob
import gzip
import json
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from torchblt.data.jsonl_stream import RecordText, TempText, json_text_bytes, skip_record, stream_record

__all__ = [
    "BAD_RECORD_REASONS",
    "Document",
    "DocumentReader",
    "SKIPPED_REASONS",
    "SUPPORTED_SUFFIXES",
    "bad_record_summary",
    "new_stats",
    "resolve_sources",
]

SUPPORTED_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet", ".arrow")
BAD_RECORD_REASONS = ("non_utf8", "empty", "too_long", "missing_field", "not_text", "bad_json")
SKIPPED_REASONS = ("empty", "missing_field", "not_text", "bad_json")  # records dropped (the others are kept)
_TABLE_BATCH_ROWS = 256
STREAM_LINE_BYTES = 1 << 24  # a JSONL line longer than this is read as a stream (bounded memory)


def new_stats() -> dict[str, int]:
    """Counters: ``documents`` and ``bytes`` returned, and one per bad-record reason."""
    return {"documents": 0, "bytes": 0, **{k: 0 for k in BAD_RECORD_REASONS}}


def bad_record_summary(stats: dict[str, int]) -> str:
    """One line for the bad records counted in ``stats`` ('' when there are none), e.g. ``"3 records skipped
    (2 missing_field, 1 bad_json); 1 document not valid UTF-8 (kept as bytes)"``."""
    parts = []
    skipped = {k: int(stats.get(k, 0)) for k in SKIPPED_REASONS if stats.get(k)}
    if skipped:
        n = sum(skipped.values())
        parts.append(f"{n} record{'s' * (n != 1)} skipped (" + ", ".join(f"{v} {k}" for k, v in skipped.items()) + ")")
    if stats.get("non_utf8"):
        n = int(stats["non_utf8"])
        parts.append(f"{n} document{'s' * (n != 1)} not valid UTF-8 (kept as bytes)")
    if stats.get("too_long"):
        n = int(stats["too_long"])
        parts.append(f"{n} document{'s' * (n != 1)} split (longer than max_doc_bytes)")
    return "; ".join(parts)


@dataclass
class Document:
    """One document (or one piece of a split document) as raw bytes, with where it came from."""

    data: bytes
    source: str  # file path
    row: int  # record index in the file (line / row number; 0 for a text file)
    entropies: np.ndarray | None = None  # (len(data) + 2,) float16, when read from entropy shards
    byte_source: tuple[str, int] | None = None  # (file, offset) where ``data`` lies, for re-reading ranges
    backing: Any = None  # keeps a temporary file holding the text alive (a streamed JSONL record)


def _suffix(path: str) -> str | None:
    name = path.lower()
    for s in SUPPORTED_SUFFIXES:
        if name.endswith(s):
            return s
    return None


def resolve_sources(sources: list[str] | str) -> list[str]:
    """Expand files, folders and globs into a sorted, de-duplicated list of supported files."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    if not sources:
        raise ValueError("data sources: the list is empty")
    files: list[str] = []
    for src in sources:
        src = os.path.expanduser(str(src))
        if any(c in src for c in "*?["):
            matches = sorted(glob.glob(src, recursive=True))
            found = [m for m in matches if os.path.isfile(m) and _suffix(m)]
            if not found:
                raise FileNotFoundError(
                    f"data source {src!r}: the pattern matches no {'/'.join(SUPPORTED_SUFFIXES)} file"
                )
            files.extend(found)
        elif os.path.isdir(src):
            found = sorted(str(p) for p in Path(src).rglob("*") if p.is_file() and _suffix(str(p)))
            if not found:
                raise ValueError(f"data source {src!r}: the folder holds no {'/'.join(SUPPORTED_SUFFIXES)} file")
            files.extend(found)
        elif os.path.isfile(src):
            if not _suffix(src):
                raise ValueError(
                    f"data source {src!r}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})"
                )
            files.append(src)
        else:
            raise FileNotFoundError(f"data source {src!r}: no such file, folder or pattern")
    seen: set[str] = set()
    out = []
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _utf8_boundary(data: bytes | memoryview, cut: int) -> int:
    """Move ``cut`` back (at most 3 bytes) so that it does not fall inside a UTF-8 character."""
    for back in range(4):
        i = cut - back
        if i <= 0 or i >= len(data):
            return cut
        if (data[i] & 0xC0) != 0x80:  # not a continuation byte: a character starts here
            return i
    return cut


def _is_utf8(data: bytes, block: int = 1 << 20) -> bool:
    """Whether ``data`` is valid UTF-8 (decoded a block at a time: no str of the whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for i in range(0, len(data), block):
            decoder.decode(view[i : i + block])
        decoder.decode(b"", final=True)
        return True
    except UnicodeDecodeError:
        return False


class DocumentReader:
    """Documents of one shard, in a deterministic order, resumable.

    ``next_document()`` returns the next :class:`Document` (``None`` after the last one when
    ``loop=False``); with ``loop=True`` it starts a new epoch after the last file.
    """

    def __init__(
        self,
        sources: list[str] | str,
        text_field: str = "text",
        shard: int = 0,
        n_shards: int = 1,
        seed: int = 0,
        shuffle_files: bool = True,
        loop: bool = True,
        max_doc_bytes: int = 64 * 2**20,
        on_bad_record: str = "skip",
        stats: dict[str, int] | None = None,
        entropies_field: str | None = None,
    ) -> None:
        if not 0 <= shard < n_shards:
            raise ValueError(f"shard must be in [0, n_shards={n_shards}), got {shard}")
        if on_bad_record not in ("skip", "error"):
            raise ValueError(f"on_bad_record must be 'skip' or 'error', got {on_bad_record!r}")
        if max_doc_bytes < 4:
            raise ValueError(f"max_doc_bytes must be at least 4, got {max_doc_bytes}")
        self.files = resolve_sources(sources)
        self.text_field = text_field
        self.shard, self.n_shards = shard, n_shards
        self.seed = seed
        self.shuffle_files = shuffle_files
        self.loop = loop
        self.max_doc_bytes = int(max_doc_bytes)
        self.on_bad_record = on_bad_record
        self.stats = stats if stats is not None else new_stats()
        for k, v in new_stats().items():
            self.stats.setdefault(k, v)
        self.entropies_field = entropies_field
        n = len(self.files)
        self.by_file = n % n_shards == 0 or n >= 8 * n_shards
        self._pos = {"epoch": 0, "file": 0, "offset": 0, "piece": 0, "counter": 0}
        self._gen: Iterator[tuple[Document, dict[str, int]]] | None = None
        self._end_counter = 0
        self._line_of: dict[str, tuple[int, int]] = {}
        # streamed JSONL records whose text file is still in use, by (file, line offset); shared with at()
        self._streamed: weakref.WeakValueDictionary[tuple[str, int], TempText] = weakref.WeakValueDictionary()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"position": dict(self._pos), "stats": dict(self.stats), "n_files": len(self.files)}

    def position(self) -> dict[str, int]:
        """Where the next document starts (what :meth:`at` takes)."""
        return dict(self._pos)

    def close(self) -> None:
        """Stop reading (closes the open file; the position stays)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def at(self, position: dict[str, int]) -> DocumentReader:
        """Another reader of the same files and settings, starting at ``position``, with its own stats."""
        other = copy.copy(self)
        other.stats = new_stats()
        other._pos = {k: int(v) for k, v in position.items()}
        other._gen = None
        other._line_of = dict(self._line_of)
        return other

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_files") != len(self.files):
            raise ValueError(
                f"data state: saved for {state.get('n_files')} files but the sources now hold {len(self.files)}"
            )
        self._pos = {k: int(v) for k, v in state["position"].items()}
        self.stats.clear()
        self.stats.update(state["stats"])
        self._gen = None

    # ------------------------------------------------------------------ reading
    def file_order(self, epoch: int) -> list[int]:
        n = len(self.files)
        if not self.shuffle_files:
            return list(range(n))
        return [int(i) for i in np.random.default_rng((self.seed, 7919, epoch)).permutation(n)]

    def next_document(self) -> Document | None:
        if self._gen is None:
            self._gen = self._iterate(dict(self._pos))
        item = next(self._gen, None)
        if item is None:
            return None
        doc, self._pos = item
        return doc

    def __iter__(self) -> Iterator[Document]:
        while (doc := self.next_document()) is not None:
            yield doc

    def _iterate(self, pos: dict[str, int]) -> Iterator[tuple[Document, dict[str, int]]]:
        epoch = pos["epoch"]
        while True:
            order = self.file_order(epoch)
            from_start = pos["file"] == 0 and pos["offset"] == 0 and pos["piece"] == 0 and pos["counter"] == 0
            produced = False
            counter = pos["counter"]
            for k in range(pos["file"], len(order)):
                if self.by_file and k % self.n_shards != self.shard:
                    continue
                path = self.files[order[k]]
                offset, piece = (pos["offset"], pos["piece"]) if k == pos["file"] else (0, 0)
                if k == pos["file"] and "row" in pos:
                    self._line_of[path] = (pos["offset"], pos["row"])
                for doc, after in self._read_file(path, offset, piece, counter):
                    produced = True
                    yield doc, {"epoch": epoch, "file": k, **after}
                    counter = after["counter"]
                counter = self._end_counter
            if not self.loop:
                return
            if from_start and not produced:
                raise ValueError(
                    f"data sources hold no usable document for shard {self.shard} of {self.n_shards} "
                    f"({len(self.files)} files; bad records: {self._bad_summary()})"
                )
            epoch += 1
            pos = {"epoch": epoch, "file": 0, "offset": 0, "piece": 0, "counter": 0}

    def _bad_summary(self) -> str:
        return ", ".join(f"{k}={self.stats[k]}" for k in BAD_RECORD_REASONS if self.stats.get(k)) or "none bad"

    # one file ----------------------------------------------------------------
    def _read_file(self, path: str, offset: int, piece: int, counter: int) -> Iterator[tuple[Document, dict[str, int]]]:
        kind = _suffix(path)
        try:
            if kind in (".txt", ".txt.gz"):
                yield from self._read_text(path, piece, counter)
            elif kind in (".jsonl", ".jsonl.gz"):
                yield from self._read_jsonl(path, offset, piece, counter)
            else:
                yield from self._read_table(path, kind, offset, piece, counter)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot read file: {e}") from e

    def _mine(self, counter: int) -> bool:
        return self.by_file or counter % self.n_shards == self.shard

    def _bad(self, reason: str, path: str, row: int, detail: str = "") -> None:
        self.stats[reason] = self.stats.get(reason, 0) + 1
        if self.on_bad_record == "error":
            raise ValueError(f"{path}: record {row}: bad record ({reason}{': ' + detail if detail else ''})")

    def _emit(self, data: bytes, path: str, row: int, entropies: np.ndarray | None = None) -> Document:
        self.stats["documents"] += 1
        self.stats["bytes"] += len(data)
        return Document(data=data, source=path, row=row, entropies=entropies)

    def _pieces(
        self, data: bytes, path: str, row: int, piece: int, entropies: np.ndarray | None
    ) -> Iterator[tuple[Document, int]]:
        """Split a document in memory; yields (document, offset of the next piece or -1 at the end)."""
        if piece == 0 and len(data) > self.max_doc_bytes:
            self._bad("too_long", path, row, f"{len(data)} bytes > max_doc_bytes={self.max_doc_bytes}")
        if piece == 0 and not _is_utf8(data):
            self._bad("non_utf8", path, row)
        if len(data) <= self.max_doc_bytes:
            yield self._emit(data, path, row, entropies), -1
            return
        if entropies is not None:
            raise ValueError(
                f"{path}: record {row}: {len(data)} bytes with stored entropies exceed data.max_doc_bytes="
                f"{self.max_doc_bytes}; raise it, or rerun `blt entropies` with --max-doc-bytes {self.max_doc_bytes}"
            )
        start = piece
        while start < len(data):
            end = _utf8_boundary(data, min(start + self.max_doc_bytes, len(data)))
            if end <= start:
                end = min(start + self.max_doc_bytes, len(data))
            yield self._emit(data[start:end], path, row), (end if end < len(data) else -1)
            start = end

    def _read_text(self, path: str, piece: int, counter: int) -> Iterator[tuple[Document, dict[str, int]]]:
        # the whole file is record ``counter``; piece -1 marks it finished
        if piece < 0:
            self._end_counter = counter
            return
        self._end_counter = counter + 1
        if not self._mine(counter):
            return
        if path.lower().endswith(".gz"):
            yield from self._read_text_gz(path, piece, counter)
            return
        # a plain file: pieces read one by one (their segments can be re-read from the file)
        size = os.path.getsize(path)
        if piece == 0 and size == 0:
            self._bad("empty", path, 0)
            return
        if piece == 0 and size > self.max_doc_bytes:
            self._bad("too_long", path, 0, f"{size} bytes > max_doc_bytes={self.max_doc_bytes}")
        bad_utf8 = False
        for start, end, data in self._file_range_pieces(path, size, piece):
            if not bad_utf8 and not _is_utf8(data):
                bad_utf8 = True
                self._bad("non_utf8", path, 0)
            doc = self._emit(data, path, 0)
            doc.byte_source = (path, start)
            del data
            yield doc, ({"offset": 0, "piece": end, "counter": counter} if end < size
                        else {"offset": 0, "piece": -1, "counter": counter + 1})

    def _file_range_pieces(self, path: str, size: int, start: int) -> Iterator[tuple[int, int, bytes]]:
        """The pieces of the plain file ``path`` (``size`` bytes) from byte ``start``: (start, end, bytes).
        Each end is found from the 4 bytes around its cut (as :meth:`_pieces` cuts), then the piece is read
        in one go: nothing but the piece itself is held."""
        with open(path, "rb") as f:
            while start < size:
                end = min(start + self.max_doc_bytes, size)
                if end < size:
                    f.seek(end - 3)
                    end = end - 3 + _utf8_boundary(f.read(4), 3)
                f.seek(start)
                data = f.read(end - start)
                if len(data) != end - start:
                    raise ValueError(f"{path}: the file changed while it was read")
                yield start, end, data
                del data
                start = end

    def _read_text_gz(self, path: str, piece: int, counter: int) -> Iterator[tuple[Document, dict[str, int]]]:
        with gzip.open(path, "rb") as f:
            f.seek(piece)
            chunk = f.read(self.max_doc_bytes + 1)
            if piece == 0 and not chunk:
                self._bad("empty", path, 0)
                return
            if piece == 0 and len(chunk) > self.max_doc_bytes:
                self._bad("too_long", path, 0, f"longer than max_doc_bytes={self.max_doc_bytes}")
            bad_utf8 = False
            start = piece
            while chunk:
                if len(chunk) > self.max_doc_bytes:
                    cut = _utf8_boundary(chunk, self.max_doc_bytes)
                    cut = cut if cut > 0 else self.max_doc_bytes
                    data, rest = chunk[:cut], chunk[cut:]
                else:
                    data, rest = chunk, b""
                del chunk
                if not bad_utf8 and not _is_utf8(data):
                    bad_utf8 = True
                    self._bad("non_utf8", path, 0)
                start += len(data)
                more = f.read(self.max_doc_bytes + 1 - len(rest)) if len(rest) <= self.max_doc_bytes else b""
                chunk = rest + more
                del rest, more
                if chunk:
                    after = {"offset": 0, "piece": start, "counter": counter}
                else:
                    after = {"offset": 0, "piece": -1, "counter": counter + 1}
                doc = self._emit(data, path, 0)
                del data
                yield doc, after

    def _read_jsonl(
        self, path: str, offset: int, piece: int, counter: int
    ) -> Iterator[tuple[Document, dict[str, int]]]:
        opener = gzip.open if path.lower().endswith(".gz") else open
        f: IO[bytes]
        with opener(path, "rb") as f:  # type: ignore[operator]
            row = self._row_of(path, offset)
            f.seek(offset)
            while line := f.readline(STREAM_LINE_BYTES):
                if len(line) == STREAM_LINE_BYTES and not line.endswith(b"\n"):  # too long to parse in memory
                    records = self._streamed_record(f, line, path, offset, row, piece) if self._mine(counter) else None
                    if records is None:
                        next_offset = offset + skip_record(f, line)
                    else:
                        next_offset, records = offset + records[0], records[1]
                elif self._mine(counter):
                    next_offset, records = offset + len(line), self._jsonl_record(line, path, row, piece)
                else:
                    next_offset, records = offset + len(line), None
                if records is not None:
                    for doc, nxt in records:
                        if nxt >= 0:
                            after = {"offset": offset, "piece": nxt, "counter": counter, "row": row}
                        else:
                            after = {"offset": next_offset, "piece": 0, "counter": counter + 1, "row": row + 1}
                            self._line_of[path] = (next_offset, row + 1)
                        yield doc, after
                counter += 1
                row += 1
                offset, piece = next_offset, 0
        self._end_counter = counter

    def _row_of(self, path: str, offset: int) -> int:
        """Line number at byte ``offset`` (remembered from reading; counted when resuming elsewhere)."""
        if offset == 0:
            return 0
        cached = self._line_of.get(path)
        if cached and cached[0] == offset:
            return cached[1]
        opener = gzip.open if path.lower().endswith(".gz") else open
        n, left = 0, offset
        with opener(path, "rb") as f:  # type: ignore[operator]
            while left > 0:
                block = f.read(min(left, 1 << 20))
                if not block:
                    break
                n += block.count(b"\n")
                left -= len(block)
        return n

    def _streamed_record(self, f: IO[bytes], head: bytes, path: str, offset: int, row: int,
                         piece: int) -> tuple[int, Iterator[tuple[Document, int]]]:
        """A line longer than :data:`STREAM_LINE_BYTES`: its text decoded to a temporary file
        (:mod:`torchblt.data.jsonl_stream`), pieces read from there. Returns (line length, documents).
        While a document of the record lives, re-reading it (a resume, :meth:`at`) reuses its file."""
        cached = self._streamed.get((path, offset))
        if cached is not None:
            length, lone, invalid = cached.record
            f.seek(offset + length)
            rec = RecordText("ok", length, text=cached, lone_surrogates=lone, invalid_utf8=invalid)
        else:
            rec = stream_record(f, head, self.text_field)
            if rec.text is not None:
                rec.text.record = (rec.length, rec.lone_surrogates, rec.invalid_utf8)
                self._streamed[(path, offset)] = rec.text
        if rec.status != "ok":
            self._bad(rec.status, path, row, rec.detail)
            return rec.length, iter(())
        if rec.lone_surrogates and piece == 0:
            self._bad("non_utf8", path, row, "lone surrogates dropped")
        return rec.length, self._file_pieces(rec, path, row, piece)

    def _file_pieces(self, rec: Any, path: str, row: int, piece: int) -> Iterator[tuple[Document, int]]:
        """:meth:`_pieces` of a streamed record (:class:`~torchblt.data.jsonl_stream.RecordText`), its text
        in a temporary file."""
        text, n = rec.text, rec.text.size
        if piece == 0 and n > self.max_doc_bytes:
            self._bad("too_long", path, row, f"{n} bytes > max_doc_bytes={self.max_doc_bytes}")
        if piece == 0 and rec.invalid_utf8:
            self._bad("non_utf8", path, row)
        for start, end, data in self._file_range_pieces(text.path, n, piece):
            doc = self._emit(data, path, row)
            del data
            doc.byte_source, doc.backing = (text.path, start), text
            yield doc, (end if end < n else -1)

    def _jsonl_record(self, line: bytes, path: str, row: int, piece: int) -> Iterator[tuple[Document, int]]:
        if not line.strip():
            self._bad("empty", path, row, "blank line")
            return
        try:
            text, raw_invalid = line.decode("utf-8"), False
        except UnicodeDecodeError:  # invalid UTF-8 bytes survive as surrogate escapes, restored below (kept)
            text, raw_invalid = line.decode("utf-8", errors="surrogateescape"), True
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            self._bad("bad_json", path, row, str(e))
            return
        if not isinstance(obj, dict):
            self._bad("bad_json", path, row, f"a JSON {type(obj).__name__}, not an object")
            return
        value = obj.get(self.text_field)
        if value is None:
            self._bad("missing_field", path, row, f"no field {self.text_field!r}")
            return
        if isinstance(value, str):
            data, dropped = json_text_bytes(value, raw_invalid)
            if dropped and piece == 0:
                self._bad("non_utf8", path, row, "lone surrogates dropped")
        else:
            self._bad("not_text", path, row, f"field {self.text_field!r} is a {type(value).__name__}")
            return
        if not data:
            self._bad("empty", path, row)
            return
        yield from self._pieces(data, path, row, piece, None)

    def _read_table(
        self, path: str, kind: str | None, offset: int, piece: int, counter: int
    ) -> Iterator[tuple[Document, dict[str, int]]]:
        try:
            import pyarrow as pa
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError(f"{path}: reading Parquet/Arrow needs pyarrow (pip install 'torchblt[data]')") from e
        try:
            batches, names = self._table_batches(path, kind, offset)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: cannot read as {'Parquet' if kind == '.parquet' else 'Arrow'}: {e}") from e
        if self.text_field not in names:
            raise ValueError(f"{path}: no column {self.text_field!r} (columns: {', '.join(names)}); set text_field")
        if self.entropies_field and self.entropies_field not in names:
            raise ValueError(
                f"{path}: no column {self.entropies_field!r}: not an entropy shard written by `blt entropies`"
            )
        row = offset
        counter_at = counter
        for batch in batches:
            texts = batch.column(self.text_field).to_pylist()
            ents = batch.column(self.entropies_field) if self.entropies_field else None
            for i, value in enumerate(texts):
                if self._mine(counter_at):
                    if value is None:
                        self._bad("missing_field", path, row, f"null {self.text_field!r}")
                    elif not isinstance(value, (str, bytes)):
                        self._bad("not_text", path, row, f"column {self.text_field!r} holds {type(value).__name__}")
                    else:
                        if isinstance(value, str):
                            data = value.encode("utf-8", errors="ignore")
                            if len(data) != len(value.encode("utf-8", errors="surrogatepass")) and piece == 0:
                                self._bad("non_utf8", path, row, "lone surrogates dropped")
                        else:
                            data = value
                        if not data:
                            self._bad("empty", path, row)
                        else:
                            e = None
                            if ents is not None:
                                e = ents[i].values.to_numpy(zero_copy_only=False).astype(np.float16)
                                if len(e) != len(data) + 2:
                                    raise ValueError(
                                        f"{path}: row {row}: {len(e)} entropies for {len(data)} bytes (expected bytes + 2)"
                                    )
                            for doc, nxt in self._pieces(data, path, row, piece, e):
                                after = (
                                    {"offset": row, "piece": nxt, "counter": counter_at}
                                    if nxt >= 0
                                    else {"offset": row + 1, "piece": 0, "counter": counter_at + 1}
                                )
                                yield doc, after
                piece = 0
                row += 1
                counter_at += 1
        self._end_counter = counter_at

    def _table_batches(self, path: str, kind: str | None, start_row: int) -> tuple[Iterator[Any], list[str]]:
        import pyarrow as pa

        columns = [self.text_field] + ([self.entropies_field] if self.entropies_field else [])
        if kind == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            if self.text_field not in names or (self.entropies_field and self.entropies_field not in names):
                return iter(()), names
            # skip whole row groups before start_row, then the rows inside the first one kept
            first_group, skipped = 0, 0
            md = pf.metadata
            while first_group < md.num_row_groups and skipped + md.row_group(first_group).num_rows <= start_row:
                skipped += md.row_group(first_group).num_rows
                first_group += 1
            groups = list(range(first_group, md.num_row_groups))

            def gen() -> Iterator[Any]:
                drop = start_row - skipped
                if not groups:
                    return
                for b in pf.iter_batches(batch_size=_TABLE_BATCH_ROWS, row_groups=groups, columns=columns):
                    if drop >= b.num_rows:
                        drop -= b.num_rows
                        continue
                    yield b.slice(drop)
                    drop = 0

            return gen(), names
        source = pa.memory_map(path, "r")
        try:
            reader: Any = pa.ipc.open_file(source)
            names = reader.schema.names
            batch_iter: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_stream(pa.memory_map(path, "r"))
            names = reader.schema.names
            batch_iter = iter(reader)
        if self.text_field not in names or (self.entropies_field and self.entropies_field not in names):
            return iter(()), names

        def gen_ipc() -> Iterator[Any]:
            drop = start_row
            for b in batch_iter:
                if drop >= b.num_rows:
                    drop -= b.num_rows
                    continue
                yield b.slice(drop).select(columns)
                drop = 0

        return gen_ipc(), names
