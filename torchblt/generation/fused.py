"""Decode-step weights: the model's linear layers laid out for one new position at a time.

Shape legend: B rows, D width, H query heads, Hkv key/value heads, Dh head width, F feed-forward width.

A cached decoding step multiplies a single row vector per batch row by every weight matrix. That is a
matrix-vector product bound by reading the weights, and two things make it cheaper than the
``nn.Linear`` calls of the full forward:

* **layout.** ``nn.Linear`` keeps ``(out, in)`` and computes ``x @ W.T``; for one row the BLAS kernel
  then reads memory well under its bandwidth. Measured on the development machine (2-core AMD EPYC,
  ``python bench/generation.py --kernels``, weights read per second): ``nn.Linear`` 12-19 GiB/s,
  ``x @ W_t`` with ``W_t (in, out)`` contiguous 17-23 GiB/s on one thread, oneDNN's packed layout 16-23 GiB/s
  on one thread and 16-30 GiB/s on two (it spreads one row over threads; the BLAS product does not). The
  step keeps large fp32 CPU matrices packed for oneDNN (:data:`PACK_MIN_ELEMENTS`) and the rest ``W_t``.
* **fused projections.** ``wq|wk|wv`` become one ``(D, (H + 2 Hkv) Dh)`` matrix and ``w1|w3`` one
  ``(D, 2F)``: four products per block instead of seven (fewer calls; on GPU, fewer kernel launches).

The packed layout goes through ``torch.ops.mkldnn`` (the operators torch.compile's CPU back-end uses; not a
documented API), so each packed matrix is checked against ``x @ W.T`` once when it is built, and any
failure (an op missing from the build, a wrong result) falls back to ``W_t``.

The products are the same dot products summed in a possibly different order, so outputs agree with the
module path to float rounding (tests: logits within 1e-4 in fp32, identical greedy bytes). The copies
cost memory equal to the transformer layers' weights (the hash and byte embeddings are not copied);
``IncrementalEngine(..., fused=False)`` runs the modules instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchblt.model.cross_attention import CrossAttention
from torchblt.model.masks import SelfAttentionMask
from torchblt.model.transformer import (
    KVCacheLike,
    TransformerBlock,
    apply_rope_table,
    scaled_dot_product,
)

# Below this many weights the oneDNN call's fixed cost outweighs its better bandwidth (measured on the
# development machine, ``bench/generation.py --kernels``: from ~0.5M weights it is as fast as ``x @ W_t`` on
# one thread and faster on two).
PACK_MIN_ELEMENTS = 1 << 19


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight (out, in)`` in oneDNN's blocked layout for one-row fp32 CPU products (``torch.ops.mkldnn``: the
    operators torch.compile's CPU back-end uses; this and :func:`onednn_product` are the only callers)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def onednn_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for ``x (..., in)`` and ``packed = onednn_pack(W)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _checked_onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """:func:`onednn_pack` of ``weight``, or None where that is not available (other devices and dtypes,
    builds without oneDNN, matrices under :data:`PACK_MIN_ELEMENTS`) or gives wrong numbers."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.numel() < PACK_MIN_ELEMENTS
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        packed = onednn_pack(weight)
        probe = torch.linspace(-1, 1, weight.shape[1])[None]
        if not torch.allclose(onednn_product(probe, packed), probe @ weight.t(), rtol=1e-4,
                              atol=1e-4 * float(weight.abs().max())):
            return None
        return packed
    except (RuntimeError, AttributeError):  # op missing or unsupported in this build
        return None


class StepLinear:
    """``x @ W.T`` for ``x (..., in)`` and one or several ``nn.Linear`` (same input) side by side: large fp32
    CPU matrices in oneDNN's packed layout, the others input-major (``x @ W_t``)."""

    __slots__ = ("weight", "packed")

    def __init__(self, *linears: nn.Linear) -> None:
        with torch.no_grad():
            weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # (out, in)
        self.packed = _checked_onednn_pack(weight)
        self.weight = weight.t().contiguous() if self.packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return onednn_product(x, self.packed)
        return x @ self.weight

    def nbytes(self) -> int:
        w = self.packed if self.packed is not None else self.weight
        return w.numel() * w.element_size()


class StepBlock:
    """One :class:`~torchblt.model.transformer.TransformerBlock` for a decoding step: ``x (B, 1, D)``."""

    def __init__(self, block: TransformerBlock) -> None:
        attn, ffn = block.attention, block.feed_forward
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.hidden = ffn.w1.out_features
        self.qkv = StepLinear(attn.wq, attn.wk, attn.wv)
        self.wo = StepLinear(attn.wo)
        self.w13 = StepLinear(ffn.w1, ffn.w3)
        self.w2 = StepLinear(ffn.w2)
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm

    def __call__(
        self, x: torch.Tensor, rope: torch.Tensor, mask: SelfAttentionMask, cache: KVCacheLike
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(self.attention_norm.forward(x))  # (B, T, (H + 2 Hkv) Dh)
        # RoPE on queries and keys at once (the table broadcasts over heads)
        qk = apply_rope_table(qkv[..., : (H + Hkv) * Dh].unflatten(-1, (H + Hkv, Dh)), rope)
        q, k = qk[:, :, :H], qk[:, :, H:]
        v = qkv[..., (H + Hkv) * Dh :].unflatten(-1, (Hkv, Dh))
        k, v = cache.update(k, v)
        if mask.block_mask is not None:  # the caches build dense step masks; a block mask would be ignored
            raise ValueError("the decoding step takes dense masks (SelfAttentionMask.dense), not a FlexAttention one")
        out = scaled_dot_product(q, k, v, mask.dense, is_causal=mask.is_causal and mask.dense is None)
        h = x + self.wo(out.reshape(B, T, H * Dh))
        a1, a3 = self.w13(self.ffn_norm.forward(h)).split(self.hidden, dim=-1)
        return h + self.w2(F.silu(a1) * a3)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in (self.qkv, self.wo, self.w13, self.w2))


class StepCrossAttention:
    """A decoder :class:`~torchblt.model.cross_attention.CrossAttention` for a step: the query side per byte,
    :meth:`project_kv` once per closed patch."""

    def __init__(self, layer: CrossAttention) -> None:
        self.n_heads, self.head_dim = layer.n_heads, layer.head_dim
        self.wq, self.wo, self.wkv = StepLinear(layer.wq), StepLinear(layer.wo), StepLinear(layer.wk, layer.wv)
        self.norm_q, self.norm_kv = layer.cross_attn_norm_q, layer.cross_attn_norm_kv

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, Tk, H, Dh)`` of ``kv (B, Tk, D)``, as the module's ``project_kv``."""
        k, v = self.wkv(self.norm_kv.forward(kv)).unflatten(-1, (2 * self.n_heads, self.head_dim)).chunk(2, dim=2)
        return k, v

    def __call__(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The update for ``x (B, 1, D)`` given keys/values ``(B, Tk, H, Dh)`` and ``mask (B, 1, 1, Tk)``.
        Every decoding row sees at least one slot (the last closed patch), so no empty-row guard."""
        B, T, _ = x.shape
        q = self.wq(self.norm_q.forward(x)).unflatten(-1, (self.n_heads, self.head_dim))
        out = scaled_dot_product(q, k, v, mask)
        return self.wo(out.reshape(B, T, -1))

    def nbytes(self) -> int:
        return self.wq.nbytes() + self.wo.nbytes() + self.wkv.nbytes()


def step_blocks(layers: nn.ModuleList) -> list[StepBlock]:
    return [StepBlock(block) for block in layers]  # type: ignore[arg-type]
