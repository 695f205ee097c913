"""The study's results: ``results.json`` (every run's row, the shared artifacts, the config),
``results.md`` (the tables) and ``study.png`` (matplotlib: held-out bits per byte against training FLOPs,
one line per family, mean over seeds with the seeds' range as error bars; and inference FLOPs per
byte against training FLOPs).
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from torchblt.outputs import staged
from torchblt.study.config import StudyConfig, config_to_dict

__all__ = ["markdown_tables", "plot", "write_report"]


def _fmt_flops(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _by_family_budget(rows: list[dict[str, Any]]) -> dict[str, dict[float, list[dict[str, Any]]]]:
    out: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[r["family"]][r["budget"]].append(r)
    return out


def noise(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per family, at each budget with several seeds: the seeds' bits per byte and their range."""
    out: dict[str, list[dict[str, Any]]] = {}
    for fam, by_budget in _by_family_budget(rows).items():
        for budget, rs in sorted(by_budget.items()):
            rs = [r for r in rs if r.get("val_bpb") is not None]
            vals = [r["val_bpb"] for r in rs]
            if len(vals) >= 2:
                out.setdefault(fam, []).append({"budget": budget, "seeds": [r["seed"] for r in rs], "val_bpb": vals,
                                                "range": max(vals) - min(vals)})
    return out


def markdown_tables(cfg: StudyConfig, rows: list[dict[str, Any]], shared: dict[str, Any]) -> str:
    """The summary (family x budget), the noise level and the per-run table, as Markdown."""
    families = [f.name for f in cfg.families]
    budgets = sorted(cfg.budgets)
    grouped = _by_family_budget(rows)
    lines = ["### Held-out bits per byte (mean over seeds)", "",
             "| family | " + " | ".join(f"{_fmt_flops(b)} FLOPs" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for fam in families:
        cells = []
        for b in budgets:
            vals = [r["val_bpb"] for r in grouped.get(fam, {}).get(b, []) if r.get("val_bpb") is not None]
            cells.append("" if not vals else f"{_mean(vals):.4f}" + (f" (n={len(vals)})" if len(vals) > 1 else ""))
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    spread = noise(rows)
    if spread:
        lines += ["", "### Noise level (same budget, different seeds: initialisation and data order)", "",
                  "| family | budget | seeds | bits per byte | range |", "|---|---|---|---|---|"]
        entries = sorted(((s["budget"], i, f, s) for i, f in enumerate(families) for s in spread.get(f, [])),
                         key=lambda e: e[:2])
        for _, _, fam, s in entries:
            lines.append(f"| {fam} | {_fmt_flops(s['budget'])} | {', '.join(map(str, s['seeds']))} | "
                         f"{', '.join(f'{v:.4f}' for v in s['val_bpb'])} | {s['range']:.4f} |")
    lines += ["", "### Every run", "",
              "| family | budget | seed | main model (d x L) | N main | N local | steps | train bytes | "
              "tokens/param | FLOPs spent (% of budget) | bytes/patch or /token | inference FLOPs/byte | "
              "train time | val bpb |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {f: i for i, f in enumerate(families)}
    for r in sorted(rows, key=lambda r: (r["budget"], order.get(r["family"], 99), r["seed"])):
        s = r["sizing"]["shape"]
        unit = "" if r["kind"] == "byte" else f"{r['train_unit_bytes']:.2f} / {r['val_unit_bytes']:.2f}"
        lines.append(
            f"| {r['family']} | {_fmt_flops(r['budget'])} | {r['seed']} | {s['width']} x {s['n_layers']} | "
            f"{r['sizing']['main_params']:,} | {r['sizing']['local_params']:,} | {r['trained_steps']} | "
            f"{r['trained_bytes'] / 1e6:.2f} M | {r['tokens_per_param']:.1f} | {_fmt_flops(r['achieved_flops'])} "
            f"({100 * r['budget_ratio']:.1f}%) | {unit} | {_fmt_flops(r['inference_flops_per_byte'])} | "
            f"{r['train_seconds'] / 60:.1f} min | {r['val_bpb']:.4f} |")
    notes = ["", "bytes/patch or /token: training / held-out. Inference FLOPs per byte: the model's forward per "
             "byte at the held-out mean patch size or bytes per token (the entropy model's forward is not included)."]
    if shared.get("entropy_model_val_bpb") is not None:
        notes.append(f"Entropy model: held-out {shared['entropy_model_val_bpb']:.4f} bits/byte.")
    for fam, p in (shared.get("patching") or {}).items():
        t = "" if p.get("threshold") is None else f", threshold {p['threshold']:.4f} nats"
        notes.append(f"{fam}: {p['mode']} patching{t}, mean patch size {p['mean_patch_size']:.3f} bytes on the "
                     "calibration sample.")
    if shared.get("bytes_per_token"):
        bpt = shared["bytes_per_token"]
        notes.append(f"BPE tokenizer ({cfg.bpe.vocab_size} ids): {bpt['train']:.3f} bytes/token on the training "
                     f"split, {bpt['validation']:.3f} on the held-out split.")
    return "\n".join(lines + notes) + "\n"


def plot(cfg: StudyConfig, rows: list[dict[str, Any]], path: Path) -> Path:
    """The two-panel figure (module docstring), written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bpb, ax_inf) = plt.subplots(1, 2, figsize=(11, 4.2))
    grouped = _by_family_budget(rows)
    markers = itertools.cycle("os^Dv<>P")
    for fam in [f.name for f in cfg.families]:
        by_budget = grouped.get(fam)
        if not by_budget:
            continue
        xs, ys, lo, hi, inf = [], [], [], [], []
        for b in sorted(by_budget):
            rs = [r for r in by_budget[b] if r.get("val_bpb") is not None]
            if not rs:
                continue
            vals = [r["val_bpb"] for r in rs]
            xs.append(b)  # the budget (every run spends it within a few %: results.md has the exact FLOPs)
            ys.append(_mean(vals))
            lo.append(ys[-1] - min(vals))
            hi.append(max(vals) - ys[-1])
            inf.append(_mean([r["inference_flops_per_byte"] for r in rs]))
        if not xs:
            continue
        line = ax_bpb.errorbar(xs, ys, yerr=[lo, hi], marker=next(markers), capsize=3, label=fam)
        color, marker = line.lines[0].get_color(), line.lines[0].get_marker()
        ax_inf.plot(xs, inf, marker=marker, label=fam, color=color)
    from matplotlib.ticker import FixedLocator, NullFormatter

    budgets = sorted(cfg.budgets)
    for ax in (ax_bpb, ax_inf):
        ax.set_xscale("log")
        ax.set_xlim(budgets[0] / 1.6, budgets[-1] * 1.6)
        ax.xaxis.set_major_locator(FixedLocator(budgets))  # one tick per budget, labelled like the table
        ax.set_xticklabels([_fmt_flops(b) for b in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training FLOPs (budget)")
        ax.grid(True, which="both", alpha=0.3)
    ax_bpb.set_ylabel("held-out bits per byte")
    ax_bpb.set_title("bits per byte at matched training FLOPs")
    ax_inf.set_yscale("log")
    ax_inf.set_ylabel("inference FLOPs per byte")
    ax_inf.set_title("inference cost")
    ax_bpb.legend(fontsize=8)
    fig.tight_layout()
    try:
        with staged(overwrite=True) as out:
            fig.savefig(out.path(path), dpi=130, format="png")
    finally:
        plt.close(fig)
    return path


def write_report(cfg: StudyConfig, out: Path, rows: list[dict[str, Any]], shared: dict[str, Any],
                 config_path: str | None = None) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and (with at least one finished run) ``study.png`` to ``out``."""
    pending = len(cfg.runs()) - len(rows)
    doc = {"config": config_to_dict(cfg), "config_path": config_path, "shared": shared, "runs": rows,
           "noise": noise(rows), "pending_runs": pending}
    command = f"blt study {config_path}" if config_path else "blt study CONFIG"
    head = f"# Study results\n\n`{command} --out {out}`: {len(rows)} runs finished, {pending} pending.\n\n"
    md = head + markdown_tables(cfg, rows, shared)
    with staged(overwrite=True) as files:  # both or neither
        files.write_text(out / "results.json", json.dumps(doc, indent=2) + "\n")
        files.write_text(out / "results.md", md)
    if rows:
        plot(cfg, rows, out / "study.png")
    return doc
