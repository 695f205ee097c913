"""Serving throughput and latency: 1, 4 and 16 concurrent streaming clients against ``blt serve``, one run.

The server (a child process: its own interpreter, as in production) serves bench/generation.py's *small*
config (random weights, entropy patching) with the default scheduler (``--max-batch 16``). Each client
sends streaming completions back to back (greedy, ``ignore_eos``, 64-byte prompts from different places
of one text, ``max_tokens`` cycling through 32..96 so requests end at different moments, as real ones
do); the clients of a level start staggered over ``--ramp`` seconds. For every level it reports:

* aggregate new bytes/s: bytes streamed to all clients between the end of the ramp and the end of the
  level (``--seconds``), divided by that time;
* time to first byte (request sent -> first chunk carrying a new byte), p50 / p99 over requests;
* inter-byte latency (each chunk's gap since the previous chunk of its request, divided by the new bytes
  it carries), p50 / p99 over bytes; bytes are counted from the chunks' ``logprobs.tokens``, so bytes
  held back (an unfinished UTF-8 character) or dropped (invalid UTF-8) still count;
* the mean number of rows decoding and of engine batches stepped per byte (``blt_running_rows``,
  ``blt_engine_batches``, sampled from ``/metrics``);

and the ratios at 16 clients to 1: aggregate throughput (goal >= 4) and p99 inter-byte latency (goal
<= 5). Every level is measured ``--rounds`` times (default 2) in alternating order (1, 4, 16, 16, 4, 1) and
the rounds are pooled: this machine's speed drifts by 10-20% within minutes, and a ratio of two levels
measured minutes apart carried that drift. An engine-only section in the same run (no HTTP) times 16 rows decoded as one batch vs as 16
one-row batches vs one row alone (what batching can bring at most), one step at each batch size, the
prefill of a 64- and a 512-byte prompt whole and in chunks (what ``--prefill-chunk`` costs and bounds),
and what a row joining / leaving a 16-row batch costs by copying the batch (``DecodeState.extend`` /
``select``) against writing it into a free slot (``DecodeState.put``).

With ``--prefill-thread on,off`` (or ``--compile on,off``: the server's compiled step, each batch size compiled
at its start) it starts one server per setting and runs each level on both in turn (which goes first
alternates), so the setting's gain is a ratio of one run.

    python bench/serve.py                        # writes serve_bench.json, prints the table
    python bench/serve.py --threads 1 --prefill-thread on,off --json bench/serve_cpu.json   # ~6.5 minutes
    python bench/serve.py --threads 1 --compile on,off --json bench/serve_compile_cpu.json  # + minutes of compiling
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generation import TEXT, build  # noqa: E402

from torchblt.commands.serve import AUTO_ON_OFF  # noqa: E402  (argparse only: no serve extra needed)


def build_small():
    """bench/generation.py's small config and its entropy patcher: ``(model, patcher)``."""
    from torchblt.patching import Patcher

    model, em, threshold = build("small", torch.device("cpu"), torch.float32)
    return model, Patcher("entropy", threshold=threshold, entropy_model=em)


MODEL_NAME = "small"
LENGTHS = (32, 48, 64, 80, 96)
PROMPT_BYTES = 64


def serve_child(args: argparse.Namespace) -> int:
    """The server process: the small model behind ``blt serve``'s server."""
    from torchblt.serve import BatchEngine, BLTServer, ServeConfig, run

    torch.set_num_threads(args.threads)
    model, patcher = build_small()
    compile_ = AUTO_ON_OFF[args.compile] is True
    # the bench's requests: 64-byte prompts, at most 96 new bytes (a compiled server sizes every row's caches
    # for max_prompt_bytes + max_tokens)
    config = ServeConfig(model_name=MODEL_NAME, max_batch=args.max_batch, max_queue=256, drain_timeout=5,
                         prefill_chunk=args.prefill_chunk, prefill_thread=AUTO_ON_OFF[args.prefill_thread],
                         max_prompt_bytes=256, max_tokens=128)
    server = BLTServer(model, config, engine=BatchEngine(model, patcher, compile=compile_, context=256 + 128))
    return run(server, port=args.port, log_level="warning")


# --------------------------------------------------------------------------- clients


def prompt_for(client: int, k: int) -> str:
    data = (TEXT * 4).encode()
    start = (client * 131 + k * 37) % (len(data) - PROMPT_BYTES)
    return data[start : start + PROMPT_BYTES].decode("utf-8", errors="ignore")


def one_request(port: int, prompt: str, max_tokens: int) -> dict:
    """A streaming completion; per chunk carrying new bytes: (arrival time, n new bytes)."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    chunks = []
    while True:
        line = resp.readline()
        if not line:
            raise RuntimeError("stream ended without [DONE]")
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        msg = json.loads(data)
        if "error" in msg:
            raise RuntimeError(msg["error"]["message"])
        lp = msg["choices"][0]["logprobs"]
        n = len(lp["tokens"]) if lp else 0
        if n:
            chunks.append((time.perf_counter(), n))
    conn.close()
    return {"sent": sent, "chunks": chunks, "max_tokens": max_tokens}


def sample_metrics(port: int, stop: threading.Event, out: list[tuple[float, float, float]]) -> None:
    while not stop.is_set():
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            rows = float(re.search(r"^blt_running_rows (\S+)$", text, re.M).group(1))
            cohorts = float(re.search(r"^blt_engine_batches (\S+)$", text, re.M).group(1))
            out.append((time.perf_counter(), rows, cohorts))
        except (OSError, AttributeError):
            pass
        stop.wait(0.2)


def scheduler_seconds(port: int) -> dict[str, float]:
    """``blt_scheduler_seconds_total`` by phase, now."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^blt_scheduler_seconds_total\{phase="(\w+)"\} (\S+)$', text, re.M)}


def run_level(port: int, n_clients: int, seconds: float, ramp: float) -> dict:
    start = time.perf_counter()
    window = (start + ramp, start + seconds)
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        time.sleep(ramp * i / n_clients)
        k = 0
        while time.perf_counter() < window[1]:
            try:
                r = one_request(port, prompt_for(i, k), LENGTHS[(i * 3 + k) % len(LENGTHS)])
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                return
            with lock:
                results.append(r)
            k += 1

    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_metrics, args=(port, stop, samples), daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    busy: list[dict[str, float]] = []

    def at_window_edges() -> None:
        for edge in window:
            time.sleep(max(0.0, edge - time.perf_counter()))
            busy.append(scheduler_seconds(port))

    edges = threading.Thread(target=at_window_edges, daemon=True)
    edges.start()
    for t in threads:
        t.join()
    edges.join()
    stop.set()
    sampler.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[:3]}")
    in_window = sum(n for r in results for t, n in r["chunks"] if window[0] <= t <= window[1])
    ttfb = [r["chunks"][0][0] - r["sent"] for r in results if r["chunks"]]
    inter = []
    for r in results:
        for (t0, _), (t1, n) in zip(r["chunks"], r["chunks"][1:]):
            inter.extend([(t1 - t0) / n] * n)
    n_bytes = sum(n for r in results for _, n in r["chunks"])
    if any(sum(n for _, n in r["chunks"]) != r["max_tokens"] for r in results):
        raise RuntimeError("a request streamed a different number of bytes than it asked for")
    steady = [s for s in samples if window[0] <= s[0] <= window[1]] or samples
    return {
        "_raw": {"ttfb": ttfb, "inter": inter, "in_window": in_window},
        "clients": n_clients,
        "requests": len(results),
        "bytes": n_bytes,
        "window_seconds": window[1] - window[0],
        "bytes_per_second": in_window / (window[1] - window[0]),
        "ttfb_p50_ms": 1000 * quantile(ttfb, 0.5),
        "ttfb_p99_ms": 1000 * quantile(ttfb, 0.99),
        "inter_byte_p50_ms": 1000 * quantile(inter, 0.5),
        "inter_byte_p99_ms": 1000 * quantile(inter, 0.99),
        "mean_running_rows": statistics.fmean(s[1] for s in steady) if steady else None,
        "mean_cohorts": statistics.fmean(s[2] for s in steady) if steady else None,
        # share of the steady window the scheduler thread spent in each phase (the rest: idle or waiting)
        "scheduler_share": {k: (busy[1].get(k, 0.0) - busy[0].get(k, 0.0)) / (window[1] - window[0])
                            for k in busy[1]} if len(busy) == 2 else None,
    }


def pool(runs: list[dict]) -> dict:
    """One level's rounds as one: bytes/s over the summed windows, quantiles over every request and byte
    of all rounds, means of the sampled gauges and scheduler shares."""
    ttfb = [x for r in runs for x in r["_raw"]["ttfb"]]
    inter = [x for r in runs for x in r["_raw"]["inter"]]
    window = sum(r["window_seconds"] for r in runs)
    shares = [r["scheduler_share"] for r in runs if r["scheduler_share"]]
    mean = lambda key: statistics.fmean(r[key] for r in runs if r[key] is not None)  # noqa: E731
    return {
        "clients": runs[0]["clients"],
        "rounds": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "bytes": sum(r["bytes"] for r in runs),
        "window_seconds": window,
        "bytes_per_second": sum(r["_raw"]["in_window"] for r in runs) / window,
        "bytes_per_second_by_round": [r["bytes_per_second"] for r in runs],
        "ttfb_p50_ms": 1000 * quantile(ttfb, 0.5),
        "ttfb_p99_ms": 1000 * quantile(ttfb, 0.99),
        "inter_byte_p50_ms": 1000 * quantile(inter, 0.5),
        "inter_byte_p99_ms": 1000 * quantile(inter, 0.99),
        "mean_running_rows": mean("mean_running_rows"),
        "mean_cohorts": mean("mean_cohorts"),
        "scheduler_share": {k: statistics.fmean(s[k] for s in shares) for k in shares[0]} if shares else None,
    }


def row_text(row: dict) -> str:
    """A level's line of the table."""
    return (f"{row['clients']:>7} {row['requests']:>8} | {row['bytes_per_second']:>8.1f} | "
            f"{row['ttfb_p50_ms']:>9.1f} {row['ttfb_p99_ms']:>8.1f} | {row['inter_byte_p50_ms']:>14.2f} "
            f"{row['inter_byte_p99_ms']:>8.2f} | {row['mean_running_rows']:>5.1f} {row['mean_cohorts']:>7.1f}")


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


# --------------------------------------------------------------------------- engine only


@torch.inference_mode()
def engine_section(threads: int, n_rows: int = 16, n_steps: int = 48) -> dict:
    """Bytes/s of ``n_rows`` rows as one batch, as ``n_rows`` one-row engines stepped in turn (the cohort
    adapter when every row joined at its own step), and of one row alone."""
    from torchblt.generation import IncrementalEngine
    from torchblt.tokenizer import ByteTokenizer

    torch.set_num_threads(threads)
    model, patcher = build_small()
    tok = ByteTokenizer()
    prompts = [tok.encode(prompt_for(i, 0), add_eos=False) for i in range(n_rows)]
    template = IncrementalEngine(model, patcher, n_steps)

    def decode(groups: list[list[list[int]]]) -> float:
        import copy

        engines = [copy.copy(template) for _ in groups]
        logits = [e.start(g) for e, g in zip(engines, groups)]
        t = time.perf_counter()
        for _ in range(n_steps):
            logits = [e.advance(lg.argmax(-1)) for e, lg in zip(engines, logits)]
        return sum(len(g) for g in groups) * n_steps / (time.perf_counter() - t)

    decode([prompts[:1]])  # warm-up
    out = {
        "rows": n_rows,
        "steps": n_steps,
        "one_row_bytes_per_second": decode([prompts[:1]]),
        "one_batch_bytes_per_second": decode([prompts]),
        "one_row_batches_bytes_per_second": decode([[p] for p in prompts]),
    }
    out.update(engine_costs(model, patcher, prompts))
    return out


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def engine_costs(model, patcher, prompts: list[list[int]]) -> dict:
    """ms per greedy step by batch size, of prefills whole and in chunks, of a join / leave by copy or by slot."""
    from torchblt.serve.engine import BatchEngine

    engine = BatchEngine(model, patcher)
    batch = engine.join(prompts, [128] * len(prompts))
    full = engine.state
    ids = batch.argmax(-1)
    step_ms = {}  # mean ms per step of 24 greedy steps (steps that close a patch and steps that do not)
    for b in (1, 2, 4, 8, 16):
        if b <= len(prompts):
            part, nxt = full.copy().select(list(range(b))), ids[:b]
            nxt = engine.engine.step(part, nxt).argmax(-1)  # warm-up
            t = time.perf_counter()
            for _ in range(24):
                nxt = engine.engine.step(part, nxt).argmax(-1)
            step_ms[b] = 1000 * (time.perf_counter() - t) / 24
    long_prompt = (prompts[0] * 9)[:512]
    prefill_ms: dict[str, dict[str, float]] = {}
    for name, ids_ in (("64", prompts[0][:64]), ("512", long_prompt)):
        row = {}
        for chunk in (16, 64, 128, 0):
            def run(chunk=chunk, ids_=ids_):
                p = engine.begin(ids_, 1)
                while not p.done:
                    engine.prefill(p, chunk or p.remaining)
            row[str(chunk or "whole")] = _median_ms(run, 3)
        prefill_ms[name] = row
    one = engine.begin(prompts[0], 128)
    engine.prefill(one, one.remaining)
    engine.engine.presize(one.state, 128)
    rest = list(range(1, len(prompts)))
    return {
        "step_ms": step_ms,
        "prefill_ms": prefill_ms,
        "join_by_extend_ms": _median_ms(lambda: full.copy().select(rest).extend(one.state.copy()))
        - _median_ms(lambda: full.copy().select(rest)),
        "leave_by_select_ms": _median_ms(lambda: full.copy().select(rest)) - _median_ms(full.copy),
        "join_into_slot_ms": _median_ms(lambda: full.put([0], one.state.copy())),
    }


@torch.inference_mode()
def compiled_steps(threads: int, batches: list[int], warmup: int = 30, rounds: int = 6, steps: int = 10) -> dict:
    """The compiled step (``IncrementalEngine(compile=True)``) against the eager one per batch size: the
    time to compile (and run ``warmup`` steps: the parts that close a patch compile at their first use),
    then ms per step, eager and compiled interleaved ``rounds`` times (a busy moment hits both)."""
    from torchblt.generation import IncrementalEngine
    from torchblt.tokenizer import ByteTokenizer

    torch.set_num_threads(threads)
    model, patcher = build_small()
    tok = ByteTokenizer()
    eager = IncrementalEngine(model, patcher, 0)
    compiled = IncrementalEngine(model, patcher, 0, compile=True)
    prompts = [tok.encode(prompt_for(i, 0), add_eos=False) for i in range(max(batches))]
    out = {}
    for b in batches:
        state, logits, _ = eager.prefill(prompts[:b])
        eager.presize(state, warmup + rounds * steps + 8)
        states = {"eager": state.copy(), "compiled": state.copy()}
        ids = {"eager": logits.argmax(-1), "compiled": logits.argmax(-1)}
        t = time.perf_counter()
        for _ in range(warmup):
            ids["compiled"] = compiled.step(states["compiled"], ids["compiled"]).argmax(-1)
        compile_s = time.perf_counter() - t
        for _ in range(warmup):
            ids["eager"] = eager.step(states["eager"], ids["eager"]).argmax(-1)
        total = {"eager": 0.0, "compiled": 0.0}
        for _ in range(rounds):
            for name, engine in (("eager", eager), ("compiled", compiled)):
                t = time.perf_counter()
                for _ in range(steps):
                    ids[name] = engine.step(states[name], ids[name]).argmax(-1)
                total[name] += time.perf_counter() - t
        row = {"compile_and_warmup_s": compile_s, "same_bytes": bool((ids["eager"] == ids["compiled"]).all())}
        row.update({f"{k}_ms_per_step": 1000 * v / (rounds * steps) for k, v in total.items()})
        out[b] = row
        print(f"batch {b}: compile + {warmup} steps {compile_s:.1f} s; eager {row['eager_ms_per_step']:.1f} ms/step, "
              f"compiled {row['compiled_ms_per_step']:.1f} ms/step", flush=True)
    return out


# --------------------------------------------------------------------------- main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    ap.add_argument("--seconds", type=float, default=25.0, help="length of each level (default 25)")
    ap.add_argument("--ramp", type=float, default=3.0, help="clients start staggered over this (default 3 s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measure every level this many times, in alternating order, and pool (default 2)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=128, help="the server's --prefill-chunk (default 128)")
    ap.add_argument("--prefill-thread", default="auto",
                    help="the server's --prefill-thread (auto, on, off), or several comma-separated: one server "
                         "each, their levels interleaved in one run (e.g. on,off: the thread's ratio)")
    ap.add_argument("--compile", default="off",
                    help="the server's compiled step (on, off), or on,off: one server each, levels interleaved")
    ap.add_argument("--json", default="serve_bench.json")
    ap.add_argument("--compiled-steps", default=None, metavar="BATCHES",
                    help="only measure the compiled vs the eager engine step at these batch sizes (e.g. 1,16; "
                         "minutes: inductor compiles each)")
    ap.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_child:
        return serve_child(args)
    if args.compiled_steps:
        t0 = time.perf_counter()
        result = compiled_steps(args.threads, [int(b) for b in args.compiled_steps.split(",")])
        Path(args.json).write_text(json.dumps({"meta": {"torch": torch.__version__, "threads": args.threads,
                                                        "argv": sys.argv[1:], "run_seconds": time.perf_counter() - t0,
                                                        "load_average_at_end": os.getloadavg()},
                                               "compiled_steps": result}, indent=1))
        print(f"wrote {args.json}")
        return 0
    levels = [int(c) for c in args.clients.split(",")]
    threads_, compiles = args.prefill_thread.split(","), args.compile.split(",")
    for name, values in (("--prefill-thread", threads_), ("--compile", compiles)):
        if not values or any(x not in AUTO_ON_OFF for x in values) or len(set(values)) != len(values):
            raise SystemExit(f"{name}: auto, on or off, comma-separated without repeats; got {','.join(values)!r}")
    if len(threads_) > 1 and len(compiles) > 1:
        raise SystemExit("compare one setting at a time: --prefill-thread or --compile with several values")
    # setting label -> (--prefill-thread, --compile) of its server
    varied = "compile" if len(compiles) > 1 else "prefill thread"
    setups = ({f"compile {c}": (threads_[0], c) for c in compiles} if len(compiles) > 1
              else {f"prefill thread {t}": (t, compiles[0]) for t in threads_})
    settings = list(setups)
    t_start = time.perf_counter()
    engine = engine_section(args.threads)
    servers: dict[str, tuple[int, subprocess.Popen]] = {}
    results: dict[str, dict] = {}
    try:
        for setting in settings:
            port = free_port()
            servers[setting] = port, subprocess.Popen(
                [sys.executable, __file__, "--serve-child", "--port", str(port), "--threads", str(args.threads),
                 "--max-batch", str(args.max_batch), "--prefill-chunk", str(args.prefill_chunk),
                 "--prefill-thread", setups[setting][0], "--compile", setups[setting][1]],
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        for setting, (port, child) in servers.items():
            deadline = time.monotonic() + 1800  # a compiled server compiles every batch size first
            while True:
                try:
                    one_request(port, prompt_for(0, 0), 8)  # up and warm
                    break
                except OSError:
                    if child.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the server ({setting}) did not start") from None
                    time.sleep(0.5)
        print(f"{'clients':>7} {'requests':>8} | {'bytes/s':>8} | {'TTFB p50':>9} {'p99':>8} | "
              f"{'inter-byte p50':>14} {'p99':>8} | {'rows':>5} {'batches':>7}   (ms)")
        # rounds in alternating order (1, 4, 16, 16, 4, 1, ...): this machine's speed drifts by 10-20% over
        # minutes (memory bandwidth shared with other tenants), so each level is measured early and late;
        # with several servers, each level runs on each server in turn (alternating which goes first)
        order = [n for r in range(args.rounds) for n in (levels if r % 2 == 0 else levels[::-1])]
        runs: dict[tuple[str, int], list[dict]] = {(x, n): [] for x in settings for n in levels}
        for i, n in enumerate(order):
            for setting in (settings if i % 2 == 0 else settings[::-1]):
                row = run_level(servers[setting][0], n, args.seconds, min(args.ramp, args.seconds / 2))
                runs[setting, n].append(row)
                share = " ".join(f"{k} {v:.0%}" for k, v in (row["scheduler_share"] or {}).items())
                print(row_text(row) + f" | scheduler: {share}"
                      + (f" (round {i // len(levels) + 1})" if args.rounds > 1 else "")
                      + (f" [{setting}]" if len(settings) > 1 else ""), flush=True)
        for setting in settings:
            rows = [pool(runs[setting, n]) for n in levels]
            if args.rounds > 1 or len(settings) > 1:
                print("pooled over the rounds" + (f" ({setting}):" if len(settings) > 1 else ":"))
                for row in rows:
                    print(row_text(row))
            by = {r["clients"]: r for r in rows}
            ratios = {}
            if 1 in by and max(by) > 1:
                hi = by[max(by)]
                ratios = {"clients": max(by),
                          "throughput_ratio": hi["bytes_per_second"] / by[1]["bytes_per_second"],
                          "p99_inter_byte_ratio": hi["inter_byte_p99_ms"] / by[1]["inter_byte_p99_ms"]}
            results[setting] = {"levels": rows, "ratios": ratios}
    finally:
        for _, child in servers.values():
            child.terminate()
        for _, child in servers.values():
            child.wait(60)
    print()
    for setting, res in results.items():
        ratios = res["ratios"]
        if ratios:
            print(f"{ratios['clients']} clients vs 1"
                  + (f" ({setting})" if len(settings) > 1 else "")
                  + f": aggregate throughput x{ratios['throughput_ratio']:.2f} (goal >= 4), "
                  f"p99 inter-byte latency x{ratios['p99_inter_byte_ratio']:.2f} (goal <= 5)")
    if len(settings) > 1:
        a, b = settings[0], settings[1]
        for ra, rb in zip(results[a]["levels"], results[b]["levels"], strict=True):
            print(f"{ra['clients']:>3} clients: {a} / {b}: bytes/s x"
                  f"{ra['bytes_per_second'] / rb['bytes_per_second']:.2f}, p99 inter-byte x"
                  f"{ra['inter_byte_p99_ms'] / rb['inter_byte_p99_ms']:.2f}")
    print("engine only, ms per step by batch size:", {b: round(v, 1) for b, v in engine["step_ms"].items()})
    print("prefill ms by chunk:", engine["prefill_ms"])
    print(f"a row joining 15 by extend {engine['join_by_extend_ms']:.1f} ms, leaving 16 by select "
          f"{engine['leave_by_select_ms']:.1f} ms, joining into a free slot {engine['join_into_slot_ms']:.1f} ms")
    print(f"engine only, {engine['rows']} rows x {engine['steps']} steps (bytes/s): one row "
          f"{engine['one_row_bytes_per_second']:.1f}; {engine['rows']} one-row batches (cohorts) "
          f"{engine['one_row_batches_bytes_per_second']:.1f}; one batch of {engine['rows']} "
          f"{engine['one_batch_bytes_per_second']:.1f} (x{engine['one_batch_bytes_per_second'] / engine['one_row_bytes_per_second']:.2f} one row)")
    out = {
        "meta": {"torch": torch.__version__, "threads": args.threads, "max_batch": args.max_batch,
                 "prefill_chunk": args.prefill_chunk, "prefill_thread": threads_, "compile": compiles,
                 "seconds_per_level": args.seconds, "ramp_seconds": args.ramp, "rounds": args.rounds,
                 "order": order, "argv": sys.argv[1:],
                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "run_seconds": time.perf_counter() - t_start,
                 "load_average_at_end": os.getloadavg()},
        "levels": results[settings[0]]["levels"],  # the first setting's
        "ratios": results[settings[0]]["ratios"],
        **({f"by_{varied.replace(' ', '_')}": {k.split()[-1]: v for k, v in results.items()}}
           if len(settings) > 1 else {}),
        "engine": engine,
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
