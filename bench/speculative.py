"""Speculative decoding (the entropy model drafts, the BLT verifies) against plain cached decoding, in one run.

On a trained model (default: the built-in package) and held-out prompts (default: the corpus's ``valid``
split, 256-byte pieces from the middle of files of different sources and languages), greedy, for batch 1
(prompts one at a time) and batch 8 (one batch), each thread count:

* ``plain`` — cached decoding (:class:`torchblt.generation.IncrementalEngine`, one step per byte);
* ``K=k`` / ``K=k patch`` — ``GenerationConfig(speculative=k)``, without / with ``draft_threshold="patch"``
  (the draft stops where the drafter's entropy crosses the patch threshold);
* a sampled row (temperature 0.8, top-p 0.95) for plain and ``K=4`` sampled drafts.

Per row: new bytes/s (every time includes building the engines and the prefill: the same prompts for
every row), the speed-up over ``plain`` in the same run, the acceptance rate (kept drafts / drafted),
the acceptance per draft position, bytes emitted per BLT step, and whether the bytes equal plain
greedy's (they must: the output is exact). Times are the median of ``--repeats`` runs, the rows
interleaved within each repeat so that a busy moment of the machine hits every row alike.

    python bench/speculative.py --json bench/speculative_cpu.json           # under bench-idle
    python bench/speculative.py --threads 1 --new-bytes 64 --ks 2,4 --repeats 1   # quick
    python bench/speculative.py --device cuda --dtype bf16 --json speculative_gpu.json
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

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" or "torchblt" not in sys.modules:
    sys.path.insert(0, os.environ.get("BENCH_TORCHBLT_ROOT", str(ROOT)))

import torchblt.generation.api as api  # noqa: E402
from torchblt import load_model  # noqa: E402
from torchblt.generation import GenerationConfig, generate_tokens  # noqa: E402
from torchblt.generation import speculative as spec  # noqa: E402
from torchblt.tokenizer import ByteTokenizer  # noqa: E402

DEFAULT_MODEL = "builtin"  # the shipped built-in model (torchblt/builtin/model)
DEFAULT_PROMPTS = "/work/data/corpus/valid"


def held_out_prompts(root: Path, n: int, n_bytes: int) -> list[bytes]:
    """``n`` prompts of ``n_bytes`` from files of ``root/<language>/<source>/`` (deterministic: round-robin
    over languages, a new source each time while there are any), cut from the middle of a file at a
    UTF-8 character boundary."""
    groups = [d for d in sorted(root.iterdir()) if d.is_dir()] + [root]
    queues = []
    for d in groups:
        files = sorted(p for p in (d.rglob("*") if d != root else d.glob("*"))
                       if p.is_file() and p.stat().st_size > 4 * n_bytes)
        first = {f.parent: f for f in reversed(files)}  # each source's first file
        queues.append(sorted(first.values()) + [f for f in files if f not in first.values()])
    picks: list[Path] = []
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop(0))
    if not picks:
        raise SystemExit(f"{root}: no file of more than {4 * n_bytes} bytes")
    distinct = len(picks)
    picks = (picks * n)[:n]  # fewer files than prompts: other pieces of the same files
    out = []
    for i, f in enumerate(picks):
        data = f.read_bytes()
        rep = i // distinct
        a = len(data) * (rep + 1) // (rep + 2)
        while a < len(data) and (data[a] & 0xC0) == 0x80:  # not inside a character
            a += 1
        piece = data[a : a + n_bytes]
        out.append(piece.decode("utf-8", errors="ignore").encode("utf-8"))
    return out


class Counted:
    """``api.speculative_steps`` with a :class:`~torchblt.generation.speculative.SpeculativeStats` of the
    last call (the bench's only hook into the driver)."""

    def __init__(self, k: int) -> None:
        self.stats = spec.SpeculativeStats(k)
        self.real = spec.speculative_steps

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return self.real(*args, **{**kwargs, "stats": self.stats})


def run_row(model, prompts: list[bytes], batch: int, cfg: GenerationConfig) -> dict:
    """Generate for ``prompts`` in batches of ``batch``: time, new bytes, tokens, draft statistics."""
    tok = ByteTokenizer()
    counted = Counted(cfg.speculative or 1)
    api.speculative_steps = counted
    try:
        t0 = time.perf_counter()
        tokens: list[list[int]] = []
        for i in range(0, len(prompts), batch):
            ids = [tok.encode(p, add_bos=True, add_eos=False) for p in prompts[i : i + batch]]
            tokens += generate_tokens(model, ids, config=cfg).tokens
        seconds = time.perf_counter() - t0
    finally:
        api.speculative_steps = counted.real
    return {"seconds": seconds, "new_bytes": sum(len(t) for t in tokens), "tokens": tokens,
            "stats": counted.stats.as_dict() if cfg.speculative else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS, help="a folder of held-out text (language/source/file)")
    ap.add_argument("--prompt-bytes", type=int, default=256)
    ap.add_argument("--new-bytes", type=int, default=128)
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts decoded one at a time for batch 1")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sampling", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model = load_model(args.model, device=args.device, dtype=args.dtype).eval()
    root = Path(args.prompts)
    if not root.is_dir():  # a machine without the corpus (the GPU script): the repository's own docs
        print(f"{root}: no such folder; prompts from {ROOT / 'docs'} instead")
        root = ROOT / "docs"
    prompts = held_out_prompts(root, 8, args.prompt_bytes)
    ks = [int(k) for k in args.ks.split(",")]
    greedy = dict(max_new_bytes=args.new_bytes, stop_at_eos=False, compile=False)
    configs: list[tuple[str, GenerationConfig]] = [("plain", GenerationConfig(**greedy))]
    for k in ks:
        configs.append((f"K={k}", GenerationConfig(speculative=k, **greedy)))
        configs.append((f"K={k} patch", GenerationConfig(speculative=k, draft_threshold="patch", **greedy)))
    if not args.no_sampling:
        sampled = dict(greedy, temperature=0.8, top_p=0.95, seed=0)
        configs.append(("sampled plain", GenerationConfig(**sampled)))
        configs.append(("sampled K=4", GenerationConfig(speculative=4, **sampled)))
        configs.append(("sampled K=4 patch", GenerationConfig(speculative=4, draft_threshold="patch", **sampled)))

    results = []
    print(f"model {args.model} on {args.device} {args.dtype}; {len(prompts)} held-out prompts of {args.prompt_bytes} "
          f"bytes; {args.new_bytes} new bytes per prompt; median of {args.repeats}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for batch in [int(b) for b in args.batches.split(",")]:
            rows = prompts[: args.batch1_prompts] if batch == 1 else prompts[:batch]
            run_row(model, rows[:1], 1, configs[1][1])  # warm-up (allocator, first calls)
            times: dict[str, list[float]] = {name: [] for name, _ in configs}
            last: dict[str, dict] = {}
            for _ in range(args.repeats):
                for name, cfg in configs:
                    r = run_row(model, rows, batch, cfg)
                    times[name].append(r["seconds"])
                    last[name] = r
            base = {"plain": statistics.median(times["plain"])}
            if "sampled plain" in times:
                base["sampled"] = statistics.median(times["sampled plain"])
            print(f"\nthreads {threads}, batch {batch} ({len(rows)} prompts)")
            print(f"{'row':<20}{'B/s':>9}{'speed-up':>10}{'accept':>8}{'B/step':>8}  same  per-position acceptance")
            for name, _ in configs:
                r, sec = last[name], statistics.median(times[name])
                ref = base["sampled"] if name.startswith("sampled") else base["plain"]
                st = r["stats"]
                per = ([round(a / d, 2) if d else None for a, d in zip(st["per_position_accepted"],
                                                                       st["per_position_drafted"])] if st else [])
                same = r["tokens"] == last["plain"]["tokens"] if not name.startswith("sampled") else None
                row = {"threads": threads, "batch": batch, "row": name, "seconds": sec, "bytes_per_s": r["new_bytes"] / sec,
                       "speedup": ref / sec, "same_bytes_as_plain": same, "stats": st, "per_position_acceptance": per,
                       "all_seconds": times[name]}
                results.append(row)
                acc = f"{st['acceptance']:.2f}" if st else "-"
                per_step = f"{st['bytes_per_row_round']:.2f}" if st else "1.00"
                print(f"{name:<20}{row['bytes_per_s']:>9.1f}{row['speedup']:>9.2f}x{acc:>8}{per_step:>8}  "
                      f"{'-' if same is None else ('yes' if same else 'NO')}  {per}")
    if args.json:
        meta = {"model": args.model, "device": args.device, "dtype": args.dtype, "prompt_bytes": args.prompt_bytes,
                "new_bytes": args.new_bytes, "repeats": args.repeats, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "prompts": [p[:40].decode("utf-8", errors="replace") for p in prompts],
                "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
