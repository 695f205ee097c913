"""Patch starts, one byte at a time: the patcher's rule with ``include_next_token=True``, made incremental.

Shape legend: B rows.

Generation needs to know whether the *next* byte (position ``j``, not yet sampled) starts a patch as
soon as byte ``j - 1`` is known, because that decides whether the patch holding ``j - 1`` is closed and
the global model must run. Every patching rule is causal, so this is possible:

* ``entropy``: ``E[j-1] > t``; with ``monotonicity`` ``E[j-1] - E[j-2] > t`` (``j >= 3``); with
  ``threshold_add`` ``E[j-1] > t and E[j-1] - E[j-2] > threshold_add`` (``j >= 4``, ``j == 3`` never);
* ``space``: byte ``j - 1`` is space-like and ``j - 2`` is not, or ``j - 1`` is a special token;
* ``bpe``: byte ``j - 1`` is the BPE delimiter; ``static``: ``j`` is some ``floor(i * patch_size)``;
  ``byte``: always;
* positions 0 and 1 always start (the BOS is a patch of its own, as the BLT forward requires);
* ``max_patch_length``: ``j`` also starts when ``(j - s) % max_patch_length == 0`` with ``s`` the last start
  of the rule above (before splitting), as :func:`torchblt.patching.split_long_patches` does.

:func:`prompt_starts` applies :class:`~torchblt.patching.Patcher`'s own functions to a whole prompt, and
:class:`IncrementalStarts` continues from there; the tests check that the two agree with
``Patcher.patch`` on every prefix. The comparisons are the same float32 tensor operations the patcher
uses, so ties resolve identically.
"""

from __future__ import annotations

import torch

from torchblt.patching import Patcher, space_like, split_long_patches
from torchblt.tokenizer import BPE_ID, OFFSET


def check_incremental(patcher: Patcher) -> None:
    """Raise ``ValueError`` for patchers whose decisions depend on the future (top-k entropy patching)."""
    if patcher.mode == "entropy" and patcher.threshold is None:
        raise ValueError(
            "patcher.threshold=None (top-k entropy patching) looks at the whole sequence and cannot decode "
            "incrementally; use a threshold or use_cache=False"
        )


def raw_prompt_starts(patcher: Patcher, tokens: torch.Tensor, entropies: torch.Tensor | None) -> torch.Tensor:
    """The rule's start mask over ``T + 1`` positions (before ``max_patch_length`` and the BOS split)."""
    B, T = tokens.shape
    if patcher.mode == "entropy":
        assert entropies is not None
        return patcher.entropy_starts(entropies.float(), True)
    if patcher.mode == "space":
        return patcher.space_starts(tokens, True)
    if patcher.mode == "bpe":
        return patcher.bpe_starts(tokens, True)
    if patcher.mode == "static":
        return patcher.static_starts(B, T + 1, tokens.device)
    return torch.ones(B, T + 1, dtype=torch.bool, device=tokens.device)


def last_raw_start(raw: torch.Tensor) -> torch.Tensor:
    """``(B, n) bool -> (B,)``: the last True position of each row (0 if none)."""
    B, n = raw.shape
    pos = torch.arange(n, device=raw.device).expand(B, n)
    return torch.where(raw, pos, torch.zeros_like(pos)).amax(1)


def finish_starts(patcher: Patcher, raw: torch.Tensor) -> torch.Tensor:
    starts = raw
    if patcher.max_patch_length is not None:
        starts = split_long_patches(starts, patcher.max_patch_length)
    starts = starts.clone()
    starts[:, : min(2, starts.shape[1])] = True  # position 1 too: what split_first_patch does for static
    return starts


def decide_starts(
    patcher: Patcher,
    j: torch.Tensor,
    e1: torch.Tensor | None,
    e2: torch.Tensor | None,
    x1: torch.Tensor,
    x2: torch.Tensor,
    last_raw: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start flags of positions ``j (B, n)`` (consecutive per row) once the bytes before them are known:
    ``e1, e2 (B, n)`` = ``E[j-1], E[j-2]``, ``x1, x2 (B, n)`` = bytes ``j-1, j-2``, ``last_raw (B,)`` = the
    last rule start before ``j[:, 0]``. Returns the flags and, per position, the last rule start up to it
    (what ``max_patch_length`` counts from). Tensor operations only (no host round trip): a compiled
    decoding step runs it inside its graph."""
    p = patcher
    early = j < 2
    if p.mode == "entropy":
        assert e1 is not None and e2 is not None
        if p.monotonicity:
            raw = ((e1 - e2) > p.threshold) | (j == 2)
        elif p.threshold_add is not None:
            raw = (((e1 - e2) > p.threshold_add) & (e1 > p.threshold) & (j >= 4)) | (j == 2)
        else:
            raw = e1 > p.threshold
    elif p.mode == "space":
        raw = (space_like(x1) & ~space_like(x2)) | (x1 < OFFSET)
    elif p.mode == "bpe":
        raw = x1 == BPE_ID
    elif p.mode == "static":
        raw = static_boundaries(j, float(p.patch_size))  # type: ignore[arg-type]
    else:
        raw = torch.ones_like(j, dtype=torch.bool)
    if p.mode in ("entropy", "space", "bpe"):
        raw = raw | early
    running = torch.cummax(torch.where(raw, j, -1), dim=1).values  # the last rule start so far
    last = torch.maximum(running, last_raw[:, None])
    starts = raw
    if p.max_patch_length is not None:
        starts = starts | ((j - last) % p.max_patch_length == 0)
    return starts | early, last


def static_boundaries(j: torch.Tensor, patch_size: float) -> torch.Tensor:
    """Is ``j`` one of ``floor(i * patch_size)``? In float64, as :meth:`Patcher.static_starts` computes them:
    the only candidates are the integers next to ``j / patch_size``."""
    jf = j.to(torch.float64)
    i = torch.ceil(jf / patch_size)
    hit = torch.zeros_like(j, dtype=torch.bool)
    for d in (-1.0, 0.0, 1.0):
        c = (i + d).clamp(min=0)
        hit = hit | (torch.floor(c * patch_size) == jf)
    return hit


class IncrementalStarts:
    """:func:`decide_starts` one position at a time, keeping the last rule start per row (tests, tools)."""

    def __init__(self, patcher: Patcher, last_raw: torch.Tensor) -> None:
        """``last_raw (B,)``: per row, the last position where the rule itself (not the length split)
        started a patch (:func:`last_raw_start` of the prompt)."""
        self.patcher = patcher
        self.last_raw = last_raw

    def select(self, rows: torch.Tensor) -> None:
        self.last_raw = self.last_raw[rows]

    def step(
        self,
        j: torch.Tensor,
        e1: torch.Tensor | None,
        e2: torch.Tensor | None,
        x1: torch.Tensor,
        x2: torch.Tensor,
    ) -> torch.Tensor:
        """Start flags ``(B,)`` for positions ``j (B,)``; ``e1, e2`` = ``E[j-1], E[j-2]``, ``x1, x2`` = bytes ``j-1, j-2``."""
        e1, e2 = (None if e is None else e[:, None] for e in (e1, e2))
        starts, last = decide_starts(self.patcher, j[:, None], e1, e2, x1[:, None], x2[:, None], self.last_raw)
        self.last_raw = last[:, 0]
        return starts[:, 0]
