"""Two CPU processes (gloo) train exactly like one process with the same global batch.

Tolerance: losses and gradient norms agree to 1e-5 relative (the only difference is the order of fp32
additions in the gradient reduce-scatter/all-reduce). Both FSDP2 (sharded) and replicate (DDP-like).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_helpers import overrides, read_metrics, write_corpus
from torchblt.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, args: list[str]) -> None:
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


@pytest.mark.parametrize("kind,data_parallel,resume", [
    ("blt", "fsdp", False),
    pytest.param("entropy", "replicate", True, marks=pytest.mark.slow),
])
def test_two_processes_match_one(tmp_path, kind, data_parallel, resume):
    train, _ = write_corpus(tmp_path / "data")
    common = ["data.batch_size=4", "train.grad_accum=2", f"train.data_parallel={data_parallel}",
              "checkpoint.every=2"]
    launch(1, overrides(tmp_path / "one", train, kind, steps=4) + common)
    launch(2, overrides(tmp_path / "two", train, kind, steps=4) + common)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["bytes_per_s"] > 0 and b["bytes_seen"] == a["bytes_seen"]  # metrics summed over ranks
    # the sharded checkpoint has one state file per rank (and resumes on 2 processes)
    last = ckpt.latest_checkpoint(tmp_path / "two")
    assert sorted(p.name for p in last.glob("train_state_rank*.json")) == ["train_state_rank0.json",
                                                                           "train_state_rank1.json"]
    if not resume:
        return
    launch(2, overrides(tmp_path / "two", train, kind, steps=6) + common)
    assert [r["step"] for r in read_metrics(tmp_path / "two")] == [1, 2, 3, 4, 5, 6]
