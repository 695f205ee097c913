"""Transformer building blocks shared by every stack: the entropy model, the local encoder and decoder,
and the global latent transformer.

Shape legend: B batch, T sequence positions, D model width, H query heads, Hkv key/value heads,
Dh head width, F feed-forward width.

* :class:`RMSNorm` normalises in fp32 and casts back before the weight, as ``torch.nn.RMSNorm`` does for
  the reference (so bf16 numerics match).
* :class:`RotaryEmbedding` is the interleaved ("complex", Llama-1/2) RoPE: pairs ``(2i, 2i+1)`` rotate by
  ``pos * theta^(-2i/Dh)``; angles and the rotation are computed in fp32.
* :class:`FeedForward` is SwiGLU with the reference's hidden-size rounding.
* :class:`Attention` supports grouped-query attention (each key/value head serves ``H/Hkv`` consecutive
  query heads), an optional KV cache, and two back-ends: SDPA (always available) or FlexAttention (GPU,
  chosen at run time). On SDPA a sliding window over a long sequence runs banded
  (:func:`banded_attention`: one batched call over blocks of queries and the keys each block can see,
  ``O(T * window)``); otherwise SDPA takes an explicit boolean mask or ``is_causal``.
* :class:`Transformer` is a backbone: embeddings in, hidden states out; embeddings and heads live with
  the models that own them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from torchblt.model.masks import BandedMask, SelfAttentionMask, banded_layer_rows, build_self_attention_mask
from torchblt.tokenizer import EOS_ID

MAX_SIZE = 1 << 17  # widths, depths and head counts beyond this are typos (e.g. dim: 1e9), not models


@dataclass
class StackConfig:
    """One transformer stack (entropy model, local encoder/decoder or global transformer)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: n_heads (no GQA)
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim_multiplier: float | None = 1.0
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seqlen: int = 8192  # positions seen in training (RoPE is computed for any position)
    attention: str = "causal"  # causal | block_causal | local_block_causal | local_causal (see masks.py)
    window: int | None = None  # sliding window (keys including the query) for the local_* kinds

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def resolved_n_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def validate(self, where: str) -> None:
        from torchblt.model.masks import MASK_KINDS, uses_window

        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not (0 if name == "n_layers" else 1) <= v <= MAX_SIZE:
                raise ValueError(f"{where}.{name} must be a positive integer (at most {MAX_SIZE}), got {v!r}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"{where}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.resolved_n_kv_heads:
            raise ValueError(
                f"{where}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"{where}: head_dim {self.resolved_head_dim} must be even for RoPE")
        if self.attention not in MASK_KINDS:
            raise ValueError(f"{where}.attention must be one of {MASK_KINDS}, got {self.attention!r}")
        if uses_window(self.attention) and (self.window is None or self.window < 1):
            raise ValueError(f"{where}.window must be a positive integer for attention={self.attention!r}")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width: ``int(2*4*dim/3)``, times the multiplier, rounded *up* to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num_embeddings, dim)``; built on the meta device it skips the default init.

    There ``nn.Embedding``'s ``normal_`` runs PyTorch's Python reference kernel, whose first use imports
    ``torch._dynamo`` (seconds, once per process: most of a first ``load_model``). Meta builds are loaded
    or ``init_weights``-ed before use, so the default init is never seen.
    """
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))
    return nn.Embedding(num_embeddings, dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fused; same values in fp32
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """Interleaved RoPE. ``cos_sin(positions)`` gives fp32 ``(B, T, Dh/2)`` tables for any positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        # Computed on the CPU, then moved: arithmetic on meta tensors (models are built on the meta device
        # before loading) runs PyTorch's Python reference kernels, whose first use imports torch._dynamo
        # (seconds, once per process: most of a first load_model).
        d = self.head_dim
        exponents = torch.arange(0, d, 2, device="cpu")[: d // 2].float() / d
        inv_freq = 1.0 / (self.theta ** exponents)
        return inv_freq.to(device if device is not None else torch.get_default_device())

    def reset_parameters(self) -> None:
        # the buffer is not in state dicts; recompute it after ``to_empty`` from the meta device
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq if self.inv_freq.device == positions.device else self.inv_freq.to(positions.device)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        return torch.cos(angles), torch.sin(angles)


def rope_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation as a complex64 table ``(B|1, T, 1, Dh/2)`` (what the attention layers take); under
    ``torch.compile`` the same numbers as real pairs ``(B|1, T, 1, Dh/2, 2)`` (inductor has no complex
    kernels)."""
    if torch.compiler.is_compiling():
        return torch.stack([cos, sin], dim=-1)[:, :, None]
    return torch.complex(cos, sin)[:, :, None, :]


def apply_rope_table(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` with a :func:`rope_table`: ``(x0 + i x1) (cos + i sin)`` in fp32, cast back.

    The complex product's parts are exactly ``x0 cos - x1 sin`` and ``x0 sin + x1 cos``; one fused
    kernel instead of a dozen small ops (this runs twice per layer for every decoded byte)."""
    if not table.is_complex():  # the real-pair table of a compiled graph
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1, c, s = xf[..., 0], xf[..., 1], table[..., 0], table[..., 1]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)
    if x.dtype == torch.float32:  # no casts (this runs for every block of every decoded byte)
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * table).flatten(-2)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * table).flatten(-2).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(2i, 2i+1)`` of ``x (B, T, H, Dh)`` by fp32 tables ``(B|1, T, Dh/2)`` (explicit form)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, Dh/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * c + x1 * (-s), x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCacheLike(Protocol):
    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v (B, T, Hkv, Dh)`` and return every cached key and value."""
        ...


class StackCache(Protocol):
    """The key/value caches of every layer of one stack, prepared for a call over new positions (a
    prefill chunk, or a decoding step of one or more positions): a stack's ``forward`` with a cache is
    the same layer loop, with ``positions`` for RoPE, the ``mask`` of the new queries against the keys
    that each layer's cache returns, and ``layers[i]`` for block ``i``."""

    positions: torch.Tensor  # (B, T) positions of the new entries
    mask: SelfAttentionMask
    layers: Sequence[KVCacheLike]


_compiled_flex: Any = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    """FlexAttention on ``(B, T, H, Dh)`` tensors (compiled on GPU, eager elsewhere); returns ``(B, Tq, H, Dh)``.

    Queries with no visible key get 0."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as _flex

    fn = _flex
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(_flex)
        fn = _compiled_flex
    out = fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)  # type: ignore[union-attr]


SMALL_QUERIES = 8  # queries per row up to which a compiled CPU attention is written out (see scaled_dot_product)


def scaled_dot_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA on ``(B, T, H, Dh)`` tensors with GQA (repeat-interleaved KV heads); returns ``(B, Tq, H, Dh)``.

    Compiled on CPU, a call with few queries (a decoding step) is written out as products and a softmax,
    which inductor fuses with the code around it, instead of the flash-attention kernel (an opaque call per
    layer: ~12% of a compiled step); the same attention, equal within float rounding."""
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    if q.shape[1] <= SMALL_QUERIES and not is_causal and q.device.type == "cpu" and torch.compiler.is_compiling():
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return (scores.softmax(-1) @ vt).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal
    )
    return out.transpose(1, 2)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: BandedMask) -> torch.Tensor:
    """Sliding-window attention in ``O(T * window)``: ``q (B, T, H, Dh)``, ``k, v (B, T, Hkv, Dh)`` ->
    ``(B, T, H, Dh)``.

    Queries in blocks of ``band.block`` attend to the ``block + window - 1`` keys that can be visible to
    the block (gathered as overlapping windows of the left-padded keys, or with ``band.prefix`` of the
    ``window - 1`` keys given before the queries), with ``band``'s per-block mask;
    one SDPA call over all blocks. Masked keys get exactly zero weight, so every query sees the same keys
    with the same weights as under the dense ``(T, T)`` mask. With ``band.query_start`` /
    ``band.key_start`` (:meth:`BandedMask.rows_from`) ``q`` and ``k, v`` hold only the rows from there, and
    only those query blocks are computed (each block exactly as in the full call)."""
    B, Tq, H, Dh = q.shape
    T, q0, W = band.T, band.query_start, band.window
    k0 = -(W - 1) if band.prefix else band.key_start  # position of k's first row (prefix: cached keys before 0)
    if Tq != T - q0 or k.shape[1] != T - k0:
        raise ValueError(
            f"banded attention of positions {q0}..{T - 1} against {k0}..{T - 1} got {Tq} queries and "
            f"{k.shape[1]} keys (mask of {T} positions)"
        )
    Bq, L = band.block, band.n_keys
    b0 = q0 // Bq  # first query block computed
    n = band.n_blocks - b0
    pad = band.n_blocks * Bq - T
    n_rep = H // k.shape[2]
    first = b0 * Bq - (W - 1) - k0  # row of k holding block b0's first key (< 0: padding before position 0)
    k, v = k[:, max(first, 0) :], v[:, max(first, 0) :]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    qb = (F.pad(q, (0, 0, 0, 0, 0, pad)) if pad else q).reshape(B, n, Bq, H, Dh)
    # overlapping key windows: (B, n, H, Dh, L) views of the keys padded to the blocks' reach
    left = max(-first, 0)
    kb = (F.pad(k, (0, 0, 0, 0, left, pad)) if left or pad else k).unfold(1, L, Bq)
    vb = (F.pad(v, (0, 0, 0, 0, left, pad)) if left or pad else v).unfold(1, L, Bq)
    mask = band.additive(q.dtype)
    if band.allowed.shape[0] == 1:  # one mask for every row: batch rows and heads share it, blocks lead
        qb = qb.permute(1, 0, 3, 2, 4).reshape(n, B * H, Bq, Dh)
        kb = kb.permute(1, 0, 2, 4, 3).reshape(n, B * H, L, Dh)
        vb = vb.permute(1, 0, 2, 4, 3).reshape(n, B * H, L, Dh)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[b0:])  # (n, B*H, Bq, Dh)
        out = out.view(n, B, H, Bq, Dh).permute(1, 0, 3, 2, 4)  # (B, n, Bq, H, Dh)
    else:  # a mask per row (documents): rows and blocks lead, heads share it
        if b0:
            mask = mask.view(B, band.n_blocks, 1, Bq, L)[:, b0:].reshape(B * n, 1, Bq, L)
        qb = qb.transpose(2, 3).reshape(B * n, H, Bq, Dh)
        kb = kb.permute(0, 1, 2, 4, 3).reshape(B * n, H, L, Dh)
        vb = vb.permute(0, 1, 2, 4, 3).reshape(B * n, H, L, Dh)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # (B*n, H, Bq, Dh)
        out = out.view(B, n, H, Bq, Dh).transpose(2, 3)  # (B, n, Bq, H, Dh)
    return out.reshape(B, n * Bq, H, Dh)[:, :Tq]


SMALL_ROWS = 3  # Linear: products over at most this many rows stream the weight once (CPU, fp32)
# Linear: one-row products with weights this large go to oneDNN on 2+ threads. 512K weights: the small
# config's global matrices (768 x 768 and up) measured faster (bench/small_rows.py); for the local stacks'
# matrices (256 x 768 and below) timings on the 2-core VM did not separate from noise, so they keep F.linear.
ONEDNN_MIN_WEIGHTS = 1 << 19

_onednn_state: bool | None = None  # None: not yet checked in this process; False: unavailable (logged once)


def onednn_row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` for one row by oneDNN's linear on the plain ``(out, in)`` weight (no packed copy), or
    None where that is unavailable. ``torch.ops.mkldnn._linear_pointwise`` is the operator torch.compile's
    CPU back-end calls, not a documented API: its first use is checked against ``F.linear`` and any
    failure (op missing, wrong numbers) turns it off for the process, logged once."""
    global _onednn_state
    if _onednn_state is None:
        _onednn_state = False
        reason = "oneDNN is not available in this build"
        if torch.backends.mkldnn.is_available():
            try:
                probe_w = torch.linspace(-1, 1, 96 * 80).reshape(96, 80)
                probe_x = torch.linspace(1, -1, 80)[None]
                got = torch.ops.mkldnn._linear_pointwise(probe_x, probe_w, None, "none", [], "")
                _onednn_state = bool(torch.allclose(got, F.linear(probe_x, probe_w), rtol=1e-5, atol=1e-5))
                reason = "its product differs from F.linear"
            except (RuntimeError, AttributeError) as err:
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if not _onednn_state:
            import logging

            logging.getLogger(__name__).warning(
                "torchblt: one-row products use F.linear (the oneDNN row product is off: %s)", reason)
    if not _onednn_state:
        return None
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters and state-dict keys) with faster products for 1-3 rows.

    A decoding step multiplies few rows by each weight: one per row of a batch (a batch's global step: the
    rows that close a patch). Only outside autograd, on CPU, in float32, without bias and
    for a plain (unsharded) weight; everywhere else :func:`torch.nn.functional.linear`:

    * **2-3 rows**: the CPU BLAS's ``x @ W.T`` costs 1.5-2x one row (it reads ``W`` once per row), while
      ``W @ x.T`` reads ``W`` once for all of them: the 43 weights of bench/generation.py's small global
      model, 1 thread, 2 / 3 rows, 23.7 / 33.4 ms as ``x @ W.T`` against 13.1 / 20.8 ms
      (``bench/small_rows.py``).
    * **1 row, 2+ threads, weights of at least** :data:`ONEDNN_MIN_WEIGHTS`: the BLAS's one-row product
      runs on one thread; oneDNN's (:func:`onednn_row_product`) spreads the row over the threads, on the
      same weight in place: the small global model's 43 weights, 2 threads, one row, 16.6 -> 12.6 ms
      (``bench/small_rows.py --threads 2 --rows 1 2 3 --json bench/small_rows_cpu_threads2.json``). On one thread it is no faster, so it is not used there; nor
      under torch.compile, which makes its own product.

    The products sum in different orders: equal to float32 rounding, not bitwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # one module attribute look-up each (a decoding step makes ~70 calls)
        rows = x.numel() // self.in_features if self.in_features else 0
        if (rows <= SMALL_ROWS and x.device.type == "cpu" and bias is None and x.dtype == torch.float32
                and not torch.is_grad_enabled() and weight.dtype == torch.float32):
            # ``type(weight.data) is torch.Tensor``: not a sharded (DTensor) weight; ``.data`` is an op, so last
            if 2 <= rows and type(weight.data) is torch.Tensor:
                out = torch.mm(weight, x.reshape(rows, self.in_features).T).T.contiguous()
                return out.view(*x.shape[:-1], self.out_features)
            if (rows == 1 and weight.numel() >= ONEDNN_MIN_WEIGHTS and not torch.compiler.is_compiling()
                    and torch.get_num_threads() > 1 and type(weight.data) is torch.Tensor):
                out = onednn_row_product(x.reshape(1, self.in_features), weight)
                if out is not None:
                    return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, bias)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and GQA, no biases."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = Linear(dim, n_heads * head_dim, bias=False)
        self.wk = Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = Linear(n_heads * head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: SelfAttentionMask,
        cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        """``x (B, T, D)``; ``rope``: :func:`rope_table` of the positions of ``x``. Returns ``(B, T - o, D)``
        for the rows from ``o = mask.query_offset`` (0 but where a banded mask computes only a tail)."""
        B, T, _ = x.shape
        o = mask.query_offset
        q = self.wq(x[:, o:] if o else x).view(B, T - o, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope_table(q, rope[:, o:] if o else rope), apply_rope_table(k, rope)
        if cache is not None:
            k, v = cache.update(k, v)
        if mask.block_mask is not None:
            out = flex_attention(q, k, v, mask.block_mask)
        elif mask.banded is not None:
            out = banded_attention(q, k, v, mask.banded)
        else:
            out = scaled_dot_product(q, k, v, mask.dense, is_causal=mask.is_causal and mask.dense is None)
        return self.wo(out.reshape(B, T - o, -1))

    def init_weights(self, std: float, out_std: float | None = None) -> None:
        for w in (self.wq, self.wk, self.wv):
            trunc_normal_(w.weight, std)
        trunc_normal_(self.wo.weight, std if out_std is None else out_std)


# Rows per piece of the row-wise work of a forward on CPU that autograd does not record (a block's
# feed-forward half, the entropy model's head): a piece's (rows, F) hidden stays in cache instead of
# (T, F) tensors fresh from the allocator (measured: bench/patching.py, docs/long-inputs.md)
CPU_ROWS = 1024


def records(x: torch.Tensor, module: nn.Module) -> bool:
    """Would autograd record ``module`` applied to ``x``? (False: in-place and piecewise forms are safe.)"""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def row_pieces(n: int, device: torch.device) -> list[slice]:
    """Slices of ``n`` rows in pieces of :data:`CPU_ROWS` on CPU (one piece elsewhere: a GPU wants few
    large kernels)."""
    step = CPU_ROWS if device.type == "cpu" else max(n, 1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if records(x, self):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        # nothing records autograd: the same kernels, silu and the product in place
        return self.w2(F.silu(self.w1(x), inplace=True).mul_(self.w3(x)))

    def init_weights(self, in_std: float, out_std: float) -> None:
        trunc_normal_(self.w1.weight, in_std)
        trunc_normal_(self.w3.weight, in_std)
        trunc_normal_(self.w2.weight, out_std)


def _residual(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x + out``, into ``out`` (a fresh result) when autograd records neither and no type promotion or
    broadcast is involved (float addition commutes: the same values)."""
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        return x + out
    if x.dtype != out.dtype or x.shape != out.shape:
        return x + out
    return out.add_(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: SelfAttentionMask,
        cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        o = mask.query_offset  # rows of x that only serve as keys (see BandedMask.rows_from)
        h = _residual(x[:, o:] if o else x, self.attention(self.attention_norm(x), rope, mask, cache))
        if records(h, self):
            return h + self.feed_forward(self.ffn_norm(h))
        # nothing records autograd: norm, feed-forward and residual piece by piece into h (a fresh
        # tensor); each row gets the same kernels and values as in one call
        if h.device.type != "cpu" or h.numel() <= CPU_ROWS * h.shape[-1]:  # one piece (a decoding step)
            return h.add_(self.feed_forward(self.ffn_norm(h)))
        rows = h.reshape(-1, h.shape[-1])
        for piece in row_pieces(rows.shape[0], rows.device):
            r = rows[piece]
            r.add_(self.feed_forward(self.ffn_norm(r)))
        return rows.view(h.shape)

    def init_weights(self, factor: float = 1.0, base_std: float | None = None) -> None:
        dim = self.attention.wq.in_features
        hidden = self.feed_forward.w1.out_features
        in_std = base_std if base_std is not None else dim**-0.5 / factor
        out_std = base_std if base_std is not None else hidden**-0.5 / factor
        self.attention.init_weights(in_std)
        self.feed_forward.init_weights(in_std, out_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


class Transformer(nn.Module):
    """A stack of blocks with RoPE: ``(B, T, D) -> (B, T, D)``. No embedding, no final norm, no head."""

    eos_id: int = EOS_ID  # the token that ends a document (document-masked attention kinds)

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rope = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))

    def rope_for(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotation table of ``positions (B|1, T)`` that the blocks take (see :func:`rope_table`)."""
        return rope_table(*self.rope.cos_sin(positions))

    def self_attention_mask(self, tokens: torch.Tensor) -> SelfAttentionMask:
        """The mask of a full forward over ``tokens (B, T)`` (this stack's attention kind and window)."""
        return build_self_attention_mask(tokens, self.cfg.attention, self.cfg.window, self.eos_id)

    def attention_inputs(
        self, tokens: torch.Tensor, cache: StackCache | None = None
    ) -> tuple[SelfAttentionMask, torch.Tensor, Sequence[KVCacheLike] | None]:
        """Mask, RoPE table and per-layer caches of a call over ``tokens (B, T)``: a full forward (positions
        ``0..T-1``, no cache) or new positions after the cached ones (``cache``)."""
        if cache is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
            return self.self_attention_mask(tokens), self.rope_for(positions), None
        return cache.mask, self.rope_for(cache.positions), cache.layers

    def run_layers(
        self,
        h: torch.Tensor,
        mask: SelfAttentionMask,
        positions: torch.Tensor | None = None,
        caches: Sequence[KVCacheLike] | None = None,
        rope: torch.Tensor | None = None,
        keep_from: int = 0,
    ) -> torch.Tensor:
        """The backbone: hidden states through every block. Models built on a stack (the entropy model,
        the local and global models) subclass this and keep their parameter names flat (``layers.i``).

        ``keep_from``: return only the rows from there, ``(B, T - keep_from, D)``; under a banded mask each
        layer then computes only the rows those can still see (:func:`banded_layer_rows`: a chunk's left
        context costs its keys, not its queries), with the same values as the full forward."""
        if rope is None:
            if positions is None:
                positions = torch.arange(h.shape[1], device=h.device)[None]
            rope = self.rope_for(positions)
        if keep_from and mask.banded is not None and caches is None:
            band, start = mask.banded, 0  # h holds the rows from start
            for layer, (k0, q0) in zip(self.layers, banded_layer_rows(keep_from, len(self.layers), band.window, band.block)):
                rows = SelfAttentionMask(dense=None, banded=band.rows_from(k0, q0))
                h, start = layer(h[:, k0 - start :], rope[:, k0:], rows), q0
            return h[:, keep_from - start :]
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, None if caches is None else caches[i])
        return h[:, keep_from:] if keep_from else h

    forward = run_layers

    def init_weights(self, depth_scaled: bool = True, base_std: float | None = None) -> None:
        """Truncated normal (±3 std): inputs ``dim^-0.5``, outputs ``hidden^-0.5``, divided by
        ``sqrt(2 (layer + 1))`` when ``depth_scaled`` (the reference's ``current_depth``)."""
        self.rope.reset_parameters()
        for i, layer in enumerate(self.layers):
            factor = math.sqrt(2 * (i + 1)) if depth_scaled else 1.0
            layer.init_weights(factor, base_std)


def trunc_normal_(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)
