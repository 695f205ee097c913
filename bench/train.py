"""Training throughput: bytes/s, peak memory and FLOPs per byte of the trainer's step, with and without
``torch.compile``, for the quickstart configs (CPU) and blt-1b (GPU only: skipped without CUDA), and the
quickstart BLT with long rows (1024, 4096, 16384 bytes per row, same bytes per step: time per byte against
the 1024-byte rows).

    python bench/train.py [--steps 10] [--warmup 3] [--json bench/train.json] [--only quickstart-blt]
    python bench/train.py --only quickstart-blt-1024 quickstart-blt-4096 quickstart-blt-16384 --no-compile

blt-1b (random weights) runs the setting the reference was measured in on an H200 — rows of 4096 bytes,
4 per step, bf16, FlexAttention (compiled) for the document-masked windows — with static patches of 4.5
bytes (so FLOPs per byte are those of the reference's MFU figure), activation checkpointing (the
states of 4.5 B parameters leave ~4 GiB for everything else under 60 GiB), hash tables with row
gradients, fused AdamW; once with eager blocks and once with ``torch.compile``d blocks. It prints the
ratio to the reference (**46.1 K bytes/s, peak 73.9 GiB, MFU 14%**) and whether the goal (>= 2x the
bytes/s with a peak <= 60 GiB) is met. Peak memory on GPU is ``max_memory_allocated`` (and reserved).

Each (config, compile) case runs in its own subprocess (so peak memory is per case: max RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU) through the real :class:`~torchblt.train.trainer.Trainer` on a
synthetic English-like corpus, BLT with space patching (no entropy model needed; the step's cost depends
only on the patch lengths). ``ratio`` is bytes/s relative to the same config without compile, measured
in the same run. FLOPs per byte: :func:`torchblt.train.metrics.training_flops_per_byte` (forward +
backward). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    # name: (config file, extra overrides, needs GPU)
    "quickstart-entropy": ("quickstart-entropy.yaml", [], False),
    "quickstart-blt": ("quickstart-blt.yaml", ["data.patching.mode=space", "data.target_patch_size=null"], False),
    "blt-1b": ("blt-1b.yaml", ["data.patching.mode=static", "data.patching.patch_size=4.5",
                               "data.patching.threshold=null", "data.seq_len=1024", "data.max_bytes=4096",
                               "data.batch_size=4", "train.grad_accum=1", "train.dtype=bf16",
                               "train.activation_checkpointing=true"], True),
}
REFERENCE = {"bytes_per_s": 46.1e3, "peak_gib": 73.9, "mfu": 0.14}  # the reference trainer, same setting, H200
GOAL = {"speedup": 2.0, "peak_gib": 60.0}
# long rows: the quickstart BLT with rows of N bytes, 16384 bytes per step (16 x 1024, 4 x 4096, 1 x 16384);
# its local windows (128) run banded, so time per byte should not grow with N (it grew with N^2 at e265e29)
for _n in (1024, 4096, 16384):
    CASES[f"quickstart-blt-{_n}"] = ("quickstart-blt.yaml", [
        "data.patching=space", "data.target_patch_size=null", f"data.max_bytes={_n}", f"data.seq_len={_n}",
        f"data.batch_size={16384 // _n}", f"model.arch.encoder.max_seqlen={_n}", f"model.arch.decoder.max_seqlen={_n}",
        f"model.arch.global.max_seqlen={_n}"], False)
LONG_ROWS = [f"quickstart-blt-{n}" for n in (1024, 4096, 16384)]


def write_corpus(folder: Path, n_docs: int = 40, seed: int = 0) -> None:
    words = ("now is the winter of our discontent made glorious summer by this sun york and all clouds that "
             "lowered upon house in deep bosom ocean buried").split()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)), encoding="utf-8")


def one_case(name: str, compile_: bool, steps: int, warmup: int, data: str, run_dir: str) -> dict:
    import torch

    from torchblt.train.config import load_config
    from torchblt.train.trainer import Trainer

    config, extra, _ = CASES[name]
    cfg = load_config(ROOT / "configs" / config, [
        f"run_dir={run_dir}", f"data.sources=[{data}]", f"train.steps={steps + warmup}", f"train.compile={compile_}",
        "log.progress=false", "log.tensorboard=false", "checkpoint.export=false", "checkpoint.every=100000",
        "optim.warmup_steps=1", "data.validation=[]", *extra])
    t = Trainer(cfg)
    times, n_bytes, mpl = [], 0, []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        rec = t.train_step()
        t.state.step += 1
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            n_bytes += rec["bytes_per_s"] * rec["step_time_s"]
            if "mean_patch_length" in rec:
                mpl.append(rec["mean_patch_length"])
    cuda = t.device.type == "cuda"
    mean_pl = sum(mpl) / len(mpl) if mpl else None
    return {
        "case": name, "compile": compile_, "device": torch.cuda.get_device_name() if cuda else platform.processor()
        or "cpu", "threads": torch.get_num_threads(), "steps": steps,
        "bytes_per_step": n_bytes / steps, "bytes_per_s": n_bytes / sum(times),
        "peak_memory_gb": (torch.cuda.max_memory_allocated() if cuda else
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
        "flops_per_byte": t.flops_per_byte(mean_pl), "mean_patch_length": mean_pl,
        "mfu": rec.get("mfu"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "train.json"))
    ap.add_argument("--only", nargs="*", default=None, help=f"cases to run (default all: {list(CASES)})")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds per (config, compile) case")
    ap.add_argument("--_one", nargs=3, metavar=("CASE", "COMPILE", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._one:
        name, comp, data = args._one
        with tempfile.TemporaryDirectory() as run_dir:
            print(json.dumps(one_case(name, comp == "1", args.steps, args.warmup, data, run_dir)))
        return

    import torch

    has_gpu = torch.cuda.is_available()
    results, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus"
        write_corpus(data)
        for name in args.only or list(CASES):
            if CASES[name][2] and not has_gpu:
                skipped.append(f"{name}: no CUDA device here (run on a GPU machine)")
                continue
            for comp in ([False] if args.no_compile else [False, True]):
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--_one", name, "1" if comp else "0", str(data)]
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout)
                except subprocess.TimeoutExpired:
                    skipped.append(f"{name} compile={comp}: did not finish within {args.case_timeout:.0f} s")
                    continue
                if res.returncode != 0:
                    err = (res.stderr.strip().splitlines() or ["?"])[-1]
                    skipped.append(f"{name} compile={comp}: failed: {err[:200]}")
                    continue
                results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = {r["case"]: r["bytes_per_s"] for r in results if not r["compile"]}
    for r in results:
        r["ratio_vs_eager"] = r["bytes_per_s"] / base[r["case"]] if r["case"] in base else None
        if r["case"] in LONG_ROWS and LONG_ROWS[0] in base and not r["compile"]:
            # time per byte relative to the 1024-byte rows (the goal: <= 1.5)
            r["time_per_byte_vs_1024"] = base[LONG_ROWS[0]] / r["bytes_per_s"]

    head = f"{'case':<20} {'compile':>7} {'bytes/s':>10} {'ratio':>6} {'peak GB':>8} {'GFLOP/byte':>10} {'patch':>6} {'MFU':>6}"
    print(head)
    print("-" * len(head))
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        pl = f"{r['mean_patch_length']:.2f}" if r["mean_patch_length"] else "-"
        ratio = f"{r['ratio_vs_eager']:.2f}" if r["ratio_vs_eager"] else "-"
        print(f"{r['case']:<20} {str(r['compile']):>7} {r['bytes_per_s']:>10.0f} {ratio:>6} "
              f"{r['peak_memory_gb']:>8.2f} {r['flops_per_byte'] / 1e9:>10.4f} {pl:>6} {mfu:>6}")
    for r in results:
        if "time_per_byte_vs_1024" in r:
            print(f"{r['case']}: time per byte {r['time_per_byte_vs_1024']:.2f}x that of 1024-byte rows")
        if r["case"] == "blt-1b":  # against the reference trainer's measurement in the same setting
            r["speedup_vs_reference"] = r["bytes_per_s"] / REFERENCE["bytes_per_s"]
            met = r["speedup_vs_reference"] >= GOAL["speedup"] and r["peak_memory_gb"] <= GOAL["peak_gib"]
            r["goal_met"] = met
            print(f"blt-1b vs reference (compile={r['compile']}): {r['speedup_vs_reference']:.2f}x bytes/s "
                  f"({r['bytes_per_s'] / 1e3:.1f} K vs {REFERENCE['bytes_per_s'] / 1e3:.1f} K), peak "
                  f"{r['peak_memory_gb']:.1f} GiB allocated / {r['peak_reserved_gb']:.1f} reserved (reference "
                  f"{REFERENCE['peak_gib']} GiB), MFU {r['mfu'] or 0:.1%} (reference {REFERENCE['mfu']:.0%}); goal "
                  f">= {GOAL['speedup']:.0f}x and <= {GOAL['peak_gib']:.0f} GiB: {'MET' if met else 'NOT MET'}")
    for s in skipped:
        print(f"skipped: {s}")
    out = {"results": results, "skipped": skipped, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "steps": args.steps, "warmup": args.warmup}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
