"""Products over a few rows: ``torchblt.model.transformer.Linear`` against ``torch.nn.functional.linear``.

A batch's decoding step runs the global model on the rows that close a patch only: a handful of rows per
weight. This times, in one run, every linear layer of bench/generation.py's *small* global model (its real
weights, cold in the cache as in a step: 42 matrices, ~170 MB) applied to ``M`` rows, ``M = 1..8``, both
ways, outside autograd, and reports the ratio (``Linear`` takes ``W @ x.T`` for 2-3 rows, oneDNN's product
for one row on 2+ threads, ``F.linear`` otherwise). The median of ``--repeats`` rounds, the two ways interleaved.

    python bench/small_rows.py                       # writes small_rows.json, prints the table
    python bench/small_rows.py --json bench/small_rows_cpu.json --threads 1
    python bench/small_rows.py --threads 2 --rows 1 2 3 --json bench/small_rows_cpu_threads2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generation import build  # noqa: E402

from torchblt.model.transformer import Linear  # noqa: E402


def time_pass(layers: list[Linear], xs: dict[int, torch.Tensor], fn, n: int) -> float:  # noqa: ANN001
    t = time.perf_counter()
    for _ in range(n):
        for layer in layers:
            fn(layer, xs[layer.in_features])
    return (time.perf_counter() - t) / n * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=list(range(1, 9)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--passes", type=int, default=5, help="passes over the weights per timing (default 5)")
    ap.add_argument("--json", default="small_rows.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _, _ = build("small", torch.device("cpu"), torch.float32)
    layers = [m for m in model.global_transformer.modules() if isinstance(m, Linear)]
    mb = sum(m.weight.numel() * m.weight.element_size() for m in layers) / 2**20
    ways = {"F.linear": lambda m, x: F.linear(x, m.weight), "Linear": lambda m, x: m(x)}
    rows = []
    print(f"global model of the small config: {len(layers)} weights, {mb:.0f} MiB; {args.threads} thread(s)")
    print(f"{'rows':>4} | {'F.linear ms':>11} {'Linear ms':>10} | {'ratio':>6} | same")
    with torch.inference_mode():
        for M in args.rows:
            xs = {d: torch.randn(1, M, d) for d in {m.in_features for m in layers}}
            same = all(torch.allclose(m(xs[m.in_features]), F.linear(xs[m.in_features], m.weight), rtol=1e-5,
                                      atol=1e-5) for m in layers)
            times: dict[str, list[float]] = {k: [] for k in ways}
            for fn in ways.values():
                time_pass(layers, xs, fn, 1)  # warm-up
            for _ in range(args.repeats):
                for k, fn in ways.items():
                    times[k].append(time_pass(layers, xs, fn, args.passes))
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["F.linear"] / med["Linear"]
            rows.append({"rows": M, "ms": med, "ratio": ratio, "same": same})
            print(f"{M:>4} | {med['F.linear']:>11.2f} {med['Linear']:>10.2f} | {ratio:>5.2f}x | {same}", flush=True)
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads, "argv": sys.argv[1:], "weights": len(layers), "weights_mib": mb,
            "load_average_at_end": list(os.getloadavg())}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
