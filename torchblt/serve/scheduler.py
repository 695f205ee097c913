"""Continuous batching: one thread owns the engine and all torch work; requests join and leave between steps.

A request (:class:`Job`) has one *choice* per prompt and ``n``; each choice is a row of the running
batch. The scheduler thread loops over *ticks*:

1. rows of cancelled (client gone) or failed jobs leave the batch;
2. waiting choices are admitted while fewer than ``max_batch`` rows run or prefill (a job may be
   admitted in parts; choices with ``max_tokens=0`` finish at once); their prompts are scored when
   ``echo`` + ``logprobs`` ask for it (on the prefill thread when there is one, see 3: the choices start,
   their rows held meanwhile, once the scores are back), and each gets a prefill (``engine.begin``);
3. prefills advance by at most ``prefill_chunk`` prompt bytes per tick (``engine.prefill``), oldest
   first: a row's prompt is prefilled in chunks at fixed offsets (multiples of ``prefill_chunk``), so
   its caches do not depend on what else runs, and a long prompt delays the running rows' next byte by
   one chunk per tick, not by its whole prefill. Rows whose prefill is done join the batch
   (``engine.admit``). With ``prefill_thread`` the chunks run instead on a thread of their own (the same
   chunks, in the same order, one prefill after another), beside the batch's steps: on a CPU with a core
   the decoding step does not use, a joining request's prefill then no longer stalls the running rows,
   and the tick only admits the rows whose prefill that thread has finished;
4. every row samples its next byte from its logits with its own temperature / top-k / top-p and its own
   ``torch.Generator`` (seeded ``seed + choice index`` as :func:`torchblt.generate` seeds row ``i``),
   appends it, checks its stop condition (EOS, stop strings, ``max_tokens``: :mod:`torchblt.generation.stream`)
   and releases the text that is final (never half a UTF-8 character, never the start of a stop string);
5. finished rows leave; the others take one ``engine.step``.

With ``speculative=K`` (``max_batch`` 1) steps 3-5 are instead the rounds of
:func:`torchblt.generation.speculative.speculative_steps` for the one running row (up to ``K + 1`` bytes per
tick; its prompt is prefilled by that driver).

So a choice's bytes depend only on its prompt, its parameters and its seed: equal to the same request
run alone, whatever else runs. Errors are contained: a job whose prefill, sampling or step raises gets
an error event and leaves; the other rows go on. Events go to the event loop through a sink callback
(thread-safe: it only hands a list over); the thread never waits on the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from torchblt.generation.sampling import sample
from torchblt.generation.speculative import speculative_steps
from torchblt.generation.stream import StopCondition, TextStream
from torchblt.serve.engine import DecodeEngine, Prefill
from torchblt.serve.metrics import Metrics
from torchblt.serve.protocol import APIError, CompletionRequest, TokenLogprob

log = logging.getLogger("torchblt.serve")


# --------------------------------------------------------------------------- events (thread -> event loop)


@dataclass
class Started:
    """Choice ``index`` was admitted; ``prompt_logprobs``: its prompt's entries (``echo`` + ``logprobs``)."""

    index: int
    prompt_logprobs: list[TokenLogprob] | None


@dataclass
class Delta:
    """New final text of a streaming choice, and the log-probabilities of the bytes generated since the last."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None


@dataclass
class Finished:
    """Choice ``index`` is done: ``text`` (its whole text, or the rest of it when streaming), why it stopped,
    how many ids it generated, and the log-probabilities not yet sent."""

    index: int
    text: str
    finish_reason: str
    n_generated: int
    logprobs: list[TokenLogprob] | None


@dataclass
class Failed:
    """The job failed (its remaining choices were cancelled)."""

    error: APIError


Event = Started | Delta | Finished | Failed


# --------------------------------------------------------------------------- jobs and rows


class Job:
    """One completions request: its choices, where its events go, and whether its client is gone."""

    def __init__(self, request: CompletionRequest, sink: Callable[[list[Event]], None]) -> None:
        self.request = request
        self.sink = sink
        self.arrival = time.perf_counter()
        self.cancelled = False  # set by the event loop (client gone); read by the scheduler thread
        self.failed = False
        self.n_finished = 0
        self.next_choice = 0  # choices below this were admitted
        self.prompt_logprobs: dict[int, list[TokenLogprob]] = {}

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.cancelled or self.failed

    @property
    def fully_admitted(self) -> bool:
        return self.next_choice >= self.request.n_rows


@dataclass
class Row:
    """One choice decoding: its sampling state, its bytes so far, its text stream."""

    job: Job
    index: int
    generator: torch.Generator | None
    stop: StopCondition
    stream: TextStream | None
    ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    last_time: float = 0.0

    @property
    def params(self) -> tuple[float, int, float]:
        g = self.job.request.generation
        return (g.temperature, g.top_k, g.top_p)


@dataclass(eq=False)
class _Scoring:
    """The prompts of a job to score (``echo`` + ``logprobs``) on the prefill thread, for its admitted
    choices ``indices``; ``entries`` (prompt index -> its entries) once done."""

    job: Job
    indices: list[int]
    prompts: list[int]
    entries: dict[int, list[TokenLogprob]] | None = None


class _PrefillThread:
    """Prefills joining rows (and scores ``echo`` + ``logprobs`` prompts) on a thread of its own, one after
    another in the order they were handed over, in the chunks the scheduler's thread would run
    (``prefill_chunk`` bytes at fixed offsets), so a row's caches are the same bytes whichever thread built them. Each prefill touches only its own one-row
    state (:class:`~torchblt.serve.engine.Prefill`), never the running batch; the scheduler reads a
    prefill again only after it is reported in :attr:`finished` (the queue orders the two threads)."""

    def __init__(self, engine: DecodeEngine, chunk: int, metrics: Metrics, on_finished: Callable[[], None]) -> None:
        self.engine, self.chunk, self.metrics, self.on_finished = engine, chunk, metrics, on_finished
        self._todo: queue.SimpleQueue[tuple[Job, Prefill | _Scoring] | None] = queue.SimpleQueue()
        self.finished: deque[tuple[Prefill | _Scoring, BaseException | None]] = deque()  # in the order they finished
        self._thread = threading.Thread(target=self._run, name="blt-prefill", daemon=True)
        self._thread.start()

    def submit(self, job: Job, task: Prefill | _Scoring) -> None:
        self._todo.put((job, task))

    def stop(self, timeout: float = 10.0) -> None:
        self._todo.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while (item := self._todo.get()) is not None:
            job, task = item
            error: BaseException | None = None
            t = time.perf_counter()
            try:
                if isinstance(task, _Scoring):
                    if not job.done:
                        task.entries = prompt_logprobs(self.engine, job.request, task.prompts)
                else:
                    while not task.done and not job.done:  # a cancelled job's prefill stops at a chunk's end
                        self.engine.prefill(task, min(self.chunk, task.remaining) if self.chunk else task.remaining)
            except Exception as e:  # noqa: BLE001 - reported to the scheduler, which fails only this job
                error = e
            self.metrics.prefill_thread_seconds.inc(time.perf_counter() - t)
            self.finished.append((task, error))
            self.on_finished()


class Scheduler:
    """Owns ``engine`` on its own thread; :meth:`submit` from any thread (the event loop)."""

    def __init__(self, engine: DecodeEngine, metrics: Metrics, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 128, speculative: int | None = None, prefill_thread: bool = False) -> None:
        """``prefill_chunk``: prompt bytes prefilled per tick (0: every admitted prompt whole at once).
        ``prefill_thread``: prefill on a second thread, beside the steps (see the module docstring; not
        with ``speculative``, whose driver prefills its row itself).
        ``speculative=K``: speculative decoding, one row at a time (``max_batch`` must be 1; ``engine`` a
        :class:`~torchblt.serve.engine.BatchEngine`, whose model and patcher it uses)."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 0:
            raise ValueError(f"max_batch must be >= 1, max_queue >= 0 and prefill_chunk >= 0, got {max_batch}, "
                             f"{max_queue} and {prefill_chunk}")
        if speculative and max_batch != 1:
            raise ValueError(f"speculative decoding runs one request at a time: it needs max_batch 1, got {max_batch}")
        self.speculative = speculative or 0
        self._spec: tuple[Row, Iterator[tuple]] | None = None  # the speculative row and its driver
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self._prefilling: list[tuple[Job, int, Prefill]] = []  # admitted choices being prefilled, oldest first
        self.prefill_calls: list[int] = []  # prompt bytes prefilled per tick that prefilled (tests)
        self.device = getattr(engine, "device", torch.device("cpu"))
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._rows: list[Row] = []
        self._logits: torch.Tensor | None = None  # (len(rows), V): each row's next-byte logits
        self._draining = False
        self._stopping = False
        self._aborting = False
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.max_rows = 0  # the most rows that ever decoded side by side
        self.prefill_thread = bool(prefill_thread) and not self.speculative
        self._prefiller: _PrefillThread | None = None
        self._handed: set[int] = set()  # ids of the prefills handed to the prefill thread and not yet reported
        self._scoring: list[_Scoring] = []  # admitted choices waiting for their prompts' scores (prefill thread)

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        if self.prefill_thread:
            self._prefiller = _PrefillThread(self.engine, self.prefill_chunk, self.metrics, self.wake)
        self._thread = threading.Thread(target=self._run, name="blt-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`APIError` 429 (queue full) or 503 (draining / stopped)."""
        with self._cv:
            if self._draining or self._stopping:
                raise APIError(503, "the server is shutting down and takes no new requests",
                               type="server_error", code="server_shutting_down")
            if not self.alive:
                raise APIError(503, "the server's scheduler is not running", type="server_error",
                               code="scheduler_stopped")
            if len(self._waiting) >= self.max_queue and not (self._free_rows() >= job.request.n_rows
                                                             and not self._waiting):
                raise APIError(429, f"the server is busy: {len(self._waiting)} requests are waiting "
                               f"(--max-queue {self.max_queue}); retry later", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"})
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def begin_drain(self, timeout: float | None = None) -> None:
        """Take no new requests; the queued and running ones go on (for at most ``timeout`` seconds, then
        :meth:`abort`)."""
        with self._cv:
            if self._draining:
                return
            self._draining = True
        if timeout is not None:
            timer = threading.Timer(timeout, self.abort)
            timer.daemon = True
            timer.start()

    def abort(self) -> None:
        """Fail every queued and running request now (503); the thread goes on (see :meth:`stop`)."""
        with self._cv:
            self._aborting = True
            self._cv.notify()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything left and end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._prefiller is not None:
            self._prefiller.stop(timeout)

    def _free_rows(self) -> int:
        return self.max_batch - len(self._rows) - len(self._prefilling) - sum(len(t.indices) for t in self._scoring)

    def _prefill_work(self) -> bool:
        """(under the lock) can a tick advance a prefill now? Not while the prefill thread runs them all."""
        if self._prefiller is None:
            return bool(self._prefilling)
        return bool(self._prefiller.finished) or any(id(p) not in self._handed for _, _, p in self._prefilling)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stopping or self._aborting or self._rows or self._waiting or self._prefill_work()):
                    self._cv.wait()
                if self._stopping:
                    break
                aborting, self._aborting = self._aborting, False
                admitted = [] if aborting else self._take_admissions()
            if aborting:
                self._fail_all("the server shut down before this request finished (--drain-timeout)")
                continue
            events: dict[Job, list[Event]] = {}
            try:
                self._tick(admitted, events)
            except Exception as e:  # noqa: BLE001 - a bug in a tick must not end the server
                log.exception("scheduler tick failed; failing the running requests")
                err = APIError(500, f"internal error while decoding: {type(e).__name__}: {e}", type="server_error",
                               code="internal_error")
                for job in ({r.job for r in self._rows} | {j for j, _ in admitted} | {j for j, _, _ in self._prefilling}
                            | {t.job for t in self._scoring}):
                    self._fail(job, err, events)
                self.engine.reset()
                self._rows, self._logits, self._prefilling, self._scoring = [], None, [], []
            clock = _PhaseClock(self.metrics)
            self._deliver(events)
            clock.lap("deliver")
            self.ticks += 1
        self._fail_all("the server shut down before this request finished")

    def _fail_all(self, message: str) -> None:
        events: dict[Job, list[Event]] = {}
        err = APIError(503, message, type="server_error", code="server_shutting_down")
        with self._cv:
            left = list(self._waiting)
            self._waiting.clear()
            self.metrics.queue_depth.set(0)
        for job in {r.job for r in self._rows} | set(left) | {j for j, _, _ in self._prefilling} | {t.job for t in self._scoring}:
            self._fail(job, err, events)
        self._prefilling, self._scoring = [], []
        self._leave(list(range(len(self._rows))))
        self._deliver(events)

    def _take_admissions(self) -> list[tuple[Job, list[int]]]:
        """(under the lock) choices to admit now: ``[(job, [choice index, ...])]``."""
        out = []
        free = self._free_rows()
        while self._waiting and (self._waiting[0].done or free > 0):
            job = self._waiting[0]
            if job.done:
                self._waiting.popleft()
                continue
            take = min(free, job.request.n_rows - job.next_choice)
            out.append((job, list(range(job.next_choice, job.next_choice + take))))
            job.next_choice += take
            free -= take
            if job.fully_admitted:
                self._waiting.popleft()
        self.metrics.queue_depth.set(len(self._waiting))
        return out

    def _tick(self, admitted: list[tuple[Job, list[int]]], events: dict[Job, list[Event]]) -> None:
        if self.speculative:
            self._tick_speculative(admitted, events)
        else:
            self._tick_batch(admitted, events)
        self.metrics.running_rows.set(len(self._rows))
        self.metrics.prefilling_rows.set(len(self._prefilling))
        self.metrics.batches.set(self.engine.n_batches if not self.speculative else len(self._rows))
        self.metrics.cache_bytes.set(self.engine.cache_bytes())

    def _tick_batch(self, admitted: list[tuple[Job, list[int]]], events: dict[Job, list[Event]]) -> None:
        clock = _PhaseClock(self.metrics)
        gone = [i for i, r in enumerate(self._rows) if r.job.done]
        if gone:
            self._leave(gone)
        self._prefilling = [p for p in self._prefilling if not p[0].done]  # their states are dropped
        self._scoring = [t for t in self._scoring if not t.job.done]
        if admitted:
            self._admit(admitted, events)
        clock.lap("admit")
        if self._prefiller is not None:
            self._prefill_elsewhere(events)
        elif self._prefilling:
            self._prefill_some(events)
        self.max_rows = max(self.max_rows, len(self._rows))
        clock.lap("prefill")
        if self._rows:
            next_ids, finished = self._sample(events)
            clock.lap("sample")
            if finished:
                done = set(finished)
                keep = [i for i in range(len(self._rows)) if i not in done]
                next_ids = next_ids[keep]
                self._leave(finished)
            if self._rows:
                out = self.engine.step(next_ids)
                failed_jobs = {self._rows[i].job: e for i, e in out.failed.items()}
                self._rows = [r for i, r in enumerate(self._rows) if i not in out.failed]
                self._logits = out.logits
                for job, e in failed_jobs.items():
                    self._fail(job, _internal(e), events)
            clock.lap("step")

    def _tick_speculative(self, admitted: list[tuple[Job, list[int]]], events: dict[Job, list[Event]]) -> None:
        """``speculative=K`` (one row at a time): the row's bytes come from
        :func:`torchblt.generation.speculative.speculative_steps` (the entropy model drafts up to ``K`` bytes,
        the BLT verifies them in one step), up to ``K + 1`` bytes per tick."""
        clock = _PhaseClock(self.metrics)
        if self._spec is not None and self._spec[0].job.done:
            self._end_speculative()
        self._prefilling = [p for p in self._prefilling if not p[0].done]
        if admitted:
            self._admit(admitted, events)
        clock.lap("admit")
        if self._spec is None and self._prefilling:
            job, i, pending = self._prefilling.pop(0)
            row = self._new_row(job, i)
            cfg = dataclasses.replace(job.request.generation, speculative=self.speculative)
            model, patcher = self.engine.model, self.engine.patcher  # type: ignore[attr-defined]
            steps = speculative_steps(model, [pending.ids], patcher, cfg, [row.generator], row.stop,
                                      record_logits=job.request.logprobs is not None)
            self._spec, self._rows = (row, steps), [row]
        if self._spec is None:
            return
        row, steps = self._spec
        try:
            for _ in range(self.speculative + 1):
                event = next(steps)
                if event[0] == "prompt_starts":
                    event = next(steps)
                _, t, logits_row, _, _ = event
                lp = _logprobs(logits_row[None], [row])[0] if logits_row is not None else None
                self.metrics.generated_bytes.inc()
                if self._emit(row, int(t), lp, time.perf_counter(), events):
                    self._end_speculative()
                    break
        except StopIteration:  # the driver ended the row where its stop condition (the row's own) did
            self._end_speculative()
        except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
            self._fail(row.job, _internal(e), events)
            self._end_speculative()
        clock.lap("step")

    def _end_speculative(self) -> None:
        if self._spec is not None:
            self._spec[1].close()
        self._spec, self._rows = None, []

    # ------------------------------------------------------------------ steps of a tick
    def _admit(self, admitted: list[tuple[Job, list[int]]], events: dict[Job, list[Event]]) -> None:
        """Admitted choices start (:meth:`_start`) once their prompts are scored, when ``echo`` + ``logprobs``
        ask for it: here, or on the prefill thread when there is one (their rows held meanwhile)."""
        ready: list[tuple[Job, list[int]]] = []
        for job, indices in admitted:
            if job.done:
                continue
            req = job.request
            if req.echo and req.logprobs is not None:
                needed = {i // req.n for i in indices}
                # a job admitted in parts: prompts that an earlier part's scoring has in hand are not scored
                # again; this part waits for them (the thread reports in order)
                in_flight = {p for t in self._scoring if t.job is job for p in t.prompts}
                todo = sorted(needed - set(job.prompt_logprobs) - in_flight)
                if self._prefiller is not None and (todo or needed & in_flight):
                    task = _Scoring(job, indices, todo)
                    self._scoring.append(task)
                    self._prefiller.submit(job, task)
                    continue
                try:
                    job.prompt_logprobs.update(prompt_logprobs(self.engine, req, todo))
                except Exception as e:  # noqa: BLE001
                    self._fail(job, _internal(e), events)
                    continue
            ready.append((job, indices))
        self._start(ready, events)

    def _start(self, admitted: list[tuple[Job, list[int]]], events: dict[Job, list[Event]]) -> None:
        """Choices whose prompts are scored (if asked) start: their ``Started`` events, and a prefill each
        (the choices of one prompt admitted together share one)."""
        new: list[tuple[Job, int]] = []
        for job, indices in admitted:
            req = job.request
            for i in indices:
                p = i // req.n
                events.setdefault(job, []).append(Started(i, job.prompt_logprobs.get(p)))
                self.metrics.prompt_bytes.inc(req.prompts[p].shown)
                if req.generation.max_new_bytes == 0:
                    self._finish_empty(job, i, events)
                else:
                    new.append((job, i))
        shared: dict[tuple[int, int], Prefill] = {}  # the choices of one prompt admitted together: one prefill
        for job, i in new:
            req = job.request
            key = (id(job), i // req.n)
            try:
                if key not in shared:
                    shared[key] = self.engine.begin(req.prompts[i // req.n].ids, req.generation.max_new_bytes)
            except Exception as e:  # noqa: BLE001
                self._fail(job, _internal(e), events)
                continue
            self._prefilling.append((job, i, shared[key]))

    def _prefill_some(self, events: dict[Job, list[Event]]) -> None:
        """Prefill chunks of the oldest prefills, at most ``prefill_chunk`` bytes in all (at least one chunk);
        the rows whose prefill is done join the batch."""
        chunk, spent = self.prefill_chunk, 0
        for job, _, pending in self._prefilling:
            while not job.done and not pending.done:
                n = min(chunk, pending.remaining) if chunk else pending.remaining
                if chunk and spent and spent + n > chunk:
                    break
                try:
                    self.engine.prefill(pending, n)
                except Exception as e:  # noqa: BLE001 - its row is its own: only its job fails
                    self._fail(job, _internal(e), events)
                spent += n
            if chunk and spent >= chunk:
                break
        self.prefill_calls.append(spent)
        ready = [(job, i, p) for job, i, p in self._prefilling if p.done and not job.done]
        self._prefilling = [t for t in self._prefilling if not t[2].done and not t[0].done]
        self._join(ready, events)

    def _prefill_elsewhere(self, events: dict[Job, list[Event]]) -> None:
        """Hand the new prefills to the prefill thread; the rows of those it finished join the batch."""
        assert self._prefiller is not None
        reported: dict[int, BaseException | None] = {}
        scored: list[tuple[Job, list[int]]] = []
        while self._prefiller.finished:
            task, error = self._prefiller.finished.popleft()
            if isinstance(task, _Scoring):
                if task in self._scoring:  # (not if its job was cancelled meanwhile)
                    self._scoring.remove(task)
                    if error is not None:
                        self._fail(task.job, _internal(error), events)
                    elif not task.job.done:
                        task.job.prompt_logprobs.update(task.entries or {})
                        scored.append((task.job, task.indices))
                continue
            self._handed.discard(id(task))
            reported[id(task)] = error
        self._start(scored, events)
        for job, _, pending in self._prefilling:
            if id(pending) not in self._handed:  # the choices of one prompt share one prefill
                self._handed.add(id(pending))
                self._prefiller.submit(job, pending)
        if not reported:
            return
        ready = []
        for t in self._prefilling:
            job, _, pending = t
            if id(pending) not in reported or job.done:
                continue
            error = reported[id(pending)]
            if error is not None:
                self._fail(job, _internal(error), events)
            else:
                ready.append(t)
        self._prefilling = [t for t in self._prefilling if id(t[2]) not in reported and not t[0].done]
        self._join(ready, events)

    def _join(self, ready: list[tuple[Job, int, Prefill]], events: dict[Job, list[Event]]) -> None:
        """The rows of finished prefills join the batch (``engine.admit``; one by one if that fails)."""
        if not ready:
            return
        groups = [ready]
        try:
            logits = self.engine.admit([p for _, _, p in ready])
        except Exception:  # noqa: BLE001 - retry prefill by prefill, so that one bad request fails alone
            by_prefill: dict[int, list[tuple[Job, int, Prefill]]] = {}
            for t in ready:
                by_prefill.setdefault(id(t[2]), []).append(t)
            groups, logits = list(by_prefill.values()), None
        for group in groups:
            if logits is None:
                try:
                    group_logits = self.engine.admit([p for _, _, p in group])
                except Exception as e:  # noqa: BLE001
                    self._fail(group[0][0], _internal(e), events)
                    continue
            else:
                group_logits = logits
            self._rows.extend(self._new_row(job, i) for job, i, _ in group)
            self._logits = group_logits if self._logits is None or not len(self._logits) else torch.cat(
                [self._logits, group_logits])

    def _new_row(self, job: Job, index: int) -> Row:
        g = job.request.generation
        gen = None
        if g.temperature > 0:  # as torchblt.generate's row_generators: choice i draws from seed + i
            gen = torch.Generator(device=self.device)
            gen.manual_seed(g.seed + index if g.seed is not None else secrets.randbits(63))
        stop = StopCondition(g.max_new_bytes, g.stop, g.stop_at_eos)
        return Row(job, index, gen, stop, TextStream(stop) if job.request.stream else None, last_time=job.arrival)

    def _sample(self, events: dict[Job, list[Event]]) -> tuple[torch.Tensor, list[int]]:
        """Next id of every row (rows of jobs that fail here are marked finished); the rows that finished."""
        logits = self._logits
        assert logits is not None and logits.shape[0] == len(self._rows)
        next_ids = torch.zeros(len(self._rows), dtype=torch.int64, device=logits.device)
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, row in enumerate(self._rows):
            groups.setdefault(row.params if row.params[0] > 0 else (0.0, 0, 1.0), []).append(i)
        bad: set[int] = set()
        for (temperature, top_k, top_p), idx in groups.items():
            try:
                next_ids[idx] = sample(logits[idx], temperature, top_k, top_p, [self._rows[i].generator for i in idx])
            except Exception:  # noqa: BLE001 - find the row(s) that fail and fail their jobs alone
                for i in idx:
                    try:
                        next_ids[i] = sample(logits[i : i + 1], temperature, top_k, top_p, [self._rows[i].generator])[0]
                    except Exception as e:  # noqa: BLE001
                        self._fail(self._rows[i].job, _internal(e), events)
                        bad.add(i)
        want_lp = [i for i, r in enumerate(self._rows) if r.job.request.logprobs is not None and i not in bad]
        lp_rows = dict(zip(want_lp, _logprobs(logits[want_lp], [self._rows[i] for i in want_lp]))) if want_lp else {}
        now = time.perf_counter()
        ids_list = next_ids.tolist()
        finished = sorted(bad)
        n_new = 0
        for i, row in enumerate(self._rows):
            if i in bad or row.job.done:
                if i not in bad:
                    finished.append(i)
                continue
            n_new += 1
            if self._emit(row, ids_list[i], lp_rows.get(i), now, events):
                finished.append(i)
        self.metrics.generated_bytes.inc(n_new)
        return next_ids, sorted(set(finished))

    def _emit(self, row: Row, t: int, lp: tuple[torch.Tensor, list[tuple[int, float]]] | None, now: float,
              events: dict[Job, list[Event]]) -> bool:
        """Append byte ``t`` to ``row`` (its log-probabilities ``lp``, see :func:`_logprobs`): metrics, text
        released, stop condition. True when the row is finished."""
        if lp is not None:
            logp_row, top = lp
            row.pending_logprobs.append(TokenLogprob(t, float(logp_row[t]), top))
        row.ids.append(t)
        (self.metrics.ttfb if len(row.ids) == 1 else self.metrics.inter_byte).observe(now - row.last_time)
        row.last_time = now
        reason = row.stop.reason(row.ids)
        if row.stream is not None and reason != "eos":
            text = row.stream.push(t)
            if text:
                events.setdefault(row.job, []).append(Delta(row.index, text, self._take_logprobs(row)))
        if reason is not None:
            self._finish(row, reason, events)
            return True
        return False

    def _take_logprobs(self, row: Row) -> list[TokenLogprob] | None:
        if row.job.request.logprobs is None:
            return None
        out, row.pending_logprobs = row.pending_logprobs, []
        return out

    def _finish(self, row: Row, reason: str, events: dict[Job, list[Event]]) -> None:
        text = row.stream.finish() if row.stream is not None else row.stop.text(row.ids)
        finish_reason = "length" if reason == "length" else "stop"
        events.setdefault(row.job, []).append(
            Finished(row.index, text, finish_reason, len(row.ids), self._take_logprobs(row)))

    def _finish_empty(self, job: Job, index: int, events: dict[Job, list[Event]]) -> None:
        lp = [] if job.request.logprobs is not None else None
        events.setdefault(job, []).append(Finished(index, "", "length", 0, lp))

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self.engine.leave(sorted(gone))
        self._rows = [self._rows[i] for i in keep]
        if self._logits is not None:
            self._logits = self._logits[keep] if keep else None

    def _fail(self, job: Job, error: APIError, events: dict[Job, list[Event]]) -> None:
        if job.failed:
            return
        job.failed = True
        events.setdefault(job, []).append(Failed(error))

    def _deliver(self, events: dict[Job, list[Event]]) -> None:
        for job, evs in events.items():
            try:
                job.sink(evs)
            except Exception:  # noqa: BLE001 - the loop is gone (shutdown): nobody to tell
                job.cancel()


def prompt_logprobs(engine: DecodeEngine, req: CompletionRequest, prompts: list[int]) -> dict[int, list[TokenLogprob]]:
    """The ``echo`` + ``logprobs`` entries of prompts ``prompts`` of ``req`` (``engine.score``): one per shown
    id, the BOS (predicted by nothing) without a log-probability."""
    out: dict[int, list[TokenLogprob]] = {}
    if not prompts:
        return out
    scores = engine.score([req.prompts[p].ids for p in prompts], req.logprobs or 0)
    for p, sc in zip(prompts, scores, strict=True):
        prompt = req.prompts[p]
        entries = []
        lps, tops, top_lps = sc.logprobs.tolist(), sc.top_ids.tolist(), sc.top_logprobs.tolist()
        # ids[0] is the BOS (predicted by nothing); shown ids are the last `prompt.shown`
        for pos in range(len(prompt.ids) - prompt.shown, len(prompt.ids)):
            if pos == 0:
                entries.append(TokenLogprob(prompt.ids[0], None, None))
            else:
                entries.append(TokenLogprob(prompt.ids[pos], lps[pos - 1], list(zip(tops[pos - 1], top_lps[pos - 1]))))
        out[p] = entries
    return out


def _logprobs(logits: torch.Tensor, rows: list[Row]) -> list[tuple[torch.Tensor, list[tuple[int, float]]]]:
    """Per row: the log-probabilities of ``logits (R, V)`` and the row's ``logprobs`` most likely ``(id, logp)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for j, row in enumerate(rows):
        k = row.job.request.logprobs or 0
        values, ids = logp[j].topk(k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        out.append((logp[j], list(zip(ids.tolist(), values.tolist()))))
    return out


class _PhaseClock:
    """Adds the time since the last lap to ``blt_scheduler_seconds_total{phase}``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.t = metrics, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.metrics.scheduler_seconds.labels(phase).inc(now - self.t)
        self.t = now


def _internal(e: BaseException) -> APIError:
    log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
    return APIError(500, f"the request failed while decoding: {type(e).__name__}: {e}", type="server_error",
                    code="internal_error")
