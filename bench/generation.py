"""Generation speed and memory: the compiled and the eager step against today's engine and the full recompute.

For every model config and thread count, batch 1, greedy, after a 64-byte prompt, in one run:

* ``compiled`` — :class:`torchblt.generation.IncrementalEngine` with ``compile=True`` (its compile time is
  reported apart: a warm-up run first, with an empty inductor cache; within one process the compiled
  graphs serve every later engine of the same model, so a config's second thread count compiles
  nothing); ``compile_break_even_bytes``: the new bytes after which compiling has paid for itself;
* ``eager`` — the same engine, ``compile=False``;
* ``baseline`` — the engine of another checkout (``--baseline PATH``, e.g. a git worktree of main at the
  commit before engine v2), run in a subprocess on the same weights;
* ``full`` — the plain generator (re-patch and re-run everything per byte; quadratic), once.

The cached paths are timed as the median of ``--repeats`` runs (a few seconds each; a busy moment of the
machine would otherwise decide the ratio), the full recompute once. Every time includes building the
engine and the prefill. Per path: new bytes/s, mean ms per step, the median step that closes a patch
(runs the global model) and one that does not, the mean patch size, peak cache memory per row, and
whether every path produced the same bytes.

"Arithmetic" of a step: the FLOPs per byte of :func:`torchblt.flops.blt_flops_per_byte` (entropy model
included, attention over the mean context) at the GEMM throughput this machine measures, and the bytes a
step must read (every local weight per byte, the global weights once per patch, the caches' keys and
values) at the read bandwidth it measures. The table gives a step's time against both.

``--prefill`` rows: prefill time and peak memory (resident set of a fresh process, minus that process
with a one-byte prompt) for prompts of 1 KB .. 1 MB; a prompt over ``--prefill-doc-bytes`` is made of
documents of that size (the global model attends within a document: one 1 MB document is
quadratic in its ~250 K patches, see docs/generation.md).

    python bench/generation.py --baseline /work/wt-baseline --json bench/generation_cpu.json
    python bench/generation.py --configs light --threads 2 --new-bytes 128 --no-full
    python bench/generation.py --device cuda --gpu        # + blt-1b (random weights), bf16, batch 1 and 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" or "torchblt" not in sys.modules:
    sys.path.insert(0, os.environ.get("BENCH_TORCHBLT_ROOT", str(ROOT)))

from torchblt.formats.common import build_model  # noqa: E402
from torchblt.model.config import (  # noqa: E402
    BLTConfig,
    CrossAttentionConfig,
    EntropyModelConfig,
    HashConfig,
    StackConfig,
    blt_1b,
    entropy_100m,
)
from torchblt.patching import Patcher  # noqa: E402
from torchblt.tokenizer import ByteTokenizer  # noqa: E402

TEXT = (
    "The Byte Latent Transformer reads raw bytes and groups them into patches whose boundaries follow the "
    "entropy of the next byte, so that compute goes where the data is hard to predict. A small local "
    "encoder turns bytes into patch vectors, a large latent transformer runs once per patch, and a small "
    "local decoder turns its output back into bytes. def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
)


def _stack(dim: int, n_layers: int, n_heads: int, window: int | None, attention: str) -> StackConfig:
    return StackConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, multiple_of=64, rope_theta=500000.0,
                       attention=attention, window=window)


def small_config() -> tuple[BLTConfig, EntropyModelConfig]:
    """A scaled-down blt-1b: the same structure (cross-attention k=2, hash n-grams 3..8, window 512) and
    the same balance, a global model several times larger than the local ones (blt-1b: 1.28B vs 0.18B)."""
    blt = BLTConfig(
        encoder=_stack(256, 1, 4, 512, "local_block_causal"),
        global_=_stack(768, 6, 12, None, "block_causal"),
        decoder=_stack(256, 4, 4, 512, "local_block_causal"),
        cross_attn=CrossAttentionConfig(k=2, n_heads=4),
        hash=HashConfig(vocab_size=8191),
    )
    em = EntropyModelConfig(transformer=StackConfig(dim=128, n_layers=4, n_heads=4, multiple_of=64,
                                                    attention="local_block_causal", window=512))
    return blt, em


def light_config() -> tuple[BLTConfig, EntropyModelConfig]:
    """The reference's small benchmark shape: global 384 x 6, encoder 256 x 1, decoder 256 x 4, entropy
    model 128 x 2 (23M parameters with the hash tables)."""
    blt, _ = small_config()
    blt.global_ = _stack(384, 6, 6, None, "block_causal")
    em = EntropyModelConfig(transformer=StackConfig(dim=128, n_layers=2, n_heads=4, multiple_of=64,
                                                    attention="local_block_causal", window=512))
    return blt, em


CONFIGS = {"small": small_config, "light": light_config, "blt-1b": lambda: (blt_1b(), entropy_100m())}


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The config's random-weight model and an entropy patcher whose threshold starts a patch at ~1 byte in
    4.5 of :data:`TEXT` (the paper's mean patch size)."""
    blt_cfg, em_cfg = CONFIGS[name]()
    torch.manual_seed(seed)
    model = build_model(blt_cfg, device=device)
    model.init_weights()
    em = build_model(em_cfg, device=device)
    em.init_weights()
    model, em = model.to(dtype).eval(), em.to(dtype).eval()
    ids = torch.tensor([ByteTokenizer().encode(TEXT * 2, add_eos=False)], device=device)
    ent = em.entropies(ids)[0].float()
    threshold = float(torch.quantile(ent, 1 - 1 / 4.5))
    return model, em, threshold


def prompts(batch: int, n_bytes: int) -> list[list[int]]:
    tok = ByteTokenizer()
    data = (TEXT * (4 + n_bytes // len(TEXT))).encode()
    return [tok.encode(data[37 * i : 37 * i + n_bytes - 1], add_eos=False) for i in range(batch)]  # BOS + bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_run(make_engine, rows: list[list[int]], n_new: int, device: torch.device) -> dict:
    """Greedy generation of ``n_new`` bytes per row: total time (engine and prefill included), per-step
    times split by whether the step closed a patch, the bytes, peak cache memory."""
    sync(device)
    t0 = time.perf_counter()
    engine = make_engine()
    logits = engine.start(rows)
    sync(device)
    prefill = time.perf_counter() - t0
    steps, closing, out = [], [], []
    peak_cache = 0
    for i in range(n_new):
        nxt = logits.argmax(-1)
        out.append(nxt.tolist())
        if i == n_new - 1:
            break
        t = time.perf_counter()
        logits = engine.advance(nxt)
        sync(device)
        steps.append(time.perf_counter() - t)
        closing.append(sum(engine.next_starts))
        if hasattr(engine, "cache_bytes") and (i % 64 == 0 or i == n_new - 2):
            peak_cache = max(peak_cache, sum(engine.cache_bytes().values()))
    total = time.perf_counter() - t0
    close = [t for t, c in zip(steps, closing) if c]
    plain = [t for t, c in zip(steps, closing) if not c]
    weights = engine.step_weight_bytes() if hasattr(engine, "step_weight_bytes") else 0
    return {
        "seconds": total,
        "prefill_seconds": prefill,
        "bytes_per_second": len(rows) * n_new / total,
        "ms_per_step": 1000 * sum(steps) / max(1, len(steps)),
        "ms_closing_step": 1000 * statistics.median(close) if close else None,
        "ms_plain_step": 1000 * statistics.median(plain) if plain else None,
        "mean_patch_bytes": len(rows) * max(1, len(steps)) / max(1, sum(closing)),
        "peak_cache_mib_per_row": peak_cache / 2**20 / len(rows),
        "step_weight_copies_mib": weights / 2**20,
        "tokens": [list(col) for col in zip(*out)],
    }


def median_run(make_engine, rows, n_new, device, repeats: int) -> dict:
    runs = sorted((timed_run(make_engine, rows, n_new, device) for _ in range(repeats)), key=lambda r: r["seconds"])
    if any(r["tokens"] != runs[0]["tokens"] for r in runs):
        raise RuntimeError("repeated runs produced different bytes")
    out = runs[len(runs) // 2]
    out["seconds_all"] = [r["seconds"] for r in runs]
    return out


# ----------------------------------------------------------------------------- the machine
def machine_rates(device: torch.device) -> dict:
    """GEMM throughput (a 2048^3 fp32 product) and read bandwidth (summing 256 MiB) at this thread count."""
    if device.type == "cuda":
        return {}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    gflops = 3 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9
    x = torch.randn(64 * 2**20)
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    gbs = 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9
    return {"gemm_gflops": gflops, "read_gb_s": gbs}


def step_arithmetic(name: str, patch_bytes: float, context: float) -> dict:
    """FLOPs and bytes read per generated byte (fp32) for the config at mean patch size ``patch_bytes``."""
    from torchblt.flops import blt_flops_per_byte

    blt, em = CONFIGS[name]()
    flops = blt_flops_per_byte(blt, patch_bytes, em, context_bytes=context)["inference"]
    model = build_model(blt, device="meta")
    ent = build_model(em, device="meta")
    hash_params = sum(p.numel() for n, p in model.named_parameters() if "hash_tok" in n or "tok_embeddings" in n)
    glob = sum(p.numel() for n, p in model.named_parameters() if n.startswith("global_transformer"))
    local = sum(p.numel() for p in model.parameters()) - glob - hash_params
    em_params = sum(p.numel() for n, p in ent.named_parameters() if "tok_embeddings" not in n)
    kv = 0.0  # keys and values read per byte: every local layer over its window, the global over the patches
    for stack in (blt.encoder, blt.decoder, em.transformer):
        kv += stack.n_layers * 2 * min(stack.window or context, context) * stack.resolved_n_kv_heads * stack.resolved_head_dim
    kv += blt.global_.n_layers * 2 * (context / patch_bytes) * blt.global_.resolved_n_kv_heads \
        * blt.global_.resolved_head_dim / patch_bytes
    weights = local + em_params + glob / patch_bytes
    return {"flops_per_byte": flops, "bytes_read_per_byte": 4 * (weights + kv)}


# ----------------------------------------------------------------------------- one table
def engine_factory(model, patcher, n_new: int, compile_step: bool):
    from torchblt.generation import IncrementalEngine

    return lambda: IncrementalEngine(model, patcher, n_new, compile=compile_step)


def bench_decode(name: str, threads: int, n_new: int, repeats: int, baseline: str | None, full: bool,
                 device: torch.device, dtype: torch.dtype, batch: int = 1, compiled: bool = True) -> dict:
    from torchblt.generation import FullRecomputeEngine

    torch.set_num_threads(threads)
    model, em, threshold = build(name, device, dtype)
    patcher = Patcher("entropy", threshold=threshold, entropy_model=em)
    rows = prompts(batch, 64)
    row: dict = {"config": name, "threads": threads, "batch": batch, "new_bytes": n_new, "device": str(device),
                 "dtype": str(dtype).replace("torch.", ""), "params": sum(p.numel() for p in model.parameters()),
                 "weights_mib": sum(p.numel() * p.element_size() for p in [*model.parameters(), *em.parameters()])
                 / 2**20, "machine": machine_rates(device)}
    row["compile_seconds"] = None
    if compiled:
        t = time.perf_counter()
        timed_run(engine_factory(model, patcher, n_new, True), rows, n_new, device)  # compiles
        row["compile_seconds"] = time.perf_counter() - t
        row["compiled"] = median_run(engine_factory(model, patcher, n_new, True), rows, n_new, device, repeats)
    row["eager"] = median_run(engine_factory(model, patcher, n_new, False), rows, n_new, device, repeats)
    if baseline:
        row["baseline"] = run_baseline(baseline, name, model, em, threshold, rows, n_new, threads, repeats)
    if full:
        row["full"] = timed_run(lambda: FullRecomputeEngine(model, patcher, batch_equal_lengths=True), rows, n_new,
                                device)
    ref = row["eager"]["tokens"]
    row["identical_bytes"] = all(row[k]["tokens"] == ref for k in ("compiled", "baseline", "full") if k in row)
    for k in ("compiled", "eager", "baseline", "full"):
        if k in row:
            row[k].pop("tokens")
    if row["machine"]:
        ar = step_arithmetic(name, row["eager"]["mean_patch_bytes"], 64 + n_new / 2)
        row["arithmetic"] = {**ar, "ms_flops": 1000 * ar["flops_per_byte"] / (row["machine"]["gemm_gflops"] * 1e9),
                             "ms_bytes": 1000 * ar["bytes_read_per_byte"] / (row["machine"]["read_gb_s"] * 1e9)}
    if compiled:
        # new bytes after which compiling has paid for itself (cold compile time / time saved per byte)
        saved = 1 / row["eager"]["bytes_per_second"] - 1 / row["compiled"]["bytes_per_second"]
        row["compile_break_even_bytes"] = row["compile_seconds"] / saved if saved > 0 else None
    for k in ("baseline", "full"):
        for mine in ("compiled", "eager"):
            if k in row and mine in row:
                row[f"{mine}_vs_{k}"] = row[mine]["bytes_per_second"] / row[k]["bytes_per_second"]
    return row


def run_baseline(root: str, name: str, model, em, threshold: float, rows, n_new: int, threads: int,
                 repeats: int) -> dict:
    """Today's engine from another checkout, in a subprocess, on these weights (the worker builds the
    config with the other checkout's classes and loads the state dicts)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save({"config": name, "model": model.state_dict(), "em": em.state_dict(), "threshold": threshold,
                    "rows": rows, "n_new": n_new, "threads": threads, "repeats": repeats}, weights)
        env = {**os.environ, "BENCH_TORCHBLT_ROOT": root, "PYTHONPATH": root}
        out = subprocess.run([sys.executable, __file__, "--_baseline-worker", str(weights)], env=env,
                             capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the baseline worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_worker(path: str) -> None:
    from torchblt.generation import IncrementalEngine

    spec = torch.load(path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    blt_cfg, em_cfg = CONFIGS[spec["config"]]()
    model, em = build_model(blt_cfg, device="cpu"), build_model(em_cfg, device="cpu")
    model.load_state_dict(spec["model"])
    em.load_state_dict(spec["em"])
    model, em = model.eval(), em.eval()
    patcher = Patcher("entropy", threshold=spec["threshold"], entropy_model=em)
    make = lambda: IncrementalEngine(model, patcher, spec["n_new"])  # noqa: E731
    timed_run(make, spec["rows"], 8, torch.device("cpu"))  # warm-up
    print(json.dumps(median_run(make, spec["rows"], spec["n_new"], torch.device("cpu"), spec["repeats"])))


# ----------------------------------------------------------------------------- prefill
def prefill_prompt(n_bytes: int, doc_bytes: int) -> list[int]:
    """``n_bytes`` of text (BOS first); over ``doc_bytes`` it is made of documents of that size (EOS-ended)."""
    tok = ByteTokenizer()
    data = (TEXT * (n_bytes // len(TEXT) + 1)).encode()[: n_bytes - 1]
    if n_bytes <= doc_bytes:
        return tok.encode(data, add_eos=False)
    out = [tok.bos_id]  # BOS, then documents that each end with an EOS
    for a in range(0, len(data), doc_bytes):
        piece = tok.encode(data[a : a + doc_bytes - 1], add_bos=False, add_eos=True)
        out += piece
    return out[:n_bytes]


def bench_prefill(name: str, sizes: list[int], doc_bytes: int, threads: int) -> list[dict]:
    rows = []
    base = prefill_worker_run(name, 1, doc_bytes, threads)
    for n in sizes:
        r = prefill_worker_run(name, n, doc_bytes, threads)
        r["peak_mib_over_1_byte"] = r["max_rss_mib"] - base["max_rss_mib"]
        rows.append(r)
        print(f"prefill {name:6s} thr {threads} {n:>8} bytes ({r['documents']} docs): {r['seconds']:8.2f} s "
              f"{r['bytes_per_second']:>9.0f} B/s  peak +{r['peak_mib_over_1_byte']:.0f} MiB  "
              f"global cache {r['global_cache_mib']:.0f} MiB", flush=True)
    return rows


def prefill_worker_run(name: str, n: int, doc_bytes: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_prefill-worker", json.dumps([name, n, doc_bytes, threads])],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prefill_worker(arg: str) -> None:
    from torchblt.generation import IncrementalEngine

    name, n, doc_bytes, threads = json.loads(arg)
    torch.set_num_threads(threads)
    model, em, threshold = build(name, torch.device("cpu"), torch.float32)
    patcher = Patcher("entropy", threshold=threshold, entropy_model=em)
    ids = prefill_prompt(n, doc_bytes)
    engine = IncrementalEngine(model, patcher, 1)
    t = time.perf_counter()
    state, _, starts = engine.prefill([ids])
    seconds = time.perf_counter() - t
    print(json.dumps({"config": name, "bytes": n, "documents": ids.count(2) + (ids[-1] != 2), "threads": threads,
                      "seconds": seconds, "bytes_per_second": n / seconds, "patches": sum(starts[0]),
                      "global_cache_mib": state.global_.nbytes() / 2**20,
                      "cache_mib": sum(state.cache_bytes().values()) / 2**20,
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# ----------------------------------------------------------------------------- output
def print_row(r: dict) -> None:
    e = r["eager"]
    c = r.get("compiled") or e
    b, f = r.get("baseline"), r.get("full")

    def bps(x):
        return f"{x['bytes_per_second']:7.1f}" if x else "      -"

    ar = r.get("arithmetic")
    arith = (f"{c['ms_per_step'] / ar['ms_flops']:5.1f}x flops {c['ms_per_step'] / ar['ms_bytes']:4.1f}x bytes"
             if ar else "-")
    print(f"{r['config']:<6} {r['threads']:>3} {r['batch']:>2} {r['new_bytes']:>4} | {bps(r.get('compiled'))} {bps(e)} "
          f"{bps(b)} {bps(f)} | "
          f"{r.get('compiled_vs_baseline', float('nan')):5.2f}x {r.get('eager_vs_baseline', float('nan')):5.2f}x "
          f"{r.get('compiled_vs_full', float('nan')):6.1f}x | {c['ms_per_step']:5.2f} {c['ms_closing_step'] or 0:6.2f} "
          f"{c['ms_plain_step'] or 0:5.2f} {(b or {}).get('ms_per_step', float('nan')):6.2f} | {arith} | "
          f"{c['peak_cache_mib_per_row']:5.1f} {r['weights_mib']:6.1f} {(b or {}).get('step_weight_copies_mib', 0):6.1f} | "
          f"{r['compile_seconds'] or 0:5.0f} {c['mean_patch_bytes']:4.2f} {r['identical_bytes']}", flush=True)


HEADER = ("config thr  B  new | compiled   eager baseline   full | comp/base eager/base comp/full | "
          "ms/step closing plain base | step vs arithmetic | cache/row weights copies | compile_s patch same")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["small", "light"], choices=["small", "light"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--new-bytes", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="a checkout of today's engine (e.g. a git worktree of main)")
    ap.add_argument("--no-full", dest="full", action="store_false", help="skip the full recompute")
    ap.add_argument("--no-compile", dest="compiled", action="store_false", help="skip the compiled step")
    ap.add_argument("--full-threads", type=int, nargs="+", default=None,
                    help="thread counts that run the full recompute (default: all)")
    ap.add_argument("--prefill", type=int, nargs="*", default=None, metavar="BYTES",
                    help="prefill rows for these prompt sizes (light config), e.g. 1024 10240 102400 1048576")
    ap.add_argument("--prefill-doc-bytes", type=int, default=1 << 17)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu", action="store_true", help="blt-1b rows (random weights, bf16, batch 1 and 8) on CUDA")
    ap.add_argument("--json", default="generation_bench.json")
    ap.add_argument("--_baseline-worker", dest="baseline_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_prefill-worker", dest="prefill_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_worker:
        baseline_worker(args.baseline_worker)
        return 0
    if args.prefill_worker:
        prefill_worker(args.prefill_worker)
        return 0
    device = torch.device(args.device)
    # a cold compile, as a user's first call sees it (not kernels cached on disk by an earlier run)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-generation-inductor-"))
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "argv": sys.argv[1:], "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "inductor_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"]}
    print(json.dumps(meta))
    results: dict = {"meta": meta, "decode": [], "prefill": []}
    if args.gpu:
        if device.type != "cuda":
            ap.error("--gpu needs --device cuda")
        for batch in (1, 8):
            r = bench_decode("blt-1b", torch.get_num_threads(), args.new_bytes, args.repeats, None, False, device,
                             torch.bfloat16, batch)
            results["decode"].append(r)
            print(f"blt-1b bf16 batch {batch}: compiled {r['compiled']['bytes_per_second']:.0f} B/s, eager "
                  f"{r['eager']['bytes_per_second']:.0f} B/s, compile {r['compile_seconds']:.0f} s", flush=True)
    else:
        print(HEADER)
        if not args.compiled:
            print("(--no-compile: the ms/step, arithmetic, cache and patch columns are the eager step's)")
        for name in args.configs:
            for threads in args.threads:
                full = args.full and (args.full_threads is None or threads in args.full_threads)
                r = bench_decode(name, threads, args.new_bytes, args.repeats, args.baseline, full, device,
                                 torch.float32, args.batch, args.compiled)
                results["decode"].append(r)
                print_row(r)
        if args.prefill:
            results["prefill"] = bench_prefill("light", args.prefill, args.prefill_doc_bytes, max(args.threads))
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
