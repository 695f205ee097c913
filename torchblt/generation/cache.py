"""Typed caches for incremental BLT decoding, one kind per network.

Shape legend: B rows, C cache capacity (positions), Hkv key/value heads, Dh head width, K slots per
patch, W patches kept for the decoder's cross-attention, D width.

* :class:`StackKV` — self-attention keys/values of one byte-level stack (the entropy model, the local
  encoder or the local decoder), every layer. A ring buffer of ``C`` positions: position ``p`` lives in
  slot ``p % C``. With a sliding window ``C = window`` (a query never sees a key ``window`` or more
  positions back, so the overwritten key is never needed): memory is bounded however long the text.
  Without a window ``C`` is the longest sequence the call can reach. Every layer of a stack shares one
  set of key metadata (position, document, filled), so the step mask is built once per stack.
* :class:`GlobalKV` — the global transformer's keys/values, one entry per *closed* patch; rows close
  patches at different steps, so each row keeps its own count and a step can update a subset of rows.
  Grows by doubling.
* :class:`PatchSlotKV` — the decoder's cross-attention keys/values of the last ``W`` closed patches
  (``W = cross_attn.window_decoder`` or 1): what a decoder step reads. Projected once, when the patch
  closes.
* :class:`Recorder` — captures a layer's keys/values during a parallel prefill.
"""

from __future__ import annotations

import torch

from torchblt.model.masks import SelfAttentionMask


class Recorder:
    """A ``KVCacheLike`` that keeps what it was given (prefill: keys equal the queries' positions)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = k, v
        return k, v


class _RowSlotWriter:
    """``KVCacheLike`` for one decoding step: writes row ``rows[j]``'s new key at slot ``slots[j]`` and returns
    the cache up to ``view`` positions — of ``rows`` only (``subset``) or of every row."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, view: int,
                 subset: bool):
        self.k, self.v, self.rows, self.slots, self.view, self.subset = k, v, rows, slots, view, subset

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[self.rows, self.slots] = k[:, 0]
        self.v[self.rows, self.slots] = v[:, 0]
        if self.subset:
            return self.k[self.rows, : self.view], self.v[self.rows, : self.view]
        return self.k[:, : self.view], self.v[:, : self.view]


class _LayerKV:
    """What every cache shares: per-layer keys ``k[i]`` and values ``v[i]``, batch rows first."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    def _select_layers(self, rows: torch.Tensor) -> None:
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class StackKV(_LayerKV):
    """Ring-buffer self-attention cache of a byte-level stack (all layers)."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        window: int | None,
        documents: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, capacity, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = torch.full((batch, capacity), -1, dtype=torch.int64, device=device)
        self.doc = torch.zeros(batch, capacity, dtype=torch.int64, device=device)
        self.capacity, self.window, self.documents = capacity, window, documents
        self._slots: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._view = capacity

    def load_row(self, row: int, layers: list[Recorder], positions: torch.Tensor, docs: torch.Tensor) -> None:
        """Store a prefilled row: ``layers[i]`` holds ``(1, L, Hkv, Dh)`` keys/values at ``positions (L,)``."""
        keep = slice(max(0, positions.shape[0] - self.capacity), None)  # the last C positions
        slots = positions[keep] % self.capacity
        for i, rec in enumerate(layers):
            assert rec.k is not None and rec.v is not None
            self.k[i][row, slots] = rec.k[0, keep].to(self.k[i].dtype)
            self.v[i][row, slots] = rec.v[0, keep].to(self.v[i].dtype)
        self.pos[row, slots] = positions[keep]
        self.doc[row, slots] = docs[keep]

    def begin_step(self, pos: torch.Tensor, doc: torch.Tensor) -> SelfAttentionMask:
        """Register every row's new key at ``pos (B,)`` (document ``doc (B,)``) and return the step mask
        ``(B, 1, 1, N)``: filled slots, not in the future, inside the window, same document. ``N`` is the
        capacity, or only the slots used so far while no row has wrapped around (less cache to read)."""
        slots = pos % self.capacity
        idx = torch.arange(pos.shape[0], device=pos.device)
        self.pos[idx, slots] = pos
        self.doc[idx, slots] = doc
        self._slots, self._rows = slots, idx
        self._view = min(self.capacity, int(pos.max()) + 1)
        kp, kd = self.pos[:, : self._view], self.doc[:, : self._view]
        qp = pos[:, None]
        allowed = (kp >= 0) & (kp <= qp)
        if self.window is not None:
            allowed &= qp - kp < self.window
        if self.documents:
            allowed &= kd == doc[:, None]
        return SelfAttentionMask(dense=allowed[:, None, None, :])

    def layer(self, i: int) -> _RowSlotWriter:
        assert self._slots is not None and self._rows is not None, "begin_step first"
        return _RowSlotWriter(self.k[i], self.v[i], self._rows, self._slots, self._view, subset=False)

    def select(self, rows: torch.Tensor) -> None:
        self._select_layers(rows)
        self.pos, self.doc = self.pos[rows], self.doc[rows]


class GlobalKV(_LayerKV):
    """The global transformer's cache: one key/value per closed patch and layer, per-row counts."""

    def __init__(
        self, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int, documents: bool,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        shape = (batch, max(capacity, 1), n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.doc = torch.zeros(batch, shape[1], dtype=torch.int64, device=device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)
        self.documents = documents
        self._rows: torch.Tensor | None = None
        self._subset = False
        self._slots: torch.Tensor | None = None
        self._view = 0

    @property
    def capacity(self) -> int:
        return self.doc.shape[1]

    def _grow(self, needed: int) -> None:
        new = self.capacity
        while new < needed:
            new *= 2
        if new == self.capacity:
            return
        pad = new - self.capacity

        def widen(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)

        self.k = [widen(t) for t in self.k]
        self.v = [widen(t) for t in self.v]
        self.doc = widen(self.doc)

    def load_row(self, row: int, layers: list[Recorder], docs: torch.Tensor) -> None:
        n = docs.shape[0]
        self._grow(n)
        for i, rec in enumerate(layers):
            assert rec.k is not None and rec.v is not None
            self.k[i][row, :n] = rec.k[0].to(self.k[i].dtype)
            self.v[i][row, :n] = rec.v[0].to(self.v[i].dtype)
        self.doc[row, :n] = docs
        self.count[row] = n

    def begin_step(self, rows: torch.Tensor | None, doc: torch.Tensor) -> tuple[SelfAttentionMask, torch.Tensor]:
        """Append one patch for ``rows`` (None: all) in document ``doc (R,)``; returns the mask ``(R, 1, 1, N)``
        and the new patches' positions ``(R,)`` (patch indices, for RoPE)."""
        count = (self.count if rows is None else self.count[rows]).clone()
        self._grow(int(count.max().item()) + 1)
        all_rows = rows if rows is not None else torch.arange(count.shape[0], device=count.device)
        self._rows, self._subset, self._slots = all_rows, rows is not None, count
        self.doc[all_rows, count] = doc
        self._view = int(count.max().item()) + 1
        key_index = torch.arange(self._view, device=count.device)[None]
        allowed = key_index <= count[:, None]
        if self.documents:
            allowed &= self.doc[all_rows, : self._view] == doc[:, None]
        self.count[all_rows] = count + 1
        return SelfAttentionMask(dense=allowed[:, None, None, :]), count

    def layer(self, i: int) -> _RowSlotWriter:
        assert self._slots is not None and self._rows is not None, "begin_step first"
        return _RowSlotWriter(self.k[i], self.v[i], self._rows, self._slots, self._view, self._subset)

    def select(self, rows: torch.Tensor) -> None:
        self._select_layers(rows)
        self.doc, self.count = self.doc[rows], self.count[rows]


class PatchSlotKV(_LayerKV):
    """The decoder's cross-attention keys/values for the last ``W`` closed patches (``K`` slots each)."""

    def __init__(
        self, n_cross_layers: int, batch: int, n_patches: int, k: int, n_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        shape = (batch, n_patches * k, n_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_cross_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_cross_layers)]
        self.filled = torch.zeros(batch, n_patches * k, dtype=torch.bool, device=device)
        self.n_patches, self.slots_per_patch = n_patches, k

    def put(self, rows: torch.Tensor, patch_index: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store patch ``patch_index (R,)`` of ``rows (R,)``; ``kv[i]`` = keys, values ``(R, K, H, Dh)``."""
        K = self.slots_per_patch
        base = (patch_index % self.n_patches) * K
        cols = base[:, None] + torch.arange(K, device=base.device)[None]  # (R, K)
        r = rows[:, None].expand_as(cols)
        for i, (k, v) in enumerate(kv):
            self.k[i][r, cols] = k.to(self.k[i].dtype)
            self.v[i][r, cols] = v.to(self.v[i].dtype)
        self.filled[r, cols] = True

    def mask(self) -> torch.Tensor:
        """``(B, 1, 1, W*K)``: a decoder step sees every stored slot (exactly the last ``W`` patches)."""
        return self.filled[:, None, None, :]

    def select(self, rows: torch.Tensor) -> None:
        self._select_layers(rows)
        self.filled = self.filled[rows]
