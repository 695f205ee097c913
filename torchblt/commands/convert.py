"""``blt convert SRC OUT``: move a model between formats.

* ``--to transformers``: any model :func:`torchblt.load_model` reads -> a Hugging Face transformers
  ``BltForCausalLM`` folder (the entropy model bundled as ``model.patcher``).
* ``--from transformers`` (or any other readable format, the default ``--to torchblt``): -> our format
  (``config.json`` + ``model.safetensors``), the entropy model in ``OUT/entropy_model/`` as the released
  repositories lay it out (so ``load_model(OUT)`` attaches it).
"""

from __future__ import annotations

import argparse

from torchblt.commands.options import add_dtype_option


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a model between torchblt and Hugging Face transformers formats")
    p.add_argument("src", help="model folder (torchblt, reference, consolidated or transformers format) or hub repo id")
    p.add_argument("out", help="output folder")
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--to", choices=["transformers", "torchblt"], help="target format (default torchblt)")
    direction.add_argument("--from", dest="from_", choices=["transformers"],
                           help="the source is a transformers folder (checked); the target is torchblt")
    p.add_argument("--entropy-model", help="entropy model to bundle / attach (default: the one SRC holds)")
    add_dtype_option(p, "fp32", "dtype of the written weights, default fp32")
    p.add_argument("--overwrite", action="store_true", help="replace files in OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from torchblt.formats import detect_format, load_model, resolve_model_path, save_model
    from torchblt.formats.native import model_files
    from torchblt.formats.transformers import transformers_files
    from torchblt.model.blt import BLT
    from torchblt.outputs import refuse_existing
    from torchblt.patching import attached_entropy_model

    out = Path(args.out)
    # what we will write, checked before the (slow) load; the entropy model's files once we know there is one
    refuse_existing(transformers_files(out) if args.to == "transformers" else model_files(out), args.overwrite)
    src = resolve_model_path(args.src)
    fmt = detect_format(src)
    if args.from_ == "transformers" and fmt != "transformers":
        raise ValueError(f"{args.src}: not a transformers BLT folder (detected format: {fmt})")
    model = load_model(src, dtype=args.dtype, entropy_model=args.entropy_model)
    if args.to == "transformers":
        from torchblt.formats.transformers import save_transformers

        if not isinstance(model, BLT):
            raise ValueError(f"{args.src}: transformers' BltForCausalLM holds a BLT; this is an entropy model")
        save_transformers(model, out, overwrite=args.overwrite)
        em = attached_entropy_model(model)
        print(f"wrote transformers BltForCausalLM to {out}" + (" (entropy model bundled)" if em is not None else ""))
        return 0
    em = attached_entropy_model(model) if isinstance(model, BLT) else None
    save_model(model, out, overwrite=args.overwrite, extra={"converted_from": {"path": str(args.src), "format": fmt}},
               entropy_model=em)
    print(f"wrote torchblt model to {out}" + (f" (entropy model in {out / 'entropy_model'})" if em is not None else ""))
    return 0
