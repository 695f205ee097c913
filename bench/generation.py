"""Generation speed: incremental (KV-cached) decoding vs full recompute, same model, same run.

For every batch size and number of new bytes (after a 64-byte prompt per row) both engines generate
greedily from random-weight models; the table gives new bytes per second, the speed-up (the ratio of
the two, measured in this run; the cached path's time is the median of 3 runs, the full recompute's one
run of minutes), how each path's cost per byte grows (ms per step over the first and the
last 10% of the steps), the peak cache memory of the cached path, and whether both produced the same
bytes. The full-recompute baseline is the plain generator; with equal-length rows it runs the rows as
one batch (a stronger baseline than one row at a time).

    python bench/generation.py                       # small config on CPU: 256/512/1024 new bytes, batch 1 and 8,
                                                     # with 1 thread and with torch's default thread count
    python bench/generation.py --lengths 512 --batch-sizes 1 --threads 2
    python bench/generation.py --kernels             # the one-row product kernels behind the decoding step
    python bench/generation.py --device cuda          # + blt-1b (random weights) when CUDA is available

Writes a JSON file (``--json``, default ``generation_bench.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchblt.formats.common import build_model  # noqa: E402
from torchblt.generation import FullRecomputeEngine, IncrementalEngine  # noqa: E402
from torchblt.generation.fused import onednn_pack, onednn_product  # noqa: E402
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


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    blt_cfg, em_cfg = small_config() if name == "small" else (blt_1b(), entropy_100m())
    torch.manual_seed(seed)
    model = build_model(blt_cfg, device=device)
    model.init_weights()
    em = build_model(em_cfg, device=device)
    em.init_weights()
    model, em = model.to(dtype).eval(), em.to(dtype).eval()
    # a threshold that starts a patch at ~1 byte in 4.5 (the paper's mean patch size) on this text
    ids = torch.tensor([ByteTokenizer().encode(TEXT * 2, add_eos=False)], device=device)
    ent = em.entropies(ids)[0].float()
    threshold = float(torch.quantile(ent, 1 - 1 / 4.5))
    return model, Patcher("entropy", threshold=threshold, entropy_model=em)


def prompts(batch: int, n_bytes: int) -> list[list[int]]:
    tok = ByteTokenizer()
    data = (TEXT * 4).encode()
    return [tok.encode(data[37 * i : 37 * i + n_bytes - 1], add_eos=False) for i in range(batch)]  # BOS + bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_run(make_engine, rows: list[list[int]], n_new: int, device: torch.device) -> dict:
    """Greedy generation of ``n_new`` bytes per row: total time (building the engine included: the cached
    one lays out its step weights), per-step times, the bytes."""
    sync(device)
    t0 = time.perf_counter()
    engine = make_engine()
    logits = engine.start(rows)
    sync(device)
    prefill = time.perf_counter() - t0
    steps, out = [], []
    peak_cache = 0
    new_starts = sum(engine.next_starts)  # does the first new byte start a patch (per row)
    for i in range(n_new):
        nxt = logits.argmax(-1)
        out.append(nxt.tolist())
        if i == n_new - 1:
            break
        t = time.perf_counter()
        logits = engine.advance(nxt)
        sync(device)
        steps.append(time.perf_counter() - t)
        new_starts += sum(engine.next_starts)
        if hasattr(engine, "cache_bytes") and (i % 64 == 0 or i == n_new - 2):
            peak_cache = max(peak_cache, sum(engine.cache_bytes().values()))
    total = time.perf_counter() - t0
    k = max(1, len(steps) // 10)
    # growth of the cost per step with the text: least-squares slope of step time against step index
    n = len(steps)
    mean_i, mean_t = (n - 1) / 2, sum(steps) / max(1, n)
    var_i = sum((i - mean_i) ** 2 for i in range(n))
    slope = sum((i - mean_i) * (t - mean_t) for i, t in enumerate(steps)) / var_i if var_i else 0.0
    return {
        "seconds": total,
        "prefill_seconds": prefill,
        "bytes_per_second": len(rows) * n_new / total,
        "ms_per_step_first10pct": 1000 * sum(steps[:k]) / k,
        "ms_per_step_last10pct": 1000 * sum(steps[-k:]) / k,
        "ms_per_step_growth_per_100_bytes": 1000 * 100 * slope,
        "peak_cache_mib": peak_cache / 2**20,
        "mean_patch_bytes_generated": len(rows) * n_new / max(1, new_starts),
        "tokens": [list(col) for col in zip(*out)],
        "cache_breakdown_mib": {k2: v / 2**20 for k2, v in engine.cache_bytes().items()}
        if hasattr(engine, "cache_bytes") else None,
        "step_weights_mib": engine.step_weight_bytes() / 2**20 if hasattr(engine, "step_weight_bytes") else None,
    }


def median_run(make_engine, rows: list[list[int]], n_new: int, device: torch.device, repeats: int) -> dict:
    """The run with the median total time of ``repeats`` (a few-second run is at the mercy of a busy
    machine; the full recompute runs for minutes and is timed once). Every repeat must give the same bytes."""
    runs = sorted((timed_run(make_engine, rows, n_new, device) for _ in range(repeats)), key=lambda r: r["seconds"])
    if any(r["tokens"] != runs[0]["tokens"] for r in runs):
        raise RuntimeError("repeated cached runs produced different bytes")
    out = runs[len(runs) // 2]
    out["seconds_all"] = [r["seconds"] for r in runs]
    return out


def bench_config(name: str, device: torch.device, dtype: torch.dtype, lengths: list[int], batch_sizes: list[int],
                 prompt_bytes: int, full_max_work: int, threads: int | None, repeats: int = 3) -> list[dict]:
    model, patcher = build(name, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    rows_out = []
    # warm-up (allocator, kernels) on every path
    timed_run(lambda: IncrementalEngine(model, patcher, 8), prompts(1, prompt_bytes), 8, device)
    timed_run(lambda: IncrementalEngine(model, patcher, 8, fused=False), prompts(1, prompt_bytes), 8, device)
    timed_run(lambda: FullRecomputeEngine(model, patcher, True), prompts(1, prompt_bytes), 4, device)
    for batch in batch_sizes:
        for n_new in lengths:
            rows = prompts(batch, prompt_bytes)
            cached = median_run(lambda n=n_new: IncrementalEngine(model, patcher, n), rows, n_new, device, repeats)
            modules = median_run(lambda n=n_new: IncrementalEngine(model, patcher, n, fused=False), rows, n_new,
                                 device, repeats)
            full = None
            if not full_max_work or batch * n_new <= full_max_work:
                full = timed_run(lambda: FullRecomputeEngine(model, patcher, batch_equal_lengths=True), rows, n_new,
                                 device)
            row = {
                "config": name,
                "device": str(device),
                "threads": threads,
                "dtype": str(dtype).replace("torch.", ""),
                "params_blt": n_params,
                "batch": batch,
                "prompt_bytes": prompt_bytes,
                "new_bytes": n_new,
                "cached": {k: v for k, v in cached.items() if k != "tokens"},
                "cached_modules": {k: v for k, v in modules.items() if k != "tokens"},
                "full": {k: v for k, v in full.items() if k != "tokens"} if full else None,
                "speedup": full["seconds"] / cached["seconds"] if full else None,
                "speedup_modules": full["seconds"] / modules["seconds"] if full else None,
                "identical_bytes": (full["tokens"] == cached["tokens"] == modules["tokens"]) if full
                else cached["tokens"] == modules["tokens"],
            }
            rows_out.append(row)
            print_row(row)
    return rows_out


HEADER = (
    f"{'config':<7} {'dev':<5} {'thr':>3} {'B':>2} {'new':>5} | {'cached B/s':>10} {'modules':>8} {'full B/s':>9} "
    f"{'speedup':>8} | {'cached ms/step':>14} {'/100B':>6} {'full ms/step':>14} {'/100B':>6} | {'cache MiB':>9} "
    f"{'patch':>5} {'same':>5}"
)


def print_row(row: dict) -> None:
    c, m, f = row["cached"], row["cached_modules"], row["full"]
    cs = f"{c['ms_per_step_first10pct']:.2f}->{c['ms_per_step_last10pct']:.2f}"
    fs = f"{f['ms_per_step_first10pct']:.1f}->{f['ms_per_step_last10pct']:.1f}" if f else "-"
    fg = f"{f['ms_per_step_growth_per_100_bytes']:+6.1f}" if f else "-"
    print(
        f"{row['config']:<7} {row['device'][:5]:<5} {row['threads'] or '-':>3} {row['batch']:>2} {row['new_bytes']:>5} | "
        f"{c['bytes_per_second']:>10.1f} {m['bytes_per_second']:>8.1f} "
        f"{(f['bytes_per_second'] if f else float('nan')):>9.1f} "
        f"{(row['speedup'] or float('nan')):>7.1f}x | {cs:>14} {c['ms_per_step_growth_per_100_bytes']:+6.2f} "
        f"{fs:>14} {fg:>6} | {c['peak_cache_mib']:>9.2f} {c['mean_patch_bytes_generated']:>5.2f} "
        f"{str(row['identical_bytes']):>5}",
        flush=True,
    )


def _products(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [fn(x, w) for w in weights]


KERNEL_SHAPES = [(256, 768), (256, 1408), (704, 256), (768, 2304), (768, 768), (768, 4096), (2048, 768)]  # (in, out)


def bench_kernels(threads: list[int], shapes: list[tuple[int, int]] = KERNEL_SHAPES) -> list[dict]:
    """One-row products (what a decoding step does) with the small config's matrix shapes: ``nn.Linear``
    vs the step's input-major ``x @ W_t`` vs oneDNN's packed layout; 40 matrices of a shape per round, so
    the weights come from memory, not from the cache. Backs the choices in ``torchblt.generation.fused``."""
    out = []
    print(f"{'thr':>3} {'in x out':>11} | {'nn.Linear':>10} {'x @ W_t':>10} {'oneDNN':>10}  (GiB/s of weights read)")
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for d_in, d_out in shapes:
            ws = [torch.randn(d_out, d_in) for _ in range(40)]
            wts = [w.t().contiguous() for w in ws]
            x = torch.randn(1, 1, d_in)
            fns = {"linear": partial(_products, torch.nn.functional.linear, x, ws),
                   "input_major": partial(_products, torch.matmul, x, wts)}
            if torch.backends.mkldnn.is_available():
                packed = [onednn_pack(w) for w in ws]
                fns["onednn"] = partial(_products, onednn_product, x, packed)
            gib = 40 * d_in * d_out * 4 / 2**30
            rates = {}
            with torch.inference_mode():
                for k, fn in fns.items():
                    fn()
                    reps = max(3, int(2e8 / (40 * d_in * d_out * 4)))
                    t = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    rates[k] = gib * reps / (time.perf_counter() - t)
            out.append({"threads": n_threads, "in": d_in, "out": d_out, "gib_per_s": rates})
            print(f"{n_threads:>3} {f'{d_in}x{d_out}':>11} | {rates['linear']:>10.1f} {rates['input_major']:>10.1f} "
                  f"{rates.get('onednn', float('nan')):>10.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-bytes", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch CPU thread counts to run the CPU table with, one table each (default: 1 and torch's "
                         "default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; the blt-1b row runs only on CUDA")
    ap.add_argument("--full-max-work", type=int, default=4096,
                    help="run the full-recompute baseline only when batch x new bytes <= this (it is quadratic; "
                         "default 4096 skips batch 8 x 1024, ~40 min on one CPU core); 0 = always")
    ap.add_argument("--gpu-lengths", type=int, nargs="+", default=None, help="lengths for blt-1b (default: --lengths)")
    ap.add_argument("--kernels", action="store_true",
                    help="only the one-row matrix-product kernels (nn.Linear vs the decoding step's layouts)")
    ap.add_argument("--json", default="generation_bench.json", help="where to write the results")
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads})
    if any(t < 1 for t in threads):
        ap.error(f"--threads must be positive, got {threads}")
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, threads {threads}")
    meta = {"torch": torch.__version__, "threads": threads, "argv": sys.argv[1:],
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.kernels:
        Path(args.json).write_text(json.dumps({"meta": meta, "kernels": bench_kernels(threads)}, indent=1))
        print(f"wrote {args.json}")
        return 0
    print("cached: the fused decode-layout step; modules: the same engine on the model's modules (fused=False); "
          "speedup = full / cached seconds")
    print("per-step columns: mean ms of one decoding step over the first -> the last 10% of the steps; /100B: "
          "least-squares growth of the step time per 100 bytes of text; patch: mean patch size of the generated bytes")
    print(HEADER)
    results = []
    if device.type == "cuda":
        results += bench_config("small", device, torch.float32, args.lengths, args.batch_sizes, args.prompt_bytes,
                                args.full_max_work, None)
    else:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            results += bench_config("small", device, torch.float32, args.lengths, args.batch_sizes,
                                    args.prompt_bytes, args.full_max_work, n_threads)
    if torch.cuda.is_available() and device.type == "cuda":
        from torchblt.model.masks import set_attention_backend

        set_attention_backend("sdpa")  # full recompute: no per-shape FlexAttention recompiles
        results += bench_config("blt-1b", device, torch.bfloat16, args.gpu_lengths or args.lengths,
                                args.batch_sizes, args.prompt_bytes, args.full_max_work, None)
    else:
        print("blt-1b on GPU: skipped (CUDA is not available here); run with --device cuda on a GPU machine")
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
