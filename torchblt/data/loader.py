"""The training data loader: documents -> patches -> packed sequences -> shuffle blocks -> batches.

The data is split into ``n_shards`` *shards* (``data.shards``; by default the number of processes x
data-loader workers of the run's first launch). One :class:`Pipeline` serves one shard:

1. :class:`~torchblt.data.sources.DocumentReader` reads the shard's documents (shard ``s`` of ``n_shards``);
2. each document becomes ``BOS + bytes + EOS`` and is patched on its own (``include_next_token=False``)
   with stored entropies, entropies from a frozen entropy model (a few documents per forward: one *read*),
   or the space/static/byte rule; ``kind="bytes"`` skips patching. A document longer than
   :data:`SEGMENT_TOKENS` is tokenised, patched and packed one segment at a time (each segment patched as
   if it began a document; entropies still see the tokens before it), so a huge document streams in
   bounded memory; shorter documents are patched whole;
3. :class:`~torchblt.data.packing.SequencePacker` cuts the stream into sequences; ``interleave`` packers
   run side by side, each taking the next document when it runs out, and sequences are taken from them
   in turn, so long documents (whole books or plays) are mixed before shuffling;
4. shuffling by blocks of ``shuffle_buffer`` sequences: each block is made, then emitted in a random order
   (numpy PCG64 seeded from ``seed``, the shard and the block's number); ``shuffle_buffer <= 1``: in order;
5. ``batch_size`` sequences are padded into a :class:`~torchblt.data.packing.Batch`.

**State = positions, never data.** A pipeline's state is where its block began: the reader's position
(and record counters), the read the pending documents came from, and per packer the overlap token, the
document it is in (the reader position of the read that produced it) and the token offset there, plus
how many sequences of the block were emitted. Resuming re-reads those documents, re-patches them and
re-makes the block, so the state is a few KB whatever the documents, and a resumed run yields exactly the
batches of an uninterrupted one. It is independent of the batch size, the number of workers and the
number of processes.

**Shards and processes.** Rank ``r`` of ``world_size`` owns the shards ``s`` with
``s % world_size == r`` and takes batches from them in turn (with ``num_workers=W`` the shards are
spread over up to ``W`` ``torch.utils.data`` workers; each batch travels with its shard's state, so
:meth:`DataLoader.state_dict` is the state after the last batch *consumed*). Because the state is kept
per shard, a run resumed on another number of processes re-splits the same shards
(:meth:`DataLoader.merge_states`): every shard continues exactly where it stopped, so across the change
no document (or part of one) is skipped or repeated; what changes is which rank reads which shard and
in which order the shards' batches interleave. The shard count itself is fixed for the run (it must be
at least the number of processes).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from torchblt.data.config import DataConfig
from torchblt.data.entropies import ENTROPIES_FIELD, check_entropy_folder, document_entropies, document_tokens
from torchblt.data.jsonl_stream import TempText
from torchblt.data.packing import Batch, Sequence, SequencePacker, collate
from torchblt.data.sources import Document, DocumentReader, new_stats
from torchblt.patching import Patcher, PatchingConfig
from torchblt.tokenizer import BOS_ID, EOS_ID, OFFSET

__all__ = ["DataLoader", "Pipeline", "SEGMENT_TOKENS", "build_loader", "sample_entropies"]

STATE_VERSION = 2
SEGMENT_TOKENS = 1 << 18  # longer documents are patched and packed in segments of this many tokens
_ONTHEFLY_DOCS = 32  # documents (at most) patched together by an on-the-fly entropy model
_ONTHEFLY_TOKENS = 1 << 15  # ... or fewer once they hold this many tokens
_UNBOUNDED_CONTEXT = 8192  # left context of a long document's segment for a model without a sliding window
# DataConfig fields a saved position depends on: resuming with other values would not continue the data
STATE_FIELDS = ("kind", "seq_len", "max_bytes", "patching", "shuffle_buffer", "interleave", "seed", "max_doc_bytes",
                "text_field")


def uses_stored_entropies(cfg: DataConfig) -> bool:
    return cfg.kind == "blt" and cfg.patching.mode == "entropy" and cfg.entropies is not None


def document_sources(cfg: DataConfig) -> list[str]:
    """Where the documents come from: the entropy shards (which hold the text) or ``cfg.sources``."""
    return check_entropy_folder(cfg.entropies) if uses_stored_entropies(cfg) else list(cfg.sources)  # type: ignore[arg-type]


class _Doc:
    """A document being packed, and where it was read: ``ref = {"at": reader position before the read,
    "n": documents in that read, "i": its index}`` (what a state saves instead of its bytes).

    A document longer than a segment does not keep its bytes: each segment's are read from the file it
    lies in (a plain text file, a streamed JSONL record's temporary file), or from a temporary file it is
    written to (other sources), so a packer holds one segment whatever the document."""

    def __init__(self, ref: dict[str, Any], doc: Document) -> None:
        self.ref = ref
        self.n_tokens = len(doc.data) + 2
        self.entropies = doc.entropies  # stored entropies, one per token
        self.lengths: np.ndarray | None = None  # patch lengths of the whole document, when patched with its read
        self.file: tuple[str, int] | None = None
        self.data: bytes | None = doc.data
        self.backing = doc.backing  # (a temporary file the text lives in stays while this document does)
        if self.n_segments > 1:
            if doc.byte_source is None:  # (gzip, Parquet/Arrow, a JSONL line read whole): spilled to a file
                self.backing = TempText()
                with open(self.backing.path, "wb") as f:
                    self.backing.size = f.write(doc.data)
                self.file = (self.backing.path, 0)
            else:
                self.file = doc.byte_source
            self.data = None

    @property
    def n_segments(self) -> int:
        return math.ceil(self.n_tokens / SEGMENT_TOKENS)

    def _bytes(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.file is not None
        with open(self.file[0], "rb") as f:
            f.seek(self.file[1] + start)
            return f.read(end - start)

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` of ``BOS + bytes + EOS`` (int64) without building the whole array."""
        out = np.empty(end - start, dtype=np.int64)
        lo, hi = max(start, 1), min(end, self.n_tokens - 1)
        if hi > lo:
            raw = self._bytes(lo - 1, hi - 1)
            if len(raw) != hi - lo:
                raise ValueError(f"{self.file and self.file[0]}: the file changed while training read it")
            out[lo - start : hi - start] = np.frombuffer(raw, np.uint8).astype(np.int64) + OFFSET
        if start == 0:
            out[0] = BOS_ID
        if end == self.n_tokens:
            out[-1] = EOS_ID
        return out


@dataclass
class _Cursor:
    """The document a packer is in and the next segment it will pull."""

    doc: _Doc | None = None
    segment: int = 0

    @property
    def end(self) -> int:
        """Token offset after the last segment pulled."""
        assert self.doc is not None
        return min(self.segment * SEGMENT_TOKENS, self.doc.n_tokens)


class Pipeline:
    """Sequences and batches of one shard (see the module docstring)."""

    def __init__(
        self,
        cfg: DataConfig,
        shard: int,
        n_shards: int,
        patching: PatchingConfig | None,
        entropy_model: torch.nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.shard, self.n_shards = shard, n_shards
        stored = uses_stored_entropies(cfg)
        self.stats = new_stats()
        self.reader = DocumentReader(
            document_sources(cfg),
            text_field="text" if stored else cfg.text_field,
            shard=shard,
            n_shards=n_shards,
            seed=cfg.seed,
            max_doc_bytes=cfg.max_doc_bytes,
            on_bad_record=cfg.on_bad_record,
            stats=self.stats,
            entropies_field=ENTROPIES_FIELD if stored else None,
        )
        self.stored = stored
        self.entropy_model = entropy_model
        self.on_the_fly = cfg.kind == "blt" and cfg.patching.mode == "entropy" and not stored
        self.patcher = None if patching is None else Patcher(patching, entropy_model)  # type: ignore[arg-type]
        self.pending: deque[_Doc] = deque()  # documents read, not yet handed to a packer ...
        self.read: dict[str, Any] | None = None  # ... and the read they come from: {"at", "n", "next"}
        max_bytes = cfg.max_bytes if cfg.kind == "blt" else None
        self.packers = [SequencePacker(cfg.kind, cfg.seq_len, max_bytes, self._puller(i)) for i in range(cfg.interleave)]
        self.cursors = [_Cursor() for _ in self.packers]
        self.turn = 0  # the packer whose sequence comes next
        self.block: list[Sequence] = []  # the shuffle block being emitted ...
        self.order: list[int] = []
        self.block_id = -1  # ... its number, the positions where it began, and how many were emitted
        self.block_start: dict[str, Any] | None = None
        self.taken = 0

    # ------------------------------------------------------------------ documents -> patched segments
    def _patch(self, tokens: np.ndarray, entropies: np.ndarray | None) -> np.ndarray:
        assert self.patcher is not None
        t = torch.from_numpy(tokens)[None]
        e = None if entropies is None else torch.from_numpy(entropies.astype(np.float32))[None]
        lengths, _ = self.patcher.patch(t, include_next_token=False, entropies=e)
        return lengths[0].numpy()

    def _read_documents(self, reader: DocumentReader, n: int | None = None) -> list[Document]:
        """One read: a document, or (on-the-fly entropies) the documents of one entropy-model batch."""
        def next_doc() -> Document:
            doc = reader.next_document()
            assert doc is not None  # the reader loops forever (or raises when the sources hold nothing)
            return doc

        if n is not None:
            return [next_doc() for _ in range(n)]
        if not self.on_the_fly:
            return [next_doc()]
        docs: list[Document] = []
        while len(docs) < _ONTHEFLY_DOCS and sum(len(d.data) + 2 for d in docs) < _ONTHEFLY_TOKENS:
            docs.append(next_doc())
        return docs

    def _documents(self, at: dict[str, int], docs: list[Document]) -> list[_Doc]:
        out = [_Doc({"at": at, "n": len(docs), "i": i}, d) for i, d in enumerate(docs)]
        if self.on_the_fly:  # documents of one segment are patched together, as one batch of the entropy model
            whole = [d for d in out if d.n_segments == 1]
            tokens = [d.tokens(0, d.n_tokens) for d in whole]
            assert self.entropy_model is not None
            for d, t, e in zip(whole, tokens, document_entropies(self.entropy_model, tokens)):
                d.lengths = self._patch(t, e)
        return out

    def _next_read(self) -> None:
        at = self.reader.position()
        docs = self._documents(at, self._read_documents(self.reader))
        self.pending.extend(docs)
        self.read = {"at": at, "n": len(docs), "next": 0}

    def _reread(self, at: dict[str, int], n: int, cache: dict[str, list[_Doc]]) -> list[_Doc]:
        """The ``n`` documents of the read at ``at``, read and patched again (a reader of its own: no stats)."""
        key = repr(sorted(at.items()))
        if key not in cache:
            reader = self.reader.at(at)
            docs = self._read_documents(reader, n)
            reader.close()  # (its generator holds the file's current chunk)
            cache[key] = self._documents(at, docs)
        return cache[key]

    def _segment(self, doc: _Doc, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens and patch lengths of segment ``k`` of ``doc``."""
        start, end = k * SEGMENT_TOKENS, min((k + 1) * SEGMENT_TOKENS, doc.n_tokens)
        tokens = doc.tokens(start, end)
        if self.cfg.kind == "bytes":
            return tokens, None
        if doc.lengths is not None:
            return tokens, doc.lengths
        entropies = None
        if doc.entropies is not None:
            entropies = doc.entropies[start:end]
        elif self.on_the_fly:  # a long document: this segment with its left context (the model's receptive field)
            assert self.entropy_model is not None
            field = getattr(self.entropy_model, "receptive_field", None) or _UNBOUNDED_CONTEXT
            left = max(0, start - field)
            entropies = document_entropies(self.entropy_model, [doc.tokens(left, end)])[0][start - left :]
        return tokens, self._patch(tokens, entropies)

    def _puller(self, i: int):
        def pull() -> tuple[np.ndarray, np.ndarray | None]:
            c = self.cursors[i]
            if c.doc is None or c.segment >= c.doc.n_segments:
                if not self.pending:
                    self._next_read()
                assert self.read is not None
                c.doc, c.segment = self.pending.popleft(), 0
                self.read["next"] += 1
            c.segment += 1
            return self._segment(c.doc, c.segment - 1)

        return pull

    # ------------------------------------------------------------------ sequences -> batches
    def _packed_sequence(self) -> Sequence:
        seq = self.packers[self.turn].next_sequence()
        self.turn = (self.turn + 1) % len(self.packers)
        return seq

    def _new_block(self) -> None:
        self.block_start = self.positions()
        self.block_id += 1
        size = max(1, self.cfg.shuffle_buffer)
        self.block = [self._packed_sequence() for _ in range(size)]
        if size > 1:
            rng = np.random.default_rng((self.cfg.seed, 104729, self.shard, self.n_shards, self.block_id))
            self.order = [int(j) for j in rng.permutation(size)]
        else:
            self.order = [0]
        self.taken = 0

    def next_sequence(self) -> Sequence:
        if self.taken >= len(self.block):
            self._new_block()
        seq = self.block[self.order[self.taken]]
        self.taken += 1
        return seq

    def next_batch(self) -> Batch:
        return collate([self.next_sequence() for _ in range(self.cfg.batch_size)], self.cfg.kind)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ state
    def positions(self) -> dict[str, Any]:
        """Where the shard stands between two sequences: positions and counters only (JSON)."""
        packers = []
        for packer, c in zip(self.packers, self.cursors):
            st = packer.state_dict()
            if c.doc is None:
                packers.append({"overlap": None, "doc": None, "t": 0, "rem": 0})
                continue
            t = c.end - st["tail"]
            assert t >= (c.segment - 1) * SEGMENT_TOKENS, "a packer's tail spans more than its last segment"
            packers.append({"overlap": st["overlap"], "doc": c.doc.ref, "t": t, "rem": st["rem"]})
        read = dict(self.read) if self.read is not None and self.read["next"] < self.read["n"] else None
        return {"reader": self.reader.state_dict(), "read": read, "packers": packers, "turn": self.turn}

    def restore_positions(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state["reader"])
        self.pending, self.read = deque(), None
        cache: dict[str, list[_Doc]] = {}  # packers often hold documents of the same read
        if state["read"] is not None:
            read = state["read"]
            self.pending.extend(self._reread(read["at"], read["n"], cache)[read["next"] :])
            self.read = dict(read)
        if len(state["packers"]) != len(self.packers):
            raise ValueError(
                f"data loader state: saved with interleave={len(state['packers'])}, now {len(self.packers)}"
            )
        for packer, c, st in zip(self.packers, self.cursors, state["packers"]):
            c.doc, c.segment = None, 0
            if st["doc"] is None:
                packer.restore(None, np.zeros(0, np.int64), None, 0)
                continue
            c.doc = self._reread(st["doc"]["at"], st["doc"]["n"], cache)[st["doc"]["i"]]
            t, rem = int(st["t"]), int(st["rem"])
            if t >= c.doc.n_tokens:
                c.segment = c.doc.n_segments
                packer.restore(st["overlap"], np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
                continue
            k = t // SEGMENT_TOKENS
            tokens, lengths = self._segment(c.doc, k)
            c.segment = k + 1
            offset = t - k * SEGMENT_TOKENS
            tail_lengths = None
            if lengths is not None:  # the patches from offset + rem on, after the rest of a split patch
                starts = np.concatenate([[0], np.cumsum(lengths)])
                j = int(np.searchsorted(starts, offset + rem))
                assert starts[j] == offset + rem, "a saved packer position is not on a patch boundary"
                tail_lengths = np.concatenate([[rem] if rem else [], lengths[j:]]).astype(np.int64)
            packer.restore(st["overlap"], tokens[offset:], tail_lengths, rem)
        self.turn = int(state["turn"])

    def state_dict(self) -> dict[str, Any]:
        if self.taken < len(self.block):  # inside a block: where it began, and how much of it was emitted
            start, block, taken = self.block_start, self.block_id, self.taken
        else:
            start, block, taken = self.positions(), self.block_id + 1, 0
        return {"start": start, "block": block, "taken": taken, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore_positions(state["start"])
        self.block, self.order, self.block_id, self.taken = [], [], int(state["block"]) - 1, 0
        if state["taken"]:
            self._new_block()  # the same block again (the same documents, patches and order)
            self.taken = int(state["taken"])


class _WorkerStream(torch.utils.data.IterableDataset):
    """Runs pipelines in ``torch.utils.data`` workers; yields ``(shard, batch, state)``."""

    def __init__(self, loader: DataLoader) -> None:
        self.cfg = loader.cfg
        self.n_shards = loader.n_shards
        self.patching = loader.patching
        self.entropy_model = loader.entropy_model
        self.states = dict(loader._states)
        self.n_workers = loader.n_workers
        self.order = loader.shards[loader._next :] + loader.shards[: loader._next]  # from the next shard on

    def __iter__(self) -> Iterator[tuple[int, Batch, dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        torch.set_num_threads(1)
        mine = self.order[w :: self.n_workers]
        pipelines = []
        for s in mine:
            p = Pipeline(self.cfg, s, self.n_shards, self.patching, self.entropy_model)
            if self.states[s] is not None:
                p.load_state_dict(self.states[s])
            pipelines.append(p)
        while True:
            for s, p in zip(mine, pipelines):
                batch = p.next_batch()
                yield s, batch, p.state_dict()


def _first(item: Any) -> Any:
    return item


def _fingerprint(cfg: DataConfig) -> dict[str, Any]:
    out = {name: getattr(cfg, name) for name in STATE_FIELDS}
    patching = dataclasses.asdict(cfg.patching)
    patching.pop("threshold")  # calibrated at start: kept in the state on its own
    out["patching"] = patching
    return out


class DataLoader:
    """Infinite iterator of :class:`~torchblt.data.packing.Batch` with exact ``state_dict`` resume.

    Iterating again continues where the last consumed batch left off. ``stats`` counts documents, bytes
    and bad records (summed over this rank's shards). ``patching`` is how the batches are patched (None for
    byte batches): ``cfg.patching`` with the entropy threshold in use, calibrated when the config gives a
    ``target_patch_size`` — the one place that threshold is kept (in the state too, so a resumed run keeps
    it), and what the trainer copies into the model's ``config.patching``. ``n_shards`` (default
    ``cfg.shards`` or ``world_size * max(1, num_workers)``) fixes how the data is split, see the module
    docstring.
    """

    def __init__(
        self,
        cfg: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        entropy_model: torch.nn.Module | None = None,
        patching: PatchingConfig | None = None,
        n_shards: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.entropy_model = entropy_model
        self.patching = patching
        self.n_batches = 0
        self._set_shards(n_shards or cfg.shards or world_size * max(1, cfg.num_workers))

    def _set_shards(self, n_shards: int) -> None:
        if n_shards < self.world_size:
            raise ValueError(
                f"data.shards: the data is split into {n_shards} shard(s), fewer than the {self.world_size} "
                "processes; a run's shard count is fixed when it starts (set data.shards to at least the "
                "largest number of processes it will run on)"
            )
        self.n_shards = n_shards
        self.shards = [s for s in range(n_shards) if s % self.world_size == self.rank]
        # workers: as many as divide this rank's shards, so taking from them in turn serves the shards in turn
        W = self.cfg.num_workers
        self.n_workers = max(w for w in range(1, len(self.shards) + 1) if len(self.shards) % w == 0 and w <= W) if W else 0
        self._next = 0  # index in self.shards of the shard of the next batch
        self._states: dict[int, dict[str, Any] | None] = {s: None for s in self.shards}
        self._stats: dict[int, dict[str, int]] = {s: new_stats() for s in self.shards}
        self._pipelines: dict[int, Pipeline] = {}
        if not self.n_workers:
            self._pipelines = {
                s: Pipeline(self.cfg, s, n_shards, self.patching, self.entropy_model) for s in self.shards
            }

    @property
    def threshold(self) -> float | None:
        """The entropy threshold in use (None without entropy patching)."""
        return self.patching.threshold if self.patching is not None and self.patching.mode == "entropy" else None

    @property
    def stats(self) -> dict[str, int]:
        parts = [p.stats for p in self._pipelines.values()] if self._pipelines else list(self._stats.values())
        total = new_stats()
        for s in parts:
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        return total

    def __iter__(self) -> Iterator[Batch]:
        if self._pipelines:
            while True:
                batch = self._pipelines[self.shards[self._next]].next_batch()
                self._next = (self._next + 1) % len(self.shards)
                self.n_batches += 1
                yield batch
        loader = torch.utils.data.DataLoader(
            _WorkerStream(self),
            batch_size=None,
            num_workers=self.n_workers,
            collate_fn=_first,
            persistent_workers=False,
        )
        for s, batch, state in loader:
            self._states[s] = state
            self._stats[s] = state["stats"]
            self._next = (self.shards.index(s) + 1) % len(self.shards)
            self.n_batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        if self._pipelines:
            shards = {str(s): p.state_dict() for s, p in self._pipelines.items()}
        else:
            shards = {str(s): st for s, st in self._states.items()}
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "n_shards": self.n_shards,
            "config": _fingerprint(self.cfg),
            "threshold": self.threshold,
            "n_batches": self.n_batches,
            "next": self._next,
            "shards": shards,
        }

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One state holding the shards of several ranks' states (a run resumed on another world size)."""
        if not states:
            raise ValueError("data loader state: nothing to merge")
        for st in states:
            _check_version(st)
            for key in ("n_shards", "config", "threshold"):
                if st[key] != states[0][key]:
                    raise ValueError(f"data loader state: the ranks' states disagree on {key}")
        shards: dict[str, Any] = {}
        for st in states:
            shards.update(st["shards"])
        return {**states[0], "rank": None, "world_size": None, "n_batches": 0, "next": 0, "shards": shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: this rank's own, or one from :meth:`merge_states` holding its shards."""
        _check_version(state)
        mine = _fingerprint(self.cfg)
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(
                    f"data loader state: saved with data.{key}={value!r}, resuming with data.{key}={mine.get(key)!r}; "
                    "the saved position only continues the same data pipeline"
                )
        if state["n_shards"] != self.n_shards:
            self._set_shards(int(state["n_shards"]))
        missing = [s for s in self.shards if str(s) not in state["shards"]]
        if missing:
            raise ValueError(f"data loader state: shard(s) {missing} of rank {self.rank} are not in the saved state")
        if state["threshold"] != self.threshold and self.patching is not None and state["threshold"] is not None:
            # keep the threshold the run started with (calibration is not re-done on resume)
            self.patching = dataclasses.replace(self.patching, threshold=float(state["threshold"]))
            self._set_shards(self.n_shards)
        same = state.get("rank") == self.rank and state.get("world_size") == self.world_size
        self.n_batches = int(state["n_batches"]) if same else 0
        self._next = int(state["next"]) % len(self.shards) if same else 0
        for s in self.shards:
            st = state["shards"][str(s)]
            if self._pipelines:
                if st is not None:
                    self._pipelines[s].load_state_dict(st)
            else:
                self._states[s] = st
                self._stats[s] = dict(st["stats"]) if st is not None else new_stats()


def _check_version(state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"data loader state: version {state.get('version')!r}, this torchblt reads version {STATE_VERSION} "
            "(positions; version 1 saved copies of token buffers): start a new run (init_from the exported model)"
        )


def sample_entropies(cfg: DataConfig, entropy_model: torch.nn.Module | None, sample_bytes: int) -> list[np.ndarray]:
    """Entropies of the first documents (all shards: every rank calibrates to the same threshold)."""
    stored = uses_stored_entropies(cfg)
    reader = DocumentReader(
        document_sources(cfg),
        text_field="text" if stored else cfg.text_field,
        seed=cfg.seed,
        loop=False,
        max_doc_bytes=min(cfg.max_doc_bytes, sample_bytes),
        entropies_field=ENTROPIES_FIELD if stored else None,
    )
    docs, total = [], 0
    for doc in reader:
        docs.append(doc)
        total += len(doc.data)
        if total >= sample_bytes:
            break
    if stored:
        return [d.entropies.astype(np.float32) for d in docs]
    assert entropy_model is not None
    toks = [document_tokens(d.data) for d in docs]
    return document_entropies(entropy_model, toks)


def _load_entropy_model(path: str) -> torch.nn.Module:
    from torchblt.data.entropies import load_entropy_model

    try:
        return load_entropy_model(path)
    except ValueError as e:
        raise ValueError(f"data.entropy_model: {e}") from None


def build_loader(
    cfg: DataConfig,
    rank: int = 0,
    world_size: int = 1,
    entropy_model: torch.nn.Module | None = None,
    calibration_bytes: int = 1 << 20,
) -> DataLoader:
    """The training loader of ``rank`` among ``world_size`` (see the module docstring).

    ``entropy_model``: a frozen model for on-the-fly entropy patching (else ``cfg.entropy_model`` is
    loaded, on CPU). With ``cfg.patching.threshold=None`` the threshold is calibrated to
    ``cfg.target_patch_size`` on the first ``calibration_bytes`` of the data (``loader.patching`` holds it).
    """
    cfg.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    patching = None if cfg.kind == "bytes" else cfg.patching
    em = None
    if cfg.kind == "blt" and cfg.patching.mode == "entropy":
        if uses_stored_entropies(cfg):
            check_entropy_folder(cfg.entropies)  # type: ignore[arg-type]
        else:
            em = entropy_model
            if em is None and cfg.entropy_model:
                em = _load_entropy_model(cfg.entropy_model)
            if em is None:
                raise ValueError(
                    "data.patching.mode: 'entropy' needs data.entropies (shards from `blt entropies`) or data.entropy_model"
                )
            em.eval()
            if cfg.num_workers > 0 and next(em.parameters()).device.type != "cpu":
                raise ValueError(
                    "data.num_workers: on-the-fly entropy patching in worker processes needs the entropy model on CPU; "
                    "preprocess with `blt entropies` or use num_workers=0"
                )
        if cfg.patching.threshold is None:
            from torchblt.data.calibrate import calibrate_threshold

            p = cfg.patching
            res = calibrate_threshold(
                sample_entropies(cfg, em, calibration_bytes),
                cfg.target_patch_size,  # type: ignore[arg-type]
                p.threshold_add,
                p.monotonicity,
                p.max_patch_length,
            )
            patching = dataclasses.replace(p, threshold=res.threshold)
    return DataLoader(cfg, rank, world_size, em, patching)
