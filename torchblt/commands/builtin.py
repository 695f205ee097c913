"""``blt builtin train --out DIR``: the recipe of the built-in model, end to end, resumable.

corpus -> weighted mix -> entropy model -> entropies -> calibrated threshold (mean patch 4.5 bytes on
English) -> BLT -> bf16 package -> held-out bits per byte per source and language against ``xz -9e``.
Each step prints the command it runs; re-running the same command skips finished steps and resumes an
interrupted training from its last checkpoint (see :mod:`torchblt.builtin.recipe`).
"""

from __future__ import annotations

import argparse
import json

from torchblt.builtin.recipe import STEPS  # light: the recipe imports its heavy parts when it runs
from torchblt.validation import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("builtin", help="the built-in model: train it again (the recipe)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="builtin_command", metavar="COMMAND")
    sub.required = True
    t = sub.add_parser("train", help="run (or resume) the whole recipe in DIR")
    t.add_argument("--out", required=True, help="working folder (corpus, runs, package, eval.json)")
    t.add_argument("--corpus", default=None, help="an existing `blt data corpus` folder (default: OUT/corpus)")
    t.add_argument("--cache", default=None, help="download cache for the corpus (default: ~/.cache/torchblt/corpus)")
    t.add_argument("--configs", default=None, help="folder holding builtin-{entropy,blt}.yaml (default: the repo's)")
    t.add_argument("--entropy-steps", type=positive_int, default=None, help="override train.steps of the entropy model")
    t.add_argument("--blt-steps", type=positive_int, default=None, help="override train.steps of the BLT")
    t.add_argument("--mix-bytes", type=positive_int, default=None, help="size of the training mix (default: the recipe's)")
    t.add_argument("--eval-bytes", type=positive_int, default=None,
                   help="held-out bytes per source in the evaluation (default: 65536, the model card's)")
    t.add_argument("--stop-after", default=None, choices=STEPS, help="stop after this step")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from torchblt.builtin.recipe import CONFIGS, MIX_BYTES, run_recipe

    summary = run_recipe(args.out, corpus=args.corpus, cache=args.cache, configs=args.configs or CONFIGS,
                         entropy_steps=args.entropy_steps, blt_steps=args.blt_steps,
                         mix_bytes=args.mix_bytes or MIX_BYTES, stop_after=args.stop_after,
                         eval_bytes_per_source=args.eval_bytes)
    print("\n== recipe: seconds per step (all invocations)")
    print(json.dumps(summary.get("seconds", {}), indent=1))
    return 0
