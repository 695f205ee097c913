"""``python -m torchblt.train CONFIG.yaml key=value ...`` — the entry point ``torchrun`` launches
(``torchrun --nproc-per-node N -m torchblt.train CONFIG ...``); ``blt train`` calls the same function."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run config (YAML); e.g. configs/quickstart-blt.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.steps=200")
    parser.add_argument("--run-dir", help="run folder (overrides run_dir in the config)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_training(config_path: str | None, overrides: list[str], run_dir: str | None = None,
                 print_config: bool = False) -> dict[str, Any]:
    from torchblt.train.config import config_to_yaml, load_config
    from torchblt.train.trainer import Trainer, TrainingDiverged

    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides, config_path = [config_path, *overrides], None
    cfg = load_config(config_path, overrides + ([f"run_dir={run_dir}"] if run_dir else []))
    if print_config:
        print(config_to_yaml(cfg), end="")
        return {}
    try:
        return Trainer(cfg).fit()
    except TrainingDiverged as e:
        raise ValueError(str(e)) from None
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchblt.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from torchblt.cli import run_reporting_errors

    def train() -> int:
        run_training(args.config, args.overrides, args.run_dir, args.print_config)
        return 0

    return run_reporting_errors("train", train)


if __name__ == "__main__":
    sys.exit(main())
