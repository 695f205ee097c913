"""Static-shape caches for incremental BLT decoding: per-row ring buffers over positions.

Shape legend: B rows, C capacity (entries), n new entries of one call, Hkv key/value heads, Dh head width.

:class:`Ring` is the one storage rule: the entry of position ``p`` (a byte position, or a patch index)
lives in slot ``p % C`` of its row, next to its position (``pos``, -1 = empty) and a tag (``tag``: its
document, or its patch). Slot ``C`` is a *discard* slot that is never visible (its ``pos`` stays -1):
entries that must not be stored (rows that close no patch this step, padding) are written there, so
every write is one ``index_copy_`` of fixed shape, whichever rows take part. Tensors never change shape
from one decoding step to the next, so a compiled step compiles once; a ring only grows (``grow``,
re-laying every entry out at ``p % C'``) when its caller reserves more than its capacity.

Attention reads only the leading ``view`` slots that can hold an entry yet (until the positions wrap
around): the caller knows the largest position stored. Keys and values are stored head-major
``(B, Hkv, C + 1, Dh)`` and handed to attention as ``(B, C + 1, Hkv, Dh)`` views, so the attention
kernel reads them in place.

Why a ring is exact: a call over new positions ``p0 .. p0+n-1`` needs the entries a query can see —
within the sliding window (``p0 - window + 1`` onward) and within the query's document. Writing the new
entries first overwrites positions ``C`` back, which no query sees as long as ``C >= span + n - 1``
(``span``: the window, or for stacks without one the live document's length, which the caller
:meth:`Ring.reserve`\\ s). A call with more new entries than that (a long prefill chunk) attends over the
old entries and the new ones side by side, then stores the last ``C`` (:meth:`StackKV.prepare`,
``write_first=False``). Rolling back (:meth:`Ring.truncate`) forgets entries from a position on; the
entries they replaced are still there when ``C`` has ``n`` positions to spare (the state's
``lookahead``).

* :class:`StackKV` — the keys/values of every layer of one transformer stack (entropy model, local
  encoder/decoder: byte positions; global model: patch indices), with the step's self-attention mask
  built from the stored positions and documents (:func:`torchblt.model.masks.self_attention_mask_dense`).
* plain :class:`Ring`\\ s hold the encoder's recent byte states (for the patches still to close) and the
  decoder's per-patch cross-attention keys/values (see :mod:`.state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from torchblt.model.masks import SelfAttentionMask, band_pays, banded_mask_after, self_attention_mask_dense


def last_kept(keep: torch.Tensor | None, positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """``keep (B, n)`` limited to each row's last ``capacity`` kept entries (the earlier ones would be
    overwritten by later ones in the same write)."""
    kept = torch.ones_like(positions, dtype=torch.bool) if keep is None else keep
    return kept & (kept.flip(1).to(torch.int64).cumsum(1).flip(1) <= capacity)


def _row_index(slots: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The row index ``(R, 1)`` of a write at ``slots (R, n)``: ``rows``, or every row in order."""
    if rows is None:
        return torch.arange(slots.shape[0], device=slots.device)[:, None]
    return rows.to(slots.device)[:, None]


class Ring:
    """Per-row ring storage: ``tensors[i] (B, C + 1, ...)``, ``pos (B, C + 1)``, ``tag (B, C + 1)``."""

    def __init__(self, tensors: list[torch.Tensor], pos: torch.Tensor, tag: torch.Tensor) -> None:
        self.tensors, self.pos, self.tag = tensors, pos, tag

    @classmethod
    def empty(cls, batch: int, capacity: int, shapes: list[tuple[int, ...]], dtype: torch.dtype,
              device: torch.device, **kwargs) -> Ring:  # noqa: ANN003 - the subclass's fields
        """``capacity`` entries (+ the discard slot) of the given per-entry ``shapes``, zeroed."""
        ring = cls([], torch.full((batch, capacity + 1), -1, dtype=torch.int64, device=device),
                   torch.zeros(batch, capacity + 1, dtype=torch.int64, device=device), **kwargs)
        ring.tensors = [ring.layout(torch.zeros(batch, capacity + 1, *s, dtype=dtype, device=device)) for s in shapes]
        return ring

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        """The memory layout of a stored tensor ``(B, C + 1, ...)`` (entries contiguous here)."""
        return self._unpacked(self._packed(t).contiguous())

    @staticmethod
    def _packed(t: torch.Tensor) -> torch.Tensor:
        """The view of a stored tensor in which its memory is contiguous (rows first); its own inverse."""
        return t

    _unpacked = _packed

    def _rows(self, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``t[rows]`` in the stored layout (one copy)."""
        return self._unpacked(self._packed(t)[rows])

    def _cat(self, ts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``torch.cat(ts)`` (rows) in the stored layout (one copy)."""
        return self._unpacked(torch.cat([self._packed(t) for t in ts]))

    @property
    def capacity(self) -> int:
        return self.pos.shape[1] - 1

    def slots(self, positions: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Where entries at ``positions (B, n)`` go: slot ``p % C``, or the discard slot where ``keep`` is False."""
        slots = positions % self.capacity
        return slots if keep is None else torch.where(keep, slots, self.capacity)

    def store(self, slots: torch.Tensor, values: list[torch.Tensor], first: int = 0,
              rows: torch.Tensor | None = None, row_index: torch.Tensor | None = None) -> None:
        """``values[j] (B, n, ...)`` into ``tensors[first + j]`` at ``slots (B, n)`` (:meth:`slots`); with
        ``rows (R,)``: ``values[j] (R, n, ...)`` into those rows. ``row_index``: :func:`_row_index` of
        ``slots, rows``, when the caller has it (a stack's layers all store at the same slots)."""
        index = (_row_index(slots, rows) if row_index is None else row_index, slots)
        for store, value in zip(self.tensors[first : first + len(values)], values, strict=True):
            store.index_put_(index, value if value.dtype == store.dtype else value.to(store.dtype))

    def store_meta(self, slots: torch.Tensor, positions: torch.Tensor, tag: torch.Tensor,
                   keep: torch.Tensor | None, rows: torch.Tensor | None = None,
                   row_index: torch.Tensor | None = None) -> None:
        """Positions and tags of entries stored at ``slots`` (see :meth:`store`). The discard slot stays
        empty: only entries that ``keep`` drops go there (:meth:`slots`), and they store position -1."""
        index = (_row_index(slots, rows) if row_index is None else row_index, slots)
        self.pos.index_put_(index, positions if keep is None else torch.where(keep, positions, -1))
        self.tag.index_put_(index, tag if tag.dtype == self.tag.dtype else tag.to(self.tag.dtype))

    def write(self, positions: torch.Tensor, values: list[torch.Tensor], tag: torch.Tensor,
              keep: torch.Tensor | None = None) -> None:
        """Store ``values[i] (B, n, ...)`` at ``positions (B, n)`` with ``tag (B, n)`` (``keep (B, n)``: only
        where True). Kept entries of a row must be at most ``C``, at distinct positions modulo ``C``."""
        slots = self.slots(positions, keep)
        self.store(slots, values)
        self.store_meta(slots, positions, tag, keep)

    def write_last(self, positions: torch.Tensor, values: list[torch.Tensor], tag: torch.Tensor,
                   keep: torch.Tensor | None = None) -> None:
        """:meth:`write` of each row's last ``C`` kept entries only (the earlier ones would be overwritten)."""
        self.write(positions, values, tag, last_kept(keep, positions, self.capacity))

    def reserve(self, span: int, keep_from: torch.Tensor | None = None) -> bool:
        """Make room for ``span`` consecutive positions per row (grow to the next power of two if needed);
        ``keep_from (B,)``: entries before it are dead (an earlier document) and dropped. True if it grew."""
        if span <= self.capacity:
            return False
        self.grow(1 << (span - 1).bit_length(), keep_from)
        return True

    def grow(self, capacity: int, keep_from: torch.Tensor | None = None) -> None:
        """Re-lay every live entry out at ``p % capacity`` (entries before ``keep_from (B,)`` are dropped)."""
        assert capacity >= self.capacity
        live = self.pos >= 0
        if keep_from is not None:
            live &= self.pos >= keep_from[:, None]
        old, old_pos, old_tag = self.tensors, self.pos, self.tag
        B = old_pos.shape[0]
        self.pos = torch.full((B, capacity + 1), -1, dtype=torch.int64, device=old_pos.device)
        self.tag = torch.zeros_like(self.pos)
        self.tensors = [self.layout(t.new_zeros(B, capacity + 1, *t.shape[2:])) for t in old]
        self.write(torch.where(live, old_pos, 0), old, old_tag, live)

    def truncate(self, first_dropped: torch.Tensor) -> None:
        """Forget every entry at or after position ``first_dropped (B,)`` (a roll-back)."""
        self.pos.masked_fill_(self.pos >= first_dropped[:, None], -1)

    def select(self, rows: torch.Tensor) -> None:
        self.tensors = [self._rows(t, rows) for t in self.tensors]
        self.pos, self.tag = self.pos[rows], self.tag[rows]

    def _shell(self) -> Ring:
        """A new ring object sharing this one's tensors (for a caller that replaces them)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

    def _at_capacity(self, capacity: int) -> Ring:
        """This ring, or (when smaller) a regrown ring of its rows at ``capacity`` (``grow`` writes into new
        tensors: this one stays as it is)."""
        if self.capacity == capacity:
            return self
        out = self._shell()
        out.grow(capacity)
        return out

    def _match_capacity(self, other: Ring) -> Ring:
        """Grow this ring to ``other``'s capacity if smaller; returns ``other`` at this ring's capacity."""
        if other.capacity > self.capacity:
            self.grow(other.capacity)
        return other._at_capacity(self.capacity)

    def extend(self, *others: Ring) -> None:
        """Append the rows of ``others``, in order (smaller rings grow to the largest capacity first). One
        concatenation for all of them: every row is copied once, however many rings join."""
        if not others:
            return
        capacity = max(r.capacity for r in (self, *others))
        if self.capacity < capacity:
            self.grow(capacity)
        parts = [self, *(r._at_capacity(capacity) for r in others)]
        self.tensors = [self._cat(ts) for ts in zip(*(r.tensors for r in parts), strict=True)]
        self.pos, self.tag = torch.cat([r.pos for r in parts]), torch.cat([r.tag for r in parts])

    def take(self, rows: torch.Tensor) -> Ring:
        """A new ring holding copies of ``rows`` (this one unchanged; :meth:`put` writes them back)."""
        out = self._shell()
        out.tensors = [self._rows(t, rows) for t in self.tensors]
        out.pos, out.tag = self.pos[rows], self.tag[rows]
        return out

    def put(self, rows: torch.Tensor, other: Ring) -> None:
        """Overwrite ``rows`` with ``other``'s rows, in place (the smaller ring grows to the larger capacity
        first): a row joins a batch in a free row without copying the others (``extend`` copies them all)."""
        other = self._match_capacity(other)
        rows = rows.to(self.pos.device)
        for mine, theirs in zip(self.tensors, other.tensors, strict=True):
            mine[rows] = theirs.to(mine.dtype)
        self.pos[rows], self.tag[rows] = other.pos, other.tag

    def put_entries(self, rows: torch.Tensor, other: Ring, positions: torch.Tensor, keep: torch.Tensor) -> None:
        """Copy the entries at ``positions (R, m)`` (where ``keep``) of ``other`` (a :meth:`take` of ``rows``
        of this ring, of the same capacity) back into ``rows``: what a call on the taken rows wrote."""
        slots = other.slots(positions, keep)
        rows = rows.to(self.pos.device)[:, None].expand_as(slots)
        mine_rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)
        for mine, theirs in zip(self.tensors, other.tensors, strict=True):
            mine[rows, slots] = theirs[mine_rows, slots]
        self.pos[rows, slots], self.tag[rows, slots] = other.pos[mine_rows, slots], other.tag[mine_rows, slots]
        self.pos[:, -1] = -1

    def copy(self) -> Ring:
        out = self._shell()
        out.tensors = [self.layout(t.clone()) for t in self.tensors]
        out.pos, out.tag = self.pos.clone(), self.tag.clone()
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.tensors, self.pos, self.tag])


@dataclass
class _LayerWriter:
    """``KVCacheLike`` of one layer for one call: stores the new keys/values and returns what the
    queries attend over (the ring's first ``view`` slots, or those followed by the new entries)."""

    cache: StackKV
    index: int  # tensors[index], tensors[index + 1]: this layer's keys and values
    slots: torch.Tensor
    view: int
    write_first: bool
    before: torch.Tensor | None = None  # (B, window - 1) slots of the entries before the new ones, in order
    rows: torch.Tensor | None = None  # (R,): a call on these rows of the cache only (the new entries' rows)
    row_index: torch.Tensor | None = None  # _row_index(slots, rows), shared by the stack's layers

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_all, v_all = self.cache.tensors[self.index], self.cache.tensors[self.index + 1]
        if self.rows is not None:  # store first, then copy out the rows' leading slots (head-major: one copy)
            self.cache.store(self.slots, [k, v], self.index, self.rows, self.row_index)
            k_rows, v_rows = (t.transpose(1, 2)[self.rows, :, : self.view].transpose(1, 2) for t in (k_all, v_all))
            return k_rows, v_rows
        if self.before is not None:  # the window before the new entries, in position order (banded)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            k_old, v_old = k_all[rows, self.before], v_all[rows, self.before]
        else:
            k_old, v_old = k_all[:, : self.view], v_all[:, : self.view]
        if not self.write_first:  # read the old entries before the new ones overwrite them
            k_old, v_old = torch.cat([k_old, k.to(k_old.dtype)], 1), torch.cat([v_old, v.to(v_old.dtype)], 1)
        self.cache.store(self.slots, [k, v], self.index, row_index=self.row_index)
        return k_old, v_old


@dataclass
class PreparedStack:
    """A stack's cache for one call (:class:`~torchblt.model.transformer.StackCache`)."""

    positions: torch.Tensor
    mask: SelfAttentionMask
    layers: list[_LayerWriter]


class StackKV(Ring):
    """Keys and values of every layer of one stack: ``tensors = [k_0, v_0, k_1, v_1, ...]``, each
    ``(B, C + 1, Hkv, Dh)`` (head-major underneath); ``tag`` = each key's document."""

    def __init__(self, tensors: list[torch.Tensor], pos: torch.Tensor, tag: torch.Tensor,
                 window: int | None = None, documents: bool = False) -> None:
        super().__init__(tensors, pos, tag)
        self.window, self.documents = window, documents

    @classmethod
    def for_stack(cls, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
                  window: int | None, documents: bool, dtype: torch.dtype, device: torch.device) -> StackKV:
        return cls.empty(batch, capacity, [(n_kv_heads, head_dim)] * (2 * n_layers), dtype, device,  # type: ignore[return-value]
                         window=window, documents=documents)

    @staticmethod
    def _packed(t: torch.Tensor) -> torch.Tensor:  # head-major underneath: (B, Hkv, C + 1, Dh) is contiguous
        return t.transpose(1, 2)

    _unpacked = _packed

    @property
    def n_layers(self) -> int:
        return len(self.tensors) // 2

    def write_first(self, n: int) -> bool:
        """Can a call over ``n`` new positions store them before attending? (see the module docstring;
        a stack without a window :meth:`~Ring.reserve`\\ s its span first)."""
        return self.window is None or self.capacity >= self.window + n - 1

    def prepare(self, positions: torch.Tensor, docs: torch.Tensor, keep: torch.Tensor | None = None,
                view: int | None = None, rows: torch.Tensor | None = None) -> PreparedStack:
        """The cache of a call over new entries at ``positions (B, n)`` in documents ``docs (B, n)``
        (``keep (B, n)``: the entries to store; the others are computed and discarded). Stores their
        metadata and builds the mask ``(B, 1, n, N)`` of the new queries against the ``N`` keys each layer
        returns. ``view``: the leading slots that can hold an entry after this call (default: all).

        A query that sees no key (a discarded entry's) sees every key instead: no row produces a NaN,
        which a masked-out value would still carry into the other rows' weighted sums.

        ``rows (R,)``: a call on those rows only (``positions``, ``docs``, ``keep`` are ``(R, n)``; a batch's
        global step for the rows that close a patch): the other rows are untouched, and of the call's rows
        only the ``view`` slots the call reads are copied out (not the whole ring). Needs room to store
        the new entries first (:meth:`write_first`)."""
        first = self.write_first(positions.shape[1])
        view = self.capacity if view is None else min(view, self.capacity)
        if rows is not None:
            if not first:
                raise ValueError(f"a call on some rows stores its {positions.shape[1]} entries first: "
                                 f"capacity {self.capacity} is too small for window {self.window}")
            slots = self.slots(positions, keep)
            index = _row_index(slots, rows)
            self.store_meta(slots, positions, docs, keep, rows, index)
            kpos, kdoc = self.pos[rows, :view], self.tag[rows, :view]
            layers = [_LayerWriter(self, 2 * i, slots, view, True, rows=rows, row_index=index)
                      for i in range(self.n_layers)]
            return PreparedStack(positions, self._mask(positions, docs, kpos, kdoc), layers)
        if not first and keep is None and self.window is not None and band_pays(positions.shape[1], self.window):
            return self._prepare_banded(positions, docs)
        if not first:
            stored = positions if keep is None else torch.where(keep, positions, -1)
            kpos, kdoc = torch.cat([self.pos[:, :view], stored], 1), torch.cat([self.tag[:, :view], docs], 1)
            keep = last_kept(keep, positions, self.capacity)
        slots = self.slots(positions, keep)
        index = _row_index(slots, None)
        self.store_meta(slots, positions, docs, keep, row_index=index)
        if first:
            kpos, kdoc = self.pos[:, :view], self.tag[:, :view]
        layers = [_LayerWriter(self, 2 * i, slots, view, first, row_index=index) for i in range(self.n_layers)]
        return PreparedStack(positions, self._mask(positions, docs, kpos, kdoc), layers)

    def rows_of(self, rows: torch.Tensor) -> StackRows:
        """These rows of the stack, for a call on them only (their caches stay in place)."""
        return StackRows(self, rows)

    def _mask(self, positions: torch.Tensor, docs: torch.Tensor, kpos: torch.Tensor,
              kdoc: torch.Tensor) -> SelfAttentionMask:
        """The new queries' mask against keys at ``kpos`` (-1: empty) in documents ``kdoc``; a query that
        would see no key sees every key (see :meth:`prepare`)."""
        allowed = self_attention_mask_dense(positions, kpos, docs if self.documents else None,
                                            kdoc if self.documents else None, self.window)
        allowed = allowed & (kpos >= 0)[:, None, None, :]
        return SelfAttentionMask(dense=allowed | ~allowed.any(-1, keepdim=True))

    def _prepare_banded(self, positions: torch.Tensor, docs: torch.Tensor) -> PreparedStack:
        """A call over many more new entries than the window (a long prefill chunk): each layer attends over
        the ``window - 1`` stored entries before the new ones (gathered in position order) and the new
        ones, under a :class:`~torchblt.model.masks.BandedMask` (``O(n * window)``, no ``(n, C + n)`` mask);
        the last ``C`` new entries are stored."""
        W = self.window
        assert W is not None
        before = positions[:, :1] - (W - 1) + torch.arange(W - 1, device=positions.device)  # (B, W-1)
        slots_before = before % self.capacity
        stored = torch.gather(self.pos, 1, slots_before)
        kpos = torch.cat([torch.where((stored == before) & (before >= 0), before, -1), positions], 1)
        kdoc = torch.cat([torch.gather(self.tag, 1, slots_before), docs], 1)
        band = banded_mask_after(positions, kpos, docs if self.documents else None,
                                 kdoc if self.documents else None, W)
        keep = last_kept(None, positions, self.capacity)
        slots = self.slots(positions, keep)
        index = _row_index(slots, None)
        layers = [_LayerWriter(self, 2 * i, slots, 0, False, slots_before, row_index=index) for i in range(self.n_layers)]
        self.store_meta(slots, positions, docs, keep, row_index=index)
        return PreparedStack(positions, SelfAttentionMask(dense=None, banded=band), layers)


@dataclass
class StackRows:
    """Rows ``rows (R,)`` of a :class:`StackKV`: :meth:`prepare` is the stack's for a call on those rows."""

    stack: StackKV
    rows: torch.Tensor

    def prepare(self, positions: torch.Tensor, docs: torch.Tensor, keep: torch.Tensor | None = None,
                view: int | None = None) -> PreparedStack:
        return self.stack.prepare(positions, docs, keep, view, rows=self.rows)
