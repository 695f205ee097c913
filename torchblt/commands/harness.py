"""``blt harness ...``: lm-evaluation-harness's own command line (``lm-eval run``) with the model type
``blt`` registered, e.g. ``blt harness --model_args pretrained=DIR,entropy_model=DIR --tasks arc_easy``
(``--model blt`` is implied). Everything after ``harness`` is passed to lm-eval unchanged.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "harness",
        help="run lm-evaluation-harness tasks on a torchblt model (lm-eval's CLI, --model blt)",
        description="Arguments are lm-eval's (see `lm-eval run --help`); --model defaults to blt. "
        "model_args: pretrained, entropy_model, device, dtype, batch_size, context_bytes, max_gen_bytes, use_cache.",
        add_help=False,
        prefix_chars="+",  # every "--option" after "harness" belongs to lm-eval, not to us
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        import torchblt.eval.harness  # noqa: F401  (registers the "blt" model type)
    except ImportError:
        raise ValueError("blt harness needs lm-eval: pip install 'torchblt[eval]'") from None
    rest = list(args.lm_eval_args)
    if rest and rest[0] in ("ls", "validate", "run"):
        command, rest = rest[0], rest[1:]
    else:
        command = "run"
    if command == "run" and "--model" not in rest and not any(a.startswith("--model=") for a in rest):
        rest = ["--model", "blt", *rest]
    setup_logging()
    cli = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", command, *rest]
    try:
        parsed = cli.parse_args()
        cli.execute(parsed)
    finally:
        sys.argv = saved
    return 0
