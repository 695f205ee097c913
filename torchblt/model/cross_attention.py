"""Cross-attention between patches and bytes.

Shape legend: B batch, Tq queries, Tk keys, H heads, Dh = D // H head width.

No RoPE, no biases; queries and keys/values are RMS-normalised first. Queries that may see no key
(zero-length padding patches) get an output of exactly 0, as the reference's FlexAttention does.

Three forms of the same visibility rule: a dense boolean mask (SDPA), a FlexAttention ``BlockMask``, or
a :class:`~torchblt.model.masks.PatchCrossMask` (the full forward's default on SDPA): every byte is paired
with the ``window * k`` slots of the patches it may meet (:func:`gathered_cross_attention`), so the work
is ``O(T * k * window)`` however many patches there are, instead of ``O(T * P * k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchblt.model.masks import PatchCrossMask
from torchblt.model.transformer import Linear, RMSNorm, flex_attention, scaled_dot_product, trunc_normal_


@dataclass
class GuardedMask:
    """A dense boolean mask with its empty-query guard worked out (:func:`guarded`): ``safe (B, 1, Tq, Tk)``
    lets a query that sees no key see every key (finite numbers, no NaN gradients) and ``scale (B, Tq, 1, 1)``
    then zeroes its output. The cross-attention layers of one call share a mask; this works it out once."""

    safe: torch.Tensor
    scale: torch.Tensor


def guarded(mask: Any, dtype: torch.dtype) -> Any:
    """A dense boolean ``mask (B, 1, Tq, Tk)`` as a :class:`GuardedMask` (outputs in ``dtype``); any other
    form (a FlexAttention ``BlockMask``, a :class:`PatchCrossMask`, a ``GuardedMask``) as it is."""
    if not isinstance(mask, torch.Tensor):
        return mask
    has_key = mask.any(-1, keepdim=True)  # (B, 1, Tq, 1)
    return GuardedMask(safe=mask | ~has_key, scale=has_key[:, 0, :, :, None].to(dtype))


def gathered_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PatchCrossMask) -> torch.Tensor:
    """Softmax attention under a :class:`PatchCrossMask`, linear in the bytes: ``(B, Tq, H, Dh)`` out.

    Bytes as queries (``q (B, T, H, Dh)``, slots ``k, v (B, P*K, H, Dh)``): each byte gathers the keys of
    its ``window * K`` slots and takes a softmax over them. Slots as queries (``q (B, P*K, H, Dh)``, bytes
    ``k, v (B, T, H, Dh)``): each byte meets its slots' queries, and the softmax over the bytes of each
    slot is a segment softmax (per-slot max, ``exp``, sums by ``scatter_add``; the max is a constant
    shift, so it carries no gradient). Scores and sums are fp32 (autocast off: it would round the einsums
    back to bf16); queries with no visible key give 0."""
    with torch.autocast(q.device.type, enabled=False):
        return _gathered(q, k, v, mask)


def _gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PatchCrossMask) -> torch.Tensor:
    index, valid = mask.slot_index()  # (B, T, J): J = window * K slots per byte
    B, T, J = index.shape
    H, Dh = q.shape[2], q.shape[3]
    slots = k if not mask.patches_as_queries else q
    flat = (index + torch.arange(B, device=index.device)[:, None, None] * slots.shape[1]).reshape(-1)

    def per_byte(x: torch.Tensor) -> torch.Tensor:  # (B, P*K, H, Dh) -> (B, T, J, H, Dh)
        return x.reshape(-1, H, Dh).index_select(0, flat).view(B, T, J, H, Dh)

    scale = Dh**-0.5
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32 scores and sums (fp64 stays fp64)
    if not mask.patches_as_queries:
        scores = torch.einsum("bthd,btjhd->btjh", q.to(ct), per_byte(k).to(ct)) * scale
        scores = scores.masked_fill(~valid[..., None], float("-inf"))
        seen = valid.any(-1)  # (B, T)
        weights = torch.softmax(scores.masked_fill(~seen[:, :, None, None], 0.0), dim=2)
        out = torch.einsum("btjh,btjhd->bthd", weights, per_byte(v).to(ct))
        return (out * seen[:, :, None, None]).to(q.dtype)
    # slots read bytes: scores of every (byte, slot) pair, then a softmax over each slot's bytes
    PK = q.shape[1]
    scores = torch.einsum("btjhd,bthd->btjh", per_byte(q).to(ct), k.to(ct)) * scale
    scores = scores.masked_fill(~valid[..., None], float("-inf"))
    target = torch.where(valid, index, PK)[..., None].expand(B, T, J, H).reshape(B, T * J, H)  # PK: a spare row
    s = scores.reshape(B, T * J, H)
    with torch.no_grad():
        top = torch.full((B, PK + 1, H), float("-inf"), dtype=ct, device=q.device).scatter_reduce(1, target, s, "amax")
        top = torch.nan_to_num(top, neginf=0.0)  # slots with no byte
    e = torch.exp(s - top.gather(1, target))  # (B, T*J, H); 0 for pairs the rule forbids
    denom = torch.zeros(B, PK + 1, H, dtype=ct, device=q.device).scatter_add(1, target, e)
    vb = v.to(ct)[:, :, None].expand(B, T, J, H, Dh).reshape(B, T * J, H, Dh)
    num = torch.zeros(B, PK + 1, H, Dh, dtype=ct, device=q.device).scatter_add(
        1, target[..., None].expand(B, T * J, H, Dh), e[..., None] * vb
    )
    out = num[:, :PK] / denom[:, :PK, :, None].clamp(min=torch.finfo(ct).tiny)
    return out.to(q.dtype)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by its {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        inner = n_heads * self.head_dim
        self.cross_attn_norm_q = RMSNorm(dim, norm_eps)
        self.cross_attn_norm_kv = RMSNorm(dim, norm_eps)
        self.wq = Linear(dim, inner, bias=False)
        self.wk = Linear(dim, inner, bias=False)
        self.wv = Linear(dim, inner, bias=False)
        self.wo = Linear(inner, dim, bias=False)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, Tk, H, Dh)`` of ``kv (B, Tk, D)`` (cacheable: they depend on ``kv`` only)."""
        B, Tk, _ = kv.shape
        kv = self.cross_attn_norm_kv(kv)
        k = self.wk(kv).view(B, Tk, self.n_heads, self.head_dim)
        v = self.wv(kv).view(B, Tk, self.n_heads, self.head_dim)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None,
        mask: Any,
        projected_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The attention update ``wo(attn(norm(x), norm(kv)))`` for ``x (B, Tq, D)``; ``mask (B, 1, Tq, Tk)``.

        ``mask`` may also be a FlexAttention ``BlockMask``, a :class:`PatchCrossMask` or a :class:`GuardedMask`. The
        caller adds the residual (see :func:`double_residual`).
        """
        B, Tq, _ = x.shape
        q = self.wq(self.cross_attn_norm_q(x)).view(B, Tq, self.n_heads, self.head_dim)
        k, v = projected_kv if projected_kv is not None else self.project_kv(kv)  # type: ignore[arg-type]
        if isinstance(mask, PatchCrossMask):
            return self.wo(gathered_cross_attention(q, k, v, mask).reshape(B, Tq, -1))
        if isinstance(mask, torch.Tensor):
            mask = guarded(mask, q.dtype)
        if not isinstance(mask, GuardedMask):
            return self.wo(flex_attention(q, k, v, mask).reshape(B, Tq, -1))
        # queries with no visible key attend to everything (finite numbers, no NaN gradients), then get 0
        out = scaled_dot_product(q, k, v, mask.safe)  # (B, Tq, H, Dh)
        out = out * (mask.scale if mask.scale.dtype == out.dtype else mask.scale.to(out.dtype))
        return self.wo(out.reshape(B, Tq, -1))

    def init_weights(self, std: float) -> None:
        for w in (self.wq, self.wk, self.wv, self.wo):
            trunc_normal_(w.weight, std)
        self.cross_attn_norm_q.reset_parameters()
        self.cross_attn_norm_kv.reset_parameters()


def double_residual(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + (x + update)``: the reference's cross-attention returns ``x + update`` and its callers add ``x``
    again. The released weights were trained with this, so we keep it (and its rounding order)."""
    return x + (x + update)
