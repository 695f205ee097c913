"""Two CPU processes (gloo) train exactly like one process with the same global batch.

Tolerance: losses and gradient norms agree to 1e-5 relative (measured: <= 1.5e-7; the only difference is
the order of fp32 additions in the reductions). FSDP2 (sharded, stopped by a signal on one rank and
resumed on 2 processes) and replicate (DDP-like, slow).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.train import overrides, read_metrics, write_corpus
from torchblt.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, args: list[str], **env_extra: str) -> None:
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env_extra)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


@pytest.mark.parametrize("kind,data_parallel,signal_one_rank", [
    ("blt", "fsdp", True),
    pytest.param("entropy", "replicate", False, marks=pytest.mark.slow),
])
def test_two_processes_match_one(tmp_path, kind, data_parallel, signal_one_rank):
    train, _ = write_corpus(tmp_path / "data")
    common = ["data.batch_size=4", "train.grad_accum=2", f"train.data_parallel={data_parallel}",
              "checkpoint.every=3"]
    launch(1, overrides(tmp_path / "one", train, kind, steps=4) + common)
    two = overrides(tmp_path / "two", train, kind, steps=4) + common
    if signal_one_rank:
        # SIGTERM reaches rank 1 only, during step 2: both ranks stop after step 2 and save one checkpoint
        launch(2, two, TEST_SIGNAL_RANK1_AT_STEP="2")
        last = ckpt.latest_checkpoint(tmp_path / "two")
        assert last.name == "step_00000002"
        assert sorted(p.name for p in last.glob("train_state_rank*.json")) == ["train_state_rank0.json",
                                                                               "train_state_rank1.json"]
        assert [r["step"] for r in read_metrics(tmp_path / "two")] == [1, 2]
    launch(2, two)  # (resumes from step 2 when stopped)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):  # measured: <= 1.5e-7 relative
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["bytes_per_s"] > 0 and b["bytes_seen"] == a["bytes_seen"]  # metrics summed over ranks


@pytest.mark.slow
def test_damage_seen_by_one_rank_makes_both_fall_back(tmp_path):
    """Only rank 1's train state of the latest checkpoint is damaged: both ranks agree to resume from the
    previous one (a rank that decided alone would hang the other in the collective load)."""
    train, _ = write_corpus(tmp_path / "data")
    args = overrides(tmp_path / "two", train, "blt", steps=2) + ["data.batch_size=4", "checkpoint.every=1",
                                                                "checkpoint.keep=5"]
    launch(2, args)
    latest = ckpt.latest_checkpoint(tmp_path / "two")
    (latest / "train_state_rank1.json").write_text("{")
    launch(2, args)
    assert (latest.parent / "damaged-step_00000002").is_dir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "two")] == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in read_metrics(tmp_path / "two")] == [1, 2]
