"""Command-line options that several commands share: one definition each, and their conversion to the
library's arguments (not a command: it has no ``register``)."""

from __future__ import annotations

import argparse
from typing import Any

from torchblt.data.config import TRAIN_PATCHING_MODES

# PatchingConfig field -> the argparse dest of its override flag
PATCHING_FLAGS = {"mode": "patching", "threshold": "threshold", "patch_size": "patch_size"}


def add_patching_options(parser: argparse.ArgumentParser) -> None:
    """``--patching``, ``--threshold``, ``--patch-size``: override a BLT's ``config.patching``."""
    parser.add_argument("--patching", choices=list(TRAIN_PATCHING_MODES), help="override the patching mode")
    parser.add_argument("--threshold", type=float, help="override the entropy threshold")
    parser.add_argument("--patch-size", type=float, help="static patch size (with --patching static)")


def patching_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The patching overrides given on the command line, as ``PatchingConfig`` field changes."""
    return {name: getattr(args, dest) for name, dest in PATCHING_FLAGS.items() if getattr(args, dest, None) is not None}


def refuse_patching_options(args: argparse.Namespace, why: str) -> None:
    """Raise ``ValueError`` naming the first patching override given (for models that are not patched)."""
    for name in patching_changes(args):
        raise ValueError(f"--{PATCHING_FLAGS[name].replace('_', '-')} {why}")
