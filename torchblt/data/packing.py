"""Packing patched documents into training sequences, and sequences into batches.

Documents (``BOS + bytes + EOS``, each patched on its own with ``include_next_token=False`` so its patch
lengths sum to its length) are laid back to back into one stream. The stream is cut into sequences:

* ``kind="blt"``: a sequence holds at most ``seq_len`` patches and at most ``max_bytes + 1`` tokens
  (``x`` has at most ``max_bytes`` bytes). Cuts fall on patch boundaries; a single patch longer than the
  byte cap is split.
* ``kind="bytes"``: a sequence holds exactly ``seq_len + 1`` tokens.

Consecutive sequences of a packer **overlap by one token**: the last token of a sequence (only a target there) is
the first input of the next one, where it forms a patch of its own. So every next-token pair of the
stream is trained exactly once, the first patch of every sequence has length 1 (the BLT's convention for
BOS), and no target is the padding id (the reference trains the last byte of every entropy-model
sequence to predict BOE and drops the pair at every sequence boundary). Targets that are BOS (the step
from one document's EOS to the next document) are masked out: nothing ever needs to predict them.

A sequence of ``n`` tokens gives ``x = tokens[:-1]``, ``y = tokens[1:]``. :func:`collate` right-pads
a batch to its longest ``x`` (``L``) with BOE (0) and ``mask=False``; for BLT the padding joins the
last patch, so each row of ``patch_lengths`` starts with 1 and sums to ``L + 1`` (the BLT forward's
``include_next_token`` convention); rows with fewer patches are right-padded with 0. (The padding
never influences real positions: every model in the BLT is causal over bytes and bytes of patch ``j``
read the global output of patch ``j - 1``.)

The packer's state holds no tokens: after a cut its buffer is the overlap token followed by a suffix of
the last unit it pulled (a document, or a segment of a long one), so :meth:`SequencePacker.state_dict`
is the overlap token, the length of that suffix and the remainder of a patch the byte cap split; the
loader turns the suffix length into a position in the document and :meth:`SequencePacker.restore`
rebuilds the same buffer from the re-read document (:mod:`torchblt.data.loader`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from torchblt.tokenizer import BOE_ID, BOS_ID

__all__ = ["Batch", "Sequence", "SequencePacker", "collate"]


@dataclass
class Sequence:
    """``tokens (n,)`` int64 and, for BLT, ``patch_lengths (p,)`` int64 summing to ``n`` (first is 1)."""

    tokens: np.ndarray
    patch_lengths: np.ndarray | None


@dataclass
class Batch:
    """One training batch (see :mod:`torchblt.data.packing` for the conventions)."""

    x: torch.Tensor  # (B, L) int64 input tokens, BOE (0) padding
    y: torch.Tensor  # (B, L) int64 next tokens
    mask: torch.Tensor  # (B, L) bool: False on padding and on BOS targets
    patch_lengths: torch.Tensor | None  # (B, P) int64: first 1, rows sum to L + 1, 0 right-padding

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            x=self.x.to(device, non_blocking=non_blocking),
            y=self.y.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            patch_lengths=None
            if self.patch_lengths is None
            else self.patch_lengths.to(device, non_blocking=non_blocking),
        )

    @property
    def n_bytes(self) -> int:
        """Number of trained targets (``mask.sum()``)."""
        return int(self.mask.sum().item())

    @property
    def n_patches(self) -> int:
        """Number of real patches (padding excluded; the overlap patch of each row included)."""
        if self.patch_lengths is None:
            return self.n_bytes
        return int((self.patch_lengths > 0).sum().item())


class SequencePacker:
    """Cuts a stream of patched documents into sequences.

    ``pull()`` returns the next ``(tokens, patch_lengths)`` of a document (``patch_lengths`` None for
    ``kind="bytes"``); :meth:`next_sequence` calls it as often as needed.
    """

    def __init__(
        self, kind: str, seq_len: int, max_bytes: int | None, pull: Callable[[], tuple[np.ndarray, np.ndarray | None]]
    ):
        self.kind = kind
        self.seq_len = seq_len
        self.max_bytes = max_bytes
        self.pull = pull
        self.tokens = np.zeros(0, dtype=np.int64)  # unconsumed stream (starts with the overlap token)
        self.lengths = np.zeros(0, dtype=np.int64)  # its patch lengths (blt)
        self.rem = 0  # blt: the stream after the overlap starts with the rest of a patch split by the byte cap

    def state_dict(self) -> dict[str, Any]:
        """``overlap`` (None before the first sequence), ``tail``: tokens after it (a suffix of the last unit
        pulled), ``rem``: the length of the split patch's rest that starts the tail (0: none)."""
        if len(self.tokens) == 0:
            return {"overlap": None, "tail": 0, "rem": 0}
        return {"overlap": int(self.tokens[0]), "tail": len(self.tokens) - 1, "rem": self.rem}

    def restore(self, overlap: int | None, tail: np.ndarray, lengths: np.ndarray | None, rem: int) -> None:
        """Rebuild the buffer :meth:`state_dict` described: ``tail`` (the unit's tokens from the saved position)
        and, for BLT, the unit's patch lengths from there (``lengths``, whose first is ``rem`` when non-zero)."""
        if overlap is None:
            self.tokens, self.lengths, self.rem = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
            return
        self.tokens = np.concatenate([[overlap], tail]).astype(np.int64)
        if self.kind == "blt":
            assert lengths is not None and int(lengths.sum()) == len(tail)
            self.lengths = np.concatenate([[1], lengths]).astype(np.int64)
        self.rem = rem

    def _append(self) -> None:
        tokens, lengths = self.pull()
        self.tokens = np.concatenate([self.tokens, tokens])
        if self.kind == "blt":
            assert lengths is not None and int(lengths.sum()) == len(tokens)
            self.lengths = np.concatenate([self.lengths, lengths])

    def next_sequence(self) -> Sequence:
        if self.kind == "bytes":
            while len(self.tokens) < self.seq_len + 1:
                self._append()
            seq = self.tokens[: self.seq_len + 1]
            self.tokens = self.tokens[self.seq_len :]
            return Sequence(seq.copy(), None)
        return self._next_blt()

    def _next_blt(self) -> Sequence:
        cap = None if self.max_bytes is None else self.max_bytes + 1  # tokens per sequence
        while len(self.lengths) == 0:
            self._append()
        if self.lengths[0] > 1:  # only at the very start of the stream (e.g. static patching): BOS alone
            self.lengths = np.concatenate([[1, self.lengths[0] - 1], self.lengths[1:]])
        # find how many patches fit: counts are cumulative sums of patch lengths
        while True:
            csum = np.cumsum(self.lengths[: self.seq_len])
            n_fit = len(csum) if cap is None else int(np.searchsorted(csum, cap, side="right"))
            enough_patches = len(self.lengths) >= self.seq_len
            capped = cap is not None and n_fit < len(csum)
            if enough_patches or capped:
                break
            self._append()
        self.rem = 0
        if n_fit < 2:
            # the second patch alone overflows the byte cap: split it (the rest stays a patch of the stream)
            take = cap - 1  # type: ignore[operator]
            self.rem = int(self.lengths[1] - take)
            self.lengths = np.concatenate([[1, take, self.rem], self.lengths[2:]])
            n_fit = 2
        n_tokens = int(self.lengths[:n_fit].sum())
        seq = Sequence(self.tokens[:n_tokens].copy(), self.lengths[:n_fit].copy())
        # overlap: the last token starts the next sequence as a patch of its own (views: O(1) per cut)
        self.tokens = self.tokens[n_tokens - 1 :]
        self.lengths = self.lengths[n_fit - 1 :]
        self.lengths[0] = 1
        return seq


def collate(sequences: list[Sequence], kind: str) -> Batch:
    """Pad sequences into a :class:`Batch` (module docstring)."""
    B = len(sequences)
    L = max(len(s.tokens) - 1 for s in sequences)
    x = torch.full((B, L), BOE_ID, dtype=torch.int64)
    y = torch.full((B, L), BOE_ID, dtype=torch.int64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, s in enumerate(sequences):
        t = torch.from_numpy(s.tokens.astype(np.int64))
        n = len(t) - 1
        x[i, :n] = t[:-1]
        y[i, :n] = t[1:]
        mask[i, :n] = t[1:] != BOS_ID
    patch_lengths = None
    if kind == "blt":
        P = max(len(s.patch_lengths) for s in sequences)  # type: ignore[arg-type]
        patch_lengths = torch.zeros(B, P, dtype=torch.int64)
        for i, s in enumerate(sequences):
            pl = torch.from_numpy(s.patch_lengths.astype(np.int64))  # type: ignore[union-attr]
            patch_lengths[i, : len(pl)] = pl
            patch_lengths[i, len(pl) - 1] += L - (len(s.tokens) - 1)  # padding joins the last patch
    return Batch(x=x, y=y, mask=mask, patch_lengths=patch_lengths)
