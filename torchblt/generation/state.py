"""The decoding state of a batch of rows: one dataclass tree, with ``select`` / ``extend`` / ``put`` / ``truncate``.

Shape legend: B rows, n new bytes of one call, w patches an encoder slot may read (``window_encoder`` or
1), tw bytes of context kept for the hash n-grams and the patching rule, H snapshots kept for roll-back.

:class:`DecodeState` holds everything incremental decoding needs after a prefix of bytes ``x[0..T-1]``:

* :class:`Cursor` — per-row scalars: ``T``, the last bytes, the last two entropies, the patching rule's
  state (does ``T`` start a patch, the last rule start), documents (the local stacks', the entropy
  model's, the global model's), closed-patch count, the open patch's starts and whether it holds an EOS;
* one :class:`~.cache.StackKV` per transformer stack (entropy model, local encoder, global model, local
  decoder);
* ``patch_bytes`` — the encoder's states of the bytes that patches still to close will pool and
  cross-attend to (the open patch, and the ``w - 1`` before it), their cross-attention keys/values
  projected once per byte; ``patch_slots`` — the decoder's cross-attention keys/values of the last
  closed patches (projected once per patch), or without cross-attention their projected global outputs;
* ``history`` — with ``lookahead > 0``, the cursor after each of the last ``lookahead + 1`` bytes.

Rows are independent everywhere (their own positions, documents, patches and cache entries), so:

* :meth:`DecodeState.select` keeps some rows (finished rows leave a batch);
* :meth:`DecodeState.extend` appends another state's rows (a new request joins a running batch; it
  then decodes exactly as it would alone: same bytes, logits equal to float rounding);
* :meth:`DecodeState.truncate` rolls rows back ``n <= lookahead`` bytes: the cursor comes back from the
  history and every cache forgets the entries at or after the new ``T`` (the rings have ``lookahead``
  entries to spare, so nothing the earlier position needs was overwritten). Stepping the same bytes
  again gives what stepping them the first time gave (speculative decoding: step ``k`` drafted bytes
  at once, keep the accepted ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchblt.generation.cache import Ring, StackKV


@dataclass
class Cursor:
    """Per-row decoding scalars after ``pos`` bytes (all ``(B,)`` unless noted; fields may carry one more
    dimension ``(B, n, ...)`` for the cursor after each byte of a multi-byte call)."""

    pos: torch.Tensor  # T: bytes so far = the next byte's position
    tail: torch.Tensor  # (B, tw) bytes T-tw .. T-1 (0 = BOE before the text)
    entropies: torch.Tensor  # (B, 2) E[T-2], E[T-1] (float32)
    next_start: torch.Tensor  # does position T start a patch
    last_raw: torch.Tensor  # the last position <= T where the patching rule itself started a patch
    doc: torch.Tensor  # document of position T (EOS bytes before it), local encoder and decoder
    doc_start: torch.Tensor  # first position of that document
    entropy_doc: torch.Tensor  # the same for the entropy model's EOS
    n_closed: torch.Tensor  # closed patches = the open patch's index
    global_doc: torch.Tensor  # the open patch's global document
    global_doc_start: torch.Tensor  # first patch of that document
    open_eos: torch.Tensor  # does the open patch hold an EOS
    patch_starts: torch.Tensor  # (B, w) starts of the last w patches, the open one last

    @classmethod
    def empty(cls, batch: int, tail_width: int, w: int, device: torch.device) -> Cursor:
        """Before the first byte: position 0 starts patch 0 (the BOS), nothing closed."""
        z = torch.zeros(batch, dtype=torch.int64, device=device)
        return cls(
            pos=z, tail=torch.zeros(batch, tail_width, dtype=torch.int64, device=device),
            entropies=torch.zeros(batch, 2, dtype=torch.float32, device=device),
            next_start=torch.ones(batch, dtype=torch.bool, device=device), last_raw=z, doc=z, doc_start=z,
            entropy_doc=z, n_closed=z, global_doc=z, global_doc_start=z,
            open_eos=torch.zeros(batch, dtype=torch.bool, device=device),
            patch_starts=torch.zeros(batch, w, dtype=torch.int64, device=device),
        )

    def map(self, fn) -> Cursor:  # noqa: ANN001 - a tensor -> tensor function
        return Cursor(**{name: fn(getattr(self, name)) for name in CURSOR_FIELDS})

    @staticmethod
    def zip(fn, *cursors: Cursor) -> Cursor:  # noqa: ANN001
        return Cursor(**{name: fn(*(getattr(c, name) for c in cursors)) for name in CURSOR_FIELDS})

    def at(self, i: int | torch.Tensor) -> Cursor:
        """The cursor after byte ``i`` of a per-byte cursor ``(B, n, ...)`` (``i``: an index, or ``(B,)``)."""
        if isinstance(i, int):
            return self.map(lambda t: t[:, i])
        rows = torch.arange(i.shape[0], device=i.device)
        return self.map(lambda t: t[rows, i])

    def advance(self, tokens: torch.Tensor, ent: torch.Tensor | None, starts: torch.Tensor, last_raw: torch.Tensor,
                eos_id: int, entropy_eos_id: int) -> Cursor:
        """The cursor after each of ``tokens (B, n)`` (positions ``pos .. pos+n-1``): fields ``(B, n, ...)``.

        ``ent (B, n)``: their entropies (or None); ``starts (B, n)``: does position ``pos+i+1`` start a patch;
        ``last_raw (B, n)``: the last rule start up to ``pos+i+1`` (:func:`.boundaries.decide_starts`).
        A patch closes at byte ``i`` when ``starts[:, i]``: then the next patch's index, document and starts
        move on. Cumulative sums and maxima only, so one byte and many bytes are the same code."""
        B, n = tokens.shape
        dev = tokens.device
        i = torch.arange(n, device=dev)[None]
        pos = self.pos[:, None] + i  # (B, n) position of each byte
        after = pos + 1
        tw = self.tail.shape[1]
        window = torch.cat([self.tail, tokens], 1)  # (B, tw + n)
        tail = window.unfold(1, tw, 1)[:, 1:]  # (B, n, tw): the last tw bytes after each byte
        e = torch.cat([self.entropies, ent.float() if ent is not None else self.entropies.new_zeros(B, n)], 1)
        entropies = e.unfold(1, 2, 1)[:, 1:]  # (B, n, 2)

        is_eos, is_eeos = tokens == eos_id, tokens == entropy_eos_id
        doc = self.doc[:, None] + is_eos.cumsum(1)
        doc_start = torch.maximum(self.doc_start[:, None],
                                  torch.cummax(torch.where(is_eos, after, -1), 1).values)
        entropy_doc = self.entropy_doc[:, None] + is_eeos.cumsum(1)
        n_closed = self.n_closed[:, None] + starts.cumsum(1)

        # the patch each byte is in starts at the last start <= its position
        prev_start = torch.cat([self.next_start[:, None], starts[:, :-1]], 1)  # does byte i start a patch
        open_start = torch.maximum(self.patch_starts[:, -1:], torch.cummax(torch.where(prev_start, pos, -1), 1).values)
        carried_eos = torch.where(self.open_eos, self.patch_starts[:, -1], -1)[:, None]
        last_eos = torch.maximum(carried_eos, torch.cummax(torch.where(is_eos, pos, -1), 1).values)
        patch_eos = last_eos >= open_start  # the patch holding byte i has an EOS up to it
        closes_doc = starts & patch_eos  # a patch ends its global document
        global_doc = self.global_doc[:, None] + closes_doc.cumsum(1)
        global_doc_start = torch.maximum(self.global_doc_start[:, None],
                                         torch.cummax(torch.where(closes_doc, n_closed, -1), 1).values)
        open_eos = patch_eos & ~starts

        # the last w patch starts: the carried ones, then this call's, in order
        w = self.patch_starts.shape[1]
        count = starts.cumsum(1)  # (B, n) starts up to each byte
        listed = torch.cat([self.patch_starts, torch.full_like(tokens, -1)], 1)  # (B, w + n)
        index = torch.where(starts, w - 1 + count, w + n)  # the new starts' places (w + n: dropped)
        listed = torch.cat([listed, listed[:, :1]], 1).scatter(1, index, after)[:, : w + n]
        last = (w - 1 + count)[:, :, None] + torch.arange(1 - w, 1, device=dev)  # (B, n, w)
        patch_starts = torch.gather(listed, 1, last.reshape(B, -1)).reshape(B, n, w)
        return Cursor(pos=after, tail=tail, entropies=entropies, next_start=starts, last_raw=last_raw, doc=doc,
                      doc_start=doc_start, entropy_doc=entropy_doc, n_closed=n_closed, global_doc=global_doc,
                      global_doc_start=global_doc_start, open_eos=open_eos, patch_starts=patch_starts)


CURSOR_FIELDS = tuple(f.name for f in dataclasses.fields(Cursor))


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides, copied if it has others, size-1 dimensions included (a compiled graph
    guards on exact strides, and ``contiguous()`` keeps a ``(1, 8)`` view's stride ``(9, 1)``)."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


@dataclass
class DecodeState:
    """Everything incremental decoding keeps for a batch of rows (see the module docstring).

    Made by :meth:`torchblt.generation.IncrementalEngine.prefill`; advanced by
    :meth:`~torchblt.generation.IncrementalEngine.step`."""

    cursor: Cursor
    encoder: StackKV
    global_: StackKV
    decoder: StackKV
    entropy: StackKV | None
    patch_bytes: Ring  # encoder byte states for patches still to close: pos = byte, tag = its patch
    patch_slots: Ring  # decoder: per closed patch, cross-attention keys/values or projected global output
    lookahead: int = 0
    history: Cursor | None = None  # (B, lookahead + 1, ...) cursor after byte p at p % (lookahead + 1)
    spans: torch.Tensor | None = None  # what the growing rings need (IncrementalEngine._spans); None: recompute

    @property
    def batch(self) -> int:
        return int(self.cursor.pos.shape[0])

    def rings(self) -> list[Ring]:
        return [r for r in (self.entropy, self.encoder, self.global_, self.decoder, self.patch_bytes,
                            self.patch_slots) if r is not None]

    # ------------------------------------------------------------------ rows
    @torch.inference_mode()
    def select(self, rows: list[int] | torch.Tensor) -> DecodeState:
        """Keep ``rows`` (in that order; a row may repeat). In place; returns ``self``."""
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.cursor.pos.device)
        self.cursor = self.cursor.map(lambda t: t[idx])
        if self.history is not None:
            self.history = self.history.map(lambda t: t[idx])
        for ring in self.rings():
            ring.select(idx.to(ring.pos.device))
        return self

    @torch.inference_mode()
    def extend(self, *others: DecodeState) -> DecodeState:
        """Append the rows of ``others`` after this state's, in order (states of the same engine). In place;
        returns ``self``. All of them in one concatenation per tensor (each row copied once).

        Rows never read each other, so a row that joins a running batch decodes exactly as it does alone."""
        if not others:
            return self
        for other in others:
            self._check_same_engine(other, "extend")

        def cat(*ts: torch.Tensor) -> torch.Tensor:
            return torch.cat(ts)

        self.cursor = Cursor.zip(cat, self.cursor, *(o.cursor for o in others))
        if self.history is not None:  # same lookahead (checked): every state has one
            self.history = Cursor.zip(cat, self.history, *(o.history for o in others))  # type: ignore[misc]
        for mine, *theirs in zip(self.rings(), *(o.rings() for o in others), strict=True):
            mine.extend(*theirs)
        self.spans = None
        return self

    def _check_same_engine(self, other: DecodeState, op: str) -> None:
        if other.lookahead != self.lookahead or (other.entropy is None) != (self.entropy is None):
            raise ValueError(f"{op} needs a state of the same engine (same model and lookahead)")

    @torch.inference_mode()
    def put(self, rows: list[int] | torch.Tensor, other: DecodeState) -> DecodeState:
        """Overwrite this state's ``rows`` with ``other``'s rows, in order (states of the same engine), in
        place; returns ``self``. A server's free row (a request that finished) takes a joining request
        without copying the running rows' caches, as ``extend`` + ``select`` would."""
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.cursor.pos.device)
        if index.numel() != other.batch:
            raise ValueError(f"put of {other.batch} rows into {index.numel()} rows")
        self._check_same_engine(other, "put")

        def put(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:  # the cursor is small: new tensors
            return mine.index_copy(0, index, theirs.to(mine.dtype))

        self.cursor = Cursor.zip(put, self.cursor, other.cursor)
        if self.history is not None and other.history is not None:
            self.history = Cursor.zip(put, self.history, other.history)
        for mine, theirs in zip(self.rings(), other.rings(), strict=True):
            mine.put(index, theirs)
        self.spans = None
        return self

    @staticmethod
    def cat(states: list[DecodeState]) -> DecodeState:
        """One state with every row of ``states``, in order (the first is extended in place, by all the others
        at once: each row's caches are copied once, not once per state that follows it)."""
        return states[0].extend(*states[1:])

    @torch.inference_mode()
    def take(self, rows: list[int] | torch.Tensor) -> DecodeState:
        """A new state holding copies of ``rows`` only (this one unchanged): ``copy().select(rows)``
        without cloning the other rows' caches first."""
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.cursor.pos.device)
        return self._rebuilt(lambda t: t[idx], lambda r: r.take(idx.to(r.pos.device)), None)

    @torch.inference_mode()
    def copy(self) -> DecodeState:
        """An independent copy (the caches are cloned)."""
        return self._rebuilt(torch.clone, lambda r: r.copy(), None if self.spans is None else self.spans.clone())

    def _rebuilt(self, tensor: Callable[[torch.Tensor], torch.Tensor], ring: Callable[[Ring], Ring],
                 spans: torch.Tensor | None) -> DecodeState:
        """A new state of the same engine: ``tensor`` applied to every cursor (and history) field, ``ring``
        to every ring."""
        def each(r: Any) -> Any:
            return None if r is None else ring(r)

        return DecodeState(
            cursor=self.cursor.map(tensor), encoder=each(self.encoder), global_=each(self.global_),
            decoder=each(self.decoder), entropy=each(self.entropy), patch_bytes=each(self.patch_bytes),
            patch_slots=each(self.patch_slots), lookahead=self.lookahead,
            history=None if self.history is None else self.history.map(tensor), spans=spans,
        )

    # ------------------------------------------------------------------ roll-back
    def record(self, after: Cursor) -> None:
        """Make ``after`` (the cursor after each byte of a call, ``(B, n, ...)``) current and keep the
        last ``lookahead + 1`` of them for :meth:`truncate`."""
        self.cursor = after.at(-1)
        if torch.compiler.is_compiling():  # row-major outputs: what the next compiled call's guards expect
            self.cursor = self.cursor.map(row_major)
        if self.history is None:
            return
        H = self.history.pos.shape[1]
        n = after.pos.shape[1]
        keep = min(n, H)
        slots = (after.pos[:, n - keep :] - 1) % H  # the cursor after byte p lives at p % H
        rows = torch.arange(self.batch, device=slots.device)[:, None]

        def put(hist: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            hist[rows, slots] = new[:, n - keep :].to(hist.dtype)
            return hist

        self.history = Cursor.zip(put, self.history, after)

    @torch.inference_mode()
    def truncate(self, n: int | torch.Tensor) -> DecodeState:
        """Roll every row back ``n`` bytes (an int, or ``(B,)`` per row; at most :attr:`lookahead`): as if
        the last ``n`` bytes had never been stepped. In place; returns ``self``."""
        if self.history is None:
            raise ValueError("truncate needs a state made with lookahead >= 1 (IncrementalEngine(lookahead=...))")
        cur = self.cursor
        n_t = torch.as_tensor(n, dtype=torch.int64, device=cur.pos.device).expand(self.batch)
        if bool((n_t < 0).any()) or bool((n_t > self.lookahead).any()):
            raise ValueError(f"truncate: n must be in [0, lookahead={self.lookahead}], got {n_t.tolist()}")
        target = cur.pos - n_t
        if bool((target < 1).any()):
            raise ValueError("truncate: cannot roll back past the first byte")
        H = self.history.pos.shape[1]
        back = self.history.at((target - 1) % H)
        moved = n_t > 0
        if bool((moved & (back.pos != target)).any()):
            raise ValueError(f"truncate: position {target.tolist()} is more than lookahead={self.lookahead} bytes "
                             "back from the furthest position stepped")
        self.cursor = Cursor.zip(lambda now, old: torch.where(moved.view(-1, *[1] * (now.dim() - 1)), old, now),
                                 cur, back)
        c = self.cursor
        for ring in (self.entropy, self.encoder, self.decoder, self.patch_bytes):
            if ring is not None:
                ring.truncate(c.pos.to(ring.pos.device))
        self.global_.truncate(c.n_closed)
        self.patch_slots.truncate(c.n_closed)
        self.spans = None
        return self

    # ------------------------------------------------------------------ memory
    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by each cache."""
        out = {"local_encoder": self.encoder.nbytes(), "global": self.global_.nbytes(),
               "local_decoder": self.decoder.nbytes(), "encoder_patch_bytes": self.patch_bytes.nbytes(),
               "decoder_patch_slots": self.patch_slots.nbytes()}
        if self.entropy is not None:
            out["entropy_model"] = self.entropy.nbytes()
        return out
