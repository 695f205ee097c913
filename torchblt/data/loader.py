"""The training data loader: documents -> patches -> packed sequences -> shuffle buffer -> batches.

One :class:`Pipeline` serves one shard (a rank, or a rank's data-loader worker):

1. :class:`~torchblt.data.sources.DocumentReader` reads this shard's documents (resumable position);
2. each document becomes ``BOS + bytes + EOS`` and is patched on its own (``include_next_token=False``)
   with stored entropies, entropies from a frozen entropy model (a few documents per forward, per row),
   or the space/static/byte rule; ``kind="bytes"`` skips patching;
3. :class:`~torchblt.data.packing.SequencePacker` cuts the stream into sequences; ``interleave`` packers
   run side by side, each taking the next document when it runs out, and sequences are taken from them
   in turn — so long documents (whole books or plays) are mixed before the shuffle buffer even starts;
4. a shuffle buffer of ``shuffle_buffer`` sequences: each output is a uniformly random slot of the
   buffer, refilled with the next sequence (numpy PCG64 seeded from ``seed``, rank and worker);
5. ``batch_size`` sequences are padded into a :class:`~torchblt.data.packing.Batch`.

The whole state — reader position, documents patched but not yet packed, the packers' tails, the
shuffle buffer's contents and the RNG — is a JSON-serialisable dict, so a resumed run yields exactly
the batches of an uninterrupted one. With ``num_workers=W`` the loader runs ``W`` pipelines (shards
``rank * W + w`` of ``world_size * W``) in ``torch.utils.data`` worker processes, taking batches from
them in turn; each batch travels with its pipeline's state, so :meth:`DataLoader.state_dict` is the
state after the last batch *consumed* (batches prefetched but not consumed are made again on resume).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from torchblt.data.config import DataConfig
from torchblt.data.entropies import ENTROPIES_FIELD, check_entropy_folder, document_entropies, document_tokens
from torchblt.data.packing import Batch, Sequence, SequencePacker, collate
from torchblt.data.sources import DocumentReader, new_stats
from torchblt.patching import Patcher, PatchingConfig

__all__ = ["DataLoader", "Pipeline", "build_loader", "sample_entropies"]

STATE_VERSION = 1
_ONTHEFLY_DOCS = 32  # documents (at most) patched together by an on-the-fly entropy model
_ONTHEFLY_TOKENS = 1 << 15  # ... or fewer once they hold this many tokens


def uses_stored_entropies(cfg: DataConfig) -> bool:
    return cfg.kind == "blt" and cfg.patching.mode == "entropy" and cfg.entropies is not None


def document_sources(cfg: DataConfig) -> list[str]:
    """Where the documents come from: the entropy shards (which hold the text) or ``cfg.sources``."""
    return check_entropy_folder(cfg.entropies) if uses_stored_entropies(cfg) else list(cfg.sources)  # type: ignore[arg-type]


class Pipeline:
    """Batches of one shard (see the module docstring)."""

    def __init__(
        self,
        cfg: DataConfig,
        shard: int,
        n_shards: int,
        patching: PatchingConfig | None,
        entropy_model: torch.nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
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
        self.patcher = None if patching is None else Patcher(patching, entropy_model)  # type: ignore[arg-type]
        self.pending: list[Sequence] = []  # documents patched, not yet handed to the packer
        max_bytes = cfg.max_bytes if cfg.kind == "blt" else None
        self.packers = [SequencePacker(cfg.kind, cfg.seq_len, max_bytes, self._pull) for _ in range(cfg.interleave)]
        self.turn = 0  # the packer whose sequence comes next
        self.buffer: list[Sequence] = []
        self.rng = np.random.default_rng((cfg.seed, 104729, shard, n_shards))

    # ------------------------------------------------------------------ documents -> patched documents
    def _next_doc(self) -> Any:
        doc = self.reader.next_document()
        assert doc is not None  # the reader loops forever (or raises when the sources hold nothing)
        return doc

    def _patch(self, tokens: np.ndarray, entropies: np.ndarray | None) -> np.ndarray:
        assert self.patcher is not None
        t = torch.from_numpy(tokens)[None]
        e = None if entropies is None else torch.from_numpy(entropies.astype(np.float32))[None]
        lengths, _ = self.patcher.patch(t, include_next_token=False, entropies=e)
        return lengths[0].numpy()

    def _pull(self) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.pending:
            self._fill_pending()
        seq = self.pending.pop(0)
        return seq.tokens, seq.patch_lengths

    def _fill_pending(self) -> None:
        cfg = self.cfg
        if cfg.kind == "bytes":
            self.pending.append(Sequence(document_tokens(self._next_doc().data), None))
        elif cfg.patching.mode == "entropy" and not self.stored:
            assert self.entropy_model is not None
            docs: list[np.ndarray] = []
            while len(docs) < _ONTHEFLY_DOCS and sum(len(d) for d in docs) < _ONTHEFLY_TOKENS:
                docs.append(document_tokens(self._next_doc().data))
            ents = document_entropies(self.entropy_model, docs)
            self.pending.extend(Sequence(t, self._patch(t, e)) for t, e in zip(docs, ents))
        else:
            doc = self._next_doc()
            tokens = document_tokens(doc.data)
            self.pending.append(Sequence(tokens, self._patch(tokens, doc.entropies)))

    # ------------------------------------------------------------------ sequences -> batches
    def _packed_sequence(self) -> Sequence:
        seq = self.packers[self.turn].next_sequence()
        self.turn = (self.turn + 1) % len(self.packers)
        return seq

    def _next_sequence(self) -> Sequence:
        size = self.cfg.shuffle_buffer
        if size <= 1:
            return self._packed_sequence()
        while len(self.buffer) < size:
            self.buffer.append(self._packed_sequence())
        j = int(self.rng.integers(len(self.buffer)))
        out = self.buffer[j]
        self.buffer[j] = self._packed_sequence()
        return out

    def next_batch(self) -> Batch:
        return collate([self._next_sequence() for _ in range(self.cfg.batch_size)], self.cfg.kind)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "reader": self.reader.state_dict(),
            "pending": [s.to_state() for s in self.pending],
            "packers": [p.state_dict() for p in self.packers],
            "turn": self.turn,
            "buffer": [s.to_state() for s in self.buffer],
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state["reader"])
        self.pending = [Sequence.from_state(s) for s in state["pending"]]
        if len(state["packers"]) != len(self.packers):
            raise ValueError(
                f"data loader state: saved with interleave={len(state['packers'])}, now {len(self.packers)}"
            )
        for p, st in zip(self.packers, state["packers"]):
            p.load_state_dict(st)
        self.turn = int(state["turn"])
        self.buffer = [Sequence.from_state(s) for s in state["buffer"]]
        self.rng.bit_generator.state = state["rng"]


class _WorkerStream(torch.utils.data.IterableDataset):
    """Runs pipelines in ``torch.utils.data`` workers; yields ``(pipeline index, batch, state)``."""

    def __init__(self, loader: DataLoader) -> None:
        self.cfg = loader.cfg
        self.rank, self.world_size = loader.rank, loader.world_size
        self.patching = loader.patching
        self.entropy_model = loader.entropy_model
        self.states = list(loader._states)
        self.first = loader._next_worker

    def __iter__(self) -> Iterator[tuple[int, Batch, dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        W = self.cfg.num_workers
        w = (self.first + (info.id if info is not None else 0)) % W
        torch.set_num_threads(1)
        p = Pipeline(self.cfg, self.rank * W + w, self.world_size * W, self.patching, self.entropy_model)
        if self.states[w] is not None:
            p.load_state_dict(self.states[w])
        while True:
            batch = p.next_batch()
            yield w, batch, {"pipeline": p.state_dict(), "stats": dict(p.stats)}


def _first(item: Any) -> Any:
    return item


class DataLoader:
    """Infinite iterator of :class:`~torchblt.data.packing.Batch` with exact ``state_dict`` resume.

    Iterating again continues where the last consumed batch left off. ``stats`` counts documents, bytes
    and bad records (summed over workers). ``patching`` is how the batches are patched (None for byte
    batches): ``cfg.patching`` with the entropy threshold in use, calibrated when the config gives a
    ``target_patch_size`` — the one place that threshold is kept (in the state too, so a resumed run keeps
    it), and what the trainer copies into the model's ``config.patching``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        entropy_model: torch.nn.Module | None = None,
        patching: PatchingConfig | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.entropy_model = entropy_model
        self.patching = patching
        self.n_batches = 0
        W = max(1, cfg.num_workers)
        self._states: list[dict[str, Any] | None] = [None] * W
        self._worker_stats: list[dict[str, int]] = [new_stats() for _ in range(W)]
        self._next_worker = 0
        self._pipeline: Pipeline | None = None
        if cfg.num_workers == 0:
            self._pipeline = Pipeline(cfg, rank, world_size, patching, entropy_model)

    @property
    def threshold(self) -> float | None:
        """The entropy threshold in use (None without entropy patching)."""
        return self.patching.threshold if self.patching is not None and self.patching.mode == "entropy" else None

    @property
    def stats(self) -> dict[str, int]:
        if self._pipeline is not None:
            return dict(self._pipeline.stats)
        total = new_stats()
        for s in self._worker_stats:
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        return total

    def __iter__(self) -> Iterator[Batch]:
        if self._pipeline is not None:
            while True:
                batch = self._pipeline.next_batch()
                self.n_batches += 1
                yield batch
        loader = torch.utils.data.DataLoader(
            _WorkerStream(self),
            batch_size=None,
            num_workers=self.cfg.num_workers,
            collate_fn=_first,
            persistent_workers=False,
        )
        for w, batch, state in loader:
            self._states[w] = state["pipeline"]
            self._worker_stats[w] = state["stats"]
            self._next_worker = (w + 1) % self.cfg.num_workers
            self.n_batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        pipelines = [self._pipeline.state_dict()] if self._pipeline is not None else list(self._states)
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "threshold": self.threshold,
            "n_batches": self.n_batches,
            "next_worker": self._next_worker,
            "pipelines": pipelines,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state: unknown version {state.get('version')!r}")
        for key, mine in (("rank", self.rank), ("world_size", self.world_size), ("num_workers", self.cfg.num_workers)):
            if state[key] != mine:
                raise ValueError(f"data loader state: saved with {key}={state[key]}, resuming with {key}={mine}")
        if state["threshold"] != self.threshold and self.patching is not None and state["threshold"] is not None:
            # keep the threshold the run started with (calibration is not re-done on resume)
            self.patching = dataclasses.replace(self.patching, threshold=float(state["threshold"]))
            if self._pipeline is not None:
                self._pipeline = Pipeline(self.cfg, self.rank, self.world_size, self.patching, self.entropy_model)
        self.n_batches = int(state["n_batches"])
        self._next_worker = int(state["next_worker"])
        if self._pipeline is not None:
            self._pipeline.load_state_dict(state["pipelines"][0])
        else:
            self._states = list(state["pipelines"])
            for w, s in enumerate(self._states):
                if s is not None:
                    self._worker_stats[w] = dict(s["reader"]["stats"])


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
