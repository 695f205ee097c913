"""Cross-attention between patches and bytes.

Shape legend: B batch, Tq queries, Tk keys, H heads, Dh = D // H head width.

No RoPE, no biases; queries and keys/values are RMS-normalised first. Queries that may see no key
(zero-length padding patches) get an output of exactly 0, as the reference's FlexAttention does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchblt.model.transformer import RMSNorm, flex_attention, scaled_dot_product, trunc_normal_


class CrossAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by its {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        inner = n_heads * self.head_dim
        self.cross_attn_norm_q = RMSNorm(dim, norm_eps)
        self.cross_attn_norm_kv = RMSNorm(dim, norm_eps)
        self.wq = nn.Linear(dim, inner, bias=False)
        self.wk = nn.Linear(dim, inner, bias=False)
        self.wv = nn.Linear(dim, inner, bias=False)
        self.wo = nn.Linear(inner, dim, bias=False)

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

        ``mask`` may also be a FlexAttention ``BlockMask``. The caller adds the residual (see :func:`double_residual`).
        """
        B, Tq, _ = x.shape
        q = self.wq(self.cross_attn_norm_q(x)).view(B, Tq, self.n_heads, self.head_dim)
        k, v = projected_kv if projected_kv is not None else self.project_kv(kv)  # type: ignore[arg-type]
        if not isinstance(mask, torch.Tensor):
            return self.wo(flex_attention(q, k, v, mask).reshape(B, Tq, -1))
        has_key = mask.any(-1, keepdim=True)  # (B, 1, Tq, 1)
        # rows with no visible key: attend to everything (finite numbers, no NaN gradients), then zero
        safe = mask | ~has_key
        out = scaled_dot_product(q, k, v, safe)  # (B, Tq, H, Dh)
        out = out * has_key[:, 0, :, :, None].to(out.dtype)
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
