"""What the server needs from a generation engine, in one small interface, and its implementation today.

:class:`DecodeEngine` is a batch of rows being decoded, one next-byte distribution per row:

* ``join(prompts, max_new_bytes) -> logits (R, V)``: prefill new rows and append them at the end of the
  batch; returns each new row's logits for its first new byte;
* ``step(next_ids (B,)) -> StepOutput``: append one byte to every row; the logits for the next byte of
  each row (rows whose step failed are removed and reported, see :class:`StepOutput`);
* ``leave(rows)``: remove rows (finished or cancelled) at once; the others keep their order; ``reset()``
  removes them all;
* ``score(sequences, top) -> [PromptScores]``: per-byte log-probabilities of whole sequences (the prompt
  of ``echo`` + ``logprobs``), scored exactly as ``blt eval`` and the lm-eval ``blt`` model score them
  (:mod:`torchblt.eval.bpb`: the same windows, patching and forward), so log-likelihoods through the
  server equal theirs.

Every row gets exactly what it gets alone: its logits do not depend on which rows share the batch or
when they joined (the scheduler's guarantee that a request's output equals ``torchblt.generate`` on it).

:class:`BatchEngine` implements it on one :class:`~torchblt.generation.IncrementalEngine` and one
:class:`~torchblt.generation.DecodeState` for every running row (continuous batching): ``join`` prefills
the new rows and extends the running state with them (``DecodeState.extend``), so a request that arrives while others are
decoding joins their batch at the next step; ``leave`` is ``select`` of the others. Rows never read each
other in the engine, so a row's bytes are those it gets alone. A step that raises is retried row by row
(each on its own copy of its row) so that only the rows whose step fails are removed: a step moves a
state's cursor only once it has finished, and the cache entries a failed step left are at the positions
it was stepping, which the next step over them writes again before reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from torchblt.eval.bpb import _forward_batch, default_context, make_windows
from torchblt.generation import DecodeState, IncrementalEngine
from torchblt.generation.api import resolve_patcher
from torchblt.model.blt import BLT
from torchblt.patching import Patcher


@dataclass
class StepOutput:
    """``logits (B', V)`` fp32 for the rows that stepped, in order; ``failed``: rows (indices in the batch
    before the step) whose step raised, already removed, with the error."""

    logits: torch.Tensor
    failed: dict[int, BaseException] = field(default_factory=dict)


@dataclass
class PromptScores:
    """Scores of targets ``1 .. L-1`` of a sequence (token ``i`` given tokens ``< i``): ``logprobs (L-1,)``,
    and the ``top`` most likely ids ``top_ids (L-1, top)`` with their log-probabilities ``top_logprobs``."""

    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


class DecodeEngine(Protocol):
    """See the module docstring."""

    @property
    def n_rows(self) -> int: ...

    @property
    def n_batches(self) -> int:
        """Batches a step runs: 1 for an engine that merges joining rows into its batch (0 when idle)."""
        ...

    def join(self, prompts: list[list[int]], max_new_bytes: list[int]) -> torch.Tensor: ...

    def step(self, next_ids: torch.Tensor) -> StepOutput: ...

    def leave(self, rows: list[int]) -> None: ...

    def reset(self) -> None: ...

    def score(self, sequences: list[list[int]], top: int) -> list[PromptScores]: ...

    def cache_bytes(self) -> int: ...


class BatchEngine:
    """:class:`DecodeEngine` on one :class:`IncrementalEngine` state holding every running row."""

    def __init__(self, model: BLT, patcher: Patcher | None = None, score_batch_size: int = 8) -> None:
        self.model = model.eval()
        self.patcher = resolve_patcher(model, patcher, None)
        self.engine = IncrementalEngine(model, self.patcher, 0)
        self.device = self.engine.device
        self.state: DecodeState | None = None
        self.score_batch_size = score_batch_size
        self.context = default_context(model)

    @property
    def n_rows(self) -> int:
        return 0 if self.state is None else self.state.batch

    @property
    def n_batches(self) -> int:
        return 0 if self.state is None else 1

    @torch.inference_mode()
    def join(self, prompts: list[list[int]], max_new_bytes: list[int]) -> torch.Tensor:
        new, logits, _ = self.engine.prefill(prompts)
        self.engine.presize(new, max(max_new_bytes))  # no cache grows while these rows decode
        if self.state is None:
            self.state = new
        else:
            self.state.extend(new)
        return logits.float()

    def _step(self, state: DecodeState, next_ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """One step of ``state`` (the batch's ``rows``); a test hook."""
        return self.engine.step(state, next_ids)

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> StepOutput:
        assert self.state is not None and next_ids.shape[0] == self.n_rows, (next_ids.shape, self.n_rows)
        rows = list(range(self.n_rows))
        try:
            return StepOutput(self._step(self.state, next_ids, rows).float())
        except Exception:  # noqa: BLE001 - find the rows that fail; the others go on
            pass
        # the batch's step failed (the state is still the one before it): step each row alone
        states, logits, failed = [], [], {}
        for r in rows:
            single = self.state.copy().select([r])
            try:
                logits.append(self._step(single, next_ids[r : r + 1], [r]).float())
                states.append(single)
            except Exception as e:  # noqa: BLE001 - one row's failure must not stop the others
                failed[r] = e
        self.state = DecodeState.cat(states) if states else None
        V = self.model.config.vocab_size
        return StepOutput(torch.cat(logits) if logits else torch.zeros(0, V, device=self.device), failed)

    def leave(self, rows: list[int]) -> None:
        if self.state is None:
            return
        gone = set(rows)
        keep = [i for i in range(self.n_rows) if i not in gone]
        self.state = self.state.select(keep) if keep else None  # rows that leave free their caches

    def reset(self) -> None:
        self.state = None

    def cache_bytes(self) -> int:
        return 0 if self.state is None else sum(self.state.cache_bytes().values())

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], top: int) -> list[PromptScores]:
        """Windows of the model's context, as :func:`torchblt.eval.bpb.score_sequences` (which this extends
        with the top alternatives): each window patched on its own and scored in one forward."""
        pending = [(i, w) for i, seq in enumerate(sequences) for w in make_windows(i, len(seq), self.context)]
        parts: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in sequences]
        pending.sort(key=lambda p: p[1].end - p[1].start, reverse=True)
        for b in range(0, len(pending), self.score_batch_size):
            chunk = pending[b : b + self.score_batch_size]
            rows = [sequences[i][w.start : w.end] for i, w in chunk]
            logp, _, _ = _forward_batch(self.model, rows, self.patcher, self.device)  # (n, T, V)
            for j, (i, w) in enumerate(chunk):
                lo, hi = w.score_from - w.start, w.end - w.start
                pred = logp[j, lo - 1 : hi - 1]  # position t predicts token t + 1
                targets = torch.tensor(sequences[i][w.score_from : w.end], device=pred.device)
                parts[i].append((w.score_from, pred.gather(1, targets[:, None])[:, 0], pred))
        out = []
        for part in parts:
            part.sort(key=lambda p: p[0])
            lp = torch.cat([p[1] for p in part]).cpu() if part else torch.zeros(0)
            if part and top > 0:
                values, ids = torch.cat([p[2] for p in part]).topk(top, dim=-1)
            else:
                values, ids = torch.zeros(len(lp), 0), torch.zeros(len(lp), 0, dtype=torch.int64)
            out.append(PromptScores(lp, ids.cpu(), values.cpu()))
        return out


CohortEngine = BatchEngine  # the interim name (rows joined as cohorts then); kept for existing imports
