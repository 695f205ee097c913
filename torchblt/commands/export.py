"""``blt export CKPT OUT``: a training checkpoint (or a run folder: its latest checkpoint) -> the inference
format that ``load_model`` reads (``config.json`` + ``model.safetensors``; a BLT trained with an entropy
model gets it in ``OUT/entropy_model``). Runs in one process whatever the number of training processes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="training checkpoint -> model folder that load_model reads",
                              description=__doc__)
    p.add_argument("checkpoint", help="checkpoint folder (RUN/checkpoints/step_N) or run folder (latest checkpoint)")
    p.add_argument("out", help="output model folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model in OUT")
    p.add_argument("--no-entropy-model", action="store_true", help="do not copy the entropy model into OUT")
    p.set_defaults(func=run)


def export_checkpoint(checkpoint: str, out: str, overwrite: bool = False, entropy_model: bool = True):
    """Write checkpoint ``checkpoint`` as a model folder ``out``; returns the output path.

    Every file it would write (``OUT/*`` and ``OUT/entropy_model/*``) is checked before anything is read:
    an existing one is refused unless ``overwrite``. The checkpoint is read safely (it cannot run code).
    """
    from pathlib import Path

    from torchblt.formats import load_model
    from torchblt.formats.native import model_files
    from torchblt.model.config import BLTConfig
    from torchblt.outputs import refuse_existing
    from torchblt.train import checkpoint as ckpt
    from torchblt.train.trainer import export_state

    path = ckpt.resolve_checkpoint(checkpoint)
    config, record = ckpt.checkpoint_model_config(path)
    em_path = record.get("entropy_model") if entropy_model and isinstance(config, BLTConfig) else None
    out_path = Path(out)
    refuse_existing(model_files(out_path, entropy_model=bool(em_path)), overwrite)
    step = ckpt.checkpoint_step(path)
    state = ckpt.read_weights(path, config)
    em = load_model(em_path) if em_path else None
    export_state(state, config, out_path, em, extra={"trained_steps": step, "kind": record["kind"]},
                 overwrite=overwrite)
    return out_path


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, args.overwrite, not args.no_entropy_model)
    print(f"wrote {out}")
    return 0
