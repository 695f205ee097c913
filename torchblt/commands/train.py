"""``blt train CONFIG.yaml key=value ...``: train a BLT, an entropy model or a byte baseline.

Re-running the same command on a run folder that has checkpoints resumes from the latest one. Under
``torchrun`` every process runs this command; see ``docs/training.md``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from torchblt.train.__main__ import add_arguments

    p = subparsers.add_parser("train", help="train a model from raw bytes (BLT, entropy model, byte baseline)",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchblt.train.__main__ import run_training

    run_training(args.config, args.overrides, args.run_dir, args.print_config)
    return 0
