"""The BPE baseline: a Llama-style transformer (our :class:`~torchblt.model.entropy_model.EntropyModel`
architecture) over BPE tokens, with a byte-level BPE tokenizer trained locally with Hugging Face
``tokenizers``; evaluated in bits per *byte* by ``blt eval`` so BLT, byte and BPE models share one scale.

The pieces live where their kind of thing lives: the tokenizer is :class:`torchblt.tokenizer.BPETokenizer`
(ids 0, 1, 2 are ``<boe>`` (padding), ``<bos>``, ``<eos>``, as in the byte vocabulary); the architecture is
:class:`torchblt.model.config.BPEConfig` (``model_type: "bpe"`` in our format, so :func:`torchblt.load_model`
and :func:`torchblt.save_model` read and write BPE folders, ``tokenizer.json`` included); the training kind
``bpe`` is a row of :data:`torchblt.train.kinds.KINDS`, and its loader (:class:`BPELoader`) is in
:mod:`torchblt.data.bpe`. This module holds tokenizer training, and re-exports the rest under their
first-release names.

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

from torchblt.data.bpe import BPEBatch, BPELoader, make_bpe_loader
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
