"""The data configuration shared by the loader, the trainer and the commands.

How the data is patched is a :class:`~torchblt.patching.PatchingConfig` of its own, ``data.patching``
(the section the trained model's ``config.patching`` is copied from). Configs written before it existed
put those settings flat in ``data`` (``data.patching: entropy``, ``data.threshold: 1.3`` ...): they are
still read, moved into ``data.patching`` by :func:`upgrade_legacy_keys` with a deprecation message.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from torchblt.patching import PatchingConfig

__all__ = ["DataConfig", "KINDS", "LEGACY_PATCHING_KEYS", "TRAIN_PATCHING_MODES", "upgrade_legacy_keys"]

KINDS = ("blt", "bytes")
TRAIN_PATCHING_MODES = ("entropy", "space", "static", "byte")
# flat data keys of the first release -> their field in data.patching ("patching" held the mode)
LEGACY_PATCHING_KEYS = {"threshold": "threshold", "threshold_add": "threshold_add", "monotonicity": "monotonicity",
                        "max_patch_length": "max_patch_length", "patch_size": "patch_size"}


def _data_patching() -> PatchingConfig:
    return PatchingConfig(threshold=None)  # entropy patching: give a threshold or a target_patch_size


def upgrade_legacy_keys(data: dict[str, Any], where: str = "data") -> dict[str, Any]:
    """``data`` with the flat patching keys of old configs moved into ``patching`` (a deprecation message
    names them and their new form). ``patching: MODE`` (a string) becomes ``patching: {mode: MODE}``.
    ``where="DataConfig"``: the keywords of a Python call."""
    moved = {LEGACY_PATCHING_KEYS[k]: v for k, v in data.items() if k in LEGACY_PATCHING_KEYS}
    patching = data.get("patching")
    if not moved and not isinstance(patching, str):
        return data
    if isinstance(patching, str):
        moved = {"mode": patching, **moved}
    elif isinstance(patching, PatchingConfig):
        patching = dataclasses.asdict(patching)
    elif patching is not None and not isinstance(patching, dict):
        return data  # not ours to fix: the type check names it
    out = {k: v for k, v in data.items() if k not in LEGACY_PATCHING_KEYS}
    out["patching"] = {**(patching if isinstance(patching, dict) else {}), **moved}
    flat = {k: v for k, v in data.items() if k in LEGACY_PATCHING_KEYS or (k == "patching" and isinstance(v, str))}
    if where == "DataConfig":
        old = ", ".join(f"{k}={v!r}" for k, v in flat.items())
        new = ", ".join(f"{k}={v!r}" for k, v in moved.items())
        message = f"DataConfig({old}): flat patching keywords are deprecated; pass patching=PatchingConfig({new})"
    else:
        old = ", ".join(f"{where}.{k}: {_yaml(v)}" for k, v in flat.items())
        new = ", ".join(f"{k}: {_yaml(v)}" for k, v in moved.items())
        message = f"{old}: the flat patching keys are deprecated; write {where}.patching: {{{new}}}"
    warnings.warn(message, FutureWarning, stacklevel=3)
    return out


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class DataConfig:
    """What to read and how to cut it into batches.

    ``sources``: files, folders or globs (``.txt``: a whole file is one document; ``.jsonl``;
    ``.parquet``; ``.arrow``). ``kind="blt"``: ``seq_len`` counts patches and ``max_bytes`` caps the bytes
    of a sequence; ``kind="bytes"``: ``seq_len`` counts bytes (entropy model / byte baseline).
    ``patching``: how ``kind="blt"`` data is patched (mode ``entropy``, ``space``, ``static`` or ``byte``).
    Entropy patching needs entropies: preprocessed shards (``entropies``, written by ``blt entropies``;
    the shards hold the text, so ``sources`` may then be empty) or a frozen ``entropy_model`` run on the
    fly, and a ``patching.threshold`` or a ``target_patch_size`` to calibrate the threshold to at start
    (:func:`torchblt.data.calibrate.calibrate_threshold`). ``interleave``: documents are packed in this many
    streams side by side and sequences taken from them in turn (mixes long documents; 1 = one stream);
    ``shuffle_buffer`` sequences are then shuffled (by blocks). ``shards``: how many independently
    resumable parts the data is split into (default: processes x workers of the run's first launch); a
    run can later resume on any number of processes up to it (see :mod:`torchblt.data.loader`).
    """

    sources: list[str] = field(default_factory=list)
    text_field: str = "text"
    validation: list[str] = field(default_factory=list)
    kind: str = "blt"
    seq_len: int = 256
    max_bytes: int | None = None
    batch_size: int = 8
    patching: PatchingConfig = field(default_factory=_data_patching)
    target_patch_size: float | None = None
    entropies: str | None = None
    entropy_model: str | None = None
    shuffle_buffer: int = 64
    interleave: int = 8
    seed: int = 0
    num_workers: int = 0
    shards: int | None = None
    max_doc_bytes: int = 64 * 2**20
    on_bad_record: str = "skip"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and value of the first bad setting."""

        def bad(name: str, why: str) -> ValueError:
            value = self
            for part in name.split("."):
                value = getattr(value, part)
            return ValueError(f"data.{name}: {why}, got {value!r}")

        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if isinstance(self.validation, str):
            self.validation = [self.validation]
        if self.kind not in KINDS:
            raise bad("kind", f"must be one of {KINDS}")
        if not isinstance(self.patching, PatchingConfig):
            raise bad("patching", "must be a mapping of patching settings (mode, threshold, ...)")
        mode = self.patching.mode
        if not self.sources and not (self.kind == "blt" and mode == "entropy" and self.entropies):
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
        if mode not in TRAIN_PATCHING_MODES:
            raise bad("patching.mode", f"must be one of {TRAIN_PATCHING_MODES}")
        if self.kind == "blt" and mode == "entropy":
            if self.patching.threshold is None and self.target_patch_size is None:
                raise bad("patching.threshold", "entropy patching needs a threshold or a data.target_patch_size")
            if self.patching.threshold is not None and self.target_patch_size is not None:
                raise bad("target_patch_size", "give a patching.threshold or a target_patch_size, not both "
                          "(patching.threshold: null calibrates it)")
            if self.target_patch_size is not None and not self.target_patch_size > 1:
                raise bad("target_patch_size", "must be greater than 1")
        self.patching.validate("data.patching")
        if isinstance(self.interleave, bool) or not isinstance(self.interleave, int) or self.interleave < 1:
            raise bad("interleave", "must be a positive integer")
        if isinstance(self.shuffle_buffer, bool) or not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 0:
            raise bad("shuffle_buffer", "must be a non-negative integer")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise bad("num_workers", "must be a non-negative integer")
        if self.shards is not None and (isinstance(self.shards, bool) or not isinstance(self.shards, int)
                                        or self.shards < 1):
            raise bad("shards", "must be a positive integer or null")
        if not isinstance(self.max_doc_bytes, int) or self.max_doc_bytes < 16:
            raise bad("max_doc_bytes", "must be an integer >= 16")
        if self.on_bad_record not in ("skip", "error"):
            raise bad("on_bad_record", "must be 'skip' or 'error'")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _accept_legacy_keywords(init: Any) -> Any:
    """``DataConfig(patching="space", threshold=1.2, ...)`` (the first release's keywords) still works."""

    @functools.wraps(init)
    def __init__(self: DataConfig, *args: Any, **kwargs: Any) -> None:
        if any(k in LEGACY_PATCHING_KEYS for k in kwargs) or isinstance(kwargs.get("patching"), str):
            kwargs = upgrade_legacy_keys(kwargs, "DataConfig")
            kwargs["patching"] = dataclasses.replace(_data_patching(), **kwargs["patching"])
        init(self, *args, **kwargs)

    return __init__


DataConfig.__init__ = _accept_legacy_keywords(DataConfig.__init__)  # type: ignore[method-assign]
