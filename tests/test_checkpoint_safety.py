"""Training checkpoints cannot run code, and damaged ones are recovered from.

A tiny run (2 steps, one checkpoint per step; ``tiny_run`` in conftest) is trained once and copied per test. A malicious
``.metadata`` (a pickle whose reduce calls ``os.system``, which would create a marker file) is refused by
``blt export``, by resume and by ``model.init_from``; so is a pickled byte item in a ``.distcp`` file.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from tests.train_helpers import overrides
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
