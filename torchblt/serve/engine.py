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

:class:`CohortEngine` implements it on :class:`~torchblt.generation.IncrementalEngine`, which can drop
rows (``select``) but not add them: rows that join in the same ``join`` call form a *cohort* with its own
engine, and ``step`` steps every cohort (rows are the cohorts' rows in order). Cohorts cost one
decoding step each per byte, so requests that arrive at different moments are not batched together; the
generation engine's ``DecodeState.extend`` (issue #12) removes that: its adapter keeps one state, ``join``
prefills the new rows and ``extend``\\ s the running state with them, ``leave`` is ``select`` of the
others, and nothing outside this module changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import torch

from torchblt.eval.bpb import _forward_batch, default_context, make_windows
from torchblt.generation import IncrementalEngine
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
        """Batches a step runs (cohorts); 1 for an engine that merges joining rows into its batch."""
        ...

    def join(self, prompts: list[list[int]], max_new_bytes: list[int]) -> torch.Tensor: ...

    def step(self, next_ids: torch.Tensor) -> StepOutput: ...

    def leave(self, rows: list[int]) -> None: ...

    def reset(self) -> None: ...

    def score(self, sequences: list[list[int]], top: int) -> list[PromptScores]: ...

    def cache_bytes(self) -> int: ...


class _Cohort:
    def __init__(self, engine: IncrementalEngine, n_rows: int) -> None:
        self.engine, self.n_rows = engine, n_rows


class CohortEngine:
    """:class:`DecodeEngine` on :class:`IncrementalEngine`: one engine per cohort of rows that joined together.

    The engines share one set of decode-layout step weights (built once, from a template engine that is
    never started), so a cohort costs only its caches.
    """

    def __init__(self, model: BLT, patcher: Patcher | None = None, score_batch_size: int = 8) -> None:
        self.model = model.eval()
        self.patcher = resolve_patcher(model, patcher, None)
        self._template = IncrementalEngine(model, self.patcher, 0)
        self.device = self._template.device
        self.cohorts: list[_Cohort] = []
        self.score_batch_size = score_batch_size
        self.context = default_context(model)

    @property
    def n_rows(self) -> int:
        return sum(c.n_rows for c in self.cohorts)

    @property
    def n_batches(self) -> int:
        return len(self.cohorts)

    def _new_engine(self, max_new_bytes: int) -> IncrementalEngine:
        # a shallow copy shares the step weights; start() gives it its own caches and row state
        engine = copy.copy(self._template)
        engine.max_new_bytes = max_new_bytes
        return engine

    @torch.inference_mode()
    def join(self, prompts: list[list[int]], max_new_bytes: list[int]) -> torch.Tensor:
        engine = self._new_engine(max(max_new_bytes))
        logits = engine.start(prompts)
        self.cohorts.append(_Cohort(engine, len(prompts)))
        return logits.float()

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> StepOutput:
        assert next_ids.shape[0] == self.n_rows, (next_ids.shape, self.n_rows)
        out, failed, kept = [], {}, []
        first = 0
        for cohort in self.cohorts:
            rows = range(first, first + cohort.n_rows)
            first += cohort.n_rows
            try:
                out.append(cohort.engine.advance(next_ids[rows.start : rows.stop]).float())
                kept.append(cohort)
            except Exception as e:  # noqa: BLE001 - one cohort's failure must not stop the others
                failed.update({r: e for r in rows})
        self.cohorts = kept
        V = self.model.config.vocab_size
        logits = torch.cat(out) if out else torch.zeros(0, V, device=self.device)
        return StepOutput(logits, failed)

    def leave(self, rows: list[int]) -> None:
        gone = set(rows)
        first, kept = 0, []
        for cohort in self.cohorts:
            keep = [i for i in range(cohort.n_rows) if first + i not in gone]
            first += cohort.n_rows
            if len(keep) == cohort.n_rows:
                kept.append(cohort)
            elif keep:
                cohort.engine.select(keep)
                cohort.n_rows = len(keep)
                kept.append(cohort)
            # a cohort with no rows left is dropped with its caches
        self.cohorts = kept

    def reset(self) -> None:
        self.cohorts = []

    def cache_bytes(self) -> int:
        return sum(sum(c.engine.cache_bytes().values()) for c in self.cohorts)

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
