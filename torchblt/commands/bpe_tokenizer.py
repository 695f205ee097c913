"""``blt bpe-tokenizer DATA... --vocab-size N --out tokenizer.json``: train the BPE baseline's byte-level
tokenizer (Hugging Face ``tokenizers``) on local files and report its mean bytes per token."""

from __future__ import annotations

import argparse
import json

from torchblt.validation import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bpe-tokenizer", help="train a byte-level BPE tokenizer for the BPE baseline")
    p.add_argument("data", nargs="+", help="training files or folders (.txt, .jsonl[.gz], .parquet, .arrow)")
    p.add_argument("--vocab-size", type=positive_int, required=True, help="vocabulary size, specials included (>= 259)")
    p.add_argument("--out", required=True, help="where to write tokenizer.json")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    p.add_argument("--max-bytes", type=positive_int, help="train on at most this many bytes (the first documents)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchblt.baselines.bpe import train_bpe_tokenizer
    from torchblt.data import iter_documents

    if args.max_bytes is not None and args.max_bytes < 1:
        raise ValueError(f"--max-bytes must be positive, got {args.max_bytes}")

    def documents():
        seen = 0
        for doc in iter_documents(args.data, text_field=args.text_field):
            yield doc
            seen += len(doc)
            if args.max_bytes is not None and seen >= args.max_bytes:
                return

    tok = train_bpe_tokenizer(documents(), args.vocab_size, args.out, overwrite=args.overwrite)
    bpt = tok.bytes_per_token(documents())
    print(json.dumps({"tokenizer": args.out, "vocab_size": tok.vocab_size, "bytes_per_token": round(bpt, 4)}))
    return 0
