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
    """Write checkpoint ``checkpoint`` as a model folder ``out``; returns the output path."""
    import json
    from pathlib import Path

    from torchblt.formats import load_model
    from torchblt.formats.common import build_model
    from torchblt.train import checkpoint as ckpt
    from torchblt.train.kinds import get_kind
    from torchblt.train.trainer import export_state

    path = ckpt.resolve_checkpoint(checkpoint)
    out_path = Path(out)
    if (out_path / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out_path / 'config.json'} exists; pass --overwrite to replace it")
    record = ckpt.read_model_config(path)
    config = get_kind(record["kind"]).make_config(record["arch"])
    model = build_model(config, device="cpu")
    ckpt.load_weights_only(path, model)
    em = None
    if entropy_model and record.get("entropy_model"):
        em = load_model(record["entropy_model"])
    step = json.loads((path / "complete.json").read_text(encoding="utf-8"))["step"]
    export_state(model.state_dict(), config, out_path, em, extra={"trained_steps": step, "kind": record["kind"]})
    return out_path


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, args.overwrite, not args.no_entropy_model)
    print(f"wrote {out}")
    return 0
