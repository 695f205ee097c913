"""Command-line options that several commands share: one definition each, and their conversion to the
library's arguments (not a command: it has no ``register``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from torchblt.data.config import TRAIN_PATCHING_MODES
from torchblt.validation import DTYPES, device_option, dtype_option, number, positive_float


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the option (the usage is one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


STDIN = "-"  # a text or file argument that reads standard input
STDIN_NAME = "<stdin>"  # standard input in tables and errors


def stdin_bytes() -> bytes:
    """All of standard input, as bytes."""
    return sys.stdin.buffer.read()


def stdin_text(what: str) -> str:
    """Standard input as one text argument (``-``): UTF-8, with one trailing newline dropped (``echo`` and
    most editors end a text with one; a text that needs it can come from a file). ``what`` names the
    argument in the error."""
    data = stdin_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} (standard input) is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


# PatchingConfig field -> the argparse dest of its override flag
PATCHING_FLAGS = {"mode": "patching", "threshold": "threshold", "patch_size": "patch_size"}


def add_patching_options(parser: argparse.ArgumentParser) -> None:
    """``--patching``, ``--threshold``, ``--patch-size``: override a BLT's ``config.patching``."""
    parser.add_argument("--patching", choices=list(TRAIN_PATCHING_MODES), help="override the patching mode")
    parser.add_argument("--threshold", type=number, help="override the entropy threshold")
    parser.add_argument("--patch-size", type=positive_float, help="static patch size (with --patching static)")


def patching_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The patching overrides given on the command line, as ``PatchingConfig`` field changes."""
    return {name: getattr(args, dest) for name, dest in PATCHING_FLAGS.items() if getattr(args, dest, None) is not None}


def refuse_patching_options(args: argparse.Namespace, why: str) -> None:
    """Raise ``ValueError`` naming the first patching override given (for models that are not patched)."""
    for name in patching_changes(args):
        raise ValueError(f"--{PATCHING_FLAGS[name].replace('_', '-')} {why}")


def add_device_option(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """``--device``: checked when parsed (``cuda`` on a machine without one is a one-line error)."""
    parser.add_argument("--device", type=device_option, default=default, metavar="DEVICE",
                        help=f"{help} (cpu, cuda, cuda:N, mps)")


def add_dtype_option(parser: argparse.ArgumentParser, default: str | None, help: str,
                     choices: tuple[str, ...] | None = None) -> None:
    """``--dtype``: one of ``choices`` (default: every name :data:`torchblt.validation.DTYPES` knows)."""
    parser.add_argument("--dtype", type=dtype_option if choices is None else str, default=default,
                        choices=None if choices is None else list(choices), metavar="DTYPE" if choices is None else None,
                        help=f"{help} ({', '.join(choices or sorted(DTYPES))})")
