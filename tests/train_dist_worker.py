"""One process of the multi-process trainer tests (launched by tests/test_train_distributed.py and
tests/test_train_scale.py with the torchrun environment variables). Not a test module.

Arguments are dotted run-config overrides; ``--`` separates several runs done one after the other in
the same process group. By default every rank reads the same global batches (a one-process loader with
the global batch size) and keeps its own slice of rows, so a run on N processes sees exactly the data
of a one-process run; ``TEST_PLAIN_LOADER=1`` uses the trainer's own per-rank loader instead.

Worker-only arguments: ``check=PATH`` compares this rank's shards with the tensors of PATH (a model
folder or a training checkpoint); ``count_comm=1`` counts the collectives of the second step;
``init_only=1`` stops after building the trainer. Each run writes ``RUN_DIR/report_rank{R}.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
from pathlib import Path

import torch


class RankSlice:
    """Wraps a loader of global batches; yields this rank's rows."""

    def __init__(self, loader, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __iter__(self):
        for b in self.loader:
            n = b.x.shape[0] // self.world_size
            rows = slice(self.rank * n, (self.rank + 1) * n)
            pl = None
            if b.patch_lengths is not None:
                pl = b.patch_lengths[rows]
                pl = pl[:, : int((pl > 0).sum(1).max())]  # drop columns that are padding for every row kept
            yield dataclasses.replace(b, x=b.x[rows], y=b.y[rows], mask=b.mask[rows], patch_lengths=pl)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: VmHWM is reset to the current RSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mb() -> float:
    """Peak RSS since the last :func:`reset_peak` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_state(path: str) -> dict[str, torch.Tensor]:
    """The full tensors of a model folder or a training checkpoint, in one process."""
    from torchblt.train import checkpoint as ckpt

    if ckpt.is_checkpoint_or_run(path):
        folder = ckpt.resolve_checkpoint(path)
        return ckpt.read_weights(folder, ckpt.checkpoint_model_config(folder)[0])
    from torchblt import load_model

    return load_model(path).state_dict()


def run(argv: list[str], rank: int, world: int) -> None:
    from torchblt.data import build_loader
    from torchblt.train.config import load_config
    from torchblt.train.hash_sharding import local_slices, row_tables
    from torchblt.train.kinds import get_kind
    from torchblt.train.trainer import Trainer

    extra = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("check", "count_comm", "init_only"))
    cfg = load_config(None, [a for a in argv if a.split("=", 1)[0] not in extra])
    loader = None
    if not os.environ.get("TEST_PLAIN_LOADER"):
        data_cfg = dataclasses.replace(cfg.data, kind=get_kind(cfg.model.kind).data_kind)
        loader = RankSlice(build_loader(data_cfg), rank, world)  # the one-process stream of global batches
        cfg.data.batch_size //= world
    reset_peak()
    before = rss_mb()
    trainer = Trainer(cfg, loader=loader)
    report: dict = {"rss_before_mb": before, "peak_after_init_mb": peak_mb(),
                    "tables_row_sharded": bool(row_tables(trainer.model)) and trainer.dist.mesh is not None}
    locals_ = {name: local_slices(t) for name, t in trainer.model.state_dict().items()}
    report["local_bytes"] = sum(t.numel() * t.element_size() for t, _ in locals_.values())
    report["global_bytes"] = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
    if "check" in extra:
        want = reference_state(extra["check"])
        report["shards_equal"] = sorted(want) == sorted(locals_) and all(
            torch.equal(t, want[name][index]) for name, (t, index) in locals_.items())
    stop_at = int(os.environ.get("TEST_SIGNAL_RANK1_AT_STEP", "0"))
    step = trainer.train_step
    if (stop_at and rank == 1) or extra.get("count_comm"):
        from torchblt.train.distributed import count_collectives

        def train_step():
            if stop_at and rank == 1 and trainer.state.step + 1 == stop_at:
                trainer.signal_received = 15  # a signal reaching one rank only, during step `stop_at`
            if extra.get("count_comm") and trainer.state.step == 1:
                with count_collectives() as volume:
                    out = step()
                report["comm_bytes"], report["comm_calls"] = volume.bytes, volume.calls
                return out
            return step()

        trainer.train_step = train_step
    if not extra.get("init_only"):
        trainer.fit()
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / f"report_rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    runs, cur = [], []
    for a in argv:
        if a == "--":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    for args in [*runs, cur]:
        run(args, rank, world)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
