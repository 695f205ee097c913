"""Self-attention kernels for sliding windows on CPU: today's dense ``(T, T)`` mask, the banded SDPA path at
several query-block sizes, and FlexAttention compiled by inductor, forward and forward + backward.

    python bench/attention_cpu.py [--T 9216] [--window 512] [--heads 2] [--head-dim 64] [--json out.json]

One attention call (no projections) on random ``(1, T, H, Dh)`` fp32 tensors with the entropy model's
document-masked sliding window (one EOS every ~2000 positions, so the document rule is live). Every variant's
output is checked against the dense path. ``ratio`` = time of the dense path / time of the variant, same run.
Compilation happens in untimed warm-up calls; the flex rows with and without building the ``BlockMask``
in the timed call (a forward builds it once for all its layers). FlexAttention has no backward on CPU
(torch 2.13), so its training-step column is empty. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import torch

from torchblt.model.masks import banded_mask, document_ids, self_attention_mask_dense
from torchblt.model.transformer import banded_attention, scaled_dot_product


def timed(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=9216, help="positions (8192 + the entropy model's 1022 of context)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    T, W, H, Dh = args.T, args.window, args.heads, args.head_dim
    tokens = torch.randint(4, 260, (1, T))
    tokens[0, torch.arange(1999, T, 2000)] = 2  # EOS: documents end
    doc = document_ids(tokens)
    q, k, v = (torch.randn(1, T, H, Dh) for _ in range(3))
    pos = torch.arange(T)[None]
    dense = self_attention_mask_dense(pos, pos, doc, doc, W)
    want = scaled_dot_product(q, k, v, dense)

    def fwd_bwd(f):
        def run():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            f(qq, kk, vv).sum().backward()
        return run

    def dense_path(a, b, c):
        return scaled_dot_product(a, b, c, self_attention_mask_dense(pos, pos, doc, doc, W))

    def banded_path(a, b, c, block):
        return banded_attention(a, b, c, banded_mask(T, W, doc, a.device, block))

    variants = {"dense mask (e265e29)": dense_path}
    for blk in args.blocks:
        variants[f"banded block {blk}"] = functools.partial(banded_path, block=blk)
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < W) & (doc[b, qi] == doc[b, ki])

        def flex(a, b, c, bm=None):
            bm = bm if bm is not None else create_block_mask(mask_mod, 1, None, T, T, device="cpu")
            return compiled(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), block_mask=bm).transpose(1, 2)

        variants["flex compiled (inductor)"] = flex
        prebuilt = create_block_mask(mask_mod, 1, None, T, T, device="cpu")
        variants["flex compiled, mask reused"] = functools.partial(flex, bm=prebuilt)
    rows = []
    for name, f in variants.items():
        row: dict = {"variant": name}
        try:
            with torch.no_grad():
                row["max_abs_err"] = (f(q, k, v) - want).abs().max().item()
                row["forward_s"] = timed(functools.partial(f, q, k, v), args.repeats)
            row["forward_backward_s"] = timed(fwd_bwd(f), args.repeats)
        except Exception as e:  # a variant that cannot run here is reported, not hidden
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
    base = rows[0]
    print(f"T={T} window={W} heads={H} head_dim={Dh} threads={torch.get_num_threads()}")
    print(f"{'variant':<26} {'fwd ms':>8} {'ratio':>6} {'fwd+bwd ms':>11} {'ratio':>6} {'max err':>9}")
    def cell(r: dict, key: str, width: int) -> str:
        if key not in r:
            return f"{'-':>{width}} {'-':>6}"
        r[f"ratio_{key[:-2]}"] = base[key] / r[key]
        return f"{r[key] * 1e3:>{width}.1f} {base[key] / r[key]:>6.2f}"

    for r in rows:
        err = f"{r['max_abs_err']:>9.1e}" if "max_abs_err" in r else f"{'-':>9}"
        print(f"{r['variant']:<26} {cell(r, 'forward_s', 8)} {cell(r, 'forward_backward_s', 11)} {err}")
        if "error" in r:
            print(f"  {r['error']}")
    if args.json:
        out = {"rows": rows, "T": T, "window": W, "heads": H, "head_dim": Dh, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "load_avg_1min": os.getloadavg()[0]}
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
