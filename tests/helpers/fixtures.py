"""Paths and readers of the golden fixtures (``tests/fixtures/reference``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"


def load_tensors(relpath: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / relpath))


def load_json(relpath: str):
    with open(FIXTURES / relpath, encoding="utf-8") as f:
        return json.load(f)
