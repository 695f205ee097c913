"""Our own format: ``config.json`` + ``model.safetensors``.

``config.json`` = ``{"format": "torchblt", "format_version": 1, "model_type": "blt" | "entropy_model" |
"bpe", "config": {...nested architecture config...}}``. Tensor names are the module paths of our models
(which are the reference's names, so the weights of a reference checkpoint and of ours are interchangeable).

``model_type`` says which config ``config`` is: :class:`~torchblt.model.config.BLTConfig`,
:class:`~torchblt.model.entropy_model.EntropyModelConfig` (an entropy model or byte LM) or
:class:`~torchblt.model.config.BPEConfig` (the BPE baseline: an entropy-model architecture over the ids of
the folder's ``tokenizer.json``, which :func:`save_model` copies in). The first release wrote BPE folders
as ``"entropy_model"`` with a ``tokenizer`` in the config: they are read as ``"bpe"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchblt.formats.common import CheckpointError, read_config_json
from torchblt.model.blt import BLT
from torchblt.model.config import (
    BLTConfig,
    BPEConfig,
    blt_config_from_dict,
    bpe_config_from_dict,
    config_to_dict,
    entropy_config_from_dict,
)
from torchblt.model.entropy_model import EntropyModel, EntropyModelConfig

if TYPE_CHECKING:
    from torchblt.outputs import Staged

FORMAT_NAME = "torchblt"
FORMAT_VERSION = 1
MODEL_TYPES = ("blt", "entropy_model", "bpe")
TOKENIZER_FILE = "tokenizer.json"


def is_native_folder(folder: Path) -> bool:
    raw = read_config_json(folder)
    return raw is not None and raw.get("format") == FORMAT_NAME


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def model_type(config: BLTConfig | EntropyModelConfig) -> str:
    """The ``model_type`` of a config: ``"blt"``, ``"bpe"`` or ``"entropy_model"``."""
    if isinstance(config, BLTConfig):
        return "blt"
    return "bpe" if isinstance(config, BPEConfig) else "entropy_model"


def _model_type_of(raw: dict[str, Any]) -> Any:
    kind = raw.get("model_type")
    if kind == "entropy_model" and isinstance(raw.get("config"), dict) and "tokenizer" in raw["config"]:
        return "bpe"  # a BPE folder written by the first release
    return kind


def folder_model_type(folder: Path) -> str | None:
    """The ``model_type`` of one of our folders (None for other formats), first-release BPE folders included."""
    raw = read_config_json(Path(folder))
    return _model_type_of(raw) if raw is not None and raw.get("format") == FORMAT_NAME else None


def config_dict(model: BLT | EntropyModel, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    config = config_to_dict(model.config)
    if isinstance(model.config, BPEConfig):
        config["tokenizer"] = TOKENIZER_FILE  # the copy next to config.json: the folder is self-contained
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": model_type(model.config),
        "config": config,
        **(extra or {}),
    }


def read_native(folder: Path) -> tuple[BLTConfig | EntropyModelConfig, dict[str, torch.Tensor]]:
    return read_native_config(folder), read_safetensors(folder / "model.safetensors")


def read_native_config(folder: Path) -> BLTConfig | EntropyModelConfig:
    raw = read_config_json(folder)
    if raw is None:
        raise CheckpointError(f"{folder / 'config.json'}: missing, or not a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{folder / 'config.json'}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    kind = _model_type_of(raw)
    try:
        if kind == "blt":
            config: BLTConfig | EntropyModelConfig = blt_config_from_dict(raw["config"])
        elif kind == "bpe":
            config = _bpe_config(folder, raw["config"])
        elif kind == "entropy_model":
            config = entropy_config_from_dict(raw["config"])
        else:
            raise CheckpointError(f"{folder / 'config.json'}: model_type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
    except (ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    return config


def model_files(folder: str | os.PathLike[str], entropy_model: bool = False) -> list[Path]:
    """The files :func:`save_model` writes in ``folder`` (+ ``entropy_model/`` ones)."""
    out = Path(folder)
    files = [out / "config.json", out / "model.safetensors"]
    return files + (model_files(out / "entropy_model") if entropy_model else [])


def tokenizer_copy(model: BLT | EntropyModel, folder: str | os.PathLike[str]) -> Path | None:
    """Where :func:`write_model` copies a BPE model's tokenizer in ``folder`` (None: no copy to make)."""
    target = Path(folder) / TOKENIZER_FILE
    if not isinstance(model.config, BPEConfig) or Path(model.config.tokenizer).resolve() == target.resolve():
        return None
    return target


def write_model(model: BLT | EntropyModel, folder: str | os.PathLike[str], out: Staged,
                extra: dict[str, Any] | None = None) -> None:
    """Stage ``model``'s files in ``folder`` as part of the write ``out`` (see :mod:`torchblt.outputs`); a BPE
    model's tokenizer is copied in as ``tokenizer.json``."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out.path(folder / "model.safetensors")), metadata={"format": "pt"})
    out.write_text(folder / "config.json", json.dumps(config_dict(model, extra), indent=2) + "\n")
    tokenizer = tokenizer_copy(model, folder)
    if tokenizer is not None:
        shutil.copyfile(model.config.tokenizer, out.path(tokenizer))  # type: ignore[union-attr]


def _bpe_config(folder: Path, data: dict[str, Any]) -> BPEConfig:
    """A BPE config whose tokenizer is the folder's ``tokenizer.json`` (or its path, relative to the folder)."""
    cfg = bpe_config_from_dict(data)
    local = folder / TOKENIZER_FILE
    if local.is_file():
        cfg.tokenizer = str(local.resolve())
    elif not Path(cfg.tokenizer).is_absolute():
        cfg.tokenizer = str((folder / cfg.tokenizer).resolve())
    return cfg


def save_model(
    model: BLT | EntropyModel,
    folder: str | os.PathLike[str],
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    *,
    entropy_model: EntropyModel | None = None,
) -> Path:
    """Write ``model`` in our format (and ``entropy_model`` in ``folder/entropy_model``, as the released
    repositories lay it out). Refuses to replace any existing file unless ``overwrite``.

    All files are written to temporary names and renamed at the end, so an interrupted or failed save
    (a full disk: ``DiskFullError``) leaves no half file and no folder it created.
    ``extra`` adds top-level keys to ``config.json`` (e.g. training metadata). A BPE model's tokenizer is
    copied in as ``tokenizer.json``.
    """
    from torchblt.outputs import refuse_existing, staged

    out = Path(folder)
    tokenizer = tokenizer_copy(model, out)
    refuse_existing(model_files(out, entropy_model is not None) + ([tokenizer] if tokenizer else []), overwrite)
    with staged(overwrite) as files:
        write_model(model, out, files, extra)
        if entropy_model is not None:
            write_model(entropy_model, out / "entropy_model", files)
    return out
