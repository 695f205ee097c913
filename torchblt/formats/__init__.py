"""Checkpoint formats, detected automatically by :func:`load_model`.

=========================  ===========================================================  =====================
format                     files                                                        adapter
=========================  ===========================================================  =====================
torchblt (ours)            ``config.json`` (``{"format": "torchblt", ...}``) + ``model.safetensors``  :mod:`.native`
reference Hugging Face     ``config.json`` (``{"args": {...}}``) + ``model.safetensors`` (+ ``train_args.json``)  :mod:`.reference`
reference consolidated     ``params.json`` + ``consolidated.pth`` (``{"model": state_dict}``)          :mod:`.consolidated`
transformers BltForCausalLM  ``config.json`` (``"model_type": "blt"``) + ``model.safetensors`` (entropy model as ``model.patcher``)  :mod:`.transformers`
torchblt training checkpoint  ``RUN/checkpoints/step_N/`` (DCP) or the run folder ``RUN`` (newest checkpoint)  :mod:`.training`
=========================  ===========================================================  =====================

A path that does not exist locally and looks like ``org/name`` is fetched with ``huggingface_hub``;
``"builtin"`` / ``"builtin-entropy"`` name the model shipped in the package (:mod:`torchblt.builtin`).
Weights are matched strictly: a missing or unexpected tensor, or a wrong shape, is an error that lists
them. A checkpoint cannot run code: safetensors and JSON hold no code, ``consolidated.pth`` is read with
``torch.load(weights_only=True)``, training checkpoints through :mod:`torchblt.train.safe_dcp` (a
restricted unpickler for DCP's ``.metadata``, ``weights_only`` for its pickled items), and a model kind
named in a checkpoint never imports a module.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from torchblt.formats.common import CheckpointError, build_model, load_state_dict_strict, resolve_dtype
from torchblt.formats.consolidated import is_consolidated_folder, read_consolidated
from torchblt.formats.native import is_native_folder, read_native, save_model
from torchblt.formats.reference import config_from_reference_folder
from torchblt.model.blt import BLT
from torchblt.model.config import BLTConfig
from torchblt.model.entropy_model import EntropyModel, EntropyModelConfig
from torchblt.patching import attach_entropy_model

Model = BLT | EntropyModel

__all__ = ["load_model", "save_model", "detect_format", "read_config", "resolve_model_path", "CheckpointError", "Model"]


def detect_format(folder: Path) -> str:
    """``"torchblt"``, ``"reference-hf"``, ``"transformers"``, ``"consolidated"`` or ``"training-checkpoint"``."""
    from torchblt.formats.transformers import is_transformers_folder

    if is_native_folder(folder):
        return "torchblt"
    if is_transformers_folder(folder):
        return "transformers"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        from torchblt.formats.reference import read_json

        raw = read_json(folder / "config.json")
        if isinstance(raw, dict) and "args" in raw:
            return "reference-hf"
    if is_consolidated_folder(folder):
        return "consolidated"
    from torchblt.formats.training import is_training_checkpoint

    if is_training_checkpoint(folder):
        return "training-checkpoint"
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: not a model folder we recognise (found {present[:12]}); expected config.json + "
        "model.safetensors (torchblt or reference format) or params.json + consolidated.pth"
    )


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """The local folder of ``path``: a folder, the folder of a file in it, or a hub repo id (downloaded)."""
    p = Path(path)
    if p.exists():
        if p.is_file():
            p = p.parent  # allow pointing at a file inside the folder
        return p
    text = str(path)
    from torchblt.builtin import NAMES, builtin_path

    if text in NAMES:
        return builtin_path(text)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        from torchblt.formats.hub import download

        return download(text)
    raise CheckpointError(f"{path}: no such file or folder")


_resolve_path = resolve_model_path  # the first release's private name


def read_config(path: str | os.PathLike[str]) -> BLTConfig | EntropyModelConfig:
    """The architecture config of a model folder (any format) or hub repo id, without reading the weights."""
    from torchblt.formats.consolidated import read_consolidated_config
    from torchblt.formats.native import read_native_config
    from torchblt.formats.transformers import config_from_transformers_folder

    folder = resolve_model_path(path)
    reader = {
        "torchblt": read_native_config,
        "transformers": config_from_transformers_folder,
        "reference-hf": config_from_reference_folder,
        "consolidated": read_consolidated_config,
    }[detect_format(folder)]
    return reader(folder)


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    entropy_model: str | os.PathLike[str] | EntropyModel | None = None,
) -> Model:
    """Load a BLT or an entropy model from a folder (any supported format), a hub repo id, or ``"builtin"``.

    The model is in eval mode, on ``device``, with parameters in ``dtype`` (fp32 by default; ``"bf16"``
    as the reference's inference path). A BLT folder that holds an ``entropy_model/`` sub-folder (as the
    released repos do), or an explicit ``entropy_model``, gets that model attached for patching
    (:func:`torchblt.patching.attach_entropy_model`; ``Patcher.for_model(model)`` then uses it).
    """
    folder = resolve_model_path(path)
    fmt = detect_format(folder)
    bundled: EntropyModel | None = None  # an entropy model stored inside the same checkpoint
    if fmt == "torchblt":
        config, state = read_native(folder)
    elif fmt == "transformers":
        from torchblt.formats.transformers import read_transformers

        config, state, em_config, em_state = read_transformers(folder)
        if em_config is not None:
            bundled = build_model(em_config)  # type: ignore[assignment]
            load_state_dict_strict(bundled, em_state, source=f"{folder} (model.patcher)", take=True)
            bundled = bundled.to(device=device, dtype=resolve_dtype(dtype)).eval()
    elif fmt == "reference-hf":
        from torchblt.formats.native import read_safetensors

        config = config_from_reference_folder(folder)
        state = read_safetensors(folder / "model.safetensors")
    elif fmt == "training-checkpoint":
        from torchblt.formats.training import read_training_checkpoint

        config, state, trained_with = read_training_checkpoint(folder)
        if trained_with and entropy_model is None and isinstance(config, BLTConfig) and Path(trained_with).exists():
            entropy_model = trained_with
    else:
        config, state = read_consolidated(folder)
    model = build_model(config)
    load_state_dict_strict(model, state, source=str(folder), take=True)  # just read: nobody else holds it
    model = model.to(device=device, dtype=resolve_dtype(dtype)).eval()
    if isinstance(model, BLT):
        em = entropy_model if entropy_model is not None else bundled
        if em is None and (folder / "entropy_model").is_dir():
            em = folder / "entropy_model"
        if em is not None and not isinstance(em, nn.Module):
            em = load_model(em, device=device, dtype=dtype)
        if em is not None:
            if not isinstance(em, EntropyModel):
                raise CheckpointError(f"{entropy_model}: not an entropy model")
            attach_entropy_model(model, em)
    return model
