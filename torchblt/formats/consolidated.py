"""Adapter for the reference's consolidated training checkpoints: ``params.json`` + ``consolidated.pth``.

``params.json`` is the training run's arguments: ``model`` (BLT arguments) and/or ``entropy_model``
(``LMTransformer`` arguments), ``train_entropy_model`` choosing which one the weights are, and
``data.patcher_args``. ``consolidated.pth`` is ``torch.save({"model": state_dict, ...})``; it is read
with ``torch.load(weights_only=True)``, which refuses any pickle that would run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from torchblt.formats.common import CheckpointError
from torchblt.formats.reference import (
    blt_config_from_reference_args,
    entropy_config_from_reference_args,
    patcher_args_from_train_args,
    read_json,
)
from torchblt.model.config import BLTConfig
from torchblt.model.entropy_model import EntropyModelConfig


def _weights_file(folder: Path) -> Path | None:
    for candidate in (folder / "consolidated.pth", folder / "consolidated" / "consolidated.pth"):
        if candidate.is_file():
            return candidate
    return None


def is_consolidated_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() and _weights_file(folder) is not None


def read_consolidated(folder: Path) -> tuple[BLTConfig | EntropyModelConfig, dict[str, torch.Tensor]]:
    config = read_consolidated_config(folder)
    path = _weights_file(folder)
    assert path is not None
    return config, read_weights(path)


def read_consolidated_config(folder: Path) -> BLTConfig | EntropyModelConfig:
    params = read_json(folder / "params.json")
    if not isinstance(params, dict):
        raise CheckpointError(f"{folder / 'params.json'}: expected a JSON object")
    is_entropy = bool(params.get("train_entropy_model")) or not isinstance(params.get("model"), dict)
    if is_entropy:
        args = params.get("entropy_model")
        if not isinstance(args, dict):
            raise CheckpointError(f"{folder / 'params.json'}: no 'model' or 'entropy_model' arguments")
        config: BLTConfig | EntropyModelConfig = entropy_config_from_reference_args(args)
    else:
        config = blt_config_from_reference_args(params["model"], patcher_args_from_train_args(params))
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """``{"model": state_dict}`` (or a bare state dict) from a ``torch.save`` file, refusing code execution."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file is not a plain tensor checkpoint (it would need to run code "
            f"while unpickling, which torchblt never allows): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    state = blob.get("model") if isinstance(blob, dict) and "model" in blob else blob
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} of tensors")
    return state
