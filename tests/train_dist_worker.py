"""One process of the 2-process equivalence test (launched by tests/test_train_distributed.py with the
torchrun environment variables). Not a test module.

Every rank reads the same global batches (a one-process loader with the global batch size) and keeps
its own slice of rows, so a run on N processes sees exactly the data of a one-process run.
"""

from __future__ import annotations

import dataclasses
import os
import sys

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


def main(argv: list[str]) -> None:
    from torchblt.data import build_loader
    from torchblt.train.config import load_config
    from torchblt.train.kinds import get_kind
    from torchblt.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(None, argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    data_cfg = dataclasses.replace(cfg.data, kind=get_kind(cfg.model.kind).data_kind)
    loader = RankSlice(build_loader(data_cfg), rank, world)  # the one-process stream of global batches
    cfg.data.batch_size //= world
    trainer = Trainer(cfg, loader=loader)
    stop_at = int(os.environ.get("TEST_SIGNAL_RANK1_AT_STEP", "0"))
    if stop_at and rank == 1:  # a signal reaching one rank only, during step `stop_at`
        step = trainer.train_step

        def train_step():
            if trainer.state.step + 1 == stop_at:
                trainer.signal_received = 15
            return step()

        trainer.train_step = train_step
    trainer.fit()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
