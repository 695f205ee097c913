"""``blt entropies``: run a trained entropy model over a corpus and write per-document entropies.

``blt entropies --entropy-model M --data SRC [SRC ...] --out DIR`` writes one Parquet shard per input
file (see :mod:`torchblt.data.entropies` for the format); a training config then sets
``data.entropies: DIR``. Rerunning the same command finishes an interrupted job (finished shards are
skipped). Under ``torchrun --nproc-per-node N -m torchblt.cli entropies ...`` each rank writes its share
of the shards on ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import os

from torchblt.commands.options import add_device_option, add_dtype_option
from torchblt.validation import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "entropies",
        help="write per-document entropies of a corpus (for entropy patching in training)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--entropy-model", required=True, help="entropy model (or a BLT that has one) folder or hub repo id")
    p.add_argument("--data", nargs="+", required=True, help="files, folders or globs (.txt .jsonl .parquet .arrow)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/Arrow field holding the text (default: text)")
    add_device_option(p, None, "default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    add_dtype_option(p, None, "default: bf16 on GPU, fp32 on CPU", choices=("fp32", "bf16"))
    p.add_argument("--batch-tokens", type=positive_int, default=1 << 15, help="padded tokens per forward (default 32768)")
    p.add_argument("--max-doc-bytes", type=positive_int, default=64 * 2**20, help="longer documents are split (counted)")
    p.add_argument("--on-bad-record", choices=["skip", "error"], default="skip")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from torchblt.data.entropies import load_entropy_model, write_entropy_shards

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.batch_tokens < 1:
        raise ValueError(f"--batch-tokens must be positive, got {args.batch_tokens}")
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    model = load_entropy_model(args.entropy_model, device=device, dtype=dtype)
    res = write_entropy_shards(
        model,
        args.data,
        args.out,
        text_field=args.text_field,
        rank=rank,
        world_size=world_size,
        max_doc_bytes=args.max_doc_bytes,
        on_bad_record=args.on_bad_record,
        batch_tokens=args.batch_tokens,
        model_name=str(args.entropy_model),
        progress=not args.no_progress,
    )
    rate = res.n_bytes / res.seconds if res.seconds > 0 else 0.0
    bad = ", ".join(f"{k}={v}" for k, v in res.stats.items() if k not in ("documents", "bytes") and v)
    print(
        f"rank {rank}/{world_size}: wrote {len(res.written)} shards, skipped {len(res.skipped)} finished; "
        f"{res.n_documents} documents, {res.n_bytes} bytes in {res.seconds:.1f}s ({rate / 1e3:.1f} kB/s) "
        f"on {device} {dtype}; bad records: {bad or 'none'}; out: {args.out}"
    )
    return 0
