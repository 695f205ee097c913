"""The BPE baseline: a Llama-style transformer (our :class:`~torchblt.model.entropy_model.EntropyModel`
architecture) over BPE tokens, with a byte-level BPE tokenizer trained locally with Hugging Face
``tokenizers``; evaluated in bits per *byte* by ``blt eval`` so BLT, byte and BPE models share one scale.

Tokenizer: byte-level BPE (every byte sequence is encodable, no unknown token); ids 0, 1, 2 are the
specials ``<boe>`` (padding), ``<bos>``, ``<eos>``, as in the byte vocabulary. Text that is not valid
UTF-8 is tokenized after replacing the bad bytes (U+FFFD), but bits per byte always divide by the
document's original byte count.

Bits per byte: a document is ``[BOS] + tokens + [EOS]``; the summed cross-entropy of every token after
the BOS (the EOS included) is divided by ``n_bytes + 1`` per document, exactly as for byte models
(:mod:`torchblt.eval.bpb`).

Training with ``blt train``: ``model.kind: torchblt.baselines.bpe:bpe`` (this module registers the kind
``bpe`` in :mod:`torchblt.train.kinds`) and ``model.arch: {base: tiny-entropy, tokenizer: PATH, ...}``.
Its loader packs ``[BOS] + tokens + [EOS]`` documents into rows of ``data.seq_len`` tokens (resumable, like
the byte loader); the loss's byte count is the bytes the target tokens stand for. The trainer builds its
loader before the model and does not pass the architecture to ``make_loader``, so the tokenizer named in
``model.arch`` reaches the loader through this module (:func:`bpe_config` records it; the loader reads it
when it starts iterating).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from torchblt.model.entropy_model import EntropyModel, EntropyModelConfig

__all__ = [
    "BPEConfig",
    "BPETokenizer",
    "bpe_config",
    "is_bpe_folder",
    "load_bpe_model",
    "read_bpe_config",
    "save_bpe_model",
    "train_bpe_tokenizer",
]

SPECIALS = ("<boe>", "<bos>", "<eos>")
BOE, BOS, EOS = 0, 1, 2


# --------------------------------------------------------------------------- tokenizer


class BPETokenizer:
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) with our special ids."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("the BPE baseline needs tokenizers: pip install 'torchblt[eval]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such tokenizer file")
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"{self.path}: not a tokenizers JSON file ({e})") from None
        ids = [self.tok.token_to_id(s) for s in SPECIALS]
        if ids != [BOE, BOS, EOS]:
            raise ValueError(f"{self.path}: special tokens {SPECIALS} must have ids 0, 1, 2, got {ids}")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> int:
        """Bytes a token stands for (byte-level BPE: one character of its string per byte)."""
        return len(self.tok.id_to_token(token_id))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i > EOS], skip_special_tokens=True)

    def bytes_per_token(self, documents: Iterable[bytes | str]) -> float:
        n_bytes = n_tokens = 0
        for doc in documents:
            data = doc.encode("utf-8") if isinstance(doc, str) else bytes(doc)
            n_bytes += len(data)
            n_tokens += len(self.encode(data))
        return n_bytes / max(n_tokens, 1)


@lru_cache(maxsize=8)
def _tokenizer(path: str) -> BPETokenizer:
    return BPETokenizer(path)


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
    _tokenizer.cache_clear()
    return BPETokenizer(out)


# --------------------------------------------------------------------------- model config


@dataclass
class BPEConfig(EntropyModelConfig):
    """An :class:`EntropyModelConfig` over a BPE vocabulary, with the tokenizer it reads.

    ``build_model`` turns it into an :class:`EntropyModel`; evaluation finds the tokenizer through
    :meth:`document_tokens` (see :func:`torchblt.eval.bpb.evaluate_bpb`).
    """

    tokenizer: str = ""

    @property
    def bpe(self) -> BPETokenizer:
        if not self.tokenizer:
            raise ValueError("BPE model config: no tokenizer path")
        return _tokenizer(str(Path(self.tokenizer).resolve()))

    def document_tokens(self, doc: bytes | str, count_eos: bool = True) -> tuple[list[int], int]:
        data = doc.encode("utf-8", errors="ignore") if isinstance(doc, str) else bytes(doc)
        return [BOS, *self.bpe.encode(data), *([EOS] if count_eos else [])], len(data)

    def encode_text(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def decode_ids(self, ids: list[int]) -> str:
        return self.bpe.decode(ids)


_LAST_TOKENIZER: dict[str, str] = {}


def bpe_config(arch: Any) -> BPEConfig:
    """``model.arch`` of the ``bpe`` kind -> :class:`BPEConfig`: a preset name or mapping as for byte models,
    plus ``tokenizer: PATH`` (required); ``vocab_size`` is the tokenizer's."""
    from torchblt.train.kinds import entropy_config

    if not isinstance(arch, dict) or not arch.get("tokenizer"):
        raise ValueError("model.arch.tokenizer: the bpe kind needs the path of a tokenizer (blt bpe-tokenizer)")
    arch = dict(arch)
    path = str(Path(arch.pop("tokenizer")).resolve())
    tok = _tokenizer(path)
    arch.pop("vocab_size", None)
    base = entropy_config(arch)
    cfg = BPEConfig(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}},
                    tokenizer=path)
    cfg.vocab_size = tok.vocab_size
    cfg.eos_id = EOS
    cfg.validate()
    _LAST_TOKENIZER["path"] = path
    return cfg


def bpe_config_from_dict(data: dict[str, Any]) -> BPEConfig:
    from torchblt.model.config import entropy_config_from_dict

    data = dict(data)
    tokenizer = data.pop("tokenizer", "")
    base = entropy_config_from_dict(data)
    return BPEConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, tokenizer=tokenizer)


# --------------------------------------------------------------------------- folders


def is_bpe_folder(folder: Path) -> bool:
    from torchblt.formats.common import read_config_json

    raw = read_config_json(Path(folder))
    return raw is not None and isinstance(raw.get("config"), dict) and "tokenizer" in raw["config"]


def read_bpe_config(folder: Path) -> BPEConfig:
    """The config of a BPE model folder; the tokenizer is the folder's ``tokenizer.json`` if present."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = bpe_config_from_dict(raw["config"])
    local = folder / "tokenizer.json"
    if local.is_file():
        cfg.tokenizer = str(local.resolve())
    elif not Path(cfg.tokenizer).is_absolute():
        cfg.tokenizer = str((folder / cfg.tokenizer).resolve())
    return cfg


def load_bpe_model(folder: str | os.PathLike[str], device: str = "cpu", dtype: str = "fp32") -> EntropyModel:
    """An :class:`EntropyModel` whose ``config`` is a :class:`BPEConfig` (so it evaluates in bits per byte)."""
    from torchblt.formats.common import build_model, load_state_dict_strict, resolve_dtype
    from torchblt.formats.native import read_safetensors

    folder = Path(folder)
    cfg = read_bpe_config(folder)
    cfg.bpe  # noqa: B018  (fail now, with the path, if the tokenizer is missing)
    model = build_model(cfg)
    load_state_dict_strict(model, read_safetensors(folder / "model.safetensors"), source=str(folder), take=True)
    return model.to(device=device, dtype=resolve_dtype(dtype)).eval()


def save_bpe_model(model: EntropyModel, folder: str | os.PathLike[str], overwrite: bool = False,
                   extra: dict[str, Any] | None = None) -> Path:
    """Our format plus ``tokenizer.json`` (a copy), so the folder is self-contained."""
    import shutil

    from torchblt.formats.native import model_files, write_model
    from torchblt.outputs import refuse_existing, staged

    if not isinstance(model.config, BPEConfig):
        raise ValueError("save_bpe_model: the model's config is not a BPEConfig")
    out = Path(folder)
    src = Path(model.config.tokenizer)
    copy_tokenizer = src.resolve() != (out / "tokenizer.json").resolve()
    refuse_existing(model_files(out) + ([out / "tokenizer.json"] if copy_tokenizer else []), overwrite)
    with staged(overwrite) as files:
        write_model(model, out, files, extra)
        if copy_tokenizer:
            shutil.copyfile(src, files.path(out / "tokenizer.json"))
    return out


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

    def __init__(self, cfg: Any, rank: int = 0, world_size: int = 1, tokenizer: str | None = None) -> None:
        from torchblt.data.sources import DocumentReader, new_stats

        if getattr(cfg, "num_workers", 0):
            raise ValueError("data.num_workers: the bpe kind's loader runs in the main process; set it to 0")
        self.cfg = cfg
        self._tokenizer_path = tokenizer
        self.stats = new_stats()
        self.reader = DocumentReader(cfg.sources, cfg.text_field, shard=rank, n_shards=world_size, seed=cfg.seed,
                                     shuffle_files=True, loop=True, max_doc_bytes=cfg.max_doc_bytes,
                                     on_bad_record=cfg.on_bad_record, stats=self.stats)
        self.buffer: list[int] = []
        self.buffer_bytes: list[int] = []
        self.threshold = None

    @property
    def tokenizer(self) -> BPETokenizer:
        path = self._tokenizer_path or _LAST_TOKENIZER.get("path")
        if path is None:
            raise ValueError("bpe loader: no tokenizer (model.arch.tokenizer is read when the model is built)")
        return _tokenizer(path)

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


def make_bpe_loader(cfg: Any, rank: int = 0, world_size: int = 1, entropy_model: Any = None, **_: Any) -> BPELoader:
    cfg.validate()
    return BPELoader(cfg, rank, world_size)


def bpe_loss(model: torch.nn.Module, batch: BPEBatch) -> Any:
    from torchblt.train.kinds import LossOutput, token_cross_entropy

    logits = model(batch.x)  # (B, L, V)
    n = int(batch.mask.sum())
    return LossOutput(token_cross_entropy(logits, batch.y, batch.mask), n, batch.n_bytes)


def _register() -> None:
    try:
        from torchblt.train.kinds import ModelKind, register_kind
    except ImportError:  # pragma: no cover - the trainer is part of the package
        return
    register_kind("bpe", ModelKind(bpe_config, bpe_loss, "bytes", make_loader=make_bpe_loader,
                                   description="BPE transformer baseline (tokenizer in model.arch.tokenizer)"))


_register()
