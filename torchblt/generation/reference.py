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

    def __init__(self, model: BLT, patcher: Patcher) -> None:
        self.model, self.patcher = model, patcher
        self.device = next(model.parameters()).device
        self.rows: list[list[int]] = []
        self.next_starts: list[bool] = []
        self.prompt_starts: list[list[bool]] = []

    def _row_logits(self, ids: list[int]) -> tuple[torch.Tensor, list[bool]]:
        tokens = torch.tensor([ids], dtype=torch.int64, device=self.device)
        patch_lengths, _ = self.patcher.patch(tokens, include_next_token=True)
        patch_lengths = split_first_patch(patch_lengths)
        logits = self.model(tokens, patch_lengths)[0, -1]  # (V,)
        starts = [False] * (len(ids) + 1)
        pos = 0
        for n in patch_lengths[0].tolist():
            if n:
                starts[pos] = True
                pos += n
        return logits.float(), starts

    @torch.inference_mode()
    def start(self, prompts: list[list[int]]) -> torch.Tensor:
        self.rows = [list(p) for p in prompts]
        out, self.next_starts, self.prompt_starts = [], [], []
        for ids in self.rows:
            logits, starts = self._row_logits(ids)
            out.append(logits)
            self.next_starts.append(starts[-1])
            self.prompt_starts.append(starts[:-1])
        return torch.stack(out)

    @torch.inference_mode()
    def advance(self, next_ids: torch.Tensor) -> torch.Tensor:
        out, self.next_starts = [], []
        for ids, t in zip(self.rows, next_ids.tolist()):
            ids.append(int(t))
            logits, starts = self._row_logits(ids)
            out.append(logits)
            self.next_starts.append(starts[-1])
        return torch.stack(out)

    def select(self, rows: list[int]) -> None:
        self.rows = [self.rows[i] for i in rows]
        self.next_starts = [self.next_starts[i] for i in rows]
