"""The ``blt`` command line.

Sub-commands live in :mod:`torchblt.commands`, one module each; a module exposes
``register(subparsers) -> None`` which adds its parser and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code). Modules are discovered, so adding a command is
adding a file. Errors a user can fix (``ValueError``, ``FileNotFoundError``, ``FileExistsError``, a full
disk, and argparse's own usage errors) are printed as one line, ``blt COMMAND: error: ...``, with exit
code 2 and no traceback; deprecation notices of the package as ``blt COMMAND: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Callable, Iterator

import torchblt.commands
from torchblt.commands.options import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="blt", description="Byte Latent Transformer tools")
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


def user_error(e: BaseException) -> str | None:
    """The one line to print for an error a user can fix (bad input, missing file, existing output, full
    disk), or None for anything else (a bug: let the traceback show)."""
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)):
        return str(e)
    if isinstance(e, OSError):
        from torchblt.outputs import disk_full_error

        full = disk_full_error(e)
        return None if full is None else str(full)
    return None


def run_reporting_errors(prog: str, fn: Callable[[], int | None]) -> int:
    """``fn()``'s exit code; a user error is printed as ``PROG: error: ...`` (exit 2), Ctrl-C as ``PROG:
    interrupted`` (exit 130), standard output closed by its reader (``blt generate ... | head``) ends the
    command quietly (exit 141, a shell's code for SIGPIPE); anything else propagates with its traceback."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # what is still buffered for the closed pipe would fail again when Python flushes at exit
        # (the recipe of the signal module's documentation, "Note on SIGPIPE")
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout is not a file (a test's capture)
            pass
        return 141
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _short_warnings(prefix: str) -> Iterator[None]:
    """Our deprecation notices (FutureWarning) as ``PREFIX: warning: ...`` lines, not ``file:line: ...`` blocks."""
    saved = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, FutureWarning):
            print(f"{prefix}: warning: {message}", file=sys.stderr)
        else:
            saved(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed on one line)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with _short_warnings(f"blt {args.command}"):
        return run_reporting_errors(f"blt {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
