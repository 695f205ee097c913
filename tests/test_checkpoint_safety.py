"""Training checkpoints cannot run code, and damaged ones are recovered from.

A tiny run (2 steps, one checkpoint per step; ``tiny_run`` in conftest) is trained once and copied per test. A malicious
``.metadata`` (a pickle whose reduce calls ``os.system``, which would create a marker file) is refused by
``blt export``, by resume and by ``model.init_from``; so is a pickled byte item in a ``.distcp`` file.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.train import overrides
from torchblt.cli import main as blt_main
from torchblt.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


class _RunsCode:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison_metadata(step_dir: Path, marker: Path) -> Path:
    path = step_dir / ".metadata"
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    return path


# ---------------------------------------------------------------------------------------------- cannot run code


def test_malicious_metadata_refused_by_export(run_copy, tmp_path, one_line_error):
    _, run = run_copy
    marker = tmp_path / "pwned"
    bad = _poison_metadata(ckpt.latest_checkpoint(run), marker)
    out = tmp_path / "out"
    assert blt_main(["export", str(run), str(out)]) == 2
    err = one_line_error()
    assert str(bad) in err and "refused to load" in err and "system" in err
    assert not marker.exists() and not out.exists()


def test_malicious_metadata_refused_on_resume(run_copy, tmp_path, one_line_error):
    train, run = run_copy
    marker = tmp_path / "pwned"
    for step_dir in ckpt.list_checkpoints(run):  # every checkpoint poisoned: nothing to fall back to
        _poison_metadata(step_dir, marker)
    assert blt_main(["train", *overrides(run, train, steps=4)]) == 2
    err = one_line_error()
    assert "step_00000002/.metadata" in err and "refused to load" in err
    assert not marker.exists()


def test_malicious_metadata_refused_by_init_from(run_copy, tmp_path, one_line_error):
    train, run = run_copy
    marker = tmp_path / "pwned"
    step_dir = ckpt.latest_checkpoint(run)
    bad = _poison_metadata(step_dir, marker)
    for source in (step_dir, run):  # a checkpoint folder, or the run folder (its newest checkpoint)
        args = overrides(tmp_path / "new", train, steps=1) + [f"model.init_from={source}"]
        assert blt_main(["train", *args]) == 2
        err = one_line_error()
        assert str(bad) in err and "refused to load" in err
    assert not marker.exists()


def test_pickled_byte_item_that_runs_code_is_refused(run_copy, tmp_path, one_line_error):
    """The optimizer's hyper-parameters are pickled "byte items" inside the .distcp files; stock DCP
    unpickles them with weights_only=False."""
    from torchblt.train.safe_dcp import read_metadata

    train, run = run_copy
    marker = tmp_path / "pwned"
    for step_dir in ckpt.list_checkpoints(run):
        md = read_metadata(step_dir)
        (step_dir / "evil.distcp").write_bytes(b"")
        with (step_dir / "evil.distcp").open("wb") as f:
            torch.save(_RunsCode(marker), f)
        size = (step_dir / "evil.distcp").stat().st_size
        for index, info in md.storage_data.items():
            if index.fqn == "optim.param_groups.0.lr":
                info.relative_path, info.offset, info.length = "evil.distcp", 0, size
        md.storage_meta = None
        (step_dir / ".metadata").write_bytes(pickle.dumps(md))
    assert blt_main(["train", *overrides(run, train, steps=4)]) == 2
    err = one_line_error()
    assert "evil.distcp" in err and "optim.param_groups.0.lr" in err and "refused" in err
    assert not marker.exists()


def test_metadata_cannot_point_outside_the_checkpoint(run_copy):
    from torchblt.formats.common import CheckpointError
    from torchblt.train.safe_dcp import read_metadata

    _, run = run_copy
    step_dir = ckpt.latest_checkpoint(run)
    md = read_metadata(step_dir)
    next(iter(md.storage_data.values())).relative_path = "../../outside.distcp"
    (step_dir / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"'\.\./\.\./outside\.distcp' is not a file inside the checkpoint"):
        read_metadata(step_dir)


def test_training_checkpoint_loads_as_a_model(run_copy, tmp_path):
    """What the safe reader admits is what real checkpoints hold: load_model on a run / checkpoint folder
    gives the weights blt export writes (FSDP2 2-process checkpoints: tests/test_train_distributed.py)."""
    from torchblt import load_model

    _, run = run_copy
    assert blt_main(["export", str(run), str(tmp_path / "out")]) == 0
    exported = load_model(tmp_path / "out")
    for source in (run, ckpt.latest_checkpoint(run)):
        model = load_model(source)
        assert type(model) is type(exported)
        for (k, a), (_, b) in zip(model.state_dict().items(), exported.state_dict().items()):
            assert torch.equal(a, b), k


def test_checkpoint_kind_never_imports_a_module(run_copy, tmp_path, monkeypatch, one_line_error):
    import json

    _, run = run_copy
    step_dir = ckpt.latest_checkpoint(run)
    record = json.loads((step_dir / "model_config.json").read_text())
    (tmp_path / "plugin_that_runs_code.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    record["kind"] = "plugin_that_runs_code:blt"
    (step_dir / "model_config.json").write_text(json.dumps(record))
    assert blt_main(["export", str(step_dir), str(tmp_path / "out")]) == 2
    err = one_line_error()
    assert "model_config.json" in err and "never makes torchblt import code" in err
    assert not (tmp_path / "pwned").exists() and "plugin_that_runs_code" not in sys.modules


# ---------------------------------------------------------------------------------------------- damaged checkpoints


def _last_item_offset(step_dir: Path) -> int:
    from torchblt.train.safe_dcp import read_metadata

    return max(info.offset for info in read_metadata(step_dir).storage_data.values())


DAMAGE = {
    "truncated shard": lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:-100]),
    "missing .metadata": lambda d: (d / ".metadata").unlink(),
    "corrupt train_state_rank0.json": lambda d: (d / "train_state_rank0.json").write_text('{"step": 2, "da'),
    "empty complete.json": lambda d: (d / "complete.json").write_text(""),
    "corrupt model_config.json": lambda d: (d / "model_config.json").write_bytes(b"\xff\xfe"),
    # the last tensor of the shard does not load: the ones before it were already copied into the model,
    # so the fallback must overwrite them all (the losses below prove it)
    "garbled tensor": lambda d: _garble(d / "__0_0.distcp", _last_item_offset(d)),
}
DAMAGED_FILE = {"truncated shard": "__0_0.distcp", "missing .metadata": ".metadata", "garbled tensor": "",
                "corrupt train_state_rank0.json": "train_state_rank0.json", "empty complete.json": "complete.json",
                "corrupt model_config.json": "model_config.json"}


def _garble(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\0" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, tiny_run, run_copy, capsys):
    from tests.helpers.train import read_metrics

    train, run = run_copy
    latest = ckpt.latest_checkpoint(run)
    DAMAGE[damage](latest)
    assert blt_main(["train", *overrides(run, train, steps=2)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert f"{latest} is damaged (" in warnings[0] and DAMAGED_FILE[damage] in warnings[0]
    assert "resuming from step_00000001" in warnings[0]
    assert (latest.parent / "damaged-step_00000002").is_dir()  # kept for inspection, out of the way
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    # resumed from step 1: step 2 is trained again, bitwise as in the uninterrupted run
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(tiny_run[1])]


def test_no_intact_checkpoint_is_one_error_and_moves_nothing(run_copy, one_line_error):
    train, run = run_copy
    for step_dir in ckpt.list_checkpoints(run):
        DAMAGE["missing .metadata"](step_dir)
    assert blt_main(["train", *overrides(run, train, steps=3)]) == 2
    err = one_line_error()
    assert "no intact checkpoint to resume from" in err and "step_00000001/.metadata: missing" in err
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000001", "step_00000002"]


def test_export_of_a_damaged_checkpoint_names_the_file(run_copy, tmp_path, one_line_error):
    _, run = run_copy
    DAMAGE["truncated shard"](ckpt.latest_checkpoint(run))
    assert blt_main(["export", str(run), str(tmp_path / "out")]) == 2
    assert "step_00000002/__0_0.distcp: truncated" in one_line_error()
    assert not (tmp_path / "out").exists()


def test_stale_temp_folder_never_blocks_a_save(run_copy, monkeypatch):
    train, run = run_copy
    stale = run / "checkpoints" / ".tmp-step_00000003"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "__0_0.distcp").write_bytes(b"half a save")
    real_rmtree = shutil.rmtree

    def cannot_remove(path, *args, **kwargs):  # e.g. files held open on NFS
        if ".tmp-step_00000003" in str(path) and "step_00000003" != Path(path).name:
            return None
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", cannot_remove)
    assert blt_main(["train", *overrides(run, train, steps=3)]) == 0
    assert ckpt.latest_checkpoint(run).name == "step_00000003"
    assert [p for p in (run / "checkpoints").glob(".tmp-stale-*")]  # renamed aside, retried by the next save


def test_full_disk_keeps_the_previous_checkpoint(run_copy, tmp_path, monkeypatch, capsys):
    import errno

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    def no_space(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    train, run = run_copy
    monkeypatch.setattr(FileSystemWriter, "write_data", no_space)
    assert blt_main(["train", *overrides(run, train, steps=3)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        f"blt train: error: no space left on device: {run / 'checkpoints' / 'step_00000003'} (checkpoint not "
        "saved; the previous checkpoint step_00000002 is intact)"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    # a first checkpoint that does not fit leaves no empty checkpoints/ folder
    fresh = tmp_path / "fresh"
    assert blt_main(["train", *overrides(fresh, train, steps=1)]) == 2
    assert "no space left on device" in capsys.readouterr().err
    assert not (fresh / "checkpoints").exists()
    monkeypatch.undo()
    assert blt_main(["train", *overrides(run, train, steps=3)]) == 0  # resumes from the intact step 2
    assert ckpt.latest_checkpoint(run).name == "step_00000003"


def test_no_code_path_deserialises_around_the_safe_readers():
    """A guard for later changes: DCP is read only through safe_dcp, torch.load only with weights_only=True,
    and nothing else unpickles."""
    import ast

    root = Path(__file__).resolve().parents[1] / "torchblt"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else (
                f.id if isinstance(f, ast.Name) else "")
            safe_dcp = rel == "torchblt/train/safe_dcp.py"
            if name == "torch.load":
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
            elif name in ("dcp.load", "pickle.load", "pickle.loads", "FileSystemReader") and not safe_dcp:
                offenders.append(f"{rel}:{node.lineno}: {name}")
    assert offenders == []
