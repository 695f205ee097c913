"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Layout of ``RUN_DIR/checkpoints/step_00001000/``: the DCP files (model + optimizer, sharded by rank under
FSDP2, one shard for one process), ``train_state_rank{R}.json`` per rank (:class:`TrainState`: step,
data-loader position, RNG), ``model_config.json`` (kind + architecture, what ``blt export`` needs) and
``complete.json``, written last.

Atomicity: everything is written into ``.tmp-step_00001000``; only when every rank has finished does
rank 0 write ``complete.json`` and rename the folder to its final name (a rename within a folder is
atomic on POSIX). A save killed midway leaves a ``.tmp-*`` folder that is ignored (and removed by the
next save, or renamed aside when it cannot be), so the previous checkpoint stays the latest valid one. A
save that fails on any rank (a full disk) is cleaned up and raised on every rank. Only the last ``keep``
are kept.

Resume (:func:`resume_latest`) checks a checkpoint before loading it (:func:`verify_checkpoint`) and falls
back to the newest intact one, moving damaged ones aside to ``damaged-step_N``.

Reading never runs code from the files: the DCP parts go through :func:`torchblt.train.safe_dcp.dcp_load`
(restricted unpickler for ``.metadata``, ``weights_only`` byte items), the rest is JSON, and the model kind
named in ``model_config.json`` must be one torchblt knows (a checkpoint never makes us import a module).

A checkpoint loads on any number of processes: DCP reshards model and optimizer tensors (FSDP shards,
row-sharded hash tables, or plain tensors in one process), and the trainer re-splits the data loader's
per-shard states (:meth:`torchblt.data.DataLoader.merge_states`). Each rank reads only its own shards.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torchblt.formats.common import CheckpointError
from torchblt.outputs import DiskFullError, is_disk_full, refuse_existing
from torchblt.train.distributed import DistInfo, all_reduce_sum, barrier
from torchblt.train.safe_dcp import checkpoint_failure, dcp_load, read_metadata

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
    """Write checkpoint ``step`` atomically (see the module docstring); returns its folder.

    A failure on any rank (a full disk: :class:`~torchblt.outputs.DiskFullError`) removes the
    temporary folder (and ``checkpoints/`` if this save created it) on every rank's behalf and raises on
    every rank; the previous checkpoints are untouched.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    made_root = not root.exists()
    error: BaseException | None = None
    if dist_info.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _clear_stale(root)
            tmp.mkdir()
        except OSError as e:
            error = e
    _raise_if_any_failed(error, dist_info, root, tmp, made_root, final)
    try:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        with warnings.catch_warnings():  # "no process group: saving in a single process" is what we want
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=str(tmp))
        (tmp / f"train_state_rank{dist_info.rank}.json").write_text(json.dumps(train_state), encoding="utf-8")
    except (OSError, CheckpointException) as e:  # DCP raises CheckpointException on every rank alike
        error = e
    _raise_if_any_failed(error, dist_info, root, tmp, made_root, final)
    if dist_info.is_main:
        try:
            (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2), encoding="utf-8")
            (tmp / "complete.json").write_text(json.dumps({"step": step, "world_size": dist_info.world_size}),
                                               encoding="utf-8")
            if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
                replaced = root / f".tmp-replaced-{final.name}"
                shutil.rmtree(replaced, ignore_errors=True)
                final.rename(replaced)  # out of the way first: the step is never missing on disk for long
                tmp.rename(final)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                tmp.rename(final)
        except OSError as e:
            error = e
    _raise_if_any_failed(error, dist_info, root, tmp, made_root, final)
    if dist_info.is_main:
        # checkpoints after this step (a timeline we resumed away from) are not counted or pruned here
        older = [p for p in list_checkpoints(run_dir) if _step_of(p) <= step]
        for old in older[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def _clear_stale(root: Path) -> None:
    """Remove the ``.tmp-*`` folders of saves that died midway; one that cannot be removed is renamed
    aside (retried by the next save), so it never blocks this save."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
        if stale.exists() and not stale.name.startswith(".tmp-stale-"):
            with contextlib.suppress(OSError):
                stale.rename(root / f".tmp-stale-{secrets.token_hex(4)}")


def _raise_if_any_failed(error: BaseException | None, dist_info: DistInfo, root: Path, tmp: Path, made_root: bool,
                         final: Path) -> None:
    """A collective: if any rank failed, rank 0 cleans up and every rank raises (none waits forever)."""
    (n_failed,) = all_reduce_sum([0.0 if error is None else 1.0], dist_info.device)
    if n_failed == 0:
        return
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty: a checkpoints/ folder this save made and could not fill
    previous = [p.name for p in list_checkpoints(root.parent) if p != final]
    kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
    if error is not None and is_disk_full(error):
        raise DiskFullError(final, note=f"checkpoint not saved{kept}") from None
    if isinstance(error, OSError):
        raise CheckpointError(f"{final}: checkpoint not saved ({error}){kept}") from None
    if isinstance(error, CheckpointException):
        raise checkpoint_failure(error, final, f"checkpoint not saved{kept}") from None
    raise CheckpointError(f"{final}: checkpoint not saved (it failed on another rank){kept}")


def checkpoint_step(path: Path) -> int:
    """The step ``complete.json`` records."""
    step = _read_json(path / "complete.json").get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / 'complete.json'}: no valid 'step' ({step!r})")
    return step


def verify_checkpoint(path: Path, dist_info: DistInfo) -> tuple[Any, dict[str, Any]]:
    """Cheap checks of everything a resume reads, before any tensor is touched: ``complete.json``,
    ``model_config.json``, this rank's ``train_state_rank{R}.json``, the DCP index and the length of every
    data file it lists. Returns (index, train state); a damaged file is a ``CheckpointError`` naming it.
    Written by another number of processes, every saved rank's train state is checked, and this rank gets
    that of saved rank ``rank % saved world size`` (step, RNG; the trainer merges the data states)."""
    checkpoint_step(path)
    read_model_config(path)
    states = read_train_states(path)
    return read_metadata(path), states[dist_info.rank % len(states)]


def saved_world_size(path: Path) -> int:
    """How many processes wrote checkpoint ``path``."""
    n = _read_json(path / "complete.json").get("world_size", 1)
    if not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{path / 'complete.json'}: no valid 'world_size' ({n!r})")
    return n


def read_train_states(path: Path) -> list[dict[str, Any]]:
    """Every saved rank's ``train_state_rank{R}.json``, by rank."""
    return [_read_json(path / f"train_state_rank{rank}.json") for rank in range(saved_world_size(path))]


def is_checkpoint_or_run(path: str | Path) -> bool:
    """A complete training checkpoint, or a run folder that holds one."""
    p = Path(path)
    return (p / "complete.json").is_file() or latest_checkpoint(p) is not None


def load_model_weights(path: Path, model: nn.Module) -> None:
    """The model tensors of checkpoint ``path`` into ``model`` (sharded or not), each rank reading its shards."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    dcp_load(state, path)
    set_model_state_dict(model, state["model"])


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    dist_info: DistInfo, verified: tuple[Any, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Load model (+ optimizer) tensors in place; return this rank's train state dict.

    ``verified``: what :func:`verify_checkpoint` returned for ``path`` (read now when None); its index
    is the one the load uses.
    """
    metadata, train_state = verified if verified is not None else verify_checkpoint(path, dist_info)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp_load(state, path, metadata)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return train_state


def resume_latest(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  dist_info: DistInfo, check: Callable[[Path], None] | None = None,
                  ) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint of ``run_dir`` that is intact; None when there is none at all.

    A damaged checkpoint (unreadable JSON, missing or refused ``.metadata``, a missing or truncated data
    file, a tensor that does not load) is skipped for the next older one; once one loads, the damaged ones
    are moved aside to ``checkpoints/damaged-step_N`` (kept for inspection, no longer counted, so never
    pruned in place of a good one) and one warning line names each and why. If none loads, nothing is
    moved and the error lists them all.
    ``check(path)`` runs before loading (e.g. the architecture comparison); what it raises propagates.
    Every rank takes the same decision (the checks are agreed with an all-reduce; DCP's load fails on
    all ranks alike).
    """
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            try:
                verified = verify_checkpoint(path, dist_info)
                problem = None
            except CheckpointError as e:
                verified, problem = None, str(e)
            (n_bad,) = all_reduce_sum([0.0 if problem is None else 1.0], dist_info.device)
            if n_bad:
                raise CheckpointError(problem or f"{path}: damaged (found by another rank)")
            if check is not None:
                check(path)
            train_state = load_checkpoint(path, model, optimizer, dist_info, verified)
        except CheckpointError as e:
            damaged.append((path, str(e)))
            continue
        for bad, _ in damaged:
            _set_aside(bad, dist_info)
        if damaged:
            _warn(dist_info, "; ".join(f"{p} is damaged ({why}), moved to damaged-{p.name}" for p, why in damaged)
                  + f"; resuming from {path.name}, the newest intact checkpoint")
        barrier()
        return path, train_state
    if damaged:
        raise CheckpointError(f"{checkpoint_dir(run_dir)}: no intact checkpoint to resume from: "
                              + "; ".join(why for _, why in damaged))
    return None


def _warn(dist_info: DistInfo, message: str) -> None:
    if dist_info.is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _set_aside(path: Path, dist_info: DistInfo) -> None:
    if not dist_info.is_main:
        return
    target = path.with_name(f"damaged-{path.name}")
    if target.exists():
        target = path.with_name(f"damaged-{path.name}-{secrets.token_hex(4)}")
    with contextlib.suppress(OSError):
        path.rename(target)


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
    dcp_load(state, path)
    return state["model"]
