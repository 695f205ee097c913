"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Layout of ``RUN_DIR/checkpoints/step_00001000/``: the DCP files (model + optimizer, sharded by rank under
FSDP2, one shard for one process), ``train_state_rank{R}.json`` per rank (:class:`TrainState`: step,
data-loader position, RNG), ``model_config.json`` (kind + architecture, what ``blt export`` needs) and
``complete.json``, written last.

Atomicity: everything is written into ``.tmp-step_00001000``; only when every rank has finished does
rank 0 write ``complete.json`` and rename the folder to its final name (a rename within a folder is
atomic on POSIX). A save killed midway leaves a ``.tmp-*`` folder that is ignored (and removed by the
next save), so the previous checkpoint stays the latest valid one. Only the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torchblt.train.distributed import DistInfo, barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "complete.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its latest checkpoint)."""
    p = Path(path)
    if (p / "complete.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    if p.exists():
        raise FileNotFoundError(f"{p}: neither a complete checkpoint (complete.json) nor a run folder with checkpoints")
    raise FileNotFoundError(f"{p}: no such checkpoint or run folder")


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], model_config: dict[str, Any], dist_info: DistInfo,
                    keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # saves that died midway
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # "no process group: saving in a single process" is what we want
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(tmp))
    (tmp / f"train_state_rank{dist_info.rank}.json").write_text(json.dumps(train_state), encoding="utf-8")
    barrier()
    if dist_info.is_main:
        (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2), encoding="utf-8")
        (tmp / "complete.json").write_text(json.dumps({"step": step, "world_size": dist_info.world_size}),
                                           encoding="utf-8")
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    dist_info: DistInfo) -> dict[str, Any]:
    """Load model (+ optimizer) tensors in place; return this rank's train state dict."""
    meta = json.loads((path / "complete.json").read_text(encoding="utf-8"))
    state_file = path / f"train_state_rank{dist_info.rank}.json"
    if meta.get("world_size", 1) != dist_info.world_size or not state_file.is_file():
        raise ValueError(
            f"{path}: written by {meta.get('world_size')} process(es), now {dist_info.world_size}; exact resume "
            "needs the same number of processes (the data position is per rank). Use init_from to start a new "
            "run from these weights (blt export first)"
        )
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return json.loads(state_file.read_text(encoding="utf-8"))


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():  # one process without a process group is a supported case
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path))


def read_model_config(path: Path) -> dict[str, Any]:
    f = path / "model_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (not a torchblt training checkpoint?)")
    return json.loads(f.read_text(encoding="utf-8"))


def load_weights_only(path: Path, model: nn.Module) -> None:
    """Model tensors of a checkpoint into a plain (unsharded) model, in one process."""
    state = {"model": model.state_dict()}
    _dcp_load(state, path)
    model.load_state_dict(state["model"])
