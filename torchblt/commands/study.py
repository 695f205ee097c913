"""``blt study CONFIG.yaml [--out DIR]``: BLT (entropy and space patching) vs a byte-level and a BPE
transformer at matched training FLOPs, the paper's central comparison, in one command.

For every budget (training FLOPs) and family the model is sized by the study's rule (docs/study.md),
trained with ``blt train`` for exactly that budget (FLOPs counted with ``torchblt.flops``) and evaluated
in held-out bits per byte as ``blt eval`` does. Shared once per study: the BPE tokenizer (trained on the
training split), the entropy model, its entropies and the calibrated thresholds. Writes
``DIR/results.json``, ``DIR/results.md`` and ``DIR/study.png``. Re-running the same command resumes an
interrupted run and skips finished ones; ``--report`` rewrites the results from the runs finished so far.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="BLT vs byte-level vs BPE transformers at matched training FLOPs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="study config (YAML), e.g. configs/study.yaml")
    p.add_argument("--out", help="output folder (default: the config's out)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true",
                      help="prepare what the runs share, print the plan (models, steps, bytes) and stop")
    mode.add_argument("--report", action="store_true",
                      help="write the results of the runs finished so far (no training)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchblt.study import StudyStopped, load_study_config, run_study

    cfg = load_study_config(args.config, out=args.out)
    try:
        doc = run_study(cfg, plan_only=args.plan, report_only=args.report, config_path=args.config)
    except StudyStopped as e:
        print(f"blt study: {e}", file=sys.stderr)
        return 1
    if not args.plan:
        print(f"\n{cfg.out}/results.md, results.json, study.png: {len(doc['runs'])} runs finished, "
              f"{doc['pending_runs']} pending")
    return 0
