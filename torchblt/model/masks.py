"""Attention masks: causal, sliding window, document-masked sliding window, and cross-attention.

Shape legend: B batch, Tq query positions, Tk key positions, T bytes, P patches, K slots per patch.

Masks are boolean, ``True`` = may attend. Self-attention masks are built from *positions* and
*document ids* so the same function serves a full forward (query and key positions equal) and a cached
decoding step (a few queries against many cached keys):

    allowed(i, j) = pos_k[j] <= pos_q[i]
                    and pos_q[i] - pos_k[j] < window          (if a window is set)
                    and doc_q[i] == doc_k[j]                    (if documents are masked)

Documents (the xformers ``BlockDiagonalCausalMask.from_seqlens`` + ``make_local_attention`` semantics the
released models were trained with): a document ends *with* an EOS token; the token after an EOS starts a
new one. Each batch row is independent. RoPE positions are not reset at document starts.

Linear-time forms (the SDPA back-end's default for full sequences; see docs/long-inputs.md):

* :class:`BandedMask`, a sliding window over a long sequence: queries in blocks of ``block`` positions,
  each block attending to the ``block + window - 1`` keys that can be visible to it (the keys gathered as
  overlapping windows), with the rule above evaluated per block: ``(B|1, n_blocks, block, block + window - 1)``
  booleans instead of ``(B, T, T)``, so time and memory are ``O(T * window)``.
* :class:`PatchCrossMask`, cross-attention: each byte meets only the slots of the (``window``) patches it
  may see, so the work is ``O(T * K * window)`` instead of a dense ``(P*K, T)`` mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

MaskKind = Literal["causal", "block_causal", "local_block_causal", "local_causal"]
MASK_KINDS: tuple[str, ...] = ("causal", "block_causal", "local_block_causal", "local_causal")


def document_ids(tokens: torch.Tensor, eos_id: int = 2) -> torch.Tensor:
    """Document index of every position: the number of EOS tokens strictly before it. ``(B, T) -> (B, T)``."""
    is_eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=1) - is_eos


# ----------------------------------------------------------------------------- back-end choice
AttentionBackend = Literal["sdpa", "flex", "auto"]
_backend: str = "auto"


def set_attention_backend(name: str) -> None:
    """``"sdpa"`` (explicit boolean masks, works everywhere), ``"flex"`` (FlexAttention block masks: sparse,
    compiled on GPU) or ``"auto"`` (flex on CUDA, sdpa elsewhere). Both give the same numbers."""
    global _backend
    if name not in ("sdpa", "flex", "auto"):
        raise ValueError(f"attention backend must be 'sdpa', 'flex' or 'auto', got {name!r}")
    _backend = name


def attention_backend(device: torch.device) -> str:
    if _backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return _backend


def _create_block_mask(mask_mod: Any, B: int, Tq: int, Tk: int, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B, None, Tq, Tk, device=device)


@dataclass
class BandedMask:
    """A sliding window (optionally document-masked) over ``T`` positions, block by block.

    Block ``i`` holds queries ``i*block .. i*block + block - 1`` and keys
    ``i*block - (window - 1) .. i*block + block - 1`` (positions before 0 and from ``T`` on are padding);
    ``allowed (B|1, n_blocks, block, block + window - 1)`` is the visibility rule evaluated on them.
    Padding queries see padding keys only (never a fully masked row); real queries never see padding.

    ``prefix``: the keys start ``window - 1`` positions before the first query (a chunk after cached
    entries: :func:`banded_mask_after`) instead of at it (a full forward: padding fills the gap).

    ``key_start`` / ``query_start`` (a multiple of ``block``): the attention gets the keys of positions
    ``key_start ..`` and the queries of ``query_start ..`` only (:meth:`rows_from`, :func:`banded_layer_rows`);
    by default every position.
    """

    T: int
    block: int
    window: int
    allowed: torch.Tensor
    prefix: bool = False
    _additive: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)
    key_start: int = 0
    query_start: int = 0

    @property
    def n_blocks(self) -> int:
        return self.allowed.shape[1]

    @property
    def n_keys(self) -> int:
        """Keys per block: ``block + window - 1``."""
        return self.allowed.shape[-1]

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """``(B|1 * n_blocks, 1, block, n_keys)``: 0 where allowed, -inf elsewhere (built once per dtype and
        shared by every layer: SDPA would otherwise convert the boolean mask in each call). Without
        documents one mask serves every row."""
        if dtype not in self._additive:
            a = self.allowed
            neg = torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill_(~a, float("-inf"))
            self._additive[dtype] = neg.reshape(-1, 1, self.block, self.n_keys)
        return self._additive[dtype]

    def rows_from(self, key_start: int, query_start: int) -> BandedMask:
        """The same mask for attention over the keys from ``key_start`` and the queries from ``query_start``
        (a multiple of ``block``, at least ``key_start``; the keys must reach back a window before it or to 0)."""
        if self.prefix:
            raise ValueError("rows_from of a mask with a prefix of cached keys")
        if query_start % self.block or not 0 <= key_start <= query_start < self.T:
            raise ValueError(f"bad rows for a banded mask: keys from {key_start}, queries from {query_start}, T={self.T}")
        if key_start > max(0, query_start - (self.window - 1)):
            raise ValueError(f"queries from {query_start} need keys from {max(0, query_start - self.window + 1)}")
        return replace(self, key_start=key_start, query_start=query_start)

    @property
    def query_offset(self) -> int:
        """Rows of the keys' input before the first query (what a block drops from its output)."""
        return self.query_start - self.key_start


def banded_layer_rows(keep_from: int, n_layers: int, window: int, block: int) -> list[tuple[int, int]]:
    """``(key_start, query_start)`` of each of ``n_layers`` banded layers so that the last layer's outputs
    from ``keep_from`` on are exact: a layer's queries start at the block holding the first row the next
    layer needs, its keys a window earlier (``window - 1`` rows per layer, what the receptive field allows
    to skip when only the tail of a sequence is kept, e.g. a chunk's context)."""
    rows = []
    need = keep_from
    for _ in range(n_layers):
        query_start = need // block * block
        need = max(0, query_start - (window - 1))
        rows.append((need, query_start))
    return rows[::-1]


# Query blocks of the banded path, measured on CPU (bench/attention_cpu.py, docs/long-inputs.md): smaller
# blocks waste fewer masked keys (block - 1 per query) and win the forward; the backward prefers larger ones
BAND_BLOCK = 64
BAND_BLOCK_TRAINING = 128


def band_block() -> int:
    """The query block for a forward now: :data:`BAND_BLOCK_TRAINING` when autograd records, else :data:`BAND_BLOCK`."""
    return BAND_BLOCK_TRAINING if torch.is_grad_enabled() else BAND_BLOCK


def banded_mask(T: int, window: int, doc: torch.Tensor | None, device: torch.device,
                block: int | None = None) -> BandedMask:
    """The :class:`BandedMask` of a full forward over ``T`` positions (document ids ``doc (B, T)`` or None;
    ``block`` default :func:`band_block`). Rows that are one document each (no EOS before the last
    position: a long one-line text) share one mask without the document rule."""
    block = block or band_block()
    if doc is None or not bool(doc[:, -1].any()):  # every row is one document: the window alone
        return _window_band(T, window, block, torch.device(device))
    allowed = _band(T, window, block, torch.device(device))  # (n, block, L)
    B, (n, _, L) = doc.shape[0], allowed.shape
    pad_right = n * block - T
    dq = F.pad(doc, (0, pad_right), value=-1)  # padding: a document of its own
    dk = F.pad(doc, (window - 1, pad_right), value=-1).unfold(1, L, block)  # (B, n, L)
    same = dq.view(B, n, block, 1) == dk[:, :, None, :]
    return BandedMask(T, block, window, allowed[None] & same)


def _band(T: int, window: int, block: int, device: torch.device) -> torch.Tensor:
    """``(n_blocks, block, block + window - 1)``: causal, inside the window, and no key before position 0."""
    n, L = -(-T // block), block + window - 1
    a = torch.arange(block, device=device)[:, None]  # query offset in its block
    c = torch.arange(L, device=device)[None, :]  # key offset in the block's keys
    band = (c >= a) & (c <= a + window - 1)  # key position - query position = c - (window - 1) - a
    kpos = torch.arange(n, device=device)[:, None] * block - (window - 1) + c  # (n, L)
    return band[None] & (kpos >= 0)[:, None, :]


@functools.lru_cache(maxsize=2)
def _window_band(T: int, window: int, block: int, device: torch.device) -> BandedMask:
    """The document-free mask: the same for every row and for every chunk of one length, so it is kept
    (with its additive form) for the next forward (entropies of a long text run many equal chunks)."""
    return BandedMask(T, block, window, _band(T, window, block, device)[None])


def banded_mask_after(
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None, k_doc: torch.Tensor | None, window: int,
    block: int | None = None,
) -> BandedMask:
    """The :class:`BandedMask` (``prefix=True``) of ``T`` new queries at positions ``q_pos (B, T)`` (consecutive
    per row) over keys ``k_pos (B, window - 1 + T)``: the ``window - 1`` positions before each row's first
    query (``-1``: no entry there), then the queries' own. ``q_doc``/``k_doc``: document ids or None.
    Time and memory ``O(T * window)`` whatever came before (a long prompt prefilled in chunks)."""
    block = block or band_block()
    B, T = q_pos.shape
    n = -(-T // block)
    L = block + window - 1
    pad = n * block - T
    qp = F.pad(q_pos, (0, pad), value=-1).view(B, n, block)
    kp = F.pad(k_pos, (0, pad), value=-1).unfold(1, L, block)  # (B, n, L)
    docs = None
    if q_doc is not None and k_doc is not None:
        qd = F.pad(q_doc, (0, pad), value=-1).view(B, n, block, 1)
        docs = (qd, F.pad(k_doc, (0, pad), value=-1).unfold(1, L, block)[:, :, None, :])
    allowed = _self_visible(qp[..., None], kp[:, :, None, :], docs, window) & (kp >= 0)[:, :, None, :]
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries: never a fully masked row
    return BandedMask(T, block, window, allowed, prefix=True)


def band_pays(T: int, window: int) -> bool:
    """Is the banded form less work than a dense ``(T, T)`` mask?"""
    return T > 2 * (band_block() + window)


@dataclass
class SelfAttentionMask:
    """What a self-attention layer needs to know about visibility.

    ``dense`` is a ``(B, 1, Tq, Tk)`` boolean mask, or ``None`` with ``is_causal`` for plain causal
    attention over equal query and key lengths (lets SDPA skip materialising the mask);
    ``block_mask`` is a FlexAttention ``BlockMask`` (flex back-end); ``banded`` a :class:`BandedMask`
    (sliding windows over long full sequences on the SDPA back-end).
    """

    dense: torch.Tensor | None
    is_causal: bool = False
    block_mask: Any = None
    banded: BandedMask | None = None

    @property
    def query_offset(self) -> int:
        """Input rows before the first query row (0 unless a banded layer computes only a tail of rows)."""
        return 0 if self.banded is None else self.banded.query_offset


def uses_documents(kind: str) -> bool:
    return kind in ("block_causal", "local_block_causal")


def uses_window(kind: str) -> bool:
    return kind in ("local_block_causal", "local_causal")


def self_attention_mask_dense(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean ``(B, 1, Tq, Tk)`` mask from positions ``(B, Tq)``/``(B, Tk)`` and optional document ids."""
    docs = None if q_doc is None or k_doc is None else (q_doc[:, :, None], k_doc[:, None, :])
    return _self_visible(q_pos[:, :, None], k_pos[:, None, :], docs, window)[:, None]


def _self_visible(q: Any, k: Any, docs: tuple[Any, Any] | None, window: int | None) -> Any:
    """The self-attention rule on broadcastable positions (dense masks and FlexAttention ``mask_mod`` alike)."""
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    if docs is not None:
        allowed = allowed & (docs[0] == docs[1])
    return allowed


def build_self_attention_mask(
    tokens: torch.Tensor,
    kind: str,
    window: int | None,
    eos_id: int = 2,
    dense: bool = False,
) -> SelfAttentionMask:
    """The mask of a full forward over ``tokens (B, T)`` for a stack configured with ``kind``/``window``.

    ``dense=True``: always an explicit boolean tensor (SDPA), whatever the back-end. Otherwise, on the
    SDPA back-end a sliding window over a sequence much longer than the window is a :class:`BandedMask`
    (linear in ``T``), and a window at least as long as the sequence without documents is plain causal."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown attention mask kind {kind!r}; expected one of {MASK_KINDS}")
    docs = uses_documents(kind)
    win = window if uses_window(kind) else None
    B, T = tokens.shape
    if not docs and win is None and not dense:
        return SelfAttentionMask(dense=None, is_causal=True)
    doc = document_ids(tokens, eos_id) if docs else None
    if not dense and attention_backend(tokens.device) == "flex":

        def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
            return _self_visible(q, k, None if doc is None else (doc[b, q], doc[b, k]), win)

        return SelfAttentionMask(dense=None, block_mask=_create_block_mask(mask_mod, B, T, T, tokens.device))
    if not dense and win is not None:
        if band_pays(T, win):
            return SelfAttentionMask(dense=None, banded=banded_mask(T, win, doc, tokens.device))
        if win >= T and doc is None:  # the window hides nothing
            return SelfAttentionMask(dense=None, is_causal=True)
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    return SelfAttentionMask(dense=self_attention_mask_dense(pos, pos, doc, doc, win))


def patch_ids_from_lengths(patch_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Patch index of every byte position: ``(B, P), T -> (B, T)``.

    Byte j belongs to patch ``#{k : cum[k] <= j} - 1`` with ``cum = [0, cumsum(lengths)]``; positions past
    a row's total length get index P (no patch).
    """
    B = patch_lengths.shape[0]
    ends = torch.cumsum(patch_lengths, dim=1)  # (B, P) exclusive ends
    positions = torch.arange(seq_len, device=patch_lengths.device).expand(B, seq_len).contiguous()
    # number of patch ends <= j is the index of the patch containing j
    return torch.searchsorted(ends.contiguous(), positions, right=True)


def cross_attention_mask(
    byte_patch_ids: torch.Tensor,
    n_patches: int,
    slots_per_patch: int,
    *,
    patches_as_queries: bool,
    window: int | None = None,
    dense: bool = False,
) -> Any:
    """Mask between the ``P*K`` patch slots and the bytes.

    ``byte_patch_ids (B, T)``: the patch each byte is matched with. Slot ``s`` stands for patch ``s // K``
    (``K = slots_per_patch``).
    Allowed iff ``p_byte == p_slot``; with a window, iff ``p_slot <= p_byte < p_slot + window`` (bytes
    read a slot) / ``p_byte <= p_slot < p_byte + window`` (slots read bytes).
    Returns ``(B, 1, P*K, T)`` if ``patches_as_queries`` else ``(B, 1, T, P*K)`` (a ``BlockMask`` of the
    same shape with the flex back-end, unless ``dense``).
    """
    device = byte_patch_ids.device
    if not dense and attention_backend(device) == "flex":
        return _cross_block_mask(byte_patch_ids, n_patches, slots_per_patch, patches_as_queries, window)
    slot_patch = torch.arange(n_patches, device=device).repeat_interleave(slots_per_patch)  # (P*K,)
    if patches_as_queries:  # (1, PK, 1) slots x (B, 1, T) bytes
        allowed = _cross_visible(slot_patch[None, :, None], byte_patch_ids[:, None, :], True, window)
    else:  # (B, T, 1) bytes x (1, 1, PK) slots
        allowed = _cross_visible(slot_patch[None, None, :], byte_patch_ids[:, :, None], False, window)
    return allowed[:, None]


@dataclass
class PatchCrossMask:
    """Cross-attention visibility kept as patch ids (the SDPA back-end's linear form).

    ``byte_patch_ids (B, T)``: the patch each byte is matched with (``>= n_patches``: none). With
    ``patches_as_queries`` the ``n_patches * k`` slots are the queries and slot ``s`` of patch ``p`` sees
    the bytes whose patch is in ``[p - window + 1, p]``; otherwise the bytes are the queries and a byte of
    patch ``d`` sees the slots of patches ``[d - window + 1, d]`` (``window=None``: 1, the patch itself),
    exactly :func:`cross_attention_mask`'s rule.
    """

    byte_patch_ids: torch.Tensor
    n_patches: int
    k: int
    patches_as_queries: bool
    window: int | None = None

    def slot_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For every byte, the ``window * k`` slots it meets: indices ``(B, T, window*k)`` into the
        ``n_patches * k`` slots (clamped) and whether each is a real slot that the rule allows."""
        w = self.window or 1
        ids = self.byte_patch_ids
        step = 1 if self.patches_as_queries else -1  # slots of patches d .. d+w-1 read byte d; byte d reads d-w+1 .. d
        offsets = torch.arange(w, device=ids.device) * step
        patch = ids[:, :, None] + offsets  # (B, T, w)
        valid = (patch >= 0) & (patch < self.n_patches)
        slots = patch[:, :, :, None] * self.k + torch.arange(self.k, device=ids.device)  # (B, T, w, k)
        valid = valid[:, :, :, None].expand_as(slots)
        index = slots.clamp(0, max(self.n_patches * self.k - 1, 0))
        B, T = ids.shape
        return index.reshape(B, T, w * self.k), valid.reshape(B, T, w * self.k)


def patch_cross_mask(
    byte_patch_ids: torch.Tensor, n_patches: int, slots_per_patch: int, *, patches_as_queries: bool,
    window: int | None = None
) -> Any:
    """The cross-attention mask of a full forward: a FlexAttention ``BlockMask`` on the flex back-end,
    else a :class:`PatchCrossMask` (linear in ``T``; :func:`cross_attention_mask` is the dense form)."""
    if attention_backend(byte_patch_ids.device) == "flex":
        return _cross_block_mask(byte_patch_ids, n_patches, slots_per_patch, patches_as_queries, window)
    return PatchCrossMask(byte_patch_ids, n_patches, slots_per_patch, patches_as_queries, window)


def cross_attention_visible(slot_patch: Any, byte_patch: Any, slots_read: bool, window: int | None) -> Any:
    """:func:`cross_attention_mask`'s rule on broadcastable patch indices of slots and bytes (a decoding
    step's cached slots are not ``0..P-1``)."""
    return _cross_visible(slot_patch, byte_patch, slots_read, window)


def _cross_visible(slot_patch: Any, byte_patch: Any, slots_read: bool, window: int | None) -> Any:
    """The cross-attention rule (dense masks and FlexAttention ``mask_mod`` alike)."""
    if window is None:
        return slot_patch == byte_patch
    if slots_read:
        return (byte_patch <= slot_patch) & (slot_patch < byte_patch + window)
    return (slot_patch <= byte_patch) & (byte_patch < slot_patch + window)


def _cross_block_mask(byte_patch_ids: torch.Tensor, n_patches: int, K: int, patches_as_queries: bool, window: int | None) -> Any:
    B, T = byte_patch_ids.shape
    ids = byte_patch_ids

    if patches_as_queries:

        def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return _cross_visible(q // K, ids[b, kv], True, window)

        return _create_block_mask(mask_mod, B, n_patches * K, T, ids.device)

    def mask_mod_dec(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return _cross_visible(kv // K, ids[b, q], False, window)

    return _create_block_mask(mask_mod_dec, B, T, n_patches * K, ids.device)
