"""The data configuration shared by the loader, the trainer and the commands."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

__all__ = ["DataConfig", "KINDS", "TRAIN_PATCHING_MODES"]

KINDS = ("blt", "bytes")
TRAIN_PATCHING_MODES = ("entropy", "space", "static", "byte")


@dataclass
class DataConfig:
    """What to read and how to cut it into batches.

    ``sources``: files, folders or globs (``.txt``: a whole file is one document; ``.jsonl``;
    ``.parquet``; ``.arrow``). ``kind="blt"``: ``seq_len`` counts patches and ``max_bytes`` caps the bytes
    of a sequence; ``kind="bytes"``: ``seq_len`` counts bytes (entropy model / byte baseline).
    Entropy patching needs entropies: preprocessed shards (``entropies``, written by ``blt entropies``;
    the shards hold the text, so ``sources`` may then be empty) or a frozen ``entropy_model`` run on the
    fly. ``threshold=None`` with ``target_patch_size`` calibrates the threshold at start
    (:func:`torchblt.data.calibrate.calibrate_threshold`). ``interleave``: documents are packed in this many
    streams side by side and sequences taken from them in turn (mixes long documents; 1 = one stream);
    ``shuffle_buffer`` sequences are then shuffled.
    """

    sources: list[str] = field(default_factory=list)
    text_field: str = "text"
    validation: list[str] = field(default_factory=list)
    kind: str = "blt"
    seq_len: int = 256
    max_bytes: int | None = None
    batch_size: int = 8
    patching: str = "entropy"
    threshold: float | None = None
    target_patch_size: float | None = None
    threshold_add: float | None = None
    monotonicity: bool = False
    max_patch_length: int | None = None
    patch_size: float = 4.5
    entropies: str | None = None
    entropy_model: str | None = None
    shuffle_buffer: int = 64
    interleave: int = 8
    seed: int = 0
    num_workers: int = 0
    max_doc_bytes: int = 64 * 2**20
    on_bad_record: str = "skip"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and value of the first bad setting."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"data.{name}: {why}, got {getattr(self, name)!r}")

        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if isinstance(self.validation, str):
            self.validation = [self.validation]
        if self.kind not in KINDS:
            raise bad("kind", f"must be one of {KINDS}")
        if not self.sources and not (self.kind == "blt" and self.patching == "entropy" and self.entropies):
            raise bad("sources", "needs at least one file, folder or glob")
        for name in ("seq_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be a positive integer")
        if self.kind == "blt" and self.seq_len < 2:
            raise bad("seq_len", "must be at least 2 patches")
        if self.max_bytes is not None and (
            isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 2
        ):
            raise bad("max_bytes", "must be an integer >= 2 or null")
        if self.patching not in TRAIN_PATCHING_MODES:
            raise bad("patching", f"must be one of {TRAIN_PATCHING_MODES}")
        if self.kind == "blt" and self.patching == "entropy":
            if self.threshold is None and self.target_patch_size is None:
                raise bad("threshold", "entropy patching needs a threshold or a target_patch_size")
            if self.threshold is not None and self.target_patch_size is not None:
                raise bad("target_patch_size", "give a threshold or a target_patch_size, not both")
            if self.target_patch_size is not None and not self.target_patch_size > 1:
                raise bad("target_patch_size", "must be greater than 1")
        if self.max_patch_length is not None and (
            not isinstance(self.max_patch_length, int) or self.max_patch_length < 1
        ):
            raise bad("max_patch_length", "must be a positive integer or null")
        if not self.patch_size > 0:
            raise bad("patch_size", "must be positive")
        if isinstance(self.interleave, bool) or not isinstance(self.interleave, int) or self.interleave < 1:
            raise bad("interleave", "must be a positive integer")
        if isinstance(self.shuffle_buffer, bool) or not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 0:
            raise bad("shuffle_buffer", "must be a non-negative integer")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise bad("num_workers", "must be a non-negative integer")
        if not isinstance(self.max_doc_bytes, int) or self.max_doc_bytes < 16:
            raise bad("max_doc_bytes", "must be an integer >= 16")
        if self.on_bad_record not in ("skip", "error"):
            raise bad("on_bad_record", "must be 'skip' or 'error'")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
