"""Patch visualisation: where a patcher cuts a text, in the terminal, as a PNG (the BLT paper's Figure 4:
entropy per byte, the threshold line, patch starts) and as a self-contained HTML page.

The text is patched as the model sees it: ``[BOS] + bytes``, the patcher's ``include_next_token=False``
boundaries, with the BOS split into a patch of its own (:func:`~torchblt.patching.split_first_patch`).
Entropies are aligned to the byte they *predict*: the value shown at byte ``j`` is the entropy of the
entropy model's next-byte distribution after reading bytes ``< j`` (``E[j-1]`` in
:mod:`torchblt.patching`), so in the global-threshold mode a byte starts a patch exactly when its value
is above the threshold line.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from torchblt.patching import Patcher, split_first_patch
from torchblt.tokenizer import BOS_ID, OFFSET

__all__ = ["PatchView", "compute_patches", "render_entropy_table", "render_terminal", "summary", "write_html", "write_plot"]

_COLOURS_ANSI = ("\033[48;5;153m", "\033[48;5;223m", "\033[48;5;194m", "\033[48;5;225m")
_COLOURS_HTML = ("#cfe3ff", "#ffe2c2", "#d8f5d0", "#ffd6f2")
_RESET = "\033[0m"


@dataclass
class PatchView:
    """A text cut into patches. ``data`` are the text's bytes (no BOS); ``patch_lengths`` cover the BOS
    patch (first, length 1) and then the bytes; ``entropies[j]`` (if known) is the entropy before byte j."""

    data: bytes
    patch_lengths: list[int]
    entropies: list[float] | None
    patcher: Patcher

    @property
    def starts(self) -> list[int]:
        """Byte offsets (into ``data``) where each patch after the BOS patch starts."""
        out, pos = [], 0
        for length in self.patch_lengths[1:]:
            out.append(pos)
            pos += length
        return out

    @property
    def patches(self) -> list[bytes]:
        return [self.data[s : s + n] for s, n in zip(self.starts, self.patch_lengths[1:])]

    @property
    def mean_patch_length(self) -> float:
        """Mean bytes per patch over the text (the BOS patch not counted)."""
        n = len(self.patch_lengths) - 1
        return len(self.data) / n if n else 0.0


@torch.no_grad()
def compute_patches(text: str | bytes, patcher: Patcher, with_entropies: bool = False) -> PatchView:
    """Patch ``text`` with ``patcher``; entropies come from the patcher's entropy model (entropy mode,
    or ``with_entropies``)."""
    data = text.encode("utf-8", errors="ignore") if isinstance(text, str) else bytes(text)
    if not data:
        raise ValueError("the text is empty")
    tokens = torch.tensor([[BOS_ID, *(b + OFFSET for b in data)]], dtype=torch.int64)
    scores = None
    if patcher.mode == "entropy" or with_entropies:
        if patcher.entropy_model is None:
            raise ValueError("per-byte entropies need an entropy model: pass --entropy-model DIR")
        scores = patcher.entropies(tokens)  # (1, T)
    lengths, _ = patcher.patch(tokens, include_next_token=False, entropies=scores)
    lengths = split_first_patch(lengths)[0]
    lengths = lengths[lengths > 0].tolist()
    # E[j-1] predicts byte j (token j + 1): byte j's value is scores[:, j] (the token before it)
    entropies = scores[0, : len(data)].tolist() if scores is not None else None
    return PatchView(data, lengths, entropies, patcher)


def _show(chunk: bytes) -> str:
    text = chunk.decode("utf-8", errors="backslashreplace")
    return text.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "\\r")


def render_terminal(view: PatchView, colour: bool = True) -> str:
    """The text with alternating background colours per patch (``|`` between patches without colour)."""
    if colour:
        body = "".join(f"{_COLOURS_ANSI[i % 2]}{_show(p)}{_RESET}" for i, p in enumerate(view.patches))
    else:
        body = "|".join(_show(p) for p in view.patches)
    return body


def summary(view: PatchView) -> str:
    p = view.patcher
    how = f"mode {p.mode}"
    if p.mode == "entropy":
        how += f", threshold {p.threshold:g}" + (f", threshold_add {p.threshold_add:g}" if p.threshold_add else "")
        how += ", monotonicity" if p.monotonicity else ""
    elif p.mode == "static":
        how += f", patch size {p.patch_size:g}"
    if p.max_patch_length:
        how += f", max patch length {p.max_patch_length}"
    return (
        f"{len(view.data)} bytes, {len(view.patch_lengths) - 1} patches (+ BOS), "
        f"mean patch length {view.mean_patch_length:.2f} ({how})"
    )


def render_entropy_table(view: PatchView) -> str:
    """One line per byte: offset, byte, entropy before it, and ``*`` where a patch starts."""
    if view.entropies is None:
        raise ValueError("no entropies to show (pass --entropy-model)")
    starts = set(view.starts)
    lines = [f"{'byte':>6}  {'char':<6} {'entropy':>8}  start"]
    for j, (b, e) in enumerate(zip(view.data, view.entropies)):
        ch = chr(b) if 32 <= b < 127 else f"\\x{b:02x}"
        lines.append(f"{j:>6}  {ch:<6} {e:>8.4f}  {'*' if j in starts else ''}")
    return "\n".join(lines)


def write_plot(view: PatchView, path: str | os.PathLike[str], overwrite: bool = False, title: str | None = None) -> Path:
    """Entropy per byte (line), the threshold (dashed) and patch starts (vertical lines), as a PNG."""
    from torchblt.outputs import refuse_existing, staged

    out = Path(path)
    refuse_existing([out], overwrite)
    if view.entropies is None:
        raise ValueError("--plot needs per-byte entropies: pass --entropy-model DIR")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'torchblt[eval]'") from None
    n = len(view.data)
    fig, ax = plt.subplots(figsize=(min(4 + 0.22 * n, 40), 3.6), dpi=110)
    xs = list(range(n))
    ax.plot(xs, view.entropies, color="#3a6ea5", marker="o", markersize=3, linewidth=1.2, label="entropy H(x_j)")
    for s in view.starts:
        ax.axvline(s - 0.5, color="#999999", linewidth=0.8, alpha=0.7)
    starts = view.starts
    ax.scatter(starts, [view.entropies[s] for s in starts], color="#d62728", s=14, zorder=3, label="patch start")
    if view.patcher.mode == "entropy" and not view.patcher.monotonicity:
        ax.axhline(view.patcher.threshold, color="#d62728", linestyle="--", linewidth=1,
                   label=f"threshold {view.patcher.threshold:.3g}")
    if n <= 200:
        ax.set_xticks(xs)
        ax.set_xticklabels([_tick(b) for b in view.data], fontsize=7, family="monospace")
    else:
        ax.set_xlabel("byte")
    ax.set_xlim(-0.8, n - 0.2)
    ax.set_ylabel("entropy (nats)")
    ax.set_title(title or f"{len(view.patch_lengths) - 1} patches, mean length {view.mean_patch_length:.2f} bytes",
                 fontsize=10)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    try:
        with staged(overwrite) as files:
            fig.savefig(files.path(out), format=out.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return out


def _tick(b: int) -> str:
    if b == 32:
        return "\u2423"
    if b == 10:
        return "\u21b5"
    return chr(b) if 32 < b < 127 else f"{b:02x}"


def write_html(view: PatchView, path: str | os.PathLike[str], overwrite: bool = False, title: str = "BLT patches") -> Path:
    """A self-contained page: patches as coloured spans (hover: patch index, length and per-byte entropy)."""
    from torchblt.outputs import refuse_existing, staged

    out = Path(path)
    refuse_existing([out], overwrite)
    spans = []
    for i, (start, chunk) in enumerate(zip(view.starts, view.patches)):
        tip = f"patch {i}: bytes {start}-{start + len(chunk) - 1} ({len(chunk)} bytes)"
        if view.entropies is not None:
            ents = ", ".join(f"{e:.2f}" for e in view.entropies[start : start + len(chunk)])
            tip += f"; entropies {ents}"
        text = html.escape(chunk.decode("utf-8", errors="backslashreplace"))
        spans.append(
            f'<span class="p" style="background:{_COLOURS_HTML[i % 2]}" title="{html.escape(tip, quote=True)}">{text}</span>'
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.text {{ font-family: monospace; font-size: 15px; line-height: 1.9; white-space: pre-wrap; word-break: break-all; }}
.p {{ border-left: 2px solid #555; padding: 1px 0; }}
.p:hover {{ outline: 1px solid #d62728; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="summary">{html.escape(summary(view))}</p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""
    with staged(overwrite) as files:
        files.write_text(out, page)
    return out
