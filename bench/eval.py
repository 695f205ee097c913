"""Bits-per-byte evaluation throughput (CPU): batching and patching variants of ``evaluate_bpb``.

    python bench/eval.py [--bytes 20000] [--threads 1] [--json bench/eval.json]

One run, the same documents (synthetic English-like text, deterministic) and quickstart-sized random models
(speed does not depend on the weights):

* ``byte LM, batch 1``: the baseline every ratio divides by;
* byte LM at batch 8; BLT with static / space / entropy patching at batch 8 (the entropy model runs on each
  window), and entropy patching at batch 1.

Prints a table (scored bytes per second and the ratio to the baseline) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch

from torchblt import Patcher
from torchblt.eval.bpb import evaluate_bpb
from torchblt.formats.common import build_model
from torchblt.model.config import CrossAttentionConfig, HashConfig, tiny_blt
from torchblt.model.entropy_model import EntropyModelConfig
from torchblt.model.transformer import StackConfig

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there one all we their been has would more will when who if out no so what up "
         "into than them can only other new some time could these two may then do first any my now such like").split()


def documents(n_bytes: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs, total = [], 0
    while total < n_bytes:
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 400))]
        doc = " ".join(words).capitalize() + "."
        docs.append(doc)
        total += len(doc)
    return docs


def models():
    torch.manual_seed(0)
    local = dict(n_heads=4, multiple_of=64, rope_theta=500000.0, attention="local_block_causal", window=128)
    cfg = tiny_blt()
    cfg.encoder = StackConfig(dim=128, n_layers=1, max_seqlen=1024, **local)
    cfg.decoder = StackConfig(dim=128, n_layers=2, max_seqlen=1024, **local)
    cfg.global_ = StackConfig(dim=256, n_layers=3, n_heads=4, multiple_of=64, rope_theta=500000.0, max_seqlen=256,
                              attention="block_causal")
    cfg.cross_attn = CrossAttentionConfig(k=2, n_heads=4)
    cfg.hash = HashConfig(vocab_size=8191)
    blt = build_model(cfg, "cpu")
    blt.init_weights()
    em = build_model(EntropyModelConfig(transformer=StackConfig(
        dim=64, n_layers=2, n_heads=2, multiple_of=64, attention="local_block_causal", window=64, max_seqlen=1024)), "cpu")
    em.init_weights()
    return blt.eval(), em.eval()


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=20000, help="bytes of text to evaluate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--context", type=int, default=512, help="context_bytes (window length)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    docs = documents(args.bytes)
    blt, em = models()
    entropy = Patcher("entropy", threshold=float(em.entropies(torch.randint(4, 260, (1, 256))).median()),
                      entropy_model=em)
    ctx = args.context
    runs = [
        ("byte LM, batch 1", lambda: evaluate_bpb(em, docs, batch_size=1, context_bytes=ctx)),
        ("byte LM, batch 8", lambda: evaluate_bpb(em, docs, batch_size=8, context_bytes=ctx)),
        ("BLT static 4, batch 8", lambda: evaluate_bpb(blt, docs, patcher=Patcher("static", patch_size=4),
                                                        batch_size=8, context_bytes=ctx)),
        ("BLT space, batch 8", lambda: evaluate_bpb(blt, docs, patcher=Patcher("space"), batch_size=8,
                                                     context_bytes=ctx)),
        ("BLT entropy, batch 8", lambda: evaluate_bpb(blt, docs, patcher=entropy, batch_size=8, context_bytes=ctx)),
        ("BLT entropy, batch 1", lambda: evaluate_bpb(blt, docs, patcher=entropy, batch_size=1, context_bytes=ctx)),
    ]
    # warm-up (allocator, first-call costs) outside the timings
    evaluate_bpb(em, docs[:2], context_bytes=ctx)
    evaluate_bpb(blt, docs[:2], patcher=entropy, context_bytes=ctx)
    rows = []
    base = None
    for name, fn in runs:
        seconds, res = timed(fn)
        rate = res.n_targets / seconds
        base = base or rate
        rows.append({"run": name, "seconds": seconds, "bytes_per_s": rate, "ratio": rate / base,
                     "bpb": res.bpb, "mean_patch_length": res.mean_patch_length, "windows": res.n_windows})
    print(f"{len(docs)} documents, {sum(len(d) for d in docs)} bytes, context {ctx}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'run':<26} {'bytes/s':>10} {'ratio':>7} {'bpb':>7} {'patch':>6} {'windows':>8}")
    for r in rows:
        mpl = "-" if r["mean_patch_length"] is None else f"{r['mean_patch_length']:.2f}"
        print(f"{r['run']:<26} {r['bytes_per_s']:>10.0f} {r['ratio']:>7.2f} {r['bpb']:>7.3f} {mpl:>6} {r['windows']:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bytes": args.bytes, "context": ctx, "threads": args.threads, "runs": rows}, f, indent=2)


if __name__ == "__main__":
    main()
