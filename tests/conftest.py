"""Shared test helpers: paths of the golden fixtures, tiny models, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "reference"

torch.set_num_threads(min(2, torch.get_num_threads()))


def load_tensors(relpath: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / relpath))


def load_json(relpath: str):
    with open(FIXTURES / relpath, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs, no spinning on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
