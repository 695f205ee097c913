"""Everything needed to resume a run exactly, apart from model and optimizer tensors: the step, the
data loader's position, and the torch / numpy / python RNG states. It is JSON (one file per rank,
beside the DCP checkpoint), so a checkpoint can be inspected with a text editor.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The process's RNG states as JSON-serialisable values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        raw = np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()
        torch.cuda.set_rng_state(torch.from_numpy(raw))


@dataclass
class TrainState:
    """Step counters, data position and RNG: the non-tensor part of a checkpoint (per rank)."""

    step: int = 0  # optimizer steps done
    bytes_seen: int = 0  # training bytes (targets) over all ranks
    data: dict[str, Any] = field(default_factory=dict)  # DataLoader.state_dict()
    rng: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "bytes_seen": self.bytes_seen, "data": self.data, "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.bytes_seen = int(state.get("bytes_seen", 0))
        self.data = state.get("data", {})
        self.rng = state.get("rng", {})
        if self.rng:
            set_rng_state(self.rng)
