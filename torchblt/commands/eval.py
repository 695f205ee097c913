"""``blt eval MODEL DATA...``: bits per byte (and nats per byte, mean patch length) per file and in total.

See :mod:`torchblt.eval.bpb` for exactly what is counted. DATA ``-`` is standard input as one document (its
bytes as they are, like a ``.txt`` file): ``cat notes.txt | blt eval -``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torchblt.commands.options import (
    STDIN,
    STDIN_NAME,
    add_device_option,
    add_dtype_option,
    add_patching_options,
    patching_changes,
    refuse_patching_options,
    stdin_bytes,
)
from torchblt.validation import non_negative_int, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="bits per byte of a model on text / JSONL / Parquet files",
        description="Bits per byte of a BLT, byte LM or BPE LM: each document is BOS + bytes + EOS; every byte "
        "and the EOS are scored, the EOS counting as one byte. Documents longer than the context are scored in "
        "overlapping windows (every byte once, with at least half a context of history).",
    )
    p.add_argument("model", help="model folder (any supported format) or hub repo id; omitted (the first argument "
                   "is a data file): the built-in model")
    p.add_argument("data", nargs="*", help=".txt (one document per file), .jsonl[.gz], .parquet or .arrow files; - : standard input "
                   "as one document")
    p.add_argument("--entropy-model", help="entropy model folder for entropy patching (default: MODEL/entropy_model)")
    add_patching_options(p)
    p.add_argument("--context-bytes", type=int, help="window length in tokens (default: the model's)")
    p.add_argument("--max-docs", type=non_negative_int, help="evaluate at most this many documents per file")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default 8)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text (default text)")
    p.add_argument("--no-eos", action="store_true", help="do not append or score an EOS per document")
    p.add_argument("--on-bad-record", choices=["skip", "error"], default="skip",
                   help="records without text (missing field, bad JSON, empty): skip and count them (default), or stop")
    add_device_option(p, "cpu", "default cpu")
    add_dtype_option(p, "fp32", "default fp32")
    p.add_argument("--json", action="store_true", help="print one JSON object (totals + per-file breakdown)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchblt.data.sources import new_stats
    from torchblt.eval.bpb import BPBResult, evaluate_bpb
    from torchblt.eval.documents import check_source, iter_file_documents, skipped_summary
    from torchblt.formats import load_model
    from torchblt.model.blt import BLT
    from torchblt.patching import Patcher

    if args.context_bytes is not None and args.context_bytes < 2:
        raise ValueError(f"--context-bytes must be >= 2, got {args.context_bytes}")
    from torchblt.builtin import split_model_argument
    from torchblt.data.sources import SUPPORTED_SUFFIXES

    args.model, args.data = split_model_argument(args.model, args.data,
                                                 lambda w: w != STDIN and not w.endswith(SUPPORTED_SUFFIXES))
    if not args.data:
        raise ValueError("no data: give the files to evaluate (.txt, .jsonl[.gz], .parquet, .arrow)")
    if args.data.count(STDIN) > 1:
        raise ValueError("- (standard input) can be given once")
    sources: list[Path | str] = [STDIN if p == STDIN else check_source(p) for p in args.data]
    stdin_doc = stdin_bytes() if STDIN in args.data else None  # read before the model loads, like the files' checks
    model = load_model(args.model, device=args.device, dtype=args.dtype, entropy_model=args.entropy_model)
    patcher = None
    if isinstance(model, BLT):
        patcher = Patcher.for_model(model, **patching_changes(args))
    else:
        if args.entropy_model:
            raise ValueError(f"--entropy-model applies to a BLT; {args.model} is a {type(model.config).__name__} model")
        refuse_patching_options(args, "only applies to BLT models")

    per_file: dict[str, BPBResult] = {}
    skipped: dict[str, str] = {}
    for source in sources:
        stats = new_stats()
        src = STDIN_NAME if source == STDIN else str(source)
        docs = (iter([stdin_doc] if stdin_doc else []) if source == STDIN
                else iter_file_documents(source, args.text_field, stats, args.on_bad_record))
        per_file[src] = evaluate_bpb(
            model,
            docs,
            patcher=patcher,
            context_bytes=args.context_bytes,
            batch_size=args.batch_size,
            device=args.device,
            max_documents=args.max_docs,
            count_eos=not args.no_eos,
        )
        note = skipped_summary(stats)
        if note:
            skipped[src] = note
            print(f"blt eval: {src}: {note}", file=sys.stderr)
        if per_file[src].n_documents == 0:
            if source == STDIN:
                raise ValueError(f"{src}: no document to evaluate (standard input is empty)")
            raise ValueError(f"{src}: no documents to evaluate ({note or 'the file is empty'}; check --text-field)")
        if not args.json:
            _print_row(src, per_file[src])
    total = BPBResult.combine(list(per_file.values()))
    if args.json:
        out = total.to_dict()
        out["model"] = str(args.model)
        out["files"] = {k: {**v.to_dict(), **({"skipped": skipped[k]} if k in skipped else {})} for k, v in per_file.items()}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if len(per_file) > 1:
            _print_row("total", total)
    return 0


def _print_row(name: str, r) -> None:
    mpl = "-" if r.mean_patch_length is None else f"{r.mean_patch_length:.3f}"
    print(
        f"{name}: bpb {r.bpb:.4f}  nats/byte {r.nats_per_byte:.4f}  bytes {r.n_bytes}  docs {r.n_documents}  "
        f"mean patch length {mpl}"
    )
