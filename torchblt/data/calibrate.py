"""Entropy-threshold calibration: find the global threshold that gives a target mean patch size.

The mean patch size is measured the way training sees it: each document (``BOS + bytes + EOS``) is
patched on its own with ``include_next_token=False`` and the mean is ``tokens / patches`` over all sample
documents. It never decreases as the threshold grows (a higher threshold starts fewer patches; the same
holds with ``threshold_add``, ``monotonicity`` and ``max_patch_length``), so bisection on the threshold
finds the target: the entropies are computed once, each step only re-patches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from torchblt.patching import Patcher

__all__ = ["CalibrationResult", "calibrate_threshold", "mean_patch_size"]

_GROUP_ELEMENTS = 1 << 20


@dataclass
class CalibrationResult:
    threshold: float
    mean_patch_size: float  # achieved at ``threshold``
    target_patch_size: float
    n_documents: int
    n_tokens: int
    iterations: int


def _groups(entropies: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pad documents (sorted by length) into (entropies (B, S), lengths (B,)) groups of bounded size."""
    order = sorted(range(len(entropies)), key=lambda i: len(entropies[i]))
    groups, cur = [], []
    for i in order:
        if cur and len(entropies[i]) * (len(cur) + 1) > _GROUP_ELEMENTS:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        S = max(len(entropies[i]) for i in g)
        e = torch.zeros(len(g), S, dtype=torch.float32)
        for r, i in enumerate(g):
            e[r, : len(entropies[i])] = torch.as_tensor(np.asarray(entropies[i], dtype=np.float32))
        out.append((e, torch.tensor([len(entropies[i]) for i in g], dtype=torch.int64)))
    return out


def _mean(groups: list[tuple[torch.Tensor, torch.Tensor]], patcher: Patcher) -> float:
    tokens = patches = 0
    for e, lens in groups:
        pl, _ = patcher.patch(torch.zeros_like(e, dtype=torch.int64), entropies=e, seq_lens=lens)
        tokens += int(lens.sum())
        patches += int((pl > 0).sum())
    return tokens / max(patches, 1)


class _GlobalRule:
    """The default rule (byte ``j >= 2`` starts a patch iff ``E[j-1] > t``) counted without patching:
    a document of ``n`` tokens has ``min(n, 2) + #{1 <= i <= n-2 : E[i] > t}`` patches, so one sorted
    array answers every threshold in O(log N)."""

    def __init__(self, entropies: list[np.ndarray]) -> None:
        self.n_tokens = sum(len(e) for e in entropies)
        self.fixed = sum(min(len(e), 2) for e in entropies)
        inner = [np.asarray(e[1:-1], dtype=np.float32) for e in entropies if len(e) > 2]
        self.sorted = np.sort(np.concatenate(inner)) if inner else np.zeros(0, np.float32)

    def mean(self, threshold: float) -> float:
        above = len(self.sorted) - int(np.searchsorted(self.sorted, np.float32(threshold), side="right"))
        return self.n_tokens / (self.fixed + above)


def _simple(threshold_add: float | None, monotonicity: bool, max_patch_length: int | None) -> bool:
    return threshold_add is None and not monotonicity and max_patch_length is None


def mean_patch_size(
    entropies: Iterable[np.ndarray],
    threshold: float,
    threshold_add: float | None = None,
    monotonicity: bool = False,
    max_patch_length: int | None = None,
) -> float:
    """Mean patch size (tokens per patch) of documents with these per-token entropies."""
    ents = [np.asarray(e, dtype=np.float32) for e in entropies]
    if _simple(threshold_add, monotonicity, max_patch_length):
        return _GlobalRule(ents).mean(threshold)
    patcher = Patcher("entropy", threshold, threshold_add, monotonicity, max_patch_length)
    return _mean(_groups(ents), patcher)


def calibrate_threshold(
    entropies: Iterable[np.ndarray],
    target_patch_size: float,
    threshold_add: float | None = None,
    monotonicity: bool = False,
    max_patch_length: int | None = None,
    iterations: int = 50,
) -> CalibrationResult:
    """Bisection on the entropy threshold (see the module docstring).

    ``entropies``: one array per document, ``len = bytes + 2`` (BOS and EOS included). Raises
    ``ValueError`` when the target is outside what any threshold can reach on this sample.
    """
    ents = [np.asarray(e, dtype=np.float32) for e in entropies]
    ents = [e for e in ents if len(e)]
    if not ents:
        raise ValueError("calibration: no sample documents")
    if not target_patch_size > 1:
        raise ValueError(f"target_patch_size must be greater than 1, got {target_patch_size}")
    n_tokens = sum(len(e) for e in ents)
    if _simple(threshold_add, monotonicity, max_patch_length):
        rule = _GlobalRule(ents)
        mean_at = rule.mean
    else:
        groups = _groups(ents)

        def mean_at(t: float) -> float:
            return _mean(groups, Patcher("entropy", t, threshold_add, monotonicity, max_patch_length))

    if monotonicity:  # the rule compares entropy differences with the threshold
        diffs = [np.diff(e) for e in ents if len(e) > 1]
        all_vals = np.concatenate(diffs) if diffs else np.zeros(1, np.float32)
    else:
        all_vals = np.concatenate(ents)
    lo, hi = float(all_vals.min()) - 1.0, float(all_vals.max()) + 1.0

    m_lo, m_hi = mean_at(lo), mean_at(hi)
    if not m_lo <= target_patch_size <= m_hi:
        raise ValueError(
            f"target_patch_size={target_patch_size}: reachable mean patch sizes on this sample are "
            f"{m_lo:.3f} .. {m_hi:.3f} ({len(ents)} documents, {n_tokens} tokens)"
        )
    best_t, best_m = (lo, m_lo) if abs(m_lo - target_patch_size) <= abs(m_hi - target_patch_size) else (hi, m_hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        m = mean_at(mid)
        if abs(m - target_patch_size) < abs(best_m - target_patch_size):
            best_t, best_m = mid, m
        if m < target_patch_size:
            lo = mid
        else:
            hi = mid
    return CalibrationResult(best_t, best_m, float(target_patch_size), len(ents), n_tokens, iterations)
