"""The ``blt`` command line.

Sub-commands live in :mod:`torchblt.commands`, one module each; a module exposes
``register(subparsers) -> None`` which adds its parser and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code). Modules are discovered, so adding a command is
adding a file. Errors a user can fix (``ValueError``, ``FileNotFoundError``, ``FileExistsError``, a full
disk) are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import torchblt.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blt", description="Byte Latent Transformer tools")
    parser.add_argument("--version", action="version", version=f"torchblt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(torchblt.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"torchblt.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def _version() -> str:
    from torchblt import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"blt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from torchblt.outputs import disk_full_error

        full = disk_full_error(e)
        if full is None:
            raise
        print(f"blt {args.command}: error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
