"""What the server needs from a generation engine, in one small interface, and its implementation today.

:class:`DecodeEngine` is a batch of rows being decoded, one next-byte distribution per row:

* ``join(prompts, max_new_bytes) -> logits (R, V)``: prefill new rows and append them at the end of the
  batch; returns each new row's logits for its first new byte. In parts, so that a long prompt is
  prefilled a chunk at a time between steps of the running rows: ``begin(prompt, max_new_bytes) ->
  Prefill`` (no work yet), ``prefill(pending, n_bytes)`` (the next ``n_bytes`` of its prompt),
  ``admit(pendings) -> logits (R, V)`` (the rows whose prefill is done join the batch);
* ``step(next_ids (B,)) -> StepOutput``: append one byte to every row; the logits for the next byte of
  each row (rows whose step failed are removed and reported, see :class:`StepOutput`);
* ``leave(rows)``: remove rows (finished or cancelled) at once; the others keep their order; ``reset()``
  removes them all;
* ``score(sequences, top) -> [PromptScores]``: per-byte log-probabilities of whole sequences (the prompt
  of ``echo`` + ``logprobs``), scored exactly as ``blt eval`` and the lm-eval ``blt`` model score them
  (:mod:`torchblt.eval.bpb`: the same windows, patching and forward), so log-likelihoods through the
  server equal theirs.

With the scheduler's prefill thread, ``prefill`` and ``score`` run on that thread while ``step``, ``admit`` and
``leave`` run on the scheduler's: an engine must keep a prefill's one-row state apart from the running batch
(``BatchEngine`` does: a prefill touches only its own state, and the model's modules hold no state of a call).

Every row gets exactly what it gets alone: its logits do not depend on which rows share the batch or
when they joined (the scheduler's guarantee that a request's output equals ``torchblt.generate`` on it).

:class:`BatchEngine` implements it on one :class:`~torchblt.generation.IncrementalEngine` and one
:class:`~torchblt.generation.DecodeState` for every running row (continuous batching): ``join`` prefills
the new rows and extends the running state with them (``DecodeState.extend``), so a request that arrives while others are
decoding joins their batch at the next step; ``leave`` is ``select`` of the others. A joining row is
prefilled on its own one-row state (``IncrementalEngine.new_state(1)``) in parts
(``IncrementalEngine.prefill_row``: the engine's own chunked prefill, driven from outside), so its caches and logits do not depend on what else runs or when its
chunks ran. Rows never read each
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
from torchblt.generation.incremental import bucket
from torchblt.model.blt import BLT
from torchblt.patching import Patcher
from torchblt.tokenizer import ByteTokenizer


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


@dataclass
class Prefill:
    """A joining row's prefill in progress (:meth:`BatchEngine.begin`): its prompt, its own one-row state
    and how many of the prompt's bytes are in it; ``logits (1, V)``: its first new byte's, once done."""

    ids: list[int]
    max_new_bytes: int
    state: DecodeState | None = None
    done_bytes: int = 0
    logits: torch.Tensor | None = None

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done_bytes

    @property
    def done(self) -> bool:
        return self.remaining == 0


class DecodeEngine(Protocol):
    """See the module docstring."""

    @property
    def n_rows(self) -> int: ...

    @property
    def n_batches(self) -> int:
        """Batches a step runs: 1 for an engine that merges joining rows into its batch (0 when idle)."""
        ...

    def join(self, prompts: list[list[int]], max_new_bytes: list[int]) -> torch.Tensor: ...

    def begin(self, prompt: list[int], max_new_bytes: int) -> Prefill: ...

    def prefill(self, pending: Prefill, n_bytes: int) -> None: ...

    def admit(self, pendings: list[Prefill]) -> torch.Tensor: ...

    def step(self, next_ids: torch.Tensor) -> StepOutput: ...

    def leave(self, rows: list[int]) -> None: ...

    def reset(self) -> None: ...

    def score(self, sequences: list[list[int]], top: int) -> list[PromptScores]: ...

    def cache_bytes(self) -> int: ...


def check_cache_memory(row_bytes: int, slots: int, free_bytes: int, context: int) -> None:
    """Refuse a compiled batch whose caches cannot fit: ``slots`` rows of ``row_bytes`` each, twice (the first
    call of each batch size runs on a copy of the state), in ``free_bytes`` of device memory."""
    need = 2 * row_bytes * slots
    if need > free_bytes:
        raise ValueError(
            f"the compiled step sizes every row's caches for {context} bytes ({row_bytes / 2**20:.0f} MiB per row): "
            f"{slots} slots need ~{need / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB are free; lower "
            "--max-prompt-bytes / --max-tokens / --max-batch, or serve with --compile off")


class BatchEngine:
    """:class:`DecodeEngine` on one :class:`IncrementalEngine` state holding every running row.

    The state's rows are *slots*: ``live[i]`` is the slot of the batch's row ``i``. A row that leaves
    frees its slot without copying the batch (``select`` copies every cache: measured at about one
    step of a 16-row batch per join or leave); a joining row is written into a free slot in place
    (``DecodeState.put``). Free slots are stepped with EOS bytes (their output is dropped; EOS keeps
    their documents, and so the caches they need, short) until a row reuses them, or the batch is
    compacted (one ``select``): when a slot has been free ``hold_steps`` steps, or more slots are
    free than a quarter of the live rows.

    ``compile=True``: the steps run compiled (``IncrementalEngine(compile=True)``: inductor on CPU, CUDA graphs
    on GPU), which needs shapes that do not change from step to step: the slots are kept at a power of two
    (the free ones pad the batch; a compaction keeps the smallest power of two that holds the live rows), and
    every joining row's growing caches are presized to hold ``context`` bytes (prompt and new bytes: the
    server's ``max_prompt_bytes + max_tokens``), so that all rows have the same cache capacities. Each batch
    size then compiles once (:meth:`warm_up` compiles them before serving); a row that would need more than
    ``context`` bytes still decodes exactly, after a recompile."""

    def __init__(self, model: BLT, patcher: Patcher | None = None, score_batch_size: int = 8,
                 hold_steps: int = 16, *, compile: bool = False, context: int | None = None) -> None:
        self.model = model.eval()
        self.patcher = resolve_patcher(model, patcher, None)
        self.compile = bool(compile)
        self.engine = IncrementalEngine(model, self.patcher, 0, compile=self.compile)
        # prefills and the row-by-row retry of a failed step run eager (a retry's one-row batch would compile)
        self.eager = IncrementalEngine(model, self.patcher, 0) if self.compile else self.engine
        self.device = self.engine.device
        self.state: DecodeState | None = None
        self.live: list[int] = []  # the slot of each row, in the batch's order
        self.free: dict[int, int] = {}  # free slot -> steps since it was freed
        self.hold_steps = hold_steps
        self.score_batch_size = score_batch_size
        self.context = default_context(model)
        # bytes per row (prompt + new) the compiled shapes are sized for
        self.compile_context = context if context is not None else 2 * self.context
        if self.compile_context < 1:
            raise ValueError(f"context must be >= 1 byte, got {self.compile_context}")
        self.compactions = 0  # selects that dropped free slots (tests, metrics)
        self.row_cache_bytes = 0  # caches of one presized row, measured by warm_up
        self._retrying = False  # stepping the rows of a failed step one by one

    @property
    def n_rows(self) -> int:
        return len(self.live)

    @property
    def n_slots(self) -> int:
        """Rows the engine steps (live rows and free slots)."""
        return 0 if self.state is None else self.state.batch

    @property
    def n_batches(self) -> int:
        return 0 if self.state is None else 1

    def join(self, prompts: list[list[int]], max_new_bytes: list[int]) -> torch.Tensor:
        """Prefill ``prompts`` whole and append them (:meth:`begin` + :meth:`prefill` + :meth:`admit`)."""
        pendings = [self.begin(p, m) for p, m in zip(prompts, max_new_bytes, strict=True)]
        for p in pendings:
            self.prefill(p, p.remaining)
        return self.admit(pendings)

    def begin(self, prompt: list[int], max_new_bytes: int) -> Prefill:
        """A row to prefill (nothing runs yet)."""
        if not prompt:
            raise ValueError("every prompt needs at least one token (the BOS)")
        return Prefill(list(prompt), max_new_bytes)

    @torch.inference_mode()
    def prefill(self, pending: Prefill, n_bytes: int) -> None:
        """Prefill the next ``n_bytes`` (at least 1) of ``pending``'s prompt into its own state
        (``IncrementalEngine.prefill_row``: the engine's prefill, in parts)."""
        if pending.state is None:
            pending.state = self.eager.new_state(1)
        end = min(len(pending.ids), pending.done_bytes + max(1, n_bytes))
        last, _ = self.eager.prefill_row(pending.state, pending.ids, pending.done_bytes, end)
        pending.done_bytes, pending.logits = end, last.float()

    @torch.inference_mode()
    def admit(self, pendings: list[Prefill]) -> torch.Tensor:
        """The rows of finished prefills join the batch (after its rows, in order: into free slots, or
        appended); their first new bytes' logits ``(R, V)``. A prefill listed several times (the ``n``
        choices of one prompt) gives each its own copy of the state."""
        assert pendings and all(p.done and p.state is not None for p in pendings)
        states: list[DecodeState] = []
        first: dict[int, DecodeState] = {}  # a prefill listed again (choices of one prompt): a copy of its state
        for p in pendings:
            assert p.state is not None
            if id(p) in first:
                states.append(first[id(p)].copy())
                continue
            # no cache grows while the row decodes (nor while its slot is held after it)
            self._presize(p.state, len(p.ids), max(q.max_new_bytes for q in pendings if q is p))
            first[id(p)] = p.state
            states.append(p.state)
        for p in pendings:
            p.state = None  # the batch owns it now
        logits = torch.cat([p.logits for p in pendings])  # type: ignore[misc]
        reuse = sorted(self.free)[: len(states)]
        if reuse:
            assert self.state is not None
            self.state.put(reuse, DecodeState.cat(states[: len(reuse)]))
            for s in reuse:
                del self.free[s]
            self.live += reuse
        if states[len(reuse) :]:
            self._append(states[len(reuse) :])
        return logits

    def _append(self, states: list[DecodeState]) -> None:
        """Append rows after the slots (one copy of each; a compiled batch is padded to its power of two with
        copies of the last row, as free slots)."""
        first, n = self.n_slots, len(states)
        pad = self._slots_for(first + n) - first - n
        padded = states + states[-1:] * pad
        self.state = DecodeState.cat(padded) if self.state is None else self.state.extend(*padded)
        self.live += list(range(first, first + n))
        self.free.update((first + n + i, 0) for i in range(pad))

    def _slots_for(self, rows: int) -> int:
        """Slots a batch of ``rows`` rows runs: a power of two when compiled (one graph per power)."""
        return bucket(rows) if self.compile else rows

    def _presize(self, state: DecodeState, prompt_bytes: int, max_new_bytes: int) -> None:
        """Size a joining row's growing caches: for its own bytes, or (compiled) for ``compile_context`` bytes,
        the same capacities for every row whatever its prompt."""
        need = max_new_bytes + self.hold_steps
        if self.compile:
            self.engine.presize(state, max(self.compile_context + self.hold_steps, prompt_bytes + need), total=True)
        else:
            self.engine.presize(state, need)

    @torch.inference_mode()
    def warm_up(self, max_batch: int) -> list[int]:
        """Compile the step of every batch size up to ``max_batch`` (the powers of two) before serving: a dummy
        batch of each size is prefilled with the start of a short text and stepped through the rest (the first
        step compiles every part). Returns the batch sizes compiled; nothing without ``compile``."""
        if not self.compile:
            return []
        import torch._dynamo

        sizes = [1 << i for i in range(bucket(max_batch).bit_length())]
        # one graph per batch size and part (all engines share the parts' code): room for every size
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(sizes) + 4)
        ids = ByteTokenizer().encode("Warm-up: the compiled step, once per batch size.\n", add_eos=False)
        for b in sizes:
            state, _, _ = self.eager.prefill([ids[:8]])
            self._presize(state, 8, len(ids))
            if b == 1:
                self.row_cache_bytes = sum(state.cache_bytes().values())
                if self.device.type == "cuda":
                    check_cache_memory(self.row_cache_bytes, sizes[-1], torch.cuda.mem_get_info(self.device)[0],
                                       self.compile_context)
            state.select([0] * b)
            for t in ids[8:]:
                self.engine.step(state, torch.full((b,), t, dtype=torch.int64, device=self.device))
        return sizes

    def _step(self, state: DecodeState, next_ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """One step of ``state`` (the batch's ``rows``, by their index in the batch; while ``_retrying``, a row
        stepped alone after its batch's step failed: eager); a test hook."""
        return (self.eager if self._retrying else self.engine).step(state, next_ids)

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> StepOutput:
        assert self.state is not None and next_ids.shape[0] == self.n_rows, (next_ids.shape, self.n_rows)
        self._maybe_compact()
        assert self.state is not None
        rows = list(range(self.n_rows))
        ids = next_ids.to(self.device, torch.int64)
        # the batch's row i is slot live[i]: a row that took a free slot may sit before running rows in
        # the slots' order even when no slot is free, so the bytes go by slot (free slots get EOS) and the
        # logits come back in the batch's order unless row i is slot i for every slot
        by_slot = self.live != list(range(self.n_slots))
        if by_slot:
            live = torch.tensor(self.live, dtype=torch.int64, device=self.device)
            ids = torch.full((self.n_slots,), self.model.config.eos_id, dtype=torch.int64,
                             device=self.device).index_copy_(0, live, ids)
        try:
            logits = self._step(self.state, ids, rows).float()
            for s in self.free:
                self.free[s] += 1
            return StepOutput(logits[live] if by_slot else logits)
        except Exception:  # noqa: BLE001 - find the rows that fail; the others go on
            pass
        # the batch's step failed (the state is still the one before it): step each row alone
        states, logits_list, failed = [], [], {}
        self._retrying = True
        try:
            for r in rows:
                single = self.state.take([self.live[r]])  # a copy of this row only
                try:
                    logits_list.append(self._step(single, next_ids[r : r + 1], [r]).float())
                    states.append(single)
                except Exception as e:  # noqa: BLE001 - one row's failure must not stop the others
                    failed[r] = e
        finally:
            self._retrying = False
        self.state, self.live, self.free = None, [], {}  # rebuilt from the rows that stepped
        if states:
            self._append(states)
        V = self.model.config.vocab_size
        return StepOutput(torch.cat(logits_list) if logits_list else torch.zeros(0, V, device=self.device), failed)

    def _maybe_compact(self) -> None:
        """Drop the free slots (one ``select``) when they are held too long or cost too much (compiled: down
        to the smallest power of two that holds the live rows, the rest free; only when that is smaller)."""
        target = self._slots_for(self.n_rows)
        spare = self.n_slots - target
        if spare > 0 and (max(self.free.values()) >= self.hold_steps or spare > max(1, self.n_rows // 4)):
            assert self.state is not None
            pad = target - self.n_rows
            self.state.select(self.live + self.live[:1] * pad)
            self.live = list(range(self.n_rows))
            self.free = {self.n_rows + i: 0 for i in range(pad)}
            self.compactions += 1

    def leave(self, rows: list[int]) -> None:
        """Rows leave; their slots are free (no copy) until reused or compacted."""
        if self.state is None:
            return
        gone = set(rows)
        for i in gone:
            self.free[self.live[i]] = 0
        self.live = [s for i, s in enumerate(self.live) if i not in gone]
        if not self.live:
            self.reset()  # the last row left: every cache is freed

    def reset(self) -> None:
        self.state, self.live, self.free = None, [], {}

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
