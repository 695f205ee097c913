"""The Byte Latent Transformer: embed, encode, pool into patches, global, decode.

Shape legend: B batch, T bytes, P patches, K slots per patch, E/G/D encoder/global/decoder widths,
V vocabulary (260).

``patch_lengths (B, P)``: first patch 1 (the BOS), every row sums to ``T + 1`` (the last patch may end
with the not-yet-seen next byte: the patcher's ``include_next_token=True``), zeros only as right padding.
Position i's logits predict byte i+1 and read the global output of the last patch that *ends before*
the patch of byte i+1 starts.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from torchblt.model.config import BLTConfig
from torchblt.model.entropy_model import EntropyModel
from torchblt.model.hash_embedding import HashNgramEmbedding
from torchblt.model.local import GlobalTransformer, LocalDecoder, LocalEncoder, concat_patches, pool_patches
from torchblt.model.masks import patch_cross_mask, patch_ids_from_lengths
from torchblt.model.transformer import trunc_normal_
from torchblt.patching import Patcher, attach_entropy_model
from torchblt.tokenizer import BOE_ID


def global_tokens_from_patches(tokens: torch.Tensor, patch_ids: torch.Tensor, n_patches: int, eos_id: int) -> torch.Tensor:
    """``(B, P)``: EOS for every patch that contains an EOS byte, BOE elsewhere (block-causal documents)."""
    B = tokens.shape[0]
    out = torch.full((B, n_patches + 1), BOE_ID, dtype=tokens.dtype, device=tokens.device)
    index = torch.where(tokens == eos_id, patch_ids, torch.full_like(patch_ids, n_patches))
    out.scatter_(1, index, eos_id)
    return out[:, :n_patches]


def check_patch_lengths(patch_lengths: torch.Tensor, tokens: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``patch_lengths`` follows the forward's contract."""
    B, T = tokens.shape
    if patch_lengths.dim() != 2 or patch_lengths.shape[0] != B:
        raise ValueError(f"patch_lengths must be (B={B}, P), got shape {tuple(patch_lengths.shape)}")
    if patch_lengths.dtype.is_floating_point:
        raise ValueError("patch_lengths must be an integer tensor")
    if (patch_lengths < 0).any():
        raise ValueError("patch_lengths must be non-negative")
    if (patch_lengths[:, 0] != 1).any():
        raise ValueError(
            f"the first patch must be the BOS alone (length 1), got {patch_lengths[:, 0].tolist()}; "
            "split it with torchblt.patching.split_first_patch"
        )
    sums = patch_lengths.sum(1)
    if (sums != T + 1).any():
        raise ValueError(
            f"every row of patch_lengths must sum to T + 1 = {T + 1} (include_next_token=True), got {sums.tolist()}"
        )


class BLT(nn.Module):
    """Byte Latent Transformer. ``blt(tokens (B, T), patch_lengths (B, P)) -> logits (B, T, V) float32``.

    A plain ``nn.Module``: its state is its weights and ``config``. The patcher belongs to the caller: with
    ``patch_lengths=None`` the input is patched by ``patcher=`` (default
    :meth:`Patcher.for_model(blt) <torchblt.patching.Patcher.for_model>`: ``config.patching`` and the entropy
    model attached by ``load_model`` / :func:`torchblt.patching.attach_entropy_model`, if any).
    """

    def __init__(self, config: BLTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        ca = config.cross_attn
        self.local_encoder = LocalEncoder(
            config.encoder, vocab_size=config.vocab_size, cross_attn=ca.encoder, slots_per_patch=ca.k,
            cross_attn_heads=ca.n_heads, cross_attn_all_layers=ca.all_layers_encoder, eos_id=config.eos_id,
        )
        self.global_transformer = GlobalTransformer(config.global_, input_dim=config.global_input_dim,
                                                    eos_id=config.eos_id)
        self.local_decoder = LocalDecoder(
            config.decoder, global_dim=config.global_.dim, vocab_size=config.vocab_size, cross_attn=ca.decoder,
            slots_per_patch=ca.k, cross_attn_heads=ca.n_heads, cross_attn_all_layers=ca.all_layers_decoder,
            eos_id=config.eos_id,
        )
        h = config.hash
        self.encoder_hash_tok_embedding = (
            HashNgramEmbedding(h.group_sizes, h.vocab_size, h.n_functions, config.encoder.dim) if h else None
        )

    # ------------------------------------------------------------------ deprecated: patching state on the model
    @property
    def patcher(self) -> Patcher:
        """Deprecated: ``Patcher.for_model(model)`` (a new patcher on every access)."""
        warnings.warn("BLT.patcher is deprecated: use torchblt.Patcher.for_model(model)", DeprecationWarning,
                      stacklevel=2)
        return Patcher.for_model(self)

    def attach_entropy_model(self, entropy_model: EntropyModel | None) -> None:
        """Deprecated: ``torchblt.patching.attach_entropy_model(model, entropy_model)``, or pass
        ``patcher=Patcher(model.config.patching, entropy_model)`` where the model is called."""
        warnings.warn("BLT.attach_entropy_model is deprecated: use torchblt.patching.attach_entropy_model(model, em) "
                      "or pass a Patcher (patcher=Patcher(model.config.patching, em))", DeprecationWarning, stacklevel=2)
        attach_entropy_model(self, entropy_model)

    # ------------------------------------------------------------------ pieces of the forward
    def embed(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Byte embeddings plus hash n-gram embeddings, summed in the reference's order. ``(B, T, E)``.
        ``context (B, C)``: the bytes before ``tokens`` (decoding), for the n-grams that reach back."""
        e = self.local_encoder.tok_embeddings(tokens)
        if self.encoder_hash_tok_embedding is not None:
            e = self.encoder_hash_tok_embedding.add_to(e, tokens, context)
        return e

    def patch_vectors(
        self, h_enc: torch.Tensor, slots: torch.Tensor | None, patch_ids: torch.Tensor, patch_lengths: torch.Tensor
    ) -> torch.Tensor:
        """The global model's inputs ``(B, P, global_input_dim)``."""
        B, P = patch_lengths.shape
        if slots is not None:
            return slots.reshape(B, P, -1)  # (B, P*K, E) -> (B, P, K*E)
        if self.config.pooling:
            return pool_patches(h_enc, patch_ids, P, self.config.pooling_modes)
        return concat_patches(h_enc, torch.cumsum(patch_lengths, dim=1), self.config.concat_patch_size)

    def forward(
        self, tokens: torch.Tensor, patch_lengths: torch.Tensor | None = None, *, patcher: Patcher | None = None
    ) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        if patch_lengths is None:
            patcher = patcher if patcher is not None else Patcher.for_model(self)
            patch_lengths, _ = patcher.patch(tokens, include_next_token=True)
        check_patch_lengths(patch_lengths, tokens)
        cfg, ca = self.config, self.config.cross_attn
        B, T = tokens.shape
        P = patch_lengths.shape[1]

        # embed + encode: bytes -> byte states and K slots per patch
        patch_ids = patch_ids_from_lengths(patch_lengths, T)  # (B, T)
        enc_mask = (patch_cross_mask(patch_ids, P, ca.k, patches_as_queries=True, window=ca.window_encoder)
                    if ca.encoder else None)
        h_enc, slots = self.local_encoder(tokens, self.embed(tokens), patch_ids, P, enc_mask)

        # pool into patches + global transformer over patches
        h = self.patch_vectors(h_enc, slots, patch_ids, patch_lengths)
        h = self.global_transformer(h, global_tokens_from_patches(tokens, patch_ids, P, cfg.eos_id))  # (B, P, G)

        # decode: byte i reads the patch before the one holding byte i+1
        dec_patch_ids = patch_ids_from_lengths(patch_lengths[:, 1:], T)  # (B, T)
        dec_mask = (patch_cross_mask(dec_patch_ids, P, ca.k, patches_as_queries=False, window=ca.window_decoder)
                    if ca.decoder else None)
        return self.local_decoder(tokens, h_enc, h, dec_patch_ids, dec_mask)

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Truncated normal (±3 std) everywhere: byte and hash embeddings ``E^-0.5``; block inputs
        ``dim^-0.5`` and outputs ``hidden^-0.5``, divided by ``sqrt(2 (layer + 1))``; projections
        ``in_features^-0.5``; head ``D^-0.5``; norms 1 (the reference's ``current_depth`` scheme)."""
        self.local_encoder.init_weights()
        self.global_transformer.init_weights()
        self.local_decoder.init_weights(self.config.global_.dim)
        for table in self.encoder_hash_tok_embedding or []:
            trunc_normal_(table.weight, self.config.encoder.dim**-0.5)
