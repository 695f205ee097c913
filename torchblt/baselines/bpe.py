"""The BPE baseline: a Llama-style transformer (our :class:`~torchblt.model.entropy_model.EntropyModel`
architecture) over BPE tokens, with a byte-level BPE tokenizer trained locally with Hugging Face
``tokenizers``; evaluated in bits per *byte* by ``blt eval`` so BLT, byte and BPE models share one scale.

The pieces live where their kind of thing lives: the tokenizer is :class:`torchblt.tokenizer.BPETokenizer`
(ids 0, 1, 2 are ``<boe>`` (padding), ``<bos>``, ``<eos>``, as in the byte vocabulary); the architecture is
:class:`torchblt.model.config.BPEConfig` (``model_type: "bpe"`` in our format, so :func:`torchblt.load_model`
and :func:`torchblt.save_model` read and write BPE folders, ``tokenizer.json`` included); the training kind
``bpe`` is a row of :data:`torchblt.train.kinds.KINDS`. This module holds tokenizer training and the
training loader, and re-exports the rest under their first-release names.

Bits per byte: a document is ``[BOS] + tokens + [EOS]``; the summed cross-entropy of every token after
the BOS (the EOS included) is divided by ``n_bytes + 1`` per document, exactly as for byte models
(:mod:`torchblt.eval.bpb`). Text that is not valid UTF-8 is tokenized after replacing the bad bytes
(U+FFFD), but bits per byte always divide by the document's original byte count.

Training with ``blt train``: ``model.kind: bpe`` and ``model.arch: {base: tiny-entropy, tokenizer: PATH, ...}``.
The loader (:class:`BPELoader`, given the tokenizer of the model it feeds) packs ``[BOS] + tokens + [EOS]``
documents into rows of ``data.seq_len`` tokens (resumable, like the byte loader); the loss's byte count is
the bytes the target tokens stand for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from torchblt.formats import load_model, save_model
from torchblt.formats.native import folder_model_type, read_native_config
from torchblt.model.config import BPEConfig
from torchblt.model.entropy_model import EntropyModel
from torchblt.tokenizer import BOE_ID as BOE
from torchblt.tokenizer import BOS_ID as BOS
from torchblt.tokenizer import BPE_SPECIALS as SPECIALS
from torchblt.tokenizer import EOS_ID as EOS
from torchblt.tokenizer import BPETokenizer, load_bpe_tokenizer

__all__ = [
    "BOE",
    "BOS",
    "EOS",
    "SPECIALS",
    "BPEBatch",
    "BPEConfig",
    "BPELoader",
    "BPETokenizer",
    "is_bpe_folder",
    "load_bpe_model",
    "make_bpe_loader",
    "read_bpe_config",
    "save_bpe_model",
    "train_bpe_tokenizer",
]


# --------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(
    documents: Iterable[bytes | str], vocab_size: int, out: str | os.PathLike[str], overwrite: bool = False
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` entries (specials included) and save it as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from torchblt.outputs import refuse_existing, staged

    out = Path(out)
    refuse_existing([out], overwrite)
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIALS)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size must be at least {n_base} (256 bytes + 3 specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        for doc in documents:
            yield doc if isinstance(doc, str) else bytes(doc).decode("utf-8", errors="replace")

    tok.train_from_iterator(texts(), trainer=trainer)
    with staged(overwrite) as files:
        tok.save(str(files.path(out)))
    load_bpe_tokenizer.cache_clear()
    return BPETokenizer(out)


# --------------------------------------------------------------------------- folders (our format, model_type "bpe")


def is_bpe_folder(folder: str | os.PathLike[str]) -> bool:
    return folder_model_type(Path(folder)) == "bpe"


def read_bpe_config(folder: str | os.PathLike[str]) -> BPEConfig:
    """The config of a BPE model folder; the tokenizer is the folder's ``tokenizer.json`` if present."""
    cfg = read_native_config(Path(folder))
    if not isinstance(cfg, BPEConfig):
        raise ValueError(f"{folder}: not a BPE model folder")
    return cfg


def load_bpe_model(folder: str | os.PathLike[str], device: str = "cpu", dtype: str = "fp32") -> EntropyModel:
    """:func:`torchblt.load_model` of a BPE folder: an :class:`EntropyModel` whose config is a :class:`BPEConfig`."""
    if not is_bpe_folder(folder):
        raise ValueError(f"{folder}: not a BPE model folder")
    model = load_model(folder, device=device, dtype=dtype)
    model.config.bpe  # noqa: B018  (fail now, with the path, if the tokenizer is missing)
    return model  # type: ignore[return-value]


def save_bpe_model(model: EntropyModel, folder: str | os.PathLike[str], overwrite: bool = False,
                   extra: dict[str, Any] | None = None) -> Path:
    """:func:`torchblt.save_model` of a BPE model (``tokenizer.json`` copied in: the folder is self-contained)."""
    if not isinstance(model.config, BPEConfig):
        raise ValueError("save_bpe_model: the model's config is not a BPEConfig")
    return save_model(model, folder, overwrite=overwrite, extra=extra)


# --------------------------------------------------------------------------- training (kind "bpe")


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
        from torchblt.data.sources import DocumentReader, new_stats

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


def make_bpe_loader(cfg: Any, *, rank: int = 0, world_size: int = 1, model_config: BPEConfig, **_: Any) -> BPELoader:
    """The ``bpe`` kind's loader: rows of the tokenizer of the model being trained."""
    cfg.validate()
    return BPELoader(cfg, rank, world_size, tokenizer=model_config.tokenizer)
