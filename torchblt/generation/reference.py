"""The plain generator: re-patch and re-run everything for every new byte (the test oracle and the
benchmark baseline).

Shape legend: B rows, T bytes so far, P patches, V vocabulary.

What the reference's ``generate_nocache`` does (spec §9.1), one row at a time: for every new byte the
whole sequence is patched with ``include_next_token=True`` (the entropy model over the whole prefix),
the whole BLT runs, and the logits of the last position give the next byte. Rows are processed
separately, so a row never sees another row (the reference computes a batch's entropies over the
concatenated rows; ours equal the single-prompt runs). Cost grows with the square of the length.
"""

from __future__ import annotations

import torch

from torchblt.model.blt import BLT
from torchblt.patching import Patcher, split_first_patch


class FullRecomputeEngine:
    """``start(prompts) -> logits (B, V)``, ``advance(next_ids (B,)) -> logits (B, V)``, ``select(rows)``.

    ``next_starts[b]``: whether the byte about to be appended to row b starts a patch.
    """

    def __init__(self, model: BLT, patcher: Patcher, batch_equal_lengths: bool = False) -> None:
        """``batch_equal_lengths``: when every row has the same length, run the rows as one batch (patch
        lengths per row, zero-padded; entropies per row) — faster, same results up to float rounding."""
        self.model, self.patcher = model, patcher
        self.batch_equal_lengths = batch_equal_lengths
        self.device = next(model.parameters()).device
        self.rows: list[list[int]] = []
        self.next_starts: list[bool] = []
        self.prompt_starts: list[list[bool]] = []

    def _logits(self, rows: list[list[int]]) -> tuple[torch.Tensor, list[list[bool]]]:
        """Last-position logits ``(B, V)`` and start flags over ``T + 1`` positions of equal-length rows."""
        tokens = torch.tensor(rows, dtype=torch.int64, device=self.device)  # (B, T)
        patch_lengths, _ = self.patcher.patch(tokens, include_next_token=True)  # per row
        patch_lengths = split_first_patch(patch_lengths)  # (B, P)
        logits = self.model(tokens, patch_lengths)[:, -1]  # (B, V)
        all_starts = []
        for row in patch_lengths.tolist():
            starts = [False] * (tokens.shape[1] + 1)
            pos = 0
            for n in row:
                if n:
                    starts[pos] = True
                    pos += n
            all_starts.append(starts)
        return logits.float(), all_starts

    def _all_logits(self) -> tuple[torch.Tensor, list[list[bool]]]:
        if self.batch_equal_lengths and len({len(r) for r in self.rows}) == 1:
            return self._logits(self.rows)
        out, starts = [], []
        for ids in self.rows:  # one row at a time: no row can influence another
            logits, s = self._logits([ids])
            out.append(logits[0])
            starts.append(s[0])
        return torch.stack(out), starts

    @torch.inference_mode()
    def start(self, prompts: list[list[int]]) -> torch.Tensor:
        self.rows = [list(p) for p in prompts]
        logits, starts = self._all_logits()
        self.next_starts = [s[-1] for s in starts]
        self.prompt_starts = [s[:-1] for s in starts]
        return logits

    @torch.inference_mode()
    def advance(self, next_ids: torch.Tensor) -> torch.Tensor:
        for ids, t in zip(self.rows, next_ids.tolist()):
            ids.append(int(t))
        logits, starts = self._all_logits()
        self.next_starts = [s[-1] for s in starts]
        return logits

    def select(self, rows: list[int]) -> None:
        self.rows = [self.rows[i] for i in rows]
        self.next_starts = [self.next_starts[i] for i in rows]
