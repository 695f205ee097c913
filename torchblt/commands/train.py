"""``blt train CONFIG.yaml key=value ...``: train a BLT, an entropy model or a byte baseline.

Re-running the same command on a run folder that has checkpoints resumes from the latest one. Under
``torchrun`` every process runs this command (``torchrun ... -m torchblt.train CONFIG ...`` is the same
command line); see ``docs/training.md``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run config (YAML); e.g. configs/quickstart-blt.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.steps=200")
    parser.add_argument("--run-dir", help="run folder (overrides run_dir in the config)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from raw bytes (BLT, entropy model, byte baseline)",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchblt.train.trainer import run_training

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # no config file: the first argument is an override
    run_training(config, overrides, args.run_dir, args.print_config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m torchblt.train ...`` (what ``torchrun`` launches): this command on its own."""
    from torchblt.cli import run_reporting_errors
    from torchblt.commands.options import OneLineParser

    parser = OneLineParser(prog="python -m torchblt.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors("train", lambda: run(args))
