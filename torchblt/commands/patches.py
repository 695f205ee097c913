"""``blt patches [MODEL] TEXT|--file F``: show where the model's patcher cuts a text (terminal colours,
``--entropies`` table, ``--plot out.png`` like the paper's Figure 4, ``--html out.html``).

MODEL is a BLT folder (its own patching config; entropy patching needs its entropy model) or an entropy
model folder (entropy patching with ``--threshold``, default the released models' 1.3354). Omitted, it is
the built-in model (``blt patches "Zürich ist schön"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torchblt.commands.options import STDIN, add_patching_options, patching_changes, stdin_bytes, stdin_text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("patches", help="visualise patch boundaries and per-byte entropies of a text")
    p.add_argument("model", nargs="?", default=None, help="BLT folder, or an entropy model folder (omitted: builtin)")
    p.add_argument("text", nargs="?", help="the text (or use --file); - reads it from standard input")
    p.add_argument("--file", help="read the text from this file (bytes as they are; - : standard input)")
    p.add_argument("--entropy-model", help="entropy model folder (default: MODEL/entropy_model)")
    add_patching_options(p)
    p.add_argument("--entropies", action="store_true", help="print the per-byte entropy table")
    p.add_argument("--plot", metavar="OUT.png", help="write entropy per byte with threshold and patch starts")
    p.add_argument("--html", metavar="OUT.html", help="write a coloured HTML page")
    p.add_argument("--overwrite", action="store_true", help="replace existing --plot / --html files")
    p.add_argument("--no-color", action="store_true", help="separate patches with | instead of colours")
    p.set_defaults(func=run)


def _patcher(args: argparse.Namespace):
    from torchblt import load_model
    from torchblt.model.blt import BLT
    from torchblt.patching import Patcher

    model = load_model(args.model, entropy_model=args.entropy_model)
    if isinstance(model, BLT):
        return Patcher.for_model(model, **patching_changes(args))
    # an entropy model: entropy patching with it (or another mode, with its entropies shown)
    if args.entropy_model:
        raise ValueError("MODEL is already an entropy model; --entropy-model applies to a BLT")
    return Patcher(
        mode=args.patching or "entropy",
        **({"threshold": args.threshold} if args.threshold is not None else {}),
        patch_size=args.patch_size,
        entropy_model=model,
    )


def run(args: argparse.Namespace) -> int:
    from torchblt.builtin import split_model_argument
    from torchblt.eval.patches import (
        compute_patches,
        render_entropy_table,
        render_terminal,
        summary,
        write_html,
        write_plot,
    )

    if args.text is None and args.file is None or args.model is None:
        args.model, rest = split_model_argument(args.model, [] if args.text is None else [args.text])
        args.text = rest[0] if rest else None
    if (args.text is None) == (args.file is None):
        raise ValueError("give the text either as an argument or with --file (not both)")
    text: str | bytes
    if args.file == STDIN:
        text = stdin_bytes()
    elif args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        text = path.read_bytes()
    else:
        text = stdin_text("TEXT -") if args.text == STDIN else args.text
    from torchblt.outputs import refuse_existing

    refuse_existing([p for p in (args.plot, args.html) if p is not None], args.overwrite)
    patcher = _patcher(args)
    need_entropies = args.entropies or args.plot is not None
    view = compute_patches(text, patcher, with_entropies=need_entropies or patcher.entropy_model is not None)
    colour = not args.no_color and sys.stdout.isatty()
    print(render_terminal(view, colour=colour))
    print(summary(view))
    if args.entropies:
        print(render_entropy_table(view))
    if args.plot:
        print(f"wrote {write_plot(view, args.plot, overwrite=args.overwrite)}")
    if args.html:
        print(f"wrote {write_html(view, args.html, overwrite=args.overwrite)}")
    return 0
