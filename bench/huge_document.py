"""Peak resident memory and loader-state size for a huge one-line training document (issue 9 item 4).

A ~200 MB document is written once as a text file and as one JSONL record (``json.dumps``: non-ASCII and
newlines escaped). For each file and each engine (a torchblt checkout put first on ``PYTHONPATH``: this
one, and e.g. the main branch's for "before"), a fresh process builds the training loader with the
default bounds (``max_doc_bytes`` 64 MiB, segments of 256 K tokens, JSONL lines past 16 MiB streamed),
takes 8 batches, saves the loader state as JSON, loads it into a fresh loader and checks that the next
batch is the same; it reports its peak RSS (VmHWM), the state's size and the seconds taken. Memory, not
time: no need for an idle machine.

    python bench/huge_document.py [--mb 200] [--formats txt,jsonl,parquet] [--engine PATH ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from torchblt.data import DataConfig, build_loader
from torchblt.patching import PatchingConfig

def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

torch.set_num_threads(1)
base = peak_mb()
t = time.perf_counter()
cfg = DataConfig(sources=[sys.argv[1]], kind="blt", patching=PatchingConfig("space"), seq_len=1024, max_bytes=4096,
                 batch_size=4)
dl = build_loader(cfg)
it = iter(dl)
for _ in range(8):
    next(it)
state = json.dumps(dl.state_dict())
again = build_loader(cfg)
again.load_state_dict(json.loads(state))
a, b = next(it), next(iter(again))
assert torch.equal(a.x, b.x) and torch.equal(a.patch_lengths, b.patch_lengths)
import torchblt
print(json.dumps({"torchblt": torchblt.__file__, "peak_rss_mb": round(peak_mb(), 1), "peak_above_imports_mb": round(peak_mb() - base, 1),
                  "state_bytes": len(state), "seconds": round(time.perf_counter() - t, 1)}))
"""


def write_documents(folder: Path, mb: int, formats: list[str]) -> dict[str, Path]:
    words = "alpha beta gamma délta x longerword «quoted» \"q\" tab\tend".split(" ")
    line = " ".join(words[(i * 7) % len(words)] for i in range(16)) + "\n"
    text = line * (mb * 2**20 // len(line.encode()) + 1)
    paths = {kind: folder / f"one_line_{mb}mb.{kind}" for kind in formats}
    if "txt" in paths:
        paths["txt"].write_text(text, encoding="utf-8")
    if "jsonl" in paths:
        paths["jsonl"].write_text(json.dumps({"id": 1, "text": text}) + "\n", encoding="utf-8")
    if "parquet" in paths:  # one row (a cell is read whole: no streaming inside a Parquet value)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [text]}), paths["parquet"])
    return paths


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--engine", action="append", help="a torchblt checkout (default: this one)")
    ap.add_argument("--formats", default="txt,jsonl", help="comma-separated: txt, jsonl, parquet")
    ap.add_argument("--json", default=str(here / "bench" / "huge_document.json"))
    args = ap.parse_args()
    engines = args.engine or [str(here)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_documents(Path(tmp), args.mb, args.formats.split(","))
        for engine in engines:
            for kind, path in paths.items():
                env = {**os.environ, "PYTHONPATH": engine, "OMP_NUM_THREADS": "1"}
                res = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env,
                                     cwd=tmp)  # (not a checkout: `-c` imports from the working directory first)
                row = {"engine": engine, "file": kind, "file_mb": round(path.stat().st_size / 2**20, 1)}
                if res.returncode:
                    row["error"] = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
                else:
                    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps({"mb": args.mb, "rows": rows}, indent=1) + "\n")
    print(f"{'engine':40} {'file':6} {'MB':>6} {'peak RSS MB':>12} {'above imports':>14} {'state bytes':>12} {'s':>6}")
    for r in rows:
        print(f"{r['engine'][-40:]:40} {r['file']:6} {r['file_mb']:6} {r.get('peak_rss_mb', '-'):>12} "
              f"{r.get('peak_above_imports_mb', '-'):>14} {r.get('state_bytes', r.get('error', '-')):>12} "
              f"{r.get('seconds', '-'):>6}")


if __name__ == "__main__":
    main()
