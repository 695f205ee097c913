"""Incremental BLT decoding: a chunked prefill, then a step per byte (or per ``n`` bytes), eager or compiled.

Shape legend: B rows, n new bytes of one call, K slots per patch, E encoder width, D decoder width,
V vocabulary.

A call over new bytes ``x[T .. T+n-1]`` (:meth:`IncrementalEngine.step`; the prefill is the same call
over chunks of the prompt) runs the model's own stacks with caches passed in
(:class:`~torchblt.model.transformer.StackCache`), in three parts:

1. **front**: the entropy model over the ``n`` bytes (its cache) -> their entropies; the patching rule
   for positions ``T+1 .. T+n`` (:func:`.boundaries.decide_starts`); the cursor after each byte
   (:meth:`.state.Cursor.advance`); the local encoder over the bytes (its cache; hash n-grams reach
   back through the cursor's last bytes); each byte's encoder state and cross-attention keys/values
   stored for the patch it belongs to;
2. **close**, only when some patch closes among the ``n`` bytes (a host check between the parts): for
   every closing patch — padded to ``n`` per row, the padding computed and discarded — its encoder
   slots from the stored bytes (:meth:`~torchblt.model.local.LocalEncoder.patch_slots`: pooling and
   cross-attention, the forward's code), the global model over the closing patches (its cache), and
   the decoder's per-patch slots (their cross-attention keys/values projected once);
3. **back**: the local decoder over the bytes (its cache; cross-attention to the stored slots of each
   byte's previous patch) -> logits ``(B, n, V)``; the cursor moves on.

Why this equals the full forward: every patching rule is causal, so boundaries never move once decided;
the global model is (block-)causal over patches, so a closed patch's output never changes; and the
decoder at byte ``i`` reads only the patch *before* the one holding byte ``i + 1``, always closed — the
forward's slot for the still-open patch reaches no logit. Every other attention is causal with
document masks and windows that the caches reproduce from each entry's position and document. Rows
are independent: each has its own positions, documents, patches and cache entries.

Static shapes: every cache is a ring of fixed capacity (:mod:`.cache`), rows that close no patch write
to a discard slot, so for a given batch size and ``n`` every call has the same shapes. With
``compile=True`` each part is ``torch.compile``'d once per (batch bucket, n) — inductor on CPU,
``mode="reduce-overhead"`` (CUDA graphs) on GPU — and the batch is padded to a power of two with
copies of a live row (their outputs are dropped), so a batch that shrinks as rows finish compiles at
most ``log2(B)`` times. The eager path runs the very same functions.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch

from torchblt.generation.boundaries import check_incremental, decide_starts
from torchblt.generation.cache import Ring, StackKV
from torchblt.generation.state import Cursor, DecodeState, row_major
from torchblt.model.blt import BLT
from torchblt.model.entropy_model import EntropyModel, entropy
from torchblt.model.local import concat_patches, pool_patches
from torchblt.model.masks import (
    PatchCrossMask,
    cross_attention_mask,
    cross_attention_visible,
    uses_documents,
    uses_window,
)
from torchblt.model.transformer import StackConfig
from torchblt.patching import Patcher

log = logging.getLogger(__name__)

# Prompt bytes per prefill call. A chunk much longer than the local windows attends banded (O(chunk x window):
# :func:`torchblt.model.masks.banded_mask_after`) and its closing patches' encoder slots gather their bytes
# (:class:`~torchblt.model.masks.PatchCrossMask`), so memory is bounded by the chunk, the windows and the
# global model's patches, and time is linear in the prompt (test_generation_state.py checks both).
PREFILL_CHUNK = 2048  # light config, 32 KB prompt, 1 thread (busy machine): 512: 32.5 s, 2048: 21.3 s, 4096: 23.3 s
# Bytes of the patches still to close that a presized state holds (``presize(total=True)``) without growing:
# patches of real text are far shorter, so rows presized together keep one capacity
PATCH_SPAN_PRESIZED = 256
DENSE_CROSS_MAX = 1 << 18  # slots x bytes of the encoder's closing cross-attention kept as a dense mask
# A compiled step of at least this many rows (on CPU) runs the close part eager on the rows that close a
# patch, when at most half of them do (measured: bench/serve.py --compile on,off)
CLOSE_ROWS_MIN_BATCH = 8


# Inductor on CPU: one- and two-row matrix products become a multiply-and-sum that inductor generates
# itself (a dot product per output over the weight's contiguous rows, reading it once) instead of a BLAS
# call whose one-row kernel reads memory well under its bandwidth (measured: bench/generation.py).
# ``cpp_wrapper``: the code that allocates buffers and calls the kernels of a compiled part is C++ instead of
# Python; a decoding step is a few hundred small kernels, and the Python wrapper was ~1 ms of a ~3 ms step
# (light config, 1 thread: 3.29 -> 2.64 ms/step with the small-query attention of
# :func:`torchblt.model.transformer.scaled_dot_product`; small config 7.71 -> 6.89; measured interleaved in one
# process under bench-idle). It makes a cold compile slower (C++ for the wrapper too).
CPU_OPTIONS: dict[str, Any] = {"post_grad_fusion_options": {"decompose_mm_pass": {
    "cpu_max_first_dimension_decomposition": 2, "cpu_max_other_dimension_decomposition": 1 << 16}},
    "cpp_wrapper": True}



def _guard_filter(entries: Any) -> list[bool]:
    """Keep Dynamo's guards on the decoding state and the engine; drop those on the model's modules and on
    module globals (functions of torch and torchblt), which never change under a running engine."""
    nn_module = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [keep and not entry.is_global for keep, entry in zip(nn_module, entries, strict=True)]


def exclusive_cumsum(flags: torch.Tensor) -> torch.Tensor:
    """``(B, n) -> (B, n)``: how many of the flags before each position are set."""
    x = flags.to(torch.int64)
    return x.cumsum(1) - x


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], list[int] | None]:
    """The distinct prompts, in first-seen order, and the index into them of each prompt (None when every
    prompt is distinct): a prompt listed several times (n samples of one prompt) is prefilled once."""
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    if len(unique) == len(prompts):
        return [list(p) for p in unique], None
    where = {p: i for i, p in enumerate(unique)}
    return [list(p) for p in unique], [where[tuple(p)] for p in prompts]


def bucket(batch: int) -> int:
    """The compiled batch size of ``batch`` rows: the next power of two."""
    return 1 << max(0, batch - 1).bit_length()


# What a failed compilation raises (no C++ compiler for inductor, an unsupported op, a recompile limit):
# the engine then runs the eager step, which gives the same results, and says so once per process.
def compile_errors() -> tuple[type[Exception], ...]:
    import torch._dynamo.exc
    import torch._inductor.exc

    return torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError


_compile_failure: str | None = None  # why compiling failed in this process (then every engine runs eager)
_compiled_models: weakref.WeakSet = weakref.WeakSet()  # models whose step compiled in this process


def compiled_before(model: BLT) -> bool:
    """Has a step of ``model`` been compiled in this process? (Later engines reuse the compiled graphs.)"""
    return model in _compiled_models


def _compiling_failed(err: Exception) -> None:
    global _compile_failure
    if _compile_failure is None:
        _compile_failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        log.warning("torchblt: the compiled decoding step is unavailable (%s); decoding runs the eager step "
                    "(same results, slower)", _compile_failure)


def _view_marker(size: int, device: torch.device) -> torch.Tensor:
    """A tensor whose (dynamic) length carries a view size into a compiled part: one graph for every size."""
    marker = torch.empty(size, device=device)
    torch._dynamo.mark_dynamic(marker, 0)
    return marker


def _size(view: int | torch.Tensor) -> int:
    return view if isinstance(view, int) else view.shape[0]


@dataclass
class _Closed:
    """New per-patch decoder entries of a call whose patches do not fit the slot ring before the
    decoder has read them (long prefill chunks): stored after the decoder."""

    positions: torch.Tensor
    values: list[torch.Tensor]
    keep: torch.Tensor


class IncrementalEngine:
    """Cached decoding of a BLT (with its patcher).

    Functional API (continuous batching builds on it)::

        engine = IncrementalEngine(model, patcher, max_new_bytes=256)
        state, logits, prompt_starts = engine.prefill(prompt_ids)     # DecodeState, (B, V)
        logits = engine.step(state, next_ids)                          # (B,) -> (B, V); (B, n) -> (B, n, V)
        state.select(rows); state.extend(other_state); state.truncate(n)

    and the driver interface of :class:`~torchblt.generation.reference.FullRecomputeEngine`:
    ``start(prompts) -> logits (B, V)``, ``advance(next_ids (B,)) -> logits (B, V)``, ``select(rows)``,
    ``next_starts`` (does the byte about to be appended start a patch), ``prompt_starts``.
    """

    def __init__(
        self,
        model: BLT,
        patcher: Patcher,
        max_new_bytes: int = 256,
        fused: bool | None = None,
        *,
        compile: bool = False,
        lookahead: int = 0,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        """``max_new_bytes``: sizes the caches that grow (the global model's, stacks without a window) so
        that decoding that many bytes never re-allocates (a compiled step would recompile). ``compile``:
        run the steps ``torch.compile``'d (see the module docstring). ``lookahead``: bytes a state can
        roll back (:meth:`DecodeState.truncate`) and the largest multi-byte step that writes its caches
        in place; costs ``lookahead`` extra entries per ring. ``fused``: deprecated, ignored (the
        decode-layout weight copies are gone: the step runs the model's own modules)."""
        if fused is not None:
            warnings.warn("IncrementalEngine(fused=...) is deprecated and ignored: steps run the model's modules "
                          "(compile=True is the fast path)", DeprecationWarning, stacklevel=2)
        check_incremental(patcher)
        if lookahead < 0 or prefill_chunk < 1:
            raise ValueError(f"lookahead must be >= 0 and prefill_chunk >= 1, got {lookahead}, {prefill_chunk}")
        self.model, self.patcher = model, patcher
        self.max_new_bytes, self.lookahead, self.prefill_chunk = max_new_bytes, lookahead, prefill_chunk
        self.em: EntropyModel | None = None
        if patcher.mode == "entropy":
            if patcher.entropy_model is None:
                raise ValueError("entropy patching needs an entropy model: pass entropy_model=... or attach one")
            self.em = patcher.entropy_model
        cfg = model.config
        self.cfg = cfg
        self.eos = cfg.eos_id
        self.em_eos = self.em.config.eos_id if self.em is not None else cfg.eos_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        enc, dec = model.local_encoder, model.local_decoder
        self.enc_cross = enc.cross_attn_layers is not None
        self.dec_cross = dec.cross_attn_layers is not None
        ca = cfg.cross_attn
        self.enc_window = ca.window_encoder if self.enc_cross else None
        self.dec_window = (ca.window_decoder or 1) if self.dec_cross else 1
        self.concat_size = cfg.concat_patch_size if (not self.enc_cross and not cfg.pooling) else 0
        self.tail_width = max([2] + (cfg.hash.group_sizes if cfg.hash else []))
        self.compile = bool(compile)
        # what a compiled part specialises on, besides tensor shapes: this model (its configuration and
        # module structure) and the patcher's rule
        self.model_key = hash((id(model), id(self.em), repr(cfg), repr(patcher), str(model)))
        self._compiled: dict[tuple[str, int], Any] = {}
        self._compiled_shapes: set[tuple] = set()  # call shapes compiled without error
        # the driver interface's state
        self.state: DecodeState | None = None
        self.prompt_starts: list[list[bool]] = []
        self._rows = 0  # live rows of self.state (the others pad a compiled batch)

    # ------------------------------------------------------------------ states
    def _stack(self, cfg: StackConfig, batch: int, dtype: torch.dtype, device: torch.device) -> StackKV:
        window = cfg.window if uses_window(cfg.attention) else None
        capacity = window + self.lookahead if window is not None else 64
        return StackKV.for_stack(cfg.n_layers, batch, capacity, cfg.resolved_n_kv_heads, cfg.resolved_head_dim, window,
                             uses_documents(cfg.attention), dtype, device)

    def new_state(self, batch: int) -> DecodeState:
        """The state before any byte (what :meth:`prefill` starts from)."""
        cfg, dev, dt = self.cfg, self.device, self.dtype
        enc, dec = self.model.local_encoder, self.model.local_decoder
        E, D = cfg.encoder.dim, cfg.decoder.dim
        if self.enc_cross:
            ca = cfg.cross_attn
            n_state = len(enc.state_layers())
            shapes = [(E,)] + [(ca.n_heads, E // ca.n_heads)] * (2 * n_state)
        else:
            shapes = [(E,)]
        if self.dec_cross:
            ca = cfg.cross_attn
            n_cross = len(dec.cross_attn_layers)  # type: ignore[arg-type]
            slot_shapes = [(dec.slots_per_patch, ca.n_heads, D // ca.n_heads)] * (2 * n_cross)
        else:
            slot_shapes = [(D,)]
        entropy_cache = None
        if self.em is not None:
            p = next(self.em.parameters())
            entropy_cache = self._stack(self.em.config.transformer, batch, p.dtype, p.device)
        w = self.enc_window or 1
        history = None
        if self.lookahead:
            H = self.lookahead + 1
            history = Cursor.empty(batch, self.tail_width, w, dev).map(
                lambda t: t[:, None].expand(-1, H, *t.shape[1:]).clone())
            history.pos.fill_(-1)
        return DecodeState(
            cursor=Cursor.empty(batch, self.tail_width, w, dev),
            encoder=self._stack(cfg.encoder, batch, dt, dev),
            global_=self._stack(cfg.global_, batch, dt, dev),
            decoder=self._stack(cfg.decoder, batch, dt, dev),
            entropy=entropy_cache,
            patch_bytes=Ring.empty(batch, 32, shapes, dt, dev),
            patch_slots=Ring.empty(batch, self.dec_window + self.lookahead, slot_shapes, dt, dev),
            lookahead=self.lookahead,
            history=history,
        )

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[DecodeState, torch.Tensor, list[list[bool]]]:
        """Prefill every prompt (each on its own, in chunks of ``prefill_chunk`` bytes that carry the
        caches: memory bounded by the windows and the patch count) and batch them. Returns the state,
        the logits ``(B, V)`` of each row's next byte, and each prompt's patch-start flags."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (the BOS)")
        unique, repeat = distinct_prompts(prompts)  # a repeated prompt is prefilled once, its row repeated
        states, logits, starts = [], [], []
        for ids in unique:
            state = self.new_state(1)
            last, flags = self.prefill_row(state, ids)
            self.presize(state, self.max_new_bytes)
            states.append(state)
            logits.append(last)
            starts.append([True, *flags][: len(ids)])
        state, out = DecodeState.cat(states), torch.cat(logits).float()
        if repeat is not None:
            state.select(repeat)
            out, starts = out[torch.tensor(repeat, device=out.device)], [list(starts[i]) for i in repeat]
        return state, out, starts

    @torch.inference_mode()
    def prefill_row(self, state: DecodeState, ids: list[int], start: int = 0,
                    end: int | None = None) -> tuple[torch.Tensor, list[bool]]:
        """Prefill bytes ``ids[start:end]`` of a one-row ``state`` that holds ``ids[:start]`` (eager, in
        chunks of ``prefill_chunk`` bytes from ``start``): the logits ``(1, V)`` after the last of them and
        whether each next position starts a patch. A prompt may be prefilled in parts (a server prefilling
        a joining request between steps of the running ones)."""
        end = len(ids) if end is None else end
        if not 0 <= start < end <= len(ids):
            raise ValueError(f"prefill of bytes {start}..{end} of a {len(ids)}-byte prompt")
        tokens = torch.tensor([ids[start:end]], dtype=torch.int64, device=self.device)
        flags: list[bool] = []
        for a in range(0, end - start, self.prefill_chunk):
            out, after = self._call(state, tokens[:, a : a + self.prefill_chunk], compiled=False)
            flags += after.next_start[0].tolist()
        return out[:, -1], flags

    def presize(self, state: DecodeState, n_bytes: int, *, total: bool = False) -> None:
        """Grow the caches that grow so that ``n_bytes`` more bytes fit without re-allocating. ``total``:
        ``n_bytes`` counts the bytes already in the state too, and every such cache gets the capacity of
        ``n_bytes`` whatever the row holds, so that rows presized to one bound have equal capacities (a
        compiled batch whose rows join and leave keeps its shapes: :class:`~torchblt.serve.BatchEngine`)."""
        self._reserve(state, n_bytes + 1, total=total)

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (``(B,)``: one byte per row; ``(B, n)``: ``n`` bytes per row) and return the
        next-byte logits (``(B, V)``, or ``(B, n, V)``: after each of the ``n``) in float32. Stepping ``n``
        bytes at once equals ``n`` single steps."""
        tokens = tokens.to(self.device, torch.int64)
        one = tokens.dim() == 1
        if one:
            tokens = tokens[:, None]
        if tokens.dim() != 2 or tokens.shape[0] != state.batch:
            raise ValueError(f"tokens must be (B={state.batch},) or (B, n), got shape {tuple(tokens.shape)}")
        logits, _ = self._call(state, tokens, compiled=self.compile)
        return logits[:, 0] if one else logits

    # ------------------------------------------------------------------ one call
    def _call(self, state: DecodeState, tokens: torch.Tensor, compiled: bool) -> tuple[torch.Tensor, Cursor]:
        if compiled and _compile_failure is None:
            # one layout for the cursor's tensors (an eager call leaves views of its per-byte results, a compiled
            # one contiguous tensors): a graph guards on strides, and a second layout recompiled every part
            state.cursor = state.cursor.map(row_major)
            if not tokens.is_inference():  # a caller's tensor from outside inference mode: one more guard failed
                tokens = tokens.clone()
            # the first call of each shape compiles: try it on a copy, so that a failure leaves the state
            # as it was for the eager step
            shape = (tuple(tokens.shape), tuple(r.capacity for r in state.rings()))
            if shape not in self._compiled_shapes:
                try:
                    self._run(state.copy(), tokens, compiled=True, trial=True)
                    self._compiled_shapes.add(shape)
                    _compiled_models.add(self.model)
                except compile_errors() as err:
                    _compiling_failed(err)
        return self._run(state, tokens, compiled and _compile_failure is None)

    def _run(self, state: DecodeState, tokens: torch.Tensor, compiled: bool,
             trial: bool = False) -> tuple[torch.Tensor, Cursor]:
        """One call. ``trial`` (a compiled call's first run of a shape, on a copy): the close part runs even
        when no patch closes (the padding rows' work, discarded), so that it compiles now, where a failure
        falls back to eager, not at the first closing step."""
        n = tokens.shape[1]
        spans = self._reserve(state, n)
        # attention reads the slots that can hold an entry after this call (bytes, patches)
        views = (spans[3] + n, spans[4] + n)
        if compiled:
            views = tuple(_view_marker(min(bucket(max(v, 16)), cap), self.device)
                          for v, cap in zip(views, (1 << 62, 1 << 62)))
            front, close, back = (self._compiled_part(p, n) for p in ("front", "close", "back"))
        else:
            front, close, back = self._front, self._close, self._back
        h, gdoc, after, n_close = front(state, tokens, views[0])
        # closing patches per row, padded to the most among the rows: n in a compiled call (one graph),
        # the real count in an eager one (a prefill chunk of n bytes closes ~n / patch size)
        width = int(n_close)
        closed = None
        if compiled and (width or trial):
            if (not trial and n == 1 and self.device.type == "cpu" and state.batch >= CLOSE_ROWS_MIN_BATCH
                    and 2 * int(after.next_start.any(1).sum()) <= state.batch):
                # few of many rows close a patch: on CPU the global model on those rows only (eager, in place)
                # costs less than the compiled close part over every row (padding for the others); on a GPU the
                # extra rows are nearly free and the eager part would leave the CUDA graphs (not measured)
                closed = self._close_rows(state, gdoc, after, views[1], 1)
            else:
                closed = close(state, gdoc, after, views[1], n)
        elif width and state.batch == 1:
            closed = close(state, gdoc, after, views[1], width)
        elif width:
            closed = self._close_rows(state, gdoc, after, views[1], width)
        logits, state.spans = back(state, tokens, h, after, closed, views[0])
        return logits, after

    def _reserve(self, state: DecodeState, n: int, total: bool = False) -> list[int]:
        """Grow the rings without a window so that a call over ``n`` more bytes fits (host-side, before
        the call; a compiled step then sees new shapes and recompiles — rare: :meth:`presize`). ``total``:
        to a span of ``n`` (at least what each ring holds), not ``n`` more; the encoder's byte ring (the bytes
        of the patches still to close) to :data:`PATCH_SPAN_PRESIZED`. Returns :meth:`_spans` (read back from the previous call: the
        one host round trip of a step)."""
        spans = [int(v) for v in (state.spans if state.spans is not None else self._spans(state)).tolist()]
        bytes_span, global_span, local_span = spans[:3]
        if total:  # fixed spans, whatever each ring holds
            bytes_need, global_need, local_need = (max(bytes_span, PATCH_SPAN_PRESIZED), max(global_span, n),
                                                   max(local_span, n))
        else:
            bytes_need, global_need, local_need = bytes_span + n, global_span + n, local_span + n
        c = state.cursor
        state.patch_bytes.reserve(bytes_need, self._first_needed(c))
        keep_global = c.global_doc_start if uses_documents(self.cfg.global_.attention) else None
        state.global_.reserve(global_need, keep_global)
        for ring in (state.encoder, state.decoder, state.entropy):
            if ring is not None and ring.window is None:
                ring.reserve(local_need, c.doc_start if ring.documents and ring is not state.entropy else None)
        return spans

    def _first_needed(self, c: Cursor) -> torch.Tensor:
        """The oldest byte whose encoder state a patch still to close reads: the first of the last ``w``
        patches' bytes (and the ``patch_size`` bytes before the open patch's end for concatenation)."""
        first = c.patch_starts[..., 0]
        if self.concat_size:
            first = torch.minimum(first, c.pos - self.concat_size)
        return first.clamp(min=0)

    def _spans(self, state: DecodeState) -> torch.Tensor:
        """``(5,)``: per ring that grows, the longest span of positions a row still needs (encoder byte
        states, global patches, local stacks without a window; the history's too: a roll-back needs it),
        then the largest byte position and closed-patch count (how much of each ring can be filled)."""
        c = state.cursor
        first = self._first_needed(c)
        doc_start, gdoc_start = c.doc_start, c.global_doc_start
        if state.history is not None:
            h = state.history
            valid = h.pos >= 0
            big = torch.iinfo(torch.int64).max
            first = torch.minimum(first, torch.where(valid, self._first_needed(h), big).amin(1))
            doc_start = torch.minimum(doc_start, torch.where(valid, h.doc_start, big).amin(1))
            gdoc_start = torch.minimum(gdoc_start, torch.where(valid, h.global_doc_start, big).amin(1))
        if not uses_documents(self.cfg.global_.attention):
            gdoc_start = torch.zeros_like(gdoc_start)
        local = c.pos - doc_start if uses_documents(self.cfg.encoder.attention) else c.pos
        if not uses_documents(self.cfg.decoder.attention):
            local = c.pos
        return torch.stack([(c.pos - first).max(), (c.n_closed - gdoc_start).max(), local.max(), c.pos.max(),
                            c.n_closed.max()])

    def _compiled_part(self, part: str, n: int) -> Any:
        key = (part, n)
        fn = self._compiled.get(key)
        if fn is None:
            # Guards on the model's modules are skipped (thousands of them: they cost more than a small
            # step); what the graph bakes in about the model is guarded through ``self.model_key``
            # instead, and the parameters are the graph's inputs, read afresh at every call.
            options: dict[str, Any] = {"guard_filter_fn": _guard_filter}
            if self.device.type == "cuda":
                fn = torch.compile(getattr(self, f"_{part}"), fullgraph=True, dynamic=False, mode="reduce-overhead",
                                   options=options)
            else:
                fn = torch.compile(getattr(self, f"_{part}"), fullgraph=True, dynamic=False,
                                   options={**CPU_OPTIONS, **options})
            self._compiled[key] = fn
        return fn

    # ------------------------------------------------------------------ the three parts
    def _front(self, state: DecodeState, tokens: torch.Tensor, view: Any):  # noqa: ANN202 - (h, gdoc, after, any_close)
        model, c = self.model, state.cursor
        B, n = tokens.shape
        torch._check(self.model_key != 0)  # a guard on the model (see _compiled_part)
        pos = c.pos[:, None] + torch.arange(n, device=tokens.device)  # (B, n)
        ent = None
        if self.em is not None:
            assert state.entropy is not None
            dev = state.entropy.pos.device
            et = tokens.to(dev)
            edocs = (c.entropy_doc[:, None] + exclusive_cumsum(tokens == self.em_eos)).to(dev)
            ent = entropy(self.em(et, cache=state.entropy.prepare(pos.to(dev), edocs, view=_size(view)))).to(tokens.device)
        e_all = torch.cat([c.entropies, ent], 1) if ent is not None else None  # E[T-2], E[T-1], E[T] ...
        x_all = torch.cat([c.tail[:, -1:], tokens], 1)
        starts, last_raw = decide_starts(
            self.patcher, pos + 1, None if e_all is None else e_all[:, 2:], None if e_all is None else e_all[:, 1:-1],
            tokens, x_all[:, :-1], c.last_raw)
        after = c.advance(tokens, ent, starts, last_raw, self.eos, self.em_eos)
        # the cursor before each byte, of the fields read: each byte's patch (the open one when it came) and
        # that patch's global document
        n_closed, gdoc = (torch.cat([now[:, None], then[:, :-1]], 1)
                          for now, then in ((c.n_closed, after.n_closed), (c.global_doc, after.global_doc)))

        enc = model.local_encoder
        docs = c.doc[:, None] + exclusive_cumsum(tokens == self.eos)
        h, states = enc.encode(tokens, model.embed(tokens, context=c.tail), cache=state.encoder.prepare(pos, docs, view=_size(view)))
        values = [states[0]] if self.enc_cross else [h]
        if self.enc_cross:
            values += [t for kv in enc.cross_kv(states) for t in kv]
        state.patch_bytes.write(pos, values, n_closed)
        return h, gdoc, after, starts.sum(1).max()

    def _close(self, state: DecodeState, gdoc: torch.Tensor, after: Cursor, view: Any, m: int) -> _Closed | None:
        """Every patch closing among the call's bytes, padded to ``m`` per row (at least the most that close
        in a row): slots, global, decoder slots. ``gdoc (B, n)``: the global document of each byte's patch."""
        model, cfg, c = self.model, self.cfg, state.cursor
        torch._check(self.model_key != 0)  # a guard on the model (see _compiled_part)
        enc, dec = model.local_encoder, model.local_decoder
        starts = after.next_start  # (B, n): the patch holding byte i closes
        B = starts.shape[0]
        dev = starts.device
        order = torch.argsort((~starts).to(torch.int8), dim=1, stable=True)[:, :m]  # closing bytes first, in order
        k = torch.arange(m, device=dev)[None]
        valid = k < starts.sum(1, keepdim=True)  # (B, m) real closing patches
        patch = c.n_closed[:, None] + k  # their indices
        gdoc = torch.gather(gdoc, 1, order)  # their global documents

        ring = state.patch_bytes
        rel = torch.where(ring.pos >= 0, ring.tag - c.n_closed[:, None], m)  # stored byte -> closing patch 0..
        rel = rel.clamp(max=m)  # m: no closing patch
        ids = torch.where(rel >= 0, rel, m)
        if self.enc_cross:
            K = cfg.cross_attn.k
            if m * K * ring.capacity > DENSE_CROSS_MAX:  # a long prefill chunk: linear in the bytes
                mask: Any = PatchCrossMask(rel, m, K, patches_as_queries=True, window=self.enc_window)
            else:
                mask = cross_attention_mask(rel, m, K, patches_as_queries=True, window=self.enc_window, dense=True)
            kv = [(ring.tensors[j], ring.tensors[j + 1]) for j in range(1, len(ring.tensors), 2)]
            vectors = enc.patch_slots(ring.tensors[0], kv, ids, m, mask).reshape(B, m, -1)  # (B, m, K*E)
        elif cfg.pooling:
            vectors = pool_patches(ring.tensors[0], ids, m, cfg.pooling_modes)
        else:  # concatenation: the patch_size bytes up to each patch's last byte, in ring slots
            ends = c.pos[:, None] + order + 1  # (B, m) each closing patch's end
            vectors = concat_patches(ring.tensors[0], ends, self.concat_size, wrap=ring.capacity)

        h = model.global_transformer(vectors, None, cache=state.global_.prepare(patch, gdoc, valid, view=_size(view)))  # (B, m, G)
        slots = dec.patch_slots(h)  # (B, m*K, D) or (B, m, D)
        if self.dec_cross:
            values = [t.unflatten(1, (m, dec.slots_per_patch)) for kv in dec.cross_kv(slots) for t in kv]  # (B, m, K, H, Dh)
        else:
            values = [slots]
        # written now if that overwrites no patch the call's bytes still read (the first byte reads up to
        # dec_window patches back unless it closes one itself, which all n closing implies)
        spare = state.patch_slots.capacity - self.dec_window
        if m <= spare or (m == starts.shape[1] and m <= spare + 1):
            state.patch_slots.write(patch, values, patch, valid)
            return None
        return _Closed(patch, values, valid)

    def _close_rows(self, state: DecodeState, gdoc: torch.Tensor, after: Cursor, view: Any, m: int) -> _Closed | None:
        """Eager :meth:`_close` of a batch, on the rows that close a patch only: in a batch of ``B`` rows at
        ~4.5 bytes per patch only ~``B / 4.5`` rows close one per step, and the global model over every row
        (padding for the others) was most of a 16-row step. The rows' caches that the close part reads or
        writes (their encoder bytes, decoder slots) are taken out and put back; the global model's cache stays
        in place and is read and written for those rows (:meth:`StackKV.rows_of`: a copy of only the slots
        the step reads, where taking the rows out copied their whole rings, sized for a patch per byte; the
        global model has no window — the config allows none — so its ring always stores first)."""
        rows = after.next_start.any(1).nonzero().flatten()  # data-dependent: eager only
        B = state.batch
        if rows.numel() == B:
            return self._close(state, gdoc, after, view, m)
        take = lambda cur: cur.map(lambda t: t[rows])  # noqa: E731
        sub = replace(state, cursor=take(state.cursor), patch_bytes=state.patch_bytes.take(rows),
                      global_=state.global_.rows_of(rows), patch_slots=state.patch_slots.take(rows))
        closed = self._close(sub, gdoc[rows], take(after), view, m)
        # what the close part wrote in the taken rings: the closing patches' decoder slots (the global
        # model's keys/values went into the rows in place)
        k = torch.arange(m, device=rows.device)[None]
        patch = sub.cursor.n_closed[:, None] + k
        valid = k < after.next_start[rows].sum(1, keepdim=True)
        state.patch_slots.put_entries(rows, sub.patch_slots, patch, valid)
        if closed is None:
            return None

        def spread(t: torch.Tensor) -> torch.Tensor:  # (R, ...) -> (B, ...), zeros in the other rows
            return t.new_zeros((B, *t.shape[1:])).index_copy_(0, rows, t)

        return _Closed(spread(closed.positions), [spread(v) for v in closed.values], spread(closed.keep))

    def _back(self, state: DecodeState, tokens: torch.Tensor, h: torch.Tensor, after: Cursor,
              closed: _Closed | None, view: Any):  # noqa: ANN202 - (logits, spans)
        model, c = self.model, state.cursor
        torch._check(self.model_key != 0)  # a guard on the model (see _compiled_part)
        dec = model.local_decoder
        B, n = tokens.shape
        pos = c.pos[:, None] + torch.arange(n, device=tokens.device)
        docs = c.doc[:, None] + exclusive_cumsum(tokens == self.eos)
        reads = after.n_closed - 1  # (B, n) the patch each byte's decoder reads: the last closed one
        ring = state.patch_slots
        tensors, slot_patch = ring.tensors, ring.pos
        if closed is not None:
            tensors = [torch.cat([t, v.to(t.dtype)], 1) for t, v in zip(tensors, closed.values, strict=True)]
            slot_patch = torch.cat([slot_patch, torch.where(closed.keep, closed.positions, -1)], 1)
        cache = state.decoder.prepare(pos, docs, view=_size(view))
        if self.dec_cross:
            kv = [(tensors[j].flatten(1, 2), tensors[j + 1].flatten(1, 2)) for j in range(0, len(tensors), 2)]
            per_slot = slot_patch.repeat_interleave(dec.slots_per_patch, dim=1)  # (B, S*K)
            mask = cross_attention_visible(per_slot[:, None, :], reads[:, :, None], False, self.dec_window)
            mask = (mask & (per_slot >= 0)[:, None, :])[:, None]  # (B, 1, n, S*K)
            logits = dec.decode(tokens, h, kv, mask, cache=cache)
        else:
            index = reads % ring.capacity
            if closed is not None:
                new = reads >= c.n_closed[:, None]
                index = torch.where(new, ring.capacity + 1 + reads - c.n_closed[:, None], index)
            logits = dec.decode(tokens, dec.add_patch_slots(h, tensors[0], index), cache=cache)
        if closed is not None:
            ring.write_last(closed.positions, closed.values, closed.positions, closed.keep)
        state.record(after)
        return logits, self._spans(state)

    # ------------------------------------------------------------------ the driver interface
    @torch.inference_mode()
    def start(self, prompts: list[list[int]]) -> torch.Tensor:
        state, logits, self.prompt_starts = self.prefill(prompts)
        self._rows = state.batch
        if self.compile:
            state.select(self._padded(list(range(state.batch))))
        self.state = state
        return logits

    def _padded(self, rows: list[int]) -> list[int]:
        """``rows`` plus copies of the first up to the compiled batch size."""
        return rows + [rows[0]] * (bucket(len(rows)) - len(rows))

    @torch.inference_mode()
    def advance(self, next_ids: torch.Tensor) -> torch.Tensor:
        assert self.state is not None, "start first"
        x = next_ids.to(self.device, torch.int64).reshape(-1)
        if self.state.batch > x.shape[0]:
            x = torch.cat([x, x[:1].expand(self.state.batch - x.shape[0])])
        return self.step(self.state, x)[: self._rows]

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (finished rows stop costing work; a compiled batch keeps its bucket)."""
        assert self.state is not None, "start first"
        self._rows = len(rows)
        self.state.select(self._padded(rows) if self.compile else rows)

    @property
    def next_starts(self) -> list[bool]:
        assert self.state is not None, "start first"
        return self.state.cursor.next_start[: self._rows].tolist()

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by each cache now."""
        assert self.state is not None, "start first"
        return self.state.cache_bytes()
