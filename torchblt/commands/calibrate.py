"""``blt calibrate``: find the entropy threshold that gives a target mean patch size.

``blt calibrate --entropy-model M --data D [D ...] --target-patch-size 4.5`` computes the entropies of
the first ``--sample-bytes`` of the data once, then bisects on the global threshold
(:func:`torchblt.data.calibrate.calibrate_threshold`) and prints the threshold with the mean patch size
it gives. ``--entropies DIR`` uses shards written by ``blt entropies`` instead of running the model.
Training configs may give ``data.target_patch_size`` instead of ``data.patching.threshold``: the loader runs the
same function at start.
"""

from __future__ import annotations

import argparse
import json

from torchblt.commands.options import add_device_option, add_dtype_option
from torchblt.validation import number, positive_float, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="find the entropy threshold for a target mean patch size",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--entropy-model", help="entropy model folder or hub repo id")
    p.add_argument("--entropies", help="or: a folder of shards written by `blt entropies`")
    p.add_argument("--data", nargs="+", default=[], help="files, folders or globs (.txt .jsonl .parquet .arrow)")
    p.add_argument("--target-patch-size", type=positive_float, required=True, help="wanted mean bytes per patch (e.g. 4.5)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--sample-bytes", type=positive_int, default=1 << 20, help="how much text to measure on (default 1 MiB)")
    p.add_argument("--threshold-add", type=number, default=None, help="the reference's threshold_add rule")
    p.add_argument("--monotonicity", action="store_true", help="the reference's monotonicity rule")
    p.add_argument("--max-patch-length", type=positive_int, default=None)
    add_device_option(p, None, "default: cuda if available, else cpu")
    add_dtype_option(p, "fp32", "of the entropy model", choices=("fp32", "bf16"))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from torchblt.data.calibrate import calibrate_threshold
    from torchblt.data.config import DataConfig
    from torchblt.data.loader import sample_entropies

    if bool(args.entropy_model) == bool(args.entropies):
        raise ValueError("give --entropy-model (with --data) or --entropies")
    if args.entropy_model and not args.data:
        raise ValueError("--data is needed with --entropy-model")
    if args.sample_bytes < 1:
        raise ValueError(f"--sample-bytes must be positive, got {args.sample_bytes}")
    em = None
    if args.entropy_model:
        from torchblt.data.entropies import load_entropy_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        em = load_entropy_model(args.entropy_model, device=device, dtype=args.dtype)
    cfg = DataConfig(
        sources=list(args.data),
        text_field=args.text_field,
        entropies=args.entropies,
        target_patch_size=args.target_patch_size,
    )
    ents = sample_entropies(cfg, em, args.sample_bytes)
    res = calibrate_threshold(
        ents, args.target_patch_size, args.threshold_add, args.monotonicity, args.max_patch_length
    )
    if args.json:
        print(json.dumps(res.__dict__))
    else:
        print(
            f"threshold {res.threshold:.6f} -> mean patch size {res.mean_patch_size:.4f} bytes "
            f"(target {res.target_patch_size}; {res.n_documents} documents, {res.n_tokens} tokens incl. BOS/EOS)"
        )
    return 0
