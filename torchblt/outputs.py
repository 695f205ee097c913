"""Writing what a command produces without losing anything: the one place that decides.

* :func:`refuse_existing` takes every path a command will write (files, and folders that must be empty)
  and raises one ``FileExistsError`` naming each that exists, unless ``overwrite``. Commands call it with
  the whole list *before* doing any work, so a refusal costs nothing and writes nothing.
* :func:`staged` is the writing itself: inside ``with staged(overwrite) as out``, ``out.path(final)`` gives
  a unique temporary sibling of ``final`` to write (hidden name, same folder, so the final rename is
  atomic). When the block succeeds the files are moved into place; without ``overwrite`` the move refuses
  a file that appeared meanwhile (a hard link never replaces). When the block fails, the temporary files
  are removed and so are the folders the block created: a failure leaves no partial file and no empty
  folder, and a re-run is not refused.
* A full disk becomes :class:`DiskFullError`, one line: ``no space left on device: PATH``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["DiskFullError", "Staged", "disk_full_error", "is_disk_full", "refuse_existing", "staged"]


class DiskFullError(OSError):
    """``no space left on device: PATH``."""

    def __init__(self, path: str | os.PathLike[str], note: str = "") -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))
        self.note = note

    def __str__(self) -> str:
        return f"no space left on device: {self.filename}" + (f" ({self.note})" if self.note else "")


def is_disk_full(e: BaseException) -> bool:
    """An ENOSPC ``OSError``, a library error that wraps one (safetensors), or DCP's per-rank failures holding one."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.CheckpointException
    if isinstance(failures, dict):
        return any(isinstance(f, tuple) and f and is_disk_full(f[0]) for f in failures.values())
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def disk_full_error(e: BaseException, path: str | os.PathLike[str] | None = None) -> DiskFullError | None:
    """``e`` as a :class:`DiskFullError` (naming ``path``, else the file ``e`` names) if it is one, else None."""
    if isinstance(e, DiskFullError):
        return e
    if not is_disk_full(e):
        return None
    return DiskFullError(path if path is not None else getattr(e, "filename", None) or "?")


def _exists(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())  # an empty folder may be written into
    return path.exists() or path.is_symlink()


def refuse_existing(paths: Iterable[str | os.PathLike[str]], overwrite: bool,
                    remedy: str = "pass --overwrite to replace") -> None:
    """Raise ``FileExistsError`` naming every path of ``paths`` that exists (a folder: that is not empty)."""
    if overwrite:
        return
    found = [str(p) for p in dict.fromkeys(Path(p) for p in paths) if _exists(p)]
    if len(found) == 1:
        raise FileExistsError(f"{found[0]} exists; {remedy}{' it' if remedy.endswith('replace') else ''}")
    if found:
        shown = ", ".join(found[:8]) + (f" (+{len(found) - 8} more)" if len(found) > 8 else "")
        raise FileExistsError(f"{shown} exist; {remedy}{' them' if remedy.endswith('replace') else ''}")


class Staged:
    """The files of one write, under temporary names until :meth:`commit` (see the module docstring)."""

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._moves: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def path(self, final: str | os.PathLike[str]) -> Path:
        """A temporary path to write ``final``'s content to (its folder is created if needed)."""
        final = Path(final)
        if not self.overwrite:
            refuse_existing([final], False)
        self._make_dirs(final.parent)
        tmp = final.parent / f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        self._moves.append((tmp, final))
        return tmp

    def write_text(self, final: str | os.PathLike[str], text: str) -> None:
        self.path(final).write_text(text, encoding="utf-8")

    def write_bytes(self, final: str | os.PathLike[str], data: bytes) -> None:
        self.path(final).write_bytes(data)

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            d.mkdir()
            self._created.append(d)

    def final_of(self, name: str | os.PathLike[str] | None) -> Path | None:
        """The final path a temporary file (or a final path) belongs to."""
        for tmp, final in self._moves:
            if name is not None and str(name) in (str(tmp), str(final)):
                return final
        return self._moves[-1][1] if self._moves else None

    def commit(self) -> None:
        if not self.overwrite:
            refuse_existing([final for _, final in self._moves], False)
        for tmp, final in self._moves:
            if self.overwrite:
                os.replace(tmp, final)
                continue
            try:
                os.link(tmp, final)  # never replaces: refuses a file that appeared while we wrote
            except FileExistsError:
                raise FileExistsError(f"{final} exists (it appeared while writing); pass --overwrite to replace "
                                      "it") from None
            except OSError:  # a filesystem without hard links
                refuse_existing([final], False)
                os.replace(tmp, final)
            else:
                os.unlink(tmp)
        self._moves.clear()
        self._created.clear()

    def abort(self) -> None:
        for tmp, _ in self._moves:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for d in reversed(self._created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: what else landed there is not ours to remove
        self._moves.clear()
        self._created.clear()


@contextlib.contextmanager
def staged(overwrite: bool = False) -> Iterator[Staged]:
    """All-or-nothing writing of several files (see the module docstring)."""
    out = Staged(overwrite)
    try:
        yield out
        out.commit()
    except BaseException as e:
        full = disk_full_error(e, out.final_of(getattr(e, "filename", None)))
        out.abort()
        if full is not None and full is not e:
            raise full from None
        raise
