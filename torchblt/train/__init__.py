"""Training: ``blt train CONFIG.yaml key=value ...`` (or ``torchrun -m torchblt.train ...``).

``config`` (run config), ``kinds`` (what can be trained), ``schedule``, ``state`` (resume state),
``checkpoint`` (DCP, atomic), ``distributed`` (process group, ``parallelize``), ``metrics`` (logging,
FLOPs, MFU), ``trainer`` (the loop).
"""

from torchblt.train.kinds import KINDS, LossOutput, ModelKind, get_kind, register_kind

__all__ = ["KINDS", "LossOutput", "ModelKind", "get_kind", "register_kind", "train"]


def train(config_path=None, overrides=None, run_dir=None, **kwargs):
    """Load a run config and train; see :func:`torchblt.train.trainer.run_training`."""
    from torchblt.train.trainer import run_training

    return run_training(config_path, overrides or [], run_dir=run_dir, **kwargs)
