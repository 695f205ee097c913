"""Where one eager decoding step spends its time: greedy, batch 1 (or ``--batch``), the bench's configs (issue 12).

Builds the model of :mod:`bench.generation` (same weights, same entropy threshold), prefills a 64-byte
prompt, then decodes ``--new-bytes`` bytes with the eager step and prints ms per step, then per step:
the aten operators (count, self time) under ``torch.profiler``, and the Python calls (cProfile).
Runs today's engine the same way when the checkout is given through ``BENCH_TORCHBLT_ROOT``, so the
two profiles can be compared op by op:

    cpu-run py bench/generation_step_profile.py --threads 1
    BENCH_TORCHBLT_ROOT=/work/wt-main0 cpu-run py bench/generation_step_profile.py --threads 1

Profile times are inflated by the profilers; the ms per step is measured without them (``--no-profile``:
only that, e.g. a 16-row batch step of two checkouts, alternating under ``bench-idle``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation as bench  # noqa: E402  (puts BENCH_TORCHBLT_ROOT or this checkout on sys.path)

from torchblt.generation import IncrementalEngine  # noqa: E402
from torchblt.patching import Patcher  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="light", choices=sorted(bench.CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-bytes", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (64-byte prompts)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="only the ms per step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, em, threshold = bench.build(args.config, torch.device("cpu"), torch.float32)
    patcher = Patcher("entropy", threshold=threshold, entropy_model=em)
    rows = bench.prompts(args.batch, 64)
    n = args.new_bytes

    @torch.inference_mode()
    def run() -> float:
        engine = IncrementalEngine(model, patcher, n)
        logits = engine.start(rows)
        t = time.perf_counter()
        for _ in range(n):
            logits = engine.advance(logits.argmax(-1))
        return (time.perf_counter() - t) / n * 1000

    run()  # warm-up
    times = sorted(run() for _ in range(3))
    print(f"{sys.modules['torchblt'].__file__}: {args.config}, batch {args.batch}, {args.threads} thread(s), "
          f"ms/step {times[1]:.2f} (runs {', '.join(f'{t:.2f}' for t in times)})")
    if not args.profile:
        return 0

    from torch.profiler import profile

    with profile() as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000
    calls = sum(e.count for e in events)
    print(f"torch.profiler: {total / n:.2f} ms self CPU and {calls / n:.0f} operator calls per step")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {e.key:<52} {e.count / n:7.1f} calls/step {e.self_cpu_time_total / 1000 / n:7.3f} ms/step")
    pr = cProfile.Profile()
    pr.runcall(run)
    stats = pstats.Stats(pr)
    print(f"cProfile: {stats.total_calls / n:.0f} Python calls per step; by own time:")
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
