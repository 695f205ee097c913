"""Training rows of the BPE baseline (the ``bpe`` kind's loader): documents become ``[BOS] + BPE ids +
[EOS]`` and are packed into rows of ``seq_len`` tokens (``x = row[:-1]``, ``y = row[1:]``; BOS targets
masked), each row starting with the previous row's last token so no target is skipped. Every target
carries the number of bytes its token stands for, so the loss is reported per byte. The state (reader
position, tokens not yet emitted) is JSON and resumes exactly. The tokenizer is the one of the model being
trained (:class:`~torchblt.model.config.BPEConfig`), given by the trainer through ``model_config``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from torchblt.data.sources import DocumentReader, new_stats
from torchblt.tokenizer import BOS_ID as BOS
from torchblt.tokenizer import EOS_ID as EOS
from torchblt.tokenizer import load_bpe_tokenizer

__all__ = ["BPEBatch", "BPELoader", "make_bpe_loader"]


class BPEBatch:
    """A :class:`torchblt.data.packing.Batch` plus ``target_bytes (B, L)``: the bytes each target stands for."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, target_bytes: torch.Tensor) -> None:
        self.x, self.y, self.mask, self.target_bytes = x, y, mask, target_bytes
        self.patch_lengths = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BPEBatch:
        return BPEBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.x, self.y, self.mask, self.target_bytes)))

    @property
    def n_bytes(self) -> int:
        return int((self.target_bytes * self.mask).sum().item())


class BPELoader:
    """Resumable loader of packed BPE rows: ``[BOS] + tokens + [EOS]`` documents, cut every ``seq_len``
    tokens (``x = row[:-1]``, ``y = row[1:]``; BOS targets masked)."""

    def __init__(self, cfg: Any, rank: int = 0, world_size: int = 1, *, tokenizer: str) -> None:
        if getattr(cfg, "num_workers", 0):
            raise ValueError("data.num_workers: the bpe kind's loader runs in the main process; set it to 0")
        self.cfg = cfg
        self.tokenizer = load_bpe_tokenizer(str(Path(tokenizer).resolve()))
        self.stats = new_stats()
        self.reader = DocumentReader(cfg.sources, cfg.text_field, shard=rank, n_shards=world_size, seed=cfg.seed,
                                     shuffle_files=True, loop=True, max_doc_bytes=cfg.max_doc_bytes,
                                     on_bad_record=cfg.on_bad_record, stats=self.stats)
        self.buffer: list[int] = []
        self.buffer_bytes: list[int] = []
        self.patching = None  # BPE rows are not patched

    def _fill(self, n: int) -> None:
        tok = self.tokenizer
        while len(self.buffer) < n:
            doc = self.reader.next_document()
            if doc is None:
                raise ValueError(f"data.sources: no documents in {self.cfg.sources}")
            ids = tok.encode(doc.data)
            self.buffer += [BOS, *ids, EOS]
            self.buffer_bytes += [0, *(tok.token_bytes(i) for i in ids), 1]

    def next_batch(self) -> BPEBatch:
        L, B = self.cfg.seq_len, self.cfg.batch_size
        rows, row_bytes = [], []
        for _ in range(B):
            self._fill(L + 1)
            rows.append(self.buffer[: L + 1])
            row_bytes.append(self.buffer_bytes[: L + 1])
            # the next row starts with this row's last token (as its input), so no target is skipped
            self.buffer, self.buffer_bytes = self.buffer[L:], self.buffer_bytes[L:]
        t = torch.tensor(rows, dtype=torch.int64)
        nb = torch.tensor(row_bytes, dtype=torch.int64)
        x, y = t[:, :-1], t[:, 1:]
        return BPEBatch(x, y, y != BOS, nb[:, 1:])

    def __iter__(self) -> Iterator[BPEBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"reader": self.reader.state_dict(), "buffer": list(self.buffer), "buffer_bytes": list(self.buffer_bytes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state["reader"])
        self.buffer, self.buffer_bytes = list(state["buffer"]), list(state["buffer_bytes"])


def make_bpe_loader(cfg: Any, *, rank: int = 0, world_size: int = 1, model_config: Any, **_: Any) -> BPELoader:
    """The ``bpe`` kind's loader: rows of the tokenizer of the model being trained."""
    cfg.validate()
    return BPELoader(cfg, rank, world_size, tokenizer=model_config.tokenizer)
