"""Local encoder and decoder: light byte-level transformers around the global model.

Shape legend: B batch, T bytes, P patches, K cross-attention slots per patch, E encoder width,
D decoder width, G global width.

Encoder: byte (+ hash n-gram) embeddings -> self-attention blocks (document-masked sliding window);
after the last block (or every block) the patches' K slots, initialised by max-pooling each patch's
byte states and projecting them to K*E, cross-attend to their patch's bytes.

Decoder: input = the encoder's byte states; before the first block (or every block) each byte
cross-attends to the K slots made from the global output of the *previous* patch; then the blocks, a
final norm and the 260-way head (fp32 logits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchblt.model.cross_attention import CrossAttention, double_residual
from torchblt.model.masks import SelfAttentionMask, build_self_attention_mask
from torchblt.model.transformer import RMSNorm, StackConfig, Transformer, trunc_normal_


def pool_patches(h: torch.Tensor, patch_ids: torch.Tensor, n_patches: int, reductions: list[str]) -> torch.Tensor:
    """Pool byte states ``h (B, T, E)`` into ``(B, P, E * len(reductions))``; empty patches are exactly 0.

    ``patch_ids (B, T)`` may contain ``P`` for bytes outside every patch: those are dropped.
    """
    B, T, E = h.shape
    index = patch_ids[:, :, None].expand(B, T, E)
    pooled = []
    for reduce in reductions:
        out = h.new_zeros(B, n_patches + 1, E)  # one spare row collects bytes outside every patch
        out = out.scatter_reduce(1, index, h, reduce=reduce, include_self=False)
        pooled.append(out[:, :n_patches])
    return torch.cat(pooled, dim=-1)


def concat_patches(h: torch.Tensor, patch_lengths: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Concatenate the last ``patch_size`` byte states before each patch end: ``(B, P, patch_size * E)``."""
    B, T, E = h.shape
    ends = torch.cumsum(patch_lengths, dim=1)  # (B, P)
    offsets = torch.arange(-patch_size, 0, device=h.device)
    rows = (ends[:, :, None] + offsets).clamp(min=0, max=T - 1)  # (B, P, S)
    gathered = torch.gather(h, 1, rows.reshape(B, -1, 1).expand(B, rows.shape[1] * patch_size, E))
    return gathered.reshape(B, rows.shape[1], patch_size * E)


class LocalEncoder(Transformer):
    """Byte embeddings -> blocks -> (optional) patch cross-attention. Names follow the reference."""

    def __init__(
        self,
        cfg: StackConfig,
        *,
        vocab_size: int,
        cross_attn: bool,
        slots_per_patch: int,
        cross_attn_heads: int,
        cross_attn_all_layers: bool,
        eos_id: int,
    ) -> None:
        super().__init__(cfg)
        self.eos_id = eos_id
        self.slots_per_patch = slots_per_patch
        self.cross_attn_all_layers = cross_attn_all_layers
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.patch_embedding_projection: nn.Linear | None = None
        self.cross_attn_layers: nn.ModuleList | None = None
        if cross_attn:
            self.patch_embedding_projection = nn.Linear(cfg.dim, cfg.dim * slots_per_patch, bias=False)
            n_cross = cfg.n_layers if cross_attn_all_layers else 1
            self.cross_attn_layers = nn.ModuleList(
                CrossAttention(cfg.dim, cross_attn_heads, cfg.norm_eps) for _ in range(n_cross)
            )

    def self_attention_mask(self, tokens: torch.Tensor) -> SelfAttentionMask:
        return build_self_attention_mask(tokens, self.cfg.attention, self.cfg.window, self.eos_id)

    def init_slots(self, h: torch.Tensor, patch_ids: torch.Tensor, n_patches: int) -> torch.Tensor:
        """The K query slots of every patch: max-pool the patch's bytes, project to K*E. ``(B, P*K, E)``."""
        B = h.shape[0]
        pooled = pool_patches(h, patch_ids, n_patches, ["amax"])
        assert self.patch_embedding_projection is not None
        return self.patch_embedding_projection(pooled).reshape(B, n_patches * self.slots_per_patch, self.cfg.dim)

    def forward(
        self,
        tokens: torch.Tensor,
        embeds: torch.Tensor,
        patch_ids: torch.Tensor | None = None,
        n_patches: int = 0,
        cross_mask: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns byte states ``(B, T, E)`` and, with cross-attention, patch slots ``(B, P*K, E)``."""
        mask = self.self_attention_mask(tokens)
        rope = self.rope_for(torch.arange(tokens.shape[1], device=tokens.device)[None])
        h = embeds
        slots = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask)
            if self.cross_attn_layers is not None and (i == last or self.cross_attn_all_layers):
                if slots is None:
                    assert patch_ids is not None and cross_mask is not None
                    slots = self.init_slots(h, patch_ids, n_patches)
                cross = self.cross_attn_layers[i if self.cross_attn_all_layers else 0]
                slots = double_residual(slots, cross(slots, h, cross_mask))
        return h, slots

    def init_weights(self) -> None:  # type: ignore[override]
        """Embeddings ``E^-0.5``; blocks depth-scaled; projection ``E^-0.5``; cross-attention ``E^-0.5 / factor``."""
        super().init_weights(depth_scaled=True)
        e = self.cfg.dim
        trunc_normal_(self.tok_embeddings.weight, e**-0.5)
        if self.patch_embedding_projection is not None:
            trunc_normal_(self.patch_embedding_projection.weight, e**-0.5)
        for i, layer in enumerate(self.cross_attn_layers or []):
            layer.init_weights(e**-0.5 / (2 * (i + 1)) ** 0.5)


class GlobalTransformer(Transformer):
    """The latent transformer over patches; an input projection when the patch vectors are wider."""

    def __init__(self, cfg: StackConfig, *, input_dim: int, eos_id: int) -> None:
        super().__init__(cfg)
        self.eos_id = eos_id
        self.token_embedding_projection = (
            nn.Linear(input_dim, cfg.dim, bias=False) if input_dim != cfg.dim else None
        )

    def self_attention_mask(self, global_tokens: torch.Tensor) -> SelfAttentionMask:
        return build_self_attention_mask(global_tokens, self.cfg.attention, self.cfg.window, self.eos_id)

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return self.token_embedding_projection(h) if self.token_embedding_projection is not None else h

    def forward(self, h: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``h (B, P, input_dim)``, ``global_tokens (B, P)`` (EOS for patches holding an EOS) -> ``(B, P, G)``."""
        return self.run_layers(self.embed(h), self.self_attention_mask(global_tokens))

    def init_weights(self) -> None:  # type: ignore[override]
        super().init_weights(depth_scaled=True)
        if self.token_embedding_projection is not None:
            trunc_normal_(self.token_embedding_projection.weight, self.token_embedding_projection.in_features**-0.5)


class LocalDecoder(Transformer):
    """Cross-attention to previous patches + blocks + norm + head. Names follow the reference."""

    def __init__(
        self,
        cfg: StackConfig,
        *,
        global_dim: int,
        vocab_size: int,
        cross_attn: bool,
        slots_per_patch: int,
        cross_attn_heads: int,
        cross_attn_all_layers: bool,
        eos_id: int,
    ) -> None:
        super().__init__(cfg)
        self.eos_id = eos_id
        self.slots_per_patch = slots_per_patch if cross_attn else 1
        self.cross_attn_all_layers = cross_attn_all_layers
        self.patch_embedding_projection = (
            nn.Linear(global_dim, cfg.dim * self.slots_per_patch, bias=False) if global_dim != cfg.dim else None
        )
        self.cross_attn_layers: nn.ModuleList | None = None
        if cross_attn:
            n_cross = cfg.n_layers if cross_attn_all_layers else 1
            self.cross_attn_layers = nn.ModuleList(
                CrossAttention(cfg.dim, cross_attn_heads, cfg.norm_eps) for _ in range(n_cross)
            )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)

    def self_attention_mask(self, tokens: torch.Tensor) -> SelfAttentionMask:
        return build_self_attention_mask(tokens, self.cfg.attention, self.cfg.window, self.eos_id)

    def patch_slots(self, h_global: torch.Tensor) -> torch.Tensor:
        """Global outputs ``(B, P, G)`` -> key/value slots ``(B, P*K, D)`` (or ``(B, P, D)`` without cross-attn)."""
        if self.patch_embedding_projection is None:
            return h_global
        B, P, _ = h_global.shape
        return self.patch_embedding_projection(h_global).reshape(B, P * self.slots_per_patch, self.cfg.dim)

    def uses_cross_attn(self, layer_index: int) -> bool:
        return self.cross_attn_layers is not None and (layer_index == 0 or self.cross_attn_all_layers)

    def cross_layer(self, layer_index: int) -> CrossAttention:
        assert self.cross_attn_layers is not None
        return self.cross_attn_layers[layer_index if self.cross_attn_all_layers else 0]  # type: ignore[return-value]

    def forward(
        self,
        tokens: torch.Tensor,
        h_enc: torch.Tensor,
        h_global: torch.Tensor,
        decoder_patch_ids: torch.Tensor,
        cross_mask: Any,
    ) -> torch.Tensor:
        """The encoder's byte states ``h_enc (B, T, D)`` and global outputs ``(B, P, G)`` -> logits (fp32)."""
        mask = self.self_attention_mask(tokens)
        rope = self.rope_for(torch.arange(tokens.shape[1], device=tokens.device)[None])
        slots = self.patch_slots(h_global)
        if self.cross_attn_layers is None:
            # no cross-attention: add the previous patch's (projected) global output to every byte
            index = decoder_patch_ids[:, :, None].expand(-1, -1, slots.shape[-1])
            h = h_enc + torch.gather(slots, 1, index)
        else:
            h = h_enc
        for i, layer in enumerate(self.layers):
            if self.uses_cross_attn(i):
                assert cross_mask is not None
                h = double_residual(h, self.cross_layer(i)(h, slots, cross_mask))
            h = layer(h, rope, mask)
        return self.head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()

    def init_weights(self, global_dim: int) -> None:  # type: ignore[override]
        super().init_weights(depth_scaled=True)
        d = self.cfg.dim
        self.norm.reset_parameters()
        trunc_normal_(self.output.weight, d**-0.5)
        if self.patch_embedding_projection is not None:
            trunc_normal_(self.patch_embedding_projection.weight, global_dim**-0.5)
        for i, layer in enumerate(self.cross_attn_layers or []):
            layer.init_weights(d**-0.5 / (2 * (i + 1)) ** 0.5)
