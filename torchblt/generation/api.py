"""The generation API: :func:`generate` (texts), :func:`generate_stream` (text pieces as they come) and
:func:`generate_tokens` (ids, per-step logits and patch boundaries).

Prompts are encoded with BOS and without EOS (as the reference does). ``use_cache=True`` decodes
incrementally (:mod:`.incremental`); ``use_cache=False`` re-runs everything per byte (:mod:`.reference`);
both give the same bytes (greedy) and logits within float tolerance. Each row of a batch gets exactly
what it gets alone (sampling too: row ``i`` draws from a generator seeded ``seed + i``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from torchblt.generation.incremental import IncrementalEngine, compiled_before
from torchblt.generation.reference import FullRecomputeEngine
from torchblt.generation.sampling import row_generators, sample, validate_sampling
from torchblt.generation.speculative import speculative_steps, validate_speculative
from torchblt.generation.stream import StopCondition, StreamPiece, TextStream
from torchblt.model.blt import BLT
from torchblt.model.entropy_model import EntropyModel
from torchblt.patching import Patcher
from torchblt.tokenizer import ByteTokenizer


@dataclass
class GenerationConfig:
    """How to generate. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable those filters.

    ``compile`` (cached decoding only): run the decoding step ``torch.compile``'d (inductor on CPU, CUDA
    graphs on GPU); ``None`` (default) compiles where it pays (see :func:`compile_pays`); ``False`` is the
    eager step (same results). ``fused_step``: deprecated, ignored (the step weights are the model's).

    ``speculative=K`` (cached decoding only): the entropy model drafts up to ``K`` bytes per round and the
    BLT verifies them in one step (:mod:`.speculative`; the same bytes greedy, the same distribution
    sampling); ``None`` or ``0``: off. ``draft``: ``"greedy"`` or ``"sample"`` drafts (``"auto"``: sample
    when ``temperature > 0``); ``draft_threshold``: stop a draft after a byte whose entropy exceeds it
    (``"patch"``: the patcher's threshold). Speculative rounds run the eager step unless ``compile=True``.
    """

    max_new_bytes: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    use_cache: bool = True
    compile: bool | None = None
    fused_step: bool | None = None
    speculative: int | None = None
    draft: str = "auto"
    draft_threshold: float | str | None = None

    def validate(self) -> None:
        if int(self.max_new_bytes) != self.max_new_bytes or self.max_new_bytes < 0:
            raise ValueError(f"max_new_bytes must be a non-negative integer, got {self.max_new_bytes!r}")
        validate_sampling(self.temperature, self.top_k, self.top_p)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a list of strings, got {self.stop!r}")
        validate_speculative(self.speculative, self.draft, self.draft_threshold, self.use_cache)


@dataclass
class GenerationOutput:
    """What :func:`generate_tokens` returns, one entry per prompt.

    ``tokens``: the new ids (a final EOS included when it stopped the row); ``texts``: their text (cut
    before a stop string); ``logits``: ``(n_new, V)`` float32, the logits each new id was chosen from
    (only with ``return_logits=True``); ``prompt_starts`` / ``patch_starts``: per prompt / new byte, does it
    start a patch; ``finish_reasons``: ``"eos"``, ``"stop"`` or ``"length"``.
    """

    tokens: list[list[int]]
    texts: list[str]
    logits: list[torch.Tensor] | None
    prompt_starts: list[list[bool]]
    patch_starts: list[list[bool]]
    finish_reasons: list[str]


def resolve_patcher(model: BLT, patcher: Patcher | None, entropy_model: EntropyModel | None) -> Patcher:
    """``patcher`` or the model's (``Patcher.for_model``); ``entropy_model`` (if given) is used without changing
    the caller's objects."""
    if not isinstance(model, BLT):
        raise ValueError(f"generation needs a BLT model, got {type(model).__name__}")
    p = patcher if patcher is not None else Patcher.for_model(model)
    if entropy_model is not None and p.entropy_model is not entropy_model:
        p = copy.copy(p)
        p.entropy_model = entropy_model
    if p.mode == "entropy" and p.entropy_model is None:
        raise ValueError(
            "entropy patching needs an entropy model: pass entropy_model=..., a Patcher with one, or load the "
            "model with load_model(..., entropy_model=...)"
        )
    return p


def encode_prompts(prompts: list[str | bytes] | str | bytes) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string or a non-empty list of strings")
    tok = ByteTokenizer()
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, bytes)):
            raise ValueError(f"prompts[{i}] must be str or bytes, got {type(p).__name__}")
        out.append(tok.encode(p, add_bos=True, add_eos=False))
    return out


def compile_pays(model: BLT, n_rows: int, max_new_bytes: int) -> bool:
    """Whether compiling the step is worth its one-off cost for this call: always on CUDA (a step is launch
    bound there) and for a model already compiled in this process (the graphs are reused); on CPU when
    the call decodes enough bytes to earn back the compile time (:data:`CPU_COMPILE_MIN_BYTES`, measured
    with ``bench/generation.py``)."""
    device = next(model.parameters()).device
    if device.type == "cuda" or compiled_before(model):
        return True
    return device.type == "cpu" and n_rows * max_new_bytes >= CPU_COMPILE_MIN_BYTES


# New bytes (rows x max_new_bytes) from which compiling pays on CPU: bench/generation.py's break-even (a cold
# compile of 42-75 s against the time it saves per byte) measured 10.6 K - 10.8 K bytes on its configs
# (bench/generation_cpu.json, 2-core VM, 2026-12-02; 3.5 K - 14.9 K in earlier runs); below it the eager step
# finishes first.
CPU_COMPILE_MIN_BYTES = 10_240


def _engine(model: BLT, patcher: Patcher, cfg: GenerationConfig, n_rows: int):
    if cfg.fused_step is not None:
        warnings.warn("GenerationConfig(fused_step=...) is deprecated and ignored; use compile=...",
                      DeprecationWarning, stacklevel=3)
    if cfg.use_cache:
        compile_step = cfg.compile if cfg.compile is not None else compile_pays(model, n_rows, cfg.max_new_bytes)
        return IncrementalEngine(model, patcher, cfg.max_new_bytes, compile=compile_step)
    return FullRecomputeEngine(model, patcher)


def _steps(model, prompt_ids, patcher, cfg, generator, record_logits):
    """The shared driver: yields ``(row, new_id, logits_row, starts_patch, reason_or_None)`` per new byte."""
    cfg.validate()
    if cfg.max_new_bytes == 0:
        return
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        gens = row_generators(len(prompt_ids), device, cfg.seed, generator)
        stops = StopCondition(cfg.max_new_bytes, cfg.stop, cfg.stop_at_eos)
        if cfg.speculative:  # eager unless asked: the verification compiles once per (batch, draft length)
            yield from speculative_steps(model, prompt_ids, patcher, cfg, gens, stops, record_logits,
                                         bool(cfg.compile))
            return
        engine = _engine(model, patcher, cfg, len(prompt_ids))
        with torch.inference_mode():
            logits = engine.start(prompt_ids)
        yield ("prompt_starts", engine.prompt_starts)
        active = list(range(len(prompt_ids)))
        new: list[list[int]] = [[] for _ in prompt_ids]
        while active:
            nxt = sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, [gens[r] for r in active])
            starts = engine.next_starts
            keep = []
            for i, r in enumerate(active):
                t = int(nxt[i])
                new[r].append(t)
                reason = stops.reason(new[r])
                yield (r, t, logits[i] if record_logits else None, bool(starts[i]), reason)
                if reason is None:
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(active):
                engine.select(keep)
                nxt = nxt[keep]
                active = [active[i] for i in keep]
            with torch.inference_mode():
                logits = engine.advance(nxt)
    finally:
        model.train(was_training)


def generate_tokens(
    model: BLT,
    prompt_ids: list[list[int]],
    patcher: Patcher | None = None,
    *,
    entropy_model: EntropyModel | None = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> GenerationOutput:
    """Generate from token-id prompts (each starting with BOS, typically). See :class:`GenerationOutput`."""
    cfg = config or GenerationConfig()
    patcher = resolve_patcher(model, patcher, entropy_model)
    n = len(prompt_ids)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logits: list[list[torch.Tensor]] = [[] for _ in range(n)]
    starts: list[list[bool]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    prompt_starts: list[list[bool]] = [[] for _ in range(n)]
    for event in _steps(model, prompt_ids, patcher, cfg, generator, return_logits):
        if event[0] == "prompt_starts":
            prompt_starts = event[1]
            continue
        r, t, lg, s, reason = event
        tokens[r].append(t)
        starts[r].append(s)
        if lg is not None:
            logits[r].append(lg)
        if reason is not None:
            reasons[r] = reason
    stop = StopCondition(cfg.max_new_bytes, cfg.stop, cfg.stop_at_eos)
    return GenerationOutput(
        tokens=tokens,
        texts=[stop.text(t) for t in tokens],
        logits=[torch.stack(lg) if lg else torch.zeros(0, model.config.vocab_size) for lg in logits]
        if return_logits else None,
        prompt_starts=prompt_starts,
        patch_starts=starts,
        finish_reasons=reasons,
    )


def _config(max_new_bytes, temperature, top_k, top_p, seed, stop, stop_at_eos, use_cache, speculative=None,
            draft_threshold=None, compile=None) -> GenerationConfig:
    return GenerationConfig(max_new_bytes=max_new_bytes, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=list(stop or []), stop_at_eos=stop_at_eos, use_cache=use_cache,
                            speculative=speculative, draft_threshold=draft_threshold, compile=compile)


def generate(
    model: BLT,
    prompts: list[str | bytes] | str,
    patcher: Patcher | None = None,
    *,
    entropy_model: EntropyModel | None = None,
    max_new_bytes: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop: list[str] | None = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
    speculative: int | None = None,
    draft_threshold: float | str | None = None,
    compile: bool | None = None,
) -> list[str]:
    """Generate a continuation for every prompt (the prompt itself is not repeated). Returns texts.
    ``speculative`` / ``draft_threshold`` / ``compile``: see :class:`GenerationConfig`."""
    cfg = _config(max_new_bytes, temperature, top_k, top_p, seed, stop, stop_at_eos, use_cache, speculative,
                  draft_threshold, compile)
    out = generate_tokens(model, encode_prompts(prompts), patcher, entropy_model=entropy_model, config=cfg,
                          generator=generator)
    return out.texts


def generate_stream(
    model: BLT,
    prompt: str | bytes,
    patcher: Patcher | None = None,
    *,
    entropy_model: EntropyModel | None = None,
    max_new_bytes: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop: list[str] | None = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
    with_patches: bool = False,
    speculative: int | None = None,
    draft_threshold: float | str | None = None,
    compile: bool | None = None,
) -> Iterator[str] | Iterator[StreamPiece]:
    """Yield the continuation of one prompt as it is generated: ``str`` pieces, or :class:`StreamPiece`
    (text + patch index + whether that byte starts a patch) with ``with_patches=True``. No piece splits a
    UTF-8 character; the pieces joined equal ``generate(...)[0]``."""
    if not isinstance(prompt, (str, bytes)):
        raise ValueError(f"generate_stream takes one prompt (str or bytes), got {type(prompt).__name__}")
    cfg = _config(max_new_bytes, temperature, top_k, top_p, seed, stop, stop_at_eos, use_cache, speculative,
                  draft_threshold, compile)
    patcher = resolve_patcher(model, patcher, entropy_model)
    prompt_ids = encode_prompts([prompt])
    stream = TextStream(StopCondition(cfg.max_new_bytes, cfg.stop, cfg.stop_at_eos))
    patch_index = -1
    for event in _steps(model, prompt_ids, patcher, cfg, generator, False):
        if event[0] == "prompt_starts":
            patch_index = sum(event[1][0]) - 1
            continue
        _, t, _, starts_patch, reason = event
        if starts_patch:
            patch_index += 1
        if reason == "eos":
            continue  # the EOS ends the text and is not part of it
        text = stream.push(t)
        if text:
            yield StreamPiece(text, patch_index, starts_patch) if with_patches else text
    rest = stream.finish()
    if rest:
        yield StreamPiece(rest, patch_index, False) if with_patches else rest
