"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Layout of ``RUN_DIR/checkpoints/step_00001000/``: the DCP files (model + optimizer, sharded by rank under
FSDP2, one shard for one process), ``train_state_rank{R}.json`` per rank (:class:`TrainState`: step,
data-loader position, RNG), ``model_config.json`` (kind + architecture, what ``blt export`` needs) and
``complete.json``, written last.

Atomicity: everything is written into ``.tmp-step_00001000``; only when every rank has finished does
rank 0 write ``complete.json`` and rename the folder to its final name (a rename within a folder is
atomic on POSIX). A save killed midway leaves a ``.tmp-*`` folder that is ignored (and removed by the
next save), so the previous checkpoint stays the latest valid one. Only the last ``keep`` are kept.

Reading never runs code from the files: the DCP parts go through :func:`torchblt.train.safe_dcp.dcp_load`
(restricted unpickler for ``.metadata``, ``weights_only`` byte items), the rest is JSON, and the model kind
named in ``model_config.json`` must be one torchblt knows (a checkpoint never makes us import a module).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
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

from torchblt.formats.common import CheckpointError
from torchblt.outputs import refuse_existing
from torchblt.train.distributed import DistInfo, barrier
from torchblt.train.safe_dcp import dcp_load

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


RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "finished.json", "model")  # what a run (re)writes in RUN_DIR


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a run folder holding files a run would overwrite that no torchblt run wrote.

    A folder is a run's own when it has ``checkpoints/`` or its ``config.yaml`` is a resolved run config
    (what the trainer writes); then re-running resumes or restarts there. Otherwise any of
    :data:`RUN_OUTPUTS` that exists is the user's, and nothing is written.
    """
    import yaml

    root = Path(run_dir)
    if not root.is_dir() or checkpoint_dir(root).is_dir():
        return
    try:
        written = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        written = None
    if isinstance(written, dict) and {"run_dir", "model", "data", "train"} <= set(written):
        return
    refuse_existing([root / name for name in RUN_OUTPUTS], False,
                    remedy=f"{root} is not a torchblt run folder: choose another run_dir or move it away")


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


def checkpoint_step(path: Path) -> int:
    """The step ``complete.json`` records."""
    step = _read_json(path / "complete.json").get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / 'complete.json'}: no valid 'step' ({step!r})")
    return step


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    dist_info: DistInfo) -> dict[str, Any]:
    """Load model (+ optimizer) tensors in place; return this rank's train state dict."""
    meta = _read_json(path / "complete.json")
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
    return _read_json(state_file)


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    dcp_load(state, path)


def read_model_config(path: Path) -> dict[str, Any]:
    f = path / "model_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (not a torchblt training checkpoint?)")
    record = _read_json(f)
    if not isinstance(record.get("kind"), str) or not isinstance(record.get("arch"), dict):
        raise CheckpointError(f"{f}: expected {{'kind': ..., 'arch': {{...}}}}")
    return record


def _read_json(f: Path) -> dict[str, Any]:
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{f}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return raw


def checkpoint_kind(path: Path, record: dict[str, Any]) -> Any:
    """The :class:`~torchblt.train.kinds.ModelKind` a checkpoint names, without importing anything new.

    A config may name a plug-in kind ``package.module:name`` (the trainer imports it); a *checkpoint* only
    gets kinds that are registered already, that live in torchblt, or whose module is already imported.
    """
    from torchblt.train.kinds import KINDS, get_kind

    name = record["kind"]
    module = name.partition(":")[0] if ":" in name else ""
    if name not in KINDS and module and module != "torchblt" and not module.startswith("torchblt.") \
            and module not in sys.modules:
        raise CheckpointError(
            f"{path / 'model_config.json'}: model kind {name!r} would import module {module!r}; a checkpoint never "
            f"makes torchblt import code (import {module} yourself first)"
        )
    try:
        return get_kind(name)
    except ValueError as e:
        raise CheckpointError(f"{path / 'model_config.json'}: {e}") from None


def checkpoint_model_config(path: Path) -> tuple[Any, dict[str, Any]]:
    """(architecture config, ``model_config.json`` record) of a checkpoint."""
    record = read_model_config(path)
    kind = checkpoint_kind(path, record)
    try:
        return kind.make_config(record["arch"]), record
    except ValueError as e:
        raise CheckpointError(f"{path / 'model_config.json'}: {e}") from None


def read_weights(path: Path, config: Any) -> dict[str, torch.Tensor]:
    """The model tensors of checkpoint ``path`` as a fresh CPU state dict (one copy; no optimizer state)."""
    from torchblt.formats.common import build_model

    shapes = build_model(config, device="meta").state_dict()
    state = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}}
    _dcp_load(state, path)
    return state["model"]


def load_weights_only(path: Path, model: nn.Module) -> None:
    """Model tensors of a checkpoint into a plain (unsharded) model, in one process."""
    state = {"model": model.state_dict()}
    _dcp_load(state, path)
    model.load_state_dict(state["model"])
