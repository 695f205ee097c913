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

from torchblt.model.cross_attention import CrossAttention, double_residual, guarded
from torchblt.model.transformer import Linear, RMSNorm, StackCache, StackConfig, Transformer, embedding, trunc_normal_


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


def concat_patches(h: torch.Tensor, ends: torch.Tensor, patch_size: int, wrap: int | None = None) -> torch.Tensor:
    """Concatenate the last ``patch_size`` byte states before each patch end ``ends (B, P)`` (exclusive; the
    cumulative patch lengths): ``(B, P, patch_size * E)``; positions before 0 repeat position 0.

    ``wrap``: ``h`` is a ring of recent byte states (decoding) where position ``p`` sits at ``p % wrap``."""
    B, T, E = h.shape
    offsets = torch.arange(-patch_size, 0, device=h.device)
    rows = (ends[:, :, None] + offsets).clamp(min=0)  # (B, P, S)
    rows = rows.clamp(max=T - 1) if wrap is None else rows % wrap
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
        self.tok_embeddings = embedding(vocab_size, cfg.dim)
        self.patch_embedding_projection: Linear | None = None
        self.cross_attn_layers: nn.ModuleList | None = None
        if cross_attn:
            self.patch_embedding_projection = Linear(cfg.dim, cfg.dim * slots_per_patch, bias=False)
            n_cross = cfg.n_layers if cross_attn_all_layers else 1
            self.cross_attn_layers = nn.ModuleList(
                CrossAttention(cfg.dim, cross_attn_heads, cfg.norm_eps) for _ in range(n_cross)
            )

    def init_slots(self, h: torch.Tensor, patch_ids: torch.Tensor, n_patches: int) -> torch.Tensor:
        """The K query slots of every patch: max-pool the patch's bytes, project to K*E. ``(B, P*K, E)``."""
        B = h.shape[0]
        pooled = pool_patches(h, patch_ids, n_patches, ["amax"])
        assert self.patch_embedding_projection is not None
        return self.patch_embedding_projection(pooled).reshape(B, n_patches * self.slots_per_patch, self.cfg.dim)

    def cross_attends(self, layer_index: int) -> bool:
        """Does the output of block ``layer_index`` feed a patch cross-attention (the last block, or every one)?"""
        return self.cross_attn_layers is not None and (
            layer_index == len(self.layers) - 1 or self.cross_attn_all_layers
        )

    def state_layers(self) -> list[int]:
        """The blocks whose byte states the patch vectors are made from: the cross-attending ones, or the
        last block (pooling and concatenation read the encoder's output)."""
        cross = [i for i in range(len(self.layers)) if self.cross_attends(i)]
        return cross or [len(self.layers) - 1]

    def forward(
        self,
        tokens: torch.Tensor,
        embeds: torch.Tensor,
        patch_ids: torch.Tensor | None = None,
        n_patches: int = 0,
        cross_mask: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns byte states ``(B, T, E)`` and, with cross-attention, patch slots ``(B, P*K, E)``."""
        h, states = self.encode(tokens, embeds)
        slots = None
        if self.cross_attn_layers is not None:
            assert patch_ids is not None and cross_mask is not None
            slots = self.patch_slots(states[0], states, patch_ids, n_patches, cross_mask)
        return h, slots

    def encode(
        self, tokens: torch.Tensor, embeds: torch.Tensor, cache: StackCache | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks over bytes ``(B, T)``: their output ``(B, T, E)`` and the byte states of
        :meth:`state_layers`. With ``cache`` the bytes are new positions after the cached ones (a
        prefill chunk or a decoding step: :class:`~torchblt.model.transformer.StackCache`)."""
        mask, rope, caches = self.attention_inputs(tokens, cache)
        keep = self.state_layers()
        h, states = embeds, []
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, None if caches is None else caches[i])
            if i in keep:
                states.append(h)
        return h, states

    def cross_kv(self, states: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values ``(B, T, H, Dh)`` of the bytes for each cross-attention layer (byte states of
        :meth:`state_layers`, in order); they depend on the byte only, so a decoding step projects each
        byte once. (Outside the layers' ``forward``: for decoding, not for sharded training.)"""
        assert self.cross_attn_layers is not None
        return [layer.project_kv(h) for layer, h in zip(self.cross_attn_layers, states, strict=True)]  # type: ignore[operator]

    def patch_slots(
        self,
        pool_states: torch.Tensor,
        kv: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]],
        patch_ids: torch.Tensor,
        n_patches: int,
        cross_mask: Any,
    ) -> torch.Tensor:
        """The K slots of each of ``n_patches`` patches ``(B, P*K, E)``: initialised from the byte states
        ``pool_states (B, T, E)`` of the first state layer (:meth:`init_slots`), then cross-attending to
        the bytes through each cross-attention layer in turn: ``kv[j]`` is layer ``j``'s byte states
        ``(B, T, E)`` (:meth:`encode`), or their keys and values already projected (:meth:`cross_kv`).

        The bytes may be any positions (a forward's whole sequence, or a decoding cache of recent bytes):
        ``patch_ids (B, T)`` gives each byte's patch (``n_patches``: none), ``cross_mask`` which bytes each
        slot reads (``(B, 1, P*K, T)``, or any form :class:`~torchblt.model.cross_attention.CrossAttention` takes)."""
        assert self.cross_attn_layers is not None
        slots = self.init_slots(pool_states, patch_ids, n_patches)
        cross_mask = guarded(cross_mask, slots.dtype)  # the layers share it
        for layer, source in zip(self.cross_attn_layers, kv, strict=True):
            projected = source if isinstance(source, tuple) else None
            update = layer(slots, None if projected is not None else source, cross_mask, projected_kv=projected)
            slots = double_residual(slots, update)
        return slots

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
            Linear(input_dim, cfg.dim, bias=False) if input_dim != cfg.dim else None
        )

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return self.token_embedding_projection(h) if self.token_embedding_projection is not None else h

    def forward(  # type: ignore[override]
        self, h: torch.Tensor, global_tokens: torch.Tensor | None, cache: StackCache | None = None
    ) -> torch.Tensor:
        """``h (B, P, input_dim)``, ``global_tokens (B, P)`` (EOS for patches holding an EOS) -> ``(B, P, G)``.
        With ``cache`` the patches are new positions after the cached ones."""
        if cache is None:
            assert global_tokens is not None
            return self.run_layers(self.embed(h), self.self_attention_mask(global_tokens))
        return self.run_layers(self.embed(h), cache.mask, caches=cache.layers, rope=self.rope_for(cache.positions))

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
            Linear(global_dim, cfg.dim * self.slots_per_patch, bias=False) if global_dim != cfg.dim else None
        )
        self.cross_attn_layers: nn.ModuleList | None = None
        if cross_attn:
            n_cross = cfg.n_layers if cross_attn_all_layers else 1
            self.cross_attn_layers = nn.ModuleList(
                CrossAttention(cfg.dim, cross_attn_heads, cfg.norm_eps) for _ in range(n_cross)
            )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, vocab_size, bias=False)

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
        slots = self.patch_slots(h_global)
        if self.cross_attn_layers is None:
            return self.decode(tokens, self.add_patch_slots(h_enc, slots, decoder_patch_ids))
        return self.decode(tokens, h_enc, slots, cross_mask)

    def add_patch_slots(self, h_enc: torch.Tensor, slots: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Without cross-attention every byte gets the (projected) global output of its patch added:
        ``h_enc (B, T, D) + slots[index]``, ``slots (B, S, D)``, ``index (B, T)`` into ``S``."""
        return h_enc + torch.gather(slots, 1, index[:, :, None].expand(-1, -1, slots.shape[-1]))

    def cross_kv(self, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values ``(B, P*K, H, Dh)`` of the slots, one pair per cross-attention layer (they depend
        on the slots only: a decoding step projects each patch's once; outside the layers' ``forward``, so
        for decoding, not for sharded training)."""
        assert self.cross_attn_layers is not None
        return [layer.project_kv(slots) for layer in self.cross_attn_layers]  # type: ignore[operator]

    def decode(
        self,
        tokens: torch.Tensor,
        h: torch.Tensor,
        cross: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        cross_mask: Any = None,
        cache: StackCache | None = None,
    ) -> torch.Tensor:
        """The blocks (each after its cross-attention to the patch slots: ``cross`` = the slots ``(B, S, D)``,
        or per cross-attention layer their keys and values already projected (:meth:`cross_kv`);
        ``cross_mask``: any form :class:`~torchblt.model.cross_attention.CrossAttention` takes), the norm and
        the head: ``h (B, T, D)`` -> logits ``(B, T, V)`` fp32. With ``cache`` the
        bytes are new positions after the cached ones (:class:`~torchblt.model.transformer.StackCache`)."""
        mask, rope, caches = self.attention_inputs(tokens, cache)
        cross_mask = guarded(cross_mask, h.dtype)  # the cross-attention layers share it
        for i, layer in enumerate(self.layers):
            if self.uses_cross_attn(i):
                assert cross is not None and cross_mask is not None
                layer_kv = None if isinstance(cross, torch.Tensor) else cross[i if self.cross_attn_all_layers else 0]
                slots = cross if isinstance(cross, torch.Tensor) else None
                h = double_residual(h, self.cross_layer(i)(h, slots, cross_mask, projected_kv=layer_kv))
            h = layer(h, rope, mask, None if caches is None else caches[i])
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
