"""Running a study: what is shared, one training run per (budget, family, seed), and the results.

Layout of ``OUT`` (every step resumes; re-running the same command skips what is finished)::

    study.yaml                       the resolved study config
    shared/bpe/tokenizer.json        the BPE tokenizer, trained on the training split (+ stats.json)
    shared/entropy/                  the entropy model's run (``blt train``; model in shared/entropy/model)
    shared/entropies/                its entropies of the training split (``blt entropies``), computed once
    shared/patching.json             per BLT family: calibrated threshold / measured mean patch size
    shared/validation/               the held-out documents every run is evaluated on (eval.sample_bytes)
    runs/<family>/<budget>-s<seed>/  replay.json, train.yaml (a ``blt train`` config), plan.json, the run,
                                     result.json
    results.json, results.md, study.png

Per run: the sizing rule (:func:`torchblt.study.sizing.size_model`) picks the model from the budget; the
run's own data loader is replayed (it is deterministic) and each step's FLOPs counted from its bytes and
mean patch size or bytes per token, which fixes the number of optimizer steps that spends the budget
(to within half a step); ``blt train`` trains it (resuming from its last checkpoint) and validates it
with :func:`torchblt.eval.bpb.evaluate_bpb` (the code of ``blt eval``) on the held-out sample; the FLOPs
actually spent are summed from the run's per-step metrics (:func:`torchblt.study.sizing.achieved_flops`). A run whose ``train.yaml`` would come
out different from the one on disk (the config changed) stops the study with the first differing key,
rather than mixing two configurations in one table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torchblt.outputs import staged
from torchblt.study.config import Family, StudyConfig, config_to_dict
from torchblt.study.sizing import ModelPlan, achieved_flops, flops_per_byte, model_config, size_model

__all__ = ["RunPlan", "Shared", "StudyStopped", "plan_runs", "prepare_shared", "run_study"]


class StudyStopped(RuntimeError):
    """A training run returned before its last step (a signal): re-running resumes it."""


def _say(text: str) -> None:
    print(text, flush=True)


def _write_json(path: Path, data: Any) -> None:
    with staged(overwrite=True) as out:
        out.write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _budget_label(budget: float) -> str:
    return f"{budget:.3g}".replace("+", "")


# --------------------------------------------------------------------------- shared artifacts


@dataclass
class Shared:
    """What every run of a study shares (paths are strings, as they go into the run configs)."""

    validation: list[str] = field(default_factory=list)  # what every model is evaluated on
    tokenizer: str | None = None
    bytes_per_token: dict[str, float] = field(default_factory=dict)  # train, validation
    entropy_model: str | None = None
    entropies: str | None = None
    entropy_model_val_bpb: float | None = None
    patching: dict[str, dict[str, Any]] = field(default_factory=dict)  # family name -> threshold, mean size


def _run_blt(title: str, argv: list[str], run_dir: Path | None = None) -> None:
    """Run ``blt ARGV`` as quickstart runs its steps; a training run (``run_dir``) that returns before its
    last step (a signal: it saved a checkpoint) or a step stopped by Ctrl-C stops the study."""
    from torchblt.commands.quickstart import Interrupted, _step

    try:
        _step(title, argv, {}, title, run_dir=run_dir, rerun="blt study (it resumes)")
    except Interrupted:
        raise StudyStopped(f"{title.split(':')[0]}: stopped before its last step; re-run the same blt study "
                           "command to resume") from None


def _entropy_train_config(cfg: StudyConfig, run_dir: Path, validation: list[str]) -> dict[str, Any]:
    e = cfg.entropy_model
    return {
        "run_dir": str(run_dir),
        "model": {"kind": "entropy", "arch": {"transformer": {
            "dim": e.dim, "n_layers": e.n_layers, "n_heads": e.n_heads, "multiple_of": cfg.sizing.multiple_of,
            "attention": "local_block_causal", "window": e.window, "max_seqlen": e.seq_len}}},
        "data": {"sources": list(cfg.data.train), "validation": list(validation),
                 "text_field": cfg.data.text_field, "seq_len": e.seq_len, "batch_size": e.batch_size,
                 "shuffle_buffer": cfg.data.shuffle_buffer, "interleave": cfg.data.interleave},
        "optim": {"lr": e.lr, "warmup_steps": max(1, round(cfg.optim.warmup_fraction * e.steps)),
                  "schedule": "cosine", "min_lr_ratio": cfg.optim.min_lr_ratio},
        "train": {"steps": e.steps, "seed": 0},
        "checkpoint": {"every": max(1, e.steps // 4), "keep": 1},
        "eval": {"every": 0, "batch_size": cfg.eval.batch_size, "context_bytes": e.seq_len},
        "log": {"every": 50, "progress": cfg.progress, "tensorboard": False},
    }


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    with staged(overwrite=True) as out:  # creates the folder
        out.write_text(path, yaml.safe_dump(data, sort_keys=False))


def _prepare_validation(cfg: StudyConfig, folder: Path) -> list[str]:
    """The held-out text every model is evaluated on: ``data.validation`` itself, or (``eval.sample_bytes``)
    whole documents drawn at random (seed 0) until they hold that many bytes, kept in their original
    order and written once to ``folder`` as one ``.txt`` file per document (the exact bytes)."""
    import numpy as np

    from torchblt.data import iter_documents

    n = cfg.eval.sample_bytes
    if n is None:
        return list(cfg.data.validation)
    done = folder / "sample.json"
    if done.is_file():
        meta = _read_json(done)
        if meta.get("sources") != list(cfg.data.validation) or meta.get("sample_bytes") != n:
            raise ValueError(f"{done}: the held-out sample was drawn from {meta.get('sources')} with sample_bytes "
                             f"{meta.get('sample_bytes')}; the config asks for {cfg.data.validation} / {n}: use a "
                             f"new --out (or delete {folder})")
        return [str(folder)]
    docs = list(iter_documents(cfg.data.validation, cfg.data.text_field))
    if not docs:
        raise ValueError(f"data.validation: no documents in {cfg.data.validation}")
    chosen, total = [], 0
    for i in np.random.default_rng(0).permutation(len(docs)):
        chosen.append(int(i))
        total += len(docs[i])
        if total >= n:
            break
    folder.mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(sorted(chosen)):
        (folder / f"{j:05d}.txt").write_bytes(docs[i])
    _write_json(done, {"sources": list(cfg.data.validation), "sample_bytes": n, "documents": len(chosen),
                       "of_documents": len(docs), "bytes": total})
    _say(f"held-out sample: {len(chosen)} of {len(docs)} documents, {total:,} bytes -> {folder}")
    return [str(folder)]


def _prepare_tokenizer(cfg: StudyConfig, folder: Path, validation: list[str]) -> tuple[str, dict[str, float]]:
    from torchblt.baselines.bpe import train_bpe_tokenizer
    from torchblt.data import iter_documents

    path, stats_path = folder / "tokenizer.json", folder / "stats.json"
    if stats_path.is_file():
        stats = _read_json(stats_path)
        if stats.get("vocab_size") == cfg.bpe.vocab_size and stats.get("max_bytes") == cfg.bpe.max_bytes:
            return str(path), stats["bytes_per_token"]
        raise ValueError(f"{stats_path}: the tokenizer was trained with vocab_size {stats.get('vocab_size')} / "
                         f"max_bytes {stats.get('max_bytes')}, the config asks for {cfg.bpe.vocab_size} / "
                         f"{cfg.bpe.max_bytes}; use a new --out (or delete {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    d = cfg.data

    def documents(sources: list[str], limit: int | None = None):
        seen = 0
        for doc in iter_documents(sources, d.text_field):
            yield doc
            seen += len(doc)
            if limit is not None and seen >= limit:
                return

    argv = ["bpe-tokenizer", *d.train, "--vocab-size", str(cfg.bpe.vocab_size), "--out", str(path)]
    if cfg.bpe.max_bytes:
        argv += ["--max-bytes", str(cfg.bpe.max_bytes)]
    _say(f"\n== the BPE tokenizer, trained on the training split\n$ blt {' '.join(argv)}")
    tmp = folder / "tokenizer.tmp.json"
    tok = train_bpe_tokenizer(documents(d.train, cfg.bpe.max_bytes), cfg.bpe.vocab_size, tmp, overwrite=True)
    os.replace(tmp, path)
    bpt = {"train": tok.bytes_per_token(documents(d.train)),
           "validation": tok.bytes_per_token(documents(validation))}
    _write_json(stats_path, {"vocab_size": cfg.bpe.vocab_size, "max_bytes": cfg.bpe.max_bytes, "bytes_per_token": bpt})
    _say(f"bytes per token: train {bpt['train']:.4f}, validation {bpt['validation']:.4f}")
    return str(path), bpt


def _calibration_sample(cfg: StudyConfig, shared: Shared) -> list[tuple[bytes, Any]]:
    """Whole documents from the start of the training split, ``entropy_model.calibration_bytes`` or a bit
    more, with their stored entropies when the study has them: the sample thresholds are calibrated on
    and space / static patch sizes measured on."""
    from torchblt.data.entropies import ENTROPIES_FIELD, check_entropy_folder
    from torchblt.data.sources import DocumentReader

    if shared.entropies is not None:
        reader = DocumentReader(check_entropy_folder(shared.entropies), "text", seed=0, loop=False,
                                entropies_field=ENTROPIES_FIELD)
    else:
        reader = DocumentReader(cfg.run_sources(), cfg.data.text_field, seed=0, loop=False)
    docs, total = [], 0
    for doc in reader:
        docs.append((doc.data, doc.entropies))
        total += len(doc.data)
        if total >= cfg.entropy_model.calibration_bytes:
            break
    return docs


def _measured_patch_size(docs: list[bytes], mode: str, patch_size: float | None) -> float:
    """Mean patch size (tokens per patch, BOS and EOS included: how calibration measures it) of a
    space or static patcher on ``docs``, each patched on its own as the training loader does."""
    import torch

    from torchblt.data.entropies import document_tokens
    from torchblt.patching import Patcher, PatchingConfig

    patcher = Patcher(PatchingConfig(mode=mode, threshold=None, patch_size=patch_size or 4.5))
    tokens = patches = 0
    for doc in docs:
        t = torch.from_numpy(document_tokens(doc))[None]
        lengths, _ = patcher.patch(t, include_next_token=False)
        tokens += t.shape[1]
        patches += int((lengths > 0).sum())
    return tokens / max(patches, 1)


def _prepare_patching(cfg: StudyConfig, shared: Shared, path: Path) -> dict[str, dict[str, Any]]:
    import numpy as np

    from torchblt.data.calibrate import calibrate_threshold

    done = _read_json(path) if path.is_file() else {}
    out: dict[str, dict[str, Any]] = {}
    sample = None
    for fam in cfg.families:
        if fam.kind != "blt":
            continue
        key = {"mode": fam.patching, "target": fam.patch_size, "sample_bytes": cfg.entropy_model.calibration_bytes}
        if fam.name in done and {k: done[fam.name].get(k) for k in key} == key:
            out[fam.name] = done[fam.name]
            continue
        sample = sample if sample is not None else _calibration_sample(cfg, shared)
        if fam.patching == "entropy":
            res = calibrate_threshold([np.asarray(e, np.float32) for _, e in sample], fam.patch_size)  # type: ignore[arg-type]
            out[fam.name] = {**key, "threshold": res.threshold, "mean_patch_size": res.mean_patch_size}
            _say(f"{fam.name}: entropy threshold {res.threshold:.4f} nats -> mean patch size "
                 f"{res.mean_patch_size:.3f} bytes on the calibration sample (target {fam.patch_size})")
        else:
            size = _measured_patch_size([d for d, _ in sample], fam.patching, fam.patch_size)  # type: ignore[arg-type]
            out[fam.name] = {**key, "threshold": None, "mean_patch_size": size}
            _say(f"{fam.name}: {fam.patching} patching -> mean patch size {size:.3f} bytes on the calibration sample")
    _write_json(path, out)
    return out


def prepare_shared(cfg: StudyConfig, out: Path) -> Shared:
    """The BPE tokenizer, the entropy model and its entropies of the training split, the thresholds: once
    per study, each skipped when already done."""
    from torchblt.data.entropies import check_entropy_folder

    shared = Shared()
    root = out / "shared"
    root.mkdir(parents=True, exist_ok=True)
    shared.validation = _prepare_validation(cfg, root / "validation")
    kinds = {f.kind for f in cfg.families}
    if "bpe" in kinds:
        shared.tokenizer, shared.bytes_per_token = _prepare_tokenizer(cfg, root / "bpe", shared.validation)
    if any(f.kind == "blt" and f.patching == "entropy" for f in cfg.families):
        run_dir = root / "entropy"
        if not (run_dir / "finished.json").is_file():
            config = root / "entropy.yaml"
            _write_yaml(config, _entropy_train_config(cfg, run_dir, shared.validation))
            _run_blt("the entropy model (a small byte LM, shared by every entropy-patched BLT)", ["train", str(config)],
                     run_dir)
        shared.entropy_model = str(run_dir / "model")
        shared.entropy_model_val_bpb = _read_json(run_dir / "finished.json").get("val_bpb")
        shared.entropies = str(root / "entropies")
        try:
            check_entropy_folder(shared.entropies)
        except (FileNotFoundError, ValueError):
            _run_blt("its entropies of the training split (computed once; data.run_files: of the files the runs read)",
                     ["entropies", "--entropy-model", shared.entropy_model, "--data", *cfg.run_sources(), "--out",
                      shared.entropies, "--text-field", cfg.data.text_field, "--no-progress"])
    if "blt" in kinds:
        shared.patching = _prepare_patching(cfg, shared, root / "patching.json")
    return shared


# --------------------------------------------------------------------------- planning


@dataclass
class RunPlan:
    """One training run of the study."""

    budget: float
    family: Family
    seed: int
    run_dir: Path
    model: ModelPlan
    context: int  # the training row in the model's units (bytes; BPE tokens)
    rows: int
    steps: int
    bytes_per_step: float  # the replay's mean (see _replay)
    unit_bytes: float  # ditto: mean patch size (BLT) / bytes per token (BPE) / 1
    planned_flops: float  # the replay's FLOPs of these ``steps``: the budget to within half a step
    train_config: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.family.name} @ {self.budget:.3g} FLOPs, seed {self.seed}"

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family.name, "kind": self.family.kind, "patching": self.family.patching,
            "target_patch_size": self.family.patch_size, "budget": self.budget, "seed": self.seed,
            "run_dir": str(self.run_dir), "context": self.context, "rows": self.rows, "steps": self.steps,
            "bytes_per_step": self.bytes_per_step, "planned_unit_bytes": self.unit_bytes,
            "planned_flops": self.planned_flops, "sizing": self.model.to_dict(),
        }


def _train_config(cfg: StudyConfig, shared: Shared, fam: Family, seed: int, run_dir: Path, arch: dict[str, Any],
                  context: int, rows: int, steps: int) -> dict[str, Any]:
    d, o = cfg.data, cfg.optim
    kind = fam.kind  # the trainer's kinds blt, byte, bpe
    model: dict[str, Any] = {"kind": kind, "arch": arch}
    data: dict[str, Any] = {"sources": cfg.run_sources(), "validation": list(shared.validation), "text_field": d.text_field,
                            "seq_len": context, "batch_size": rows, "shuffle_buffer": d.shuffle_buffer,
                            "interleave": d.interleave, "seed": seed}
    if fam.kind == "blt":
        # rows are cut by bytes (seq_len patches never binds: every patch holds at least one byte)
        patching: dict[str, Any] = {"mode": fam.patching}
        if fam.patching == "entropy":
            model["entropy_model"] = shared.entropy_model
            data["entropies"] = shared.entropies
            patching["threshold"] = shared.patching[fam.name]["threshold"]
        elif fam.patching == "static":
            patching["patch_size"] = fam.patch_size
        data.update(max_bytes=context, patching=patching)
    return {
        "run_dir": str(run_dir),
        "model": model,
        "data": data,
        "optim": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay, "grad_clip": o.grad_clip,
                  "schedule": "cosine", "warmup_steps": max(1, round(o.warmup_fraction * steps)),
                  "min_lr_ratio": o.min_lr_ratio},
        "train": {"steps": steps, "seed": seed},
        "checkpoint": {"every": max(1, steps // cfg.checkpoints_per_run), "keep": 1, "export": True},
        "eval": {"every": 0, "batch_size": cfg.eval.batch_size, "context_bytes": context},
        "log": {"every": 1, "progress": cfg.progress, "tensorboard": False},  # every step: the FLOP account
    }


def _batch_counts(batch: Any, kind: str) -> tuple[int, float]:
    """``(trained bytes, bytes per patch / token)`` of one batch, counted as the trainer counts them
    (``mask.sum()`` targets; a BLT's patches per row without the row's leading one-token patch, over all
    positions of the padded rows, as :func:`torchblt.train.kinds.blt_loss` reports them)."""
    n_bytes = batch.n_bytes
    if kind == "blt":
        patches = int((batch.patch_lengths > 0).sum()) - batch.patch_lengths.shape[0]
        return n_bytes, batch.x.numel() / max(patches, 1)
    if kind == "bpe":
        return n_bytes, n_bytes / max(int(batch.mask.sum()), 1)
    return n_bytes, 1.0


def _replay(train_config: dict[str, Any], fam: Family, tokenizer: str | None, config: Any, context: int,
            budget: float) -> dict[str, Any]:
    """Read the run's own data loader (deterministic: training will see exactly these batches) and count
    each step's FLOPs as :func:`~torchblt.study.sizing.achieved_flops` will: the number of steps is the one
    whose cumulative FLOPs come nearest the budget."""
    from torchblt.data import build_loader
    from torchblt.data.config import DataConfig
    from torchblt.validation import build_dataclass

    dc = build_dataclass(DataConfig, {**train_config["data"], "kind": "blt" if fam.kind == "blt" else "bytes"}, "data")
    if fam.kind == "bpe":
        from torchblt.data.bpe import BPELoader

        loader: Any = BPELoader(dc, tokenizer=tokenizer)  # type: ignore[arg-type]
    else:
        loader = build_loader(dc)
    total = n_bytes = units = 0.0
    steps = 0
    cache: dict[float, float] = {}
    for batch in loader:
        nb, unit = _batch_counts(batch, fam.kind)
        key = round(unit, 4)
        if key not in cache:
            cache[key] = flops_per_byte(fam.kind, config, context, unit)["train"]
        step = nb * cache[key]
        if total + step / 2 > budget:  # the next step would overshoot more than stopping undershoots
            break
        total += step
        n_bytes += nb
        units += nb / unit
        steps += 1
        if steps > 10_000_000:
            raise ValueError(f"budgets: {budget:.3g} FLOPs is more than 10 million steps of {fam.name}")
    return {"steps": steps, "flops": total, "bytes": n_bytes, "unit_bytes": n_bytes / units if units else 0.0}


def _unit_bytes(fam: Family, shared: Shared) -> float:
    """Bytes per main-model token for the sizing rule: measured once per study (seed-independent)."""
    if fam.kind == "blt":
        return float(shared.patching[fam.name]["mean_patch_size"])
    if fam.kind == "bpe":
        return float(shared.bytes_per_token["train"])
    return 1.0


def _vocab_size(fam: Family, shared: Shared) -> int:
    if fam.kind == "bpe":
        from torchblt.tokenizer import load_bpe_tokenizer

        return load_bpe_tokenizer(shared.tokenizer).vocab_size  # type: ignore[arg-type]
    from torchblt.tokenizer import VOCAB_SIZE

    return VOCAB_SIZE


def plan_run(cfg: StudyConfig, shared: Shared, out: Path, budget: float, fam: Family, seed: int) -> RunPlan:
    unit = _unit_bytes(fam, shared)
    context = cfg.data.context_bytes if fam.kind != "bpe" else max(2, round(cfg.data.context_bytes / unit))
    vocab = _vocab_size(fam, shared)
    model = size_model(fam.kind, budget, cfg.sizing, context=context, unit_bytes=unit, vocab_size=vocab,
                       tokenizer=shared.tokenizer)
    run_dir = out / "runs" / fam.name / f"{_budget_label(budget)}-s{seed}"
    rows = cfg.rows_per_step
    key = {"budget": budget, "train_config": _train_config(cfg, shared, fam, seed, run_dir, model.arch, context, rows, 1)}
    cached = run_dir / "replay.json"  # the replay is deterministic: done once per run
    replay = None
    if cached.is_file():
        old = _read_json(cached)
        if old.get("key") == json.loads(json.dumps(key)):
            replay = old["replay"]
    if replay is None:
        config = model_config(fam.kind, model.arch, vocab)
        replay = _replay(key["train_config"], fam, shared.tokenizer, config, context, budget)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(cached, {"key": key, "replay": replay})
    steps = replay["steps"]
    if steps < cfg.min_steps:
        raise ValueError(
            f"budgets: {budget:.3g} FLOPs buys {fam.name} ({model.shape.width} x {model.shape.n_layers}) only "
            f"{steps} optimizer steps of {cfg.data.batch_bytes} bytes (min_steps {cfg.min_steps}); raise the budget "
            "or lower data.batch_bytes")
    train_config = _train_config(cfg, shared, fam, seed, run_dir, model.arch, context, rows, steps)
    return RunPlan(budget, fam, seed, run_dir, model, context, rows, steps, replay["bytes"] / steps,
                   replay["unit_bytes"], replay["flops"], train_config)


def plan_runs(cfg: StudyConfig, shared: Shared, out: Path) -> list[RunPlan]:
    return [plan_run(cfg, shared, out, b, f, s) for b, f, s in cfg.runs()]


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} -> {b!r}"


# --------------------------------------------------------------------------- running


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _result(plan: RunPlan, shared: Shared) -> dict[str, Any]:
    """The row of the results table for a finished run."""
    from torchblt import flops

    fam = plan.family
    finished = _read_json(plan.run_dir / "finished.json")
    config = model_config(fam.kind, plan.model.arch, _vocab_size(fam, shared))
    records = _records(plan.run_dir)
    acc = achieved_flops(fam.kind, config, plan.context, records, plan.unit_bytes)
    if fam.kind == "blt":
        val_unit = finished.get("val_mean_patch_length") or plan.unit_bytes
    elif fam.kind == "bpe":
        val_unit = shared.bytes_per_token["validation"]
    else:
        val_unit = 1.0
    infer = flops_per_byte(fam.kind, config, plan.context, val_unit)["inference"]
    row = {
        **plan.summary(),
        "achieved_flops": acc["flops"],
        "budget_ratio": acc["flops"] / plan.budget,
        "trained_bytes": acc["bytes"],
        "trained_steps": acc["steps"],
        "train_unit_bytes": acc["unit_bytes"],
        "tokens_per_param": acc["bytes"] / acc["unit_bytes"] / plan.model.main_params if acc["unit_bytes"] else None,
        "train_seconds": sum(r.get("step_time_s", 0.0) for r in records if "bytes_seen" in r),
        "val_bpb": finished.get("val_bpb"),
        "val_bytes": finished.get("val_bytes"),
        "val_unit_bytes": val_unit,
        "inference_flops_per_byte": infer,
    }
    if fam.kind == "blt" and fam.patching == "entropy":
        from torchblt.formats.native import read_native_config

        em = read_native_config(Path(shared.entropy_model))  # type: ignore[arg-type]
        row["entropy_model_flops_per_byte"] = flops.entropy_flops_per_byte(em, plan.context)["forward"]
    return row


def check_unchanged(plan: RunPlan) -> None:
    """Refuse to continue a run folder that was made with another configuration (first differing key)."""
    config_path = plan.run_dir / "train.yaml"
    if config_path.is_file():
        old = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        diff = _first_difference(old, plan.train_config)
        if diff:
            raise ValueError(f"{config_path}: this run was made with another configuration ({diff}); use a new "
                             f"--out, or delete {plan.run_dir} to train it again")


def execute(plan: RunPlan, shared: Shared, index: int, total: int) -> dict[str, Any]:
    """Train (or resume, or skip) one run and return its result row."""
    run_dir = plan.run_dir
    check_unchanged(plan)
    config_path, result_path = run_dir / "train.yaml", run_dir / "result.json"
    if result_path.is_file():
        _say(f"[{index}/{total}] {plan.name}: finished (skipped)")
        return _read_json(result_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_yaml(config_path, plan.train_config)
    _write_json(run_dir / "plan.json", plan.summary())
    m = plan.model
    _run_blt(f"[{index}/{total}] {plan.name}: main model {m.shape.width} x {m.shape.n_layers} "
             f"({m.main_params:,} parameters), {plan.steps} steps of {plan.bytes_per_step:,.0f} bytes",
             ["train", str(config_path)], run_dir)
    row = _result(plan, shared)
    _write_json(result_path, row)
    _say(f"{plan.name}: val {row['val_bpb']:.4f} bits/byte, {row['achieved_flops']:.4g} FLOPs "
         f"({100 * row['budget_ratio']:.1f}% of the budget), {row['train_seconds']:.0f} s")
    return row


def run_study(cfg: StudyConfig, *, plan_only: bool = False, report_only: bool = False,
              config_path: str | None = None) -> dict[str, Any]:
    """Run (or resume) the whole study; returns the results document (also written to ``OUT``)."""
    from torchblt.study.report import write_report

    out = Path(cfg.out)
    if report_only:
        if not out.is_dir():
            raise FileNotFoundError(f"{out}: no such study folder (nothing to report)")
        return write_report(cfg, out, _collect(cfg, out), _shared_summary(out), config_path)
    out.mkdir(parents=True, exist_ok=True)
    shared = prepare_shared(cfg, out)
    plans = plan_runs(cfg, shared, out)
    for p in plans:  # before training anything: one study folder holds one configuration
        check_unchanged(p)
    _write_yaml(out / "study.yaml", config_to_dict(cfg))
    _say("\n== plan (sizing rule: docs/study.md)")
    for p in plans:
        m = p.model
        _say(f"  {p.family.name:<16} {p.budget:9.3g} seed {p.seed}: {m.shape.width:>4} x {m.shape.n_layers:<2} "
             f"N {m.main_params:>10,}  local {m.local_params:>8,}  {p.steps:>6} steps x {p.bytes_per_step:>7,.0f} B "
             f"= {p.steps * p.bytes_per_step / 1e6:8.2f} MB  ({m.tokens_per_param:5.1f} tokens/param, "
             f"{p.planned_flops / p.budget * 100:5.1f}% of the budget)")
    from torchblt.data.sources import resolve_sources

    files = resolve_sources(cfg.run_sources())
    split = sum(os.path.getsize(f) for f in files)
    _say(f"  the runs read {len(files)} training files ({split / 1e6:.1f} MB on disk)")
    for p in plans:
        if p.steps * p.bytes_per_step > split:
            _say(f"  warning: {p.name} reads {p.steps * p.bytes_per_step / 1e6:.1f} MB: more than one pass over them "
                 "(raise data.run_files)")
    if plan_only:
        _write_json(out / "plan.json", [p.summary() for p in plans])
        return {"plan": [p.summary() for p in plans]}
    rows = []
    for i, p in enumerate(plans, 1):
        rows.append(execute(p, shared, i, len(plans)))
        write_report(cfg, out, rows, _shared_summary(out), config_path)  # partial results after every run
    return write_report(cfg, out, rows, _shared_summary(out), config_path)


def _collect(cfg: StudyConfig, out: Path) -> list[dict[str, Any]]:
    """Result rows of the runs of ``cfg`` finished so far (for ``--report`` while a study runs)."""
    rows = []
    for budget, fam, seed in cfg.runs():
        path = out / "runs" / fam.name / f"{_budget_label(budget)}-s{seed}" / "result.json"
        if path.is_file():
            rows.append(_read_json(path))
    return rows


def _shared_summary(out: Path) -> dict[str, Any]:
    root = out / "shared"
    summary: dict[str, Any] = {}
    if (root / "bpe" / "stats.json").is_file():
        summary["tokenizer"] = str(root / "bpe" / "tokenizer.json")
        summary["bytes_per_token"] = _read_json(root / "bpe" / "stats.json")["bytes_per_token"]
    if (root / "entropy" / "finished.json").is_file():
        summary["entropy_model"] = str(root / "entropy" / "model")
        summary["entropy_model_val_bpb"] = _read_json(root / "entropy" / "finished.json").get("val_bpb")
    if (root / "patching.json").is_file():
        summary["patching"] = _read_json(root / "patching.json")
    return summary

