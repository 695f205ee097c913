"""A torchblt *training* checkpoint read as a model: ``RUN/checkpoints/step_N`` or a run folder ``RUN``
(its newest checkpoint), so ``load_model``, ``blt generate`` and ``model.init_from`` take a run directly.

Only the model tensors are read (no optimizer state), in one process whatever the training world size,
through the safe DCP reader (:mod:`torchblt.train.safe_dcp`: a checkpoint cannot run code). A BLT trained
with an entropy model gets the one its run used (``model_config.json`` records the path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def is_training_checkpoint(folder: Path) -> bool:
    """A checkpoint folder (``complete.json``) or a run folder holding ``checkpoints/``."""
    return (folder / "complete.json").is_file() or (folder / "checkpoints").is_dir()


def read_training_checkpoint(folder: Path) -> tuple[Any, dict[str, torch.Tensor], str | None]:
    """(config, state dict, entropy model path or None) of the checkpoint ``folder`` stands for."""
    from torchblt.train import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(folder)
    config, record = ckpt.checkpoint_model_config(path)
    em = record.get("entropy_model")
    return config, ckpt.read_weights(path, config), em if isinstance(em, str) and em else None
