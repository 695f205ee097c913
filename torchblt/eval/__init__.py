"""Evaluation: bits per byte (:mod:`.bpb`), the lm-evaluation-harness adapter (:mod:`.harness`) and
patch visualisation (:mod:`.patches`)."""

from torchblt.eval.bpb import BPBResult, evaluate_bpb

__all__ = ["BPBResult", "evaluate_bpb"]
