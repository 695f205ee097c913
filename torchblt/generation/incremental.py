"""Incremental BLT decoding: a parallel prefill, then one cheap step per byte.

Shape legend: B rows, L prompt length, T bytes so far, P patches, Pc closed patches, K slots per patch,
E encoder width (= decoder width D), G global width, V vocabulary.

Per new byte ``x[T]`` a step runs

1. one step of the entropy model (its sliding-window KV cache) -> ``E[T]``;
2. the patch decision for the *next* position ``T + 1`` (:mod:`.boundaries`, the patcher's rule with
   ``include_next_token=True``);
3. one step of the local encoder (self-attention KV cache; hash n-grams from the last 8 bytes);
4. for the rows whose decision closes the patch holding ``x[T]``: its encoder slots (pooled from and
   cross-attending to exactly that patch's bytes), **one step of the global transformer** (global KV
   cache), and the decoder's cross-attention keys/values of the new global output;
5. one step of the local decoder (self-attention KV cache; cross-attention to the slots of the last
   closed patch) -> the logits for ``x[T + 1]``.

Why this equals the full forward: every patching rule is causal, so patch boundaries never move once
decided; the global model is (block-)causal over patches, so the output of a closed patch never
changes; and the decoder at byte ``i`` reads only the patch *before* the one holding byte ``i + 1``,
which is always closed — the full forward's slot for the still-open patch (pooled over the bytes seen
so far) reaches nothing a logit depends on. Local self-attention is document-masked (EOS ends a
document) with a sliding window; RoPE positions keep counting, and the caches carry each key's
position and document so the step mask is exact. Rows are independent: each keeps its own positions,
documents, patch boundaries and global cache length; rows that finish are dropped from every cache.

The steps run on decode-layout copies of the layer weights (:mod:`.fused`; ``fused=False`` runs the
modules) and are otherwise the modules' math.

Memory: the entropy, encoder and decoder caches are ring buffers of ``window`` positions (bounded
however long the text); the global cache holds one key/value per closed patch and layer; the decoder
keeps cross-attention keys/values for the last ``cross_attn.window_decoder`` (or 1) patches; the
encoder keeps the byte states of the open patch (and of the ``window_encoder - 1`` patches before it).
"""

from __future__ import annotations

import torch

from torchblt.generation.boundaries import (
    IncrementalStarts,
    check_incremental,
    finish_starts,
    last_raw_start,
    raw_prompt_starts,
)
from torchblt.generation.cache import GlobalKV, PatchSlotKV, Recorder, StackKV
from torchblt.generation.fused import StepCrossAttention, StepLinear, step_blocks
from torchblt.model.blt import BLT, global_tokens_from_patches
from torchblt.model.cross_attention import double_residual
from torchblt.model.entropy_model import EntropyModel, entropy
from torchblt.model.local import pool_patches
from torchblt.model.masks import (
    SelfAttentionMask,
    build_self_attention_mask,
    cross_attention_mask,
    document_ids,
    patch_ids_from_lengths,
    uses_documents,
    uses_window,
)
from torchblt.model.transformer import StackConfig
from torchblt.patching import Patcher, lengths_from_start_mask


def _dense_self_mask(cfg: StackConfig, tokens: torch.Tensor, eos_id: int) -> SelfAttentionMask:
    """The full-forward self-attention mask as an explicit boolean tensor (SDPA on every device: the
    prefill records keys/values through the caches)."""
    return build_self_attention_mask(tokens, cfg.attention, cfg.window, eos_id, dense=True)


def _stack_kv(cfg: StackConfig, batch: int, total: int, dtype: torch.dtype, device: torch.device) -> StackKV:
    window = cfg.window if uses_window(cfg.attention) else None
    capacity = min(window, total) if window is not None else total
    return StackKV(cfg.n_layers, batch, capacity, cfg.resolved_n_kv_heads, cfg.resolved_head_dim, window,
                   uses_documents(cfg.attention), dtype, device)


def _has_hooks(model: torch.nn.Module) -> bool:
    """Is a forward (pre-)hook registered on ``model``, one of its modules, or globally?"""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class IncrementalEngine:
    """Cached decoding with the same interface as :class:`~torchblt.generation.reference.FullRecomputeEngine`:
    ``start(prompts) -> logits (B, V)``, ``advance(next_ids (B,)) -> logits (B, V)``, ``select(rows)``,
    ``next_starts`` (does the byte about to be appended start a patch), ``prompt_starts``."""

    def __init__(self, model: BLT, patcher: Patcher, max_new_bytes: int, fused: bool | None = None) -> None:
        """``fused``: run the steps on decode-layout copies of the layer weights (:mod:`.fused`: fused
        q/k/v and w1/w3, input-major; faster, costs memory equal to the transformer layers' weights);
        ``False`` runs the model's modules; ``None`` (default): fused unless a forward hook is registered
        on the model or the entropy model (hooks see the modules' calls, which the fused step skips)."""
        check_incremental(patcher)
        self.model, self.patcher = model, patcher
        self.max_new_bytes = max_new_bytes
        self.em: EntropyModel | None = None
        if patcher.mode == "entropy":
            if patcher.entropy_model is None:
                raise ValueError("entropy patching needs an entropy model: pass entropy_model=... or attach one")
            self.em = patcher.entropy_model
            self.em_device = next(self.em.parameters()).device
        cfg = model.config
        self.cfg = cfg
        self.eos = cfg.eos_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        enc = model.local_encoder
        self.enc_cross = enc.cross_attn_layers is not None
        n = cfg.encoder.n_layers
        # which encoder layers' byte states a closing patch needs (slots: init + cross-attention)
        if self.enc_cross and enc.cross_attn_all_layers:
            self.state_layers = list(range(n))
        else:
            self.state_layers = [n - 1]
        self.enc_window = cfg.cross_attn.window_encoder if self.enc_cross else None
        self.concat_size = cfg.concat_patch_size if (not self.enc_cross and not cfg.pooling) else 0
        self.dec_cross = model.local_decoder.cross_attn_layers is not None
        self.dec_window = (cfg.cross_attn.window_decoder or 1) if self.dec_cross else 1
        self.tail_width = max([2] + (cfg.hash.group_sizes if cfg.hash else []))
        self.prompt_starts: list[list[bool]] = []
        if fused is None:
            fused = not any(_has_hooks(m) for m in (model, self.em) if m is not None)
        self.fused = fused
        self._build_step(model)

    def _build_step(self, model: BLT) -> None:
        """What a step calls: the blocks, the decoder's cross-attention queries and the heads — the
        model's modules, or their decode-layout copies (``fused``)."""
        enc, gt, dec = model.local_encoder, model.global_transformer, model.local_decoder
        dec_cross = list(dec.cross_attn_layers) if dec.cross_attn_layers is not None else []
        if self.fused:
            self.enc_blocks, self.g_blocks, self.dec_blocks = (
                step_blocks(enc.layers), step_blocks(gt.layers), step_blocks(dec.layers))
            self.dec_output = StepLinear(dec.output)
            self.dec_cross_steps = [StepCrossAttention(layer) for layer in dec_cross]
            self.dec_project_kv = [layer.project_kv for layer in self.dec_cross_steps]
            g_proj = gt.token_embedding_projection
            self.g_embed = StepLinear(g_proj) if g_proj is not None else gt.embed
            proj = dec.patch_embedding_projection
            self.dec_patch_proj = StepLinear(proj) if proj is not None else None
            if self.em is not None:
                self.em_blocks = step_blocks(self.em.layers)
                self.em_output = StepLinear(self.em.output)
        else:
            self.enc_blocks, self.g_blocks, self.dec_blocks = list(enc.layers), list(gt.layers), list(dec.layers)
            self.dec_output = dec.output
            self.dec_cross_steps = [
                (lambda x, k, v, mask, layer=layer: layer(x, None, mask, projected_kv=(k, v))) for layer in dec_cross
            ]
            self.dec_project_kv = [layer.project_kv for layer in dec_cross]
            self.g_embed = gt.embed
            self.dec_patch_proj = dec.patch_embedding_projection
            if self.em is not None:
                self.em_blocks = list(self.em.layers)
                self.em_output = self.em.output

    def step_weight_bytes(self) -> int:
        """Memory held by the decode-layout weight copies (0 when not ``fused``)."""
        if not self.fused:
            return 0
        parts = [*self.enc_blocks, *self.g_blocks, *self.dec_blocks, self.dec_output, *self.dec_cross_steps]
        parts += [p for p in (self.g_embed, self.dec_patch_proj) if isinstance(p, StepLinear)]
        if self.em is not None:
            parts += [*self.em_blocks, self.em_output]
        return sum(p.nbytes() for p in parts)

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def start(self, prompts: list[list[int]]) -> torch.Tensor:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (the BOS)")
        B = len(prompts)
        total = max(len(p) for p in prompts) + self.max_new_bytes + 1
        cfg, dev, dt = self.cfg, self.device, self.dtype
        if self.em is not None:
            em_param = next(self.em.parameters())
            self.em_kv = _stack_kv(self.em.config.transformer, B, total, em_param.dtype, em_param.device)
        self.enc_kv = _stack_kv(cfg.encoder, B, total, dt, dev)
        self.dec_kv = _stack_kv(cfg.decoder, B, total, dt, dev)
        g = cfg.global_
        self.gkv = GlobalKV(g.n_layers, B, max(len(p) for p in prompts) + 16, g.resolved_n_kv_heads,
                            g.resolved_head_dim, uses_documents(g.attention), dt, dev)
        dec = self.model.local_decoder
        if self.dec_cross:
            ca = cfg.cross_attn
            self.slot_kv = PatchSlotKV(len(dec.cross_attn_layers), B, self.dec_window, dec.slots_per_patch, ca.n_heads,
                                       cfg.decoder.dim // ca.n_heads, dt, dev)
        else:
            self.last_slot = torch.zeros(B, cfg.decoder.dim, dtype=dt, device=dev)
        self.pos = torch.zeros(B, dtype=torch.int64, device=dev)
        self.doc = torch.zeros(B, dtype=torch.int64, device=dev)
        self.edoc = torch.zeros(B, dtype=torch.int64, device=dev)  # the entropy model's documents
        self.gdoc = torch.zeros(B, dtype=torch.int64, device=dev)
        self.open_has_eos = torch.zeros(B, dtype=torch.bool, device=dev)
        self.next_start = torch.zeros(B, dtype=torch.bool, device=dev)
        self.e_last = torch.zeros(B, 2, dtype=torch.float32, device=dev)  # E[T-2], E[T-1]
        self.tail = torch.zeros(B, self.tail_width, dtype=torch.int64, device=dev)
        self.hist: list[list[torch.Tensor]] = []  # per row: per-byte encoder states (n_state_layers, E)
        self.hist_from: list[int] = []  # position of hist[r][0]
        self.pstarts: list[list[int]] = []  # per row: starts of the last patches, the open one last
        self.prompt_starts = []
        last_raw = torch.zeros(B, dtype=torch.int64, device=dev)
        logits = []
        for r, ids in enumerate(prompts):
            row_logits, raw = self._prefill_row(r, ids)
            logits.append(row_logits)
            last_raw[r] = last_raw_start(raw)[0]
        self.starts = IncrementalStarts(self.patcher, last_raw)
        return torch.stack(logits)

    def _prefill_row(self, r: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        model, cfg, dev = self.model, self.cfg, self.device
        enc, gt, dec = model.local_encoder, model.global_transformer, model.local_decoder
        tokens = torch.tensor([ids], dtype=torch.int64, device=dev)  # (1, L)
        L = len(ids)
        pos = torch.arange(L, device=dev)
        doc = document_ids(tokens, self.eos)[0]

        # entropy model over the prompt -> entropies and its cache
        ent = None
        if self.em is not None:
            em = self.em
            et = tokens.to(next(em.parameters()).device)
            recs = [Recorder() for _ in em.layers]
            h = em.run_layers(em.tok_embeddings(et), _dense_self_mask(em.config.transformer, et, em.config.eos_id),
                              None, recs)
            ent = entropy(em.output(em.norm(h)))  # (1, L)
            self.em_kv.load_row(r, recs, pos.to(et.device), document_ids(et, em.config.eos_id)[0])
            ent = ent.to(dev)
            self.e_last[r, 1] = ent[0, -1]
            if L >= 2:
                self.e_last[r, 0] = ent[0, -2]

        # patch starts over positions 0..L (L = the next byte), as Patcher.patch + split_first_patch
        raw = raw_prompt_starts(self.patcher, tokens, ent)
        starts = finish_starts(self.patcher, raw)  # (1, L + 1)
        patch_lengths = lengths_from_start_mask(starts)  # (1, P), sums to L + 1
        P = patch_lengths.shape[1]
        Pc = P - 1  # the last patch holds position L: still open
        patch_ids = patch_ids_from_lengths(patch_lengths, L)  # (1, L); open-patch bytes get Pc
        self.prompt_starts.append(starts[0, :L].tolist())
        self.next_start[r] = starts[0, L]

        # local encoder over the prompt
        recs = [Recorder() for _ in enc.layers]
        h = model.embed(tokens)
        rope = enc.rope_for(pos[None])
        mask = _dense_self_mask(cfg.encoder, tokens, self.eos)
        states = []
        for i, layer in enumerate(enc.layers):
            h = layer(h, rope, mask, recs[i])
            states.append(h)
        h_enc = h
        self.enc_kv.load_row(r, recs, pos, doc)

        # closed patches -> global inputs
        ca = cfg.cross_attn
        if self.enc_cross:
            cmask = cross_attention_mask(patch_ids, Pc, ca.k, patches_as_queries=True, window=ca.window_encoder,
                                         dense=True)
            slots = None
            last = len(enc.layers) - 1
            for i in range(len(enc.layers)):
                if i == last or enc.cross_attn_all_layers:
                    if slots is None:
                        slots = enc.init_slots(states[i], patch_ids, Pc)
                    cross = enc.cross_attn_layers[i if enc.cross_attn_all_layers else 0]
                    slots = double_residual(slots, cross(slots, states[i], cmask))
            vectors = model.patch_vectors(h_enc, slots, patch_ids, patch_lengths[:, :Pc])
        else:
            vectors = model.patch_vectors(h_enc, None, patch_ids, patch_lengths[:, :Pc])

        # global transformer over the closed patches
        gtokens = global_tokens_from_patches(tokens, patch_ids, Pc, self.eos)  # (1, Pc)
        gdocs = document_ids(gtokens, self.eos)[0]
        recs_g = [Recorder() for _ in gt.layers]
        hg = gt.run_layers(gt.embed(vectors), _dense_self_mask(cfg.global_, gtokens, self.eos), None, recs_g)
        self.gkv.load_row(r, recs_g, gdocs)
        self.gdoc[r] = (gtokens[0] == self.eos).sum()

        # local decoder over the prompt
        dslots = dec.patch_slots(hg)  # (1, Pc*K, D) or (1, Pc, D)
        dec_ids = patch_ids_from_lengths(patch_lengths[:, 1:], L)  # (1, L), all < Pc
        if self.dec_cross:
            dmask = cross_attention_mask(dec_ids, Pc, dec.slots_per_patch, patches_as_queries=False,
                                         window=ca.window_decoder, dense=True)
            h = h_enc
        else:
            h = h_enc + torch.gather(dslots, 1, dec_ids[:, :, None].expand(-1, -1, dslots.shape[-1]))
        recs_d = [Recorder() for _ in dec.layers]
        mask = _dense_self_mask(cfg.decoder, tokens, self.eos)
        rope = dec.rope_for(pos[None])
        for i, layer in enumerate(dec.layers):
            if dec.uses_cross_attn(i):
                h = double_residual(h, dec.cross_layer(i)(h, dslots, dmask))
            h = layer(h, rope, mask, recs_d[i])
        logits = dec.head(h[:, -1:])[0, 0]
        self.dec_kv.load_row(r, recs_d, pos, doc)
        if self.dec_cross:
            K = dec.slots_per_patch
            rows = torch.tensor([r], device=dev)
            for p in range(max(0, Pc - self.dec_window), Pc):
                piece = dslots[:, p * K : (p + 1) * K]
                kv = [layer.project_kv(piece) for layer in dec.cross_attn_layers]
                self.slot_kv.put(rows, torch.tensor([p], device=dev), kv)
        else:
            self.last_slot[r] = dslots[0, Pc - 1]

        # per-row state for the steps
        start_list = starts[0].nonzero()[:, 0].tolist()  # every start in 0..L
        open_start = start_list[-1]
        keep_starts = start_list[-(self.enc_window or 1):]
        keep_from = keep_starts[0]
        if self.concat_size:
            keep_from = min(keep_from, open_start + 1 - self.concat_size)
        keep_from = max(0, keep_from)
        stacked = torch.stack([states[i][0] for i in self.state_layers], dim=1)  # (L, n_state, E)
        self.hist.append(list(stacked[keep_from:].unbind(0)))
        self.hist_from.append(keep_from)
        self.pstarts.append(keep_starts)
        self.pos[r] = L
        self.doc[r] = int((tokens == self.eos).sum())
        if self.em is not None:
            self.edoc[r] = int((tokens == self.em.config.eos_id).sum())
        self.open_has_eos[r] = bool((tokens[0, open_start:] == self.eos).any()) if open_start < L else False
        tail = ids[-self.tail_width:]
        self.tail[r, self.tail_width - len(tail):] = torch.tensor(tail, dtype=torch.int64, device=dev)
        return logits.float(), raw

    # ------------------------------------------------------------------ one byte
    @torch.inference_mode()
    def advance(self, next_ids: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = next_ids.to(self.device, torch.int64)  # (B,) the byte at position T
        T, doc = self.pos, self.doc
        is_eos = x == self.eos
        self.tail = torch.cat([self.tail[:, 1:], x[:, None]], dim=1)

        # 1. entropy model step -> E[T]
        e1 = e2 = None
        if self.em is not None:
            e_new = self._entropy_step(x, T)
            self.e_last = torch.stack([self.e_last[:, 1], e_new], dim=1)
            e2, e1 = self.e_last[:, 0], self.e_last[:, 1]

        # 2. does T + 1 start a patch?
        s_next = self.starts.step(T + 1, e1, e2, x, self.tail[:, -2])

        # 3. local encoder step
        enc = model.local_encoder
        e = enc.tok_embeddings(x[:, None])  # (B, 1, E)
        if model.encoder_hash_tok_embedding is not None:
            ids = model.encoder_hash_tok_embedding.last_ids(self.tail)
            e = model.encoder_hash_tok_embedding.add_to(e, None, ids=ids)  # type: ignore[arg-type]
        mask = self.enc_kv.begin_step(T, doc)
        rope = enc.rope_for(T[:, None])
        h = e
        states = []
        for i, block in enumerate(self.enc_blocks):
            h = block(h, rope, mask, self.enc_kv.layer(i))
            states.append(h)
        h_enc = h
        per_byte = torch.stack([states[i][:, 0] for i in self.state_layers], dim=1)  # (B, n_state, E)
        for r, hist in enumerate(self.hist):
            hist.append(per_byte[r])
        self.open_has_eos |= is_eos

        # 4. close patches: slots, one global step, decoder cross-attention keys/values
        closing = s_next.nonzero()[:, 0]
        if closing.numel():
            self._close(closing, T + 1)

        # 5. local decoder step
        dec = model.local_decoder
        if self.dec_cross:
            h = h_enc
            cmask = self.slot_kv.mask()
        else:
            h = h_enc + self.last_slot[:, None]
        mask = self.dec_kv.begin_step(T, doc)
        rope = dec.rope_for(T[:, None])
        for i, block in enumerate(self.dec_blocks):
            if dec.uses_cross_attn(i):
                j = i if dec.cross_attn_all_layers else 0
                h = double_residual(h, self.dec_cross_steps[j](h, self.slot_kv.k[j], self.slot_kv.v[j], cmask))
            h = block(h, rope, mask, self.dec_kv.layer(i))
        logits = self.dec_output(dec.norm(h))[:, 0]

        self.pos = T + 1
        self.doc = doc + is_eos.to(torch.int64)
        self.next_start = s_next
        return logits.float()

    def _entropy_step(self, x: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        em = self.em
        assert em is not None
        dev = self.em_device
        xe, Te = x.to(dev), T.to(dev)
        mask = self.em_kv.begin_step(Te, self.edoc.to(dev))
        self.edoc = self.edoc + (x == self.em.config.eos_id).to(torch.int64)
        rope = em.rope_for(Te[:, None])
        h = em.tok_embeddings(xe[:, None])
        for i, block in enumerate(self.em_blocks):
            h = block(h, rope, mask, self.em_kv.layer(i))
        return entropy(self.em_output(em.norm(h)).float())[:, 0].to(self.device)

    def _close(self, rows: torch.Tensor, ends: torch.Tensor) -> None:
        """Close the open patch of ``rows (R,)`` (their next patch starts at ``ends (B,)``)."""
        model, cfg = self.model, self.cfg
        enc, gt, dec = model.local_encoder, model.global_transformer, model.local_decoder
        patches, kv_spans, concat_rows = [], [], []
        ends_list = ends[rows].tolist()
        for r, b in zip(rows.tolist(), ends_list):
            hist, first = self.hist[r], self.hist_from[r]
            starts = self.pstarts[r]
            byte_states = torch.stack(hist, dim=0)  # (n_kept, n_state, E), positions first..
            patches.append(byte_states[starts[-1] - first : b - first])  # the closing patch's bytes
            if self.enc_cross:
                kv_spans.append(byte_states[starts[0] - first : b - first])  # the last window_encoder patches
            elif self.concat_size:
                idx = torch.arange(b - self.concat_size, b, device=byte_states.device).clamp(min=0) - first
                concat_rows.append(byte_states[idx, -1].reshape(-1))
            # bookkeeping: the new open patch starts at b; keep what the next closings need
            starts.append(b)
            del starts[: max(0, len(starts) - (self.enc_window or 1))]
            keep_from = starts[0]
            if self.concat_size:
                keep_from = min(keep_from, b + 1 - self.concat_size)
            keep_from = max(keep_from, first)
            del hist[: keep_from - first]
            self.hist_from[r] = keep_from

        # the closing patches of all rows at once, right-padded: (R, n_max, n_state, E)
        patch = torch.nn.utils.rnn.pad_sequence(patches, batch_first=True)
        lengths = torch.tensor([p.shape[0] for p in patches], device=patch.device)
        # byte -> patch index for pooling: 0 for real bytes, 1 (dropped) for padding
        pad_ids = (torch.arange(patch.shape[1], device=patch.device)[None] >= lengths[:, None]).to(torch.int64)
        if self.enc_cross:
            kv = torch.nn.utils.rnn.pad_sequence(kv_spans, batch_first=True)  # (R, m_max, n_state, E)
            kv_len = torch.tensor([k.shape[0] for k in kv_spans], device=kv.device)
            allowed = torch.arange(kv.shape[1], device=kv.device)[None] < kv_len[:, None]  # (R, m_max)
            slots = None
            for j in range(len(self.state_layers)):
                if slots is None:
                    slots = enc.init_slots(patch[:, :, j], pad_ids, 1)  # (R, K, E)
                cross = enc.cross_attn_layers[j if enc.cross_attn_all_layers else 0]
                mask = allowed[:, None, None, :].expand(-1, 1, slots.shape[1], -1)
                slots = double_residual(slots, cross(slots, kv[:, :, j], mask))
            v = slots.reshape(len(patches), 1, -1)
        elif cfg.pooling:
            v = pool_patches(patch[:, :, -1], pad_ids, 1, cfg.pooling_modes)  # (R, 1, E * n_modes)
        else:
            v = torch.stack(concat_rows)[:, None]

        # one global step for the closing rows; v: (R, 1, global_input_dim)
        all_rows = rows.numel() == self.pos.shape[0]
        gdoc = self.gdoc[rows]
        mask, gpos = self.gkv.begin_step(None if all_rows else rows, gdoc)
        rope = gt.rope_for(gpos[:, None])
        h = self.g_embed(v)
        for i, block in enumerate(self.g_blocks):
            h = block(h, rope, mask, self.gkv.layer(i))
        self.gdoc[rows] = gdoc + self.open_has_eos[rows].to(torch.int64)
        self.open_has_eos[rows] = False

        # decoder cross-attention keys/values (or the projected global output) of the closed patch
        # the decoder's slots of the closed patch (LocalDecoder.patch_slots): (R, K, D) or (R, 1, D)
        dslots = h if self.dec_patch_proj is None else self.dec_patch_proj(h).reshape(h.shape[0], dec.slots_per_patch, -1)
        if self.dec_cross:
            kv = [project(dslots) for project in self.dec_project_kv]
            self.slot_kv.put(rows, gpos, kv)
        else:
            self.last_slot[rows] = dslots[:, 0]

    # ------------------------------------------------------------------ batch bookkeeping
    @property
    def next_starts(self) -> list[bool]:
        return self.next_start.tolist()

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (finished rows stop costing work)."""
        idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
        for cache in (getattr(self, "em_kv", None), self.enc_kv, self.dec_kv, self.gkv,
                      getattr(self, "slot_kv", None)):
            if cache is not None:
                cache.select(idx.to(cache.k[0].device) if cache.k else idx)
        if not self.dec_cross:
            self.last_slot = self.last_slot[idx]
        for name in ("pos", "doc", "edoc", "gdoc", "open_has_eos", "next_start", "e_last", "tail"):
            setattr(self, name, getattr(self, name)[idx])
        self.starts.select(idx)
        self.hist = [self.hist[i] for i in rows]
        self.hist_from = [self.hist_from[i] for i in rows]
        self.pstarts = [self.pstarts[i] for i in rows]

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by each cache now (the encoder's open-patch states not included: a few bytes' worth)."""
        out = {"local_encoder": self.enc_kv.nbytes(), "local_decoder": self.dec_kv.nbytes(),
               "global": self.gkv.nbytes()}
        if self.em is not None:
            out["entropy_model"] = self.em_kv.nbytes()
        if self.dec_cross:
            out["decoder_patch_slots"] = self.slot_kv.nbytes()
        return out
