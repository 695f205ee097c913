"""Speculative decoding with the entropy model as the drafter: the same bytes (greedy) or the same
distribution (sampling) as plain cached decoding, with fewer BLT steps.

Shape legend: B rows, K drafted bytes at most per round (``GenerationConfig.speculative``), n bytes
stepped in a round (``n <= K + 1``), V vocabulary.

The BLT already carries a byte LM: the entropy model, which runs on every byte to place patch
boundaries. Inside a patch (where it is confident, by construction) the BLT mostly agrees with it, so
it can propose bytes that the BLT then checks all at once. One round, per row, from the BLT's own next
byte ``b`` (chosen at the end of the previous round, not yet stepped) at position ``T``:

1. **draft**: the drafter (:class:`Drafter`: the entropy model on the state's entropy-model cache, or
   its own) steps ``b`` and then each byte it drafts, one position per call, drafting ``d_1 .. d_m``
   (``m <= K``): the argmax of its
   next-byte logits (greedy), or a draw from its own distribution ``q`` (sampling: its logits under
   the same temperature / top-k / top-p as the BLT's). With ``draft_threshold`` the draft stops after
   a byte whose drafter entropy exceeds it (``"patch"``: the patcher's threshold — the next byte would
   start a patch, where the drafter is least sure);
2. **verify**: one multi-position BLT step over ``[b, d_1 .. d_m]``
   (:meth:`~torchblt.generation.IncrementalEngine.step` over ``n = m + 1`` bytes: entropy model,
   encoder and decoder over the ``n`` positions, the global model for the patches that close among
   them) gives the BLT's logits ``L_0 .. L_m`` after each of them;
3. **accept**: greedy keeps the longest prefix with ``d_i == argmax L_{i-1}`` and then the BLT's own
   byte ``argmax L_a`` (``a`` = drafts kept). Sampling applies the standard rule (Leviathan et al.
   2023, Chen et al. 2023): keep ``d_i`` with probability ``min(1, p_i(d_i) / q_i(d_i))`` (``p_i`` =
   the BLT's filtered distribution from ``L_{i-1}``); at the first rejection draw the BLT's byte from
   ``max(0, p_i - q_i)`` renormalised; if every draft is kept draw it from ``p`` after the last;
4. **roll back**: :meth:`~torchblt.generation.DecodeState.truncate` drops the ``m - a`` rejected
   positions from every BLT cache (the engine runs with ``lookahead = K + 1``), and the drafter's
   own cache (if it has one) forgets them too. A round emits ``a + 1`` bytes for one BLT step.

Why it is exact. Greedy: every emitted byte is the argmax of the BLT's logits after exactly the bytes
before it — a kept draft equals it by the acceptance test, the last byte is it by construction — and
those logits are the plain step's (a step over ``n`` bytes equals ``n`` single steps, and a truncated
state equals one that never stepped the dropped bytes: the engine's tests). So the bytes are plain
greedy decoding's, whatever the drafter proposes. Sampling: for one position, a draft ``d ~ q`` kept
with probability ``min(1, p(d)/q(d))``, else a draw from ``(p - q)+``, is a draw from ``p`` exactly
(the two branches sum to ``min(p, q) + (p - q)+ = p``); by induction every byte is drawn from the
BLT's distribution given the bytes before it. A greedy draft is the case ``q`` = one-hot. Rows use
their own generators (``seed + i``) and draw only for their own drafts, so a row gets the same output
in any batch — but not the same random stream as plain sampling: the same distribution, other draws.

The rows of a batch draft and verify together (one call over ``n`` positions for all rows); a row
whose draft stopped earlier has padding drafts past its limit that are stepped and always dropped. EOS,
stop strings and ``max_new_bytes`` are checked per emitted byte, as in plain decoding, so a stop inside
a draft ends the row exactly where plain decoding ends it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from torchblt.generation.cache import StackKV
from torchblt.generation.incremental import IncrementalEngine, distinct_prompts, exclusive_cumsum
from torchblt.generation.sampling import filter_logits, sample
from torchblt.generation.stream import StopCondition
from torchblt.model.blt import BLT
from torchblt.model.entropy_model import EntropyModel, entropy
from torchblt.patching import Patcher

DRAFT_MODES = ("auto", "greedy", "sample")


def validate_speculative(speculative: int | None, draft: str, draft_threshold: float | str | None,
                         use_cache: bool) -> None:
    """Raise ``ValueError`` naming the bad field of :class:`~torchblt.generation.GenerationConfig`."""
    if speculative is not None and (isinstance(speculative, bool) or int(speculative) != speculative
                                    or speculative < 0):
        raise ValueError(f"speculative must be a non-negative integer (drafted bytes per round) or None, "
                         f"got {speculative!r}")
    if draft not in DRAFT_MODES:
        raise ValueError(f"draft must be one of {', '.join(DRAFT_MODES)}, got {draft!r}")
    if draft_threshold is not None and draft_threshold != "patch":
        if isinstance(draft_threshold, bool) or not isinstance(draft_threshold, (int, float)) \
                or not draft_threshold >= 0.0:
            raise ValueError(f"draft_threshold must be a non-negative number, 'patch' or None, got {draft_threshold!r}")
    if speculative and not use_cache:
        raise ValueError("speculative decoding needs use_cache=True (it verifies drafts with the cached step)")


def resolve_threshold(draft_threshold: float | str | None, patcher: Patcher) -> float | None:
    """``"patch"`` -> the patcher's entropy threshold (entropy patching only)."""
    if draft_threshold != "patch":
        return None if draft_threshold is None else float(draft_threshold)
    if patcher.mode != "entropy" or patcher.threshold is None:
        raise ValueError(f"draft_threshold='patch' needs entropy patching with a threshold (the patcher's mode is "
                         f"{patcher.mode!r}); give a number instead")
    return float(patcher.threshold)


class Drafter:
    """The entropy model over each row's text so far: one byte per :meth:`step`, on a cache of the
    engine's kind (:class:`~torchblt.generation.cache.StackKV`, sized for the engine's ``lookahead``) that
    :meth:`rollback` cuts back.

    When the engine's patcher runs this very entropy model (entropy patching) the drafter is ``shared``:
    it drafts on the decoding state's own entropy-model cache and forgets its entries before the
    verification step, whose entropy-model pass over the same bytes writes them again (the entropies
    the patching rule needs). A round then costs the drafted bytes' calls and no more. Otherwise
    (other patching modes, or another entropy model) it keeps its own cache, prefilled over the prompt
    and advanced over every byte the BLT keeps."""

    def __init__(self, em: EntropyModel, engine: IncrementalEngine) -> None:
        self.em, self.engine = em, engine
        self.shared = em is engine.em
        self.eos = em.config.eos_id
        param = next(em.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.cache: StackKV | None = None
        self.pos = torch.zeros(0, dtype=torch.int64, device=self.device)  # (B,) bytes in the cache
        self.doc = torch.zeros_like(self.pos)  # (B,) the entropy model's document of position pos

    def _run(self, cache: StackKV, tokens: torch.Tensor, pos: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
        """The entropy model over ``tokens (B, n)`` at positions ``pos ..`` -> logits ``(B, n, V)``."""
        n = tokens.shape[1]
        positions = pos[:, None] + torch.arange(n, device=tokens.device)
        docs = doc[:, None] + exclusive_cumsum(tokens == self.eos)
        if cache.window is None:  # no window: every earlier position stays readable
            cache.reserve(int(positions.max()) + 1)
        return self.em(tokens, cache=cache.prepare(positions, docs))

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], state: Any) -> None:
        """The cache over every prompt (each on its own, in the engine's prefill chunks), batched;
        shared: the engine's ``state`` (prefilled over the same prompts) already holds it."""
        if self.shared:
            self.cache = state.entropy
            self.sync(state)
            return
        caches = []
        chunk = self.engine.prefill_chunk
        zero = torch.zeros(1, dtype=torch.int64, device=self.device)
        for ids in prompts:
            cache = self.engine._stack(self.em.config.transformer, 1, self.dtype, self.device)
            tokens = torch.tensor([ids], dtype=torch.int64, device=self.device)
            for a in range(0, len(ids), chunk):
                part = tokens[:, a : a + chunk]
                self._run(cache, part, zero + a, zero + int((tokens[0, :a] == self.eos).sum()))
            caches.append(cache)
        caches[0].extend(*caches[1:])  # one copy of every row
        self.cache = caches[0]
        self.pos = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=self.device)
        self.doc = torch.tensor([sum(t == self.eos for t in p) for p in prompts], dtype=torch.int64,
                                device=self.device)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one byte per row ``(B,)``; the next-byte logits ``(B, V)`` (float32)."""
        assert self.cache is not None, "prefill first"
        tokens = tokens.to(self.device, torch.int64)
        logits = self._run(self.cache, tokens[:, None], self.pos, self.doc)[:, 0]
        self.pos = self.pos + 1
        self.doc = self.doc + (tokens == self.eos).to(torch.int64)
        return logits.float()

    @torch.inference_mode()
    def rollback(self, pos: torch.Tensor, doc: torch.Tensor) -> None:
        """Forget every position at or after ``pos (B,)``; ``doc (B,)``: the document at ``pos``."""
        assert self.cache is not None, "prefill first"
        self.cache.truncate(pos.to(self.device))
        self.pos, self.doc = pos.to(self.device), doc.to(self.device)

    def sync(self, state: Any) -> None:
        """Shared: the position and document of the state's cursor (after its roll-back)."""
        self.pos, self.doc = state.cursor.pos.clone(), state.cursor.entropy_doc.clone()

    def keep(self, x: torch.Tensor, kept: torch.Tensor, start_pos: torch.Tensor, start_doc: torch.Tensor,
             state: Any) -> None:
        """After a round that started at ``start_pos`` and stepped ``x (B, n)``, of which the BLT kept
        ``x[:, : kept + 1]``: the drafter's text is the round's start plus those bytes."""
        if self.shared:
            self.sync(state)
            return
        eos_seen = (x == self.eos).to(torch.int64).cumsum(1)
        rows = torch.arange(x.shape[0], device=x.device)
        self.rollback(start_pos + kept + 1, start_doc + eos_seen[rows, kept].to(start_doc.device))

    @torch.inference_mode()
    def select(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` (shared: after the state's own ``select``, which already kept the cache's)."""
        assert self.cache is not None, "prefill first"
        rows = rows.to(self.device)
        if not self.shared:
            self.cache.select(rows)
        self.pos, self.doc = self.pos[rows], self.doc[rows]


class SpeculativeStats:
    """Counts of one run: rounds, drafted and accepted bytes (overall and per draft position)."""

    def __init__(self, k: int) -> None:
        self.rounds = 0
        self.drafted = [0] * k  # per draft position i (0-based): rows that proposed a byte there
        self.accepted = [0] * k  # ... and kept it
        self.emitted = 0
        self.kept_histogram: dict[int, int] = {}  # drafts kept in a round -> rows x rounds

    def acceptance(self) -> float:
        """Kept drafts / proposed drafts."""
        return sum(self.accepted) / max(1, sum(self.drafted))

    def as_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "drafted": sum(self.drafted), "accepted": sum(self.accepted),
                "acceptance": self.acceptance(), "per_position_drafted": self.drafted,
                "per_position_accepted": self.accepted, "kept_histogram": dict(sorted(self.kept_histogram.items())),
                "bytes_per_row_round": self.emitted / max(1, sum(self.kept_histogram.values()))}


def _draft(logits: torch.Tensor, live: torch.Tensor, sampled: bool, temperature: float, top_k: int, top_p: float,
           gens: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One drafted byte per row from the drafter's logits ``(B, V)`` and its distribution ``q (B, V)``
    (None for greedy drafts: a one-hot). Only ``live`` rows draw random numbers (a row's draws depend on
    nothing but its own text)."""
    greedy = logits.argmax(-1)
    if not sampled:
        return greedy, None
    q = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    out = greedy.clone()
    for b in range(logits.shape[0]):
        if bool(live[b]):
            out[b] = torch.multinomial(q[b], 1, generator=gens[b])[0]
    return out, q


def _accept_greedy(L: torch.Tensor, x: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts kept per row ``(B,)`` and the BLT's byte after them ``(B,)``."""
    n = x.shape[1]
    ok = (L[:, :-1].argmax(-1) == x[:, 1:]) & (torch.arange(n - 1, device=x.device) < limit[:, None])
    kept = ok.to(torch.int64).cumprod(1).sum(1)
    rows = torch.arange(x.shape[0], device=x.device)
    return kept, L[rows, kept].argmax(-1)


def _accept_sampled(L: torch.Tensor, x: torch.Tensor, limit: torch.Tensor, qs: list[torch.Tensor | None],
                    cfg: Any, gens: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule, row by row (each with its own generator)."""
    B = x.shape[0]
    kept, nxt = torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64)
    p_all = torch.softmax(filter_logits(L.flatten(0, 1), cfg.temperature, cfg.top_k, cfg.top_p), -1).view_as(L)
    for b in range(B):
        p, a, g = p_all[b], 0, gens[b]
        dist = None
        while a < int(limit[b]):
            d = int(x[b, a + 1])
            q = qs[a]
            qb = q[b] if q is not None else torch.nn.functional.one_hot(x[b, a + 1], p.shape[-1]).to(p.dtype)
            u = float(torch.rand((), generator=g, device=p.device))
            if u * float(qb[d]) < float(p[a, d]):
                a += 1
                continue
            residual = (p[a] - qb).clamp(min=0)
            dist = residual if float(residual.sum()) > 0 else p[a]
            break
        if dist is None:
            dist = p[a]
        kept[b], nxt[b] = a, torch.multinomial(dist, 1, generator=g)[0]
    return kept.to(x.device), nxt.to(x.device)


def speculative_steps(model: BLT, prompt_ids: list[list[int]], patcher: Patcher, cfg: Any,
                      gens: list[torch.Generator | None], stops: StopCondition, record_logits: bool,
                      compile_step: bool = False, stats: SpeculativeStats | None = None) -> Iterator[tuple]:
    """The generation driver's events (see :func:`torchblt.generation.api._steps`) with speculative
    rounds: ``("prompt_starts", flags)``, then ``(row, new_id, logits_row, starts_patch, reason)`` per
    new byte, in order per row."""
    K = int(cfg.speculative)
    em = patcher.entropy_model
    if em is None:
        raise ValueError("speculative decoding drafts with the entropy model: this patcher has none (pass "
                         "entropy_model=..., or load the model with its entropy model)")
    threshold = resolve_threshold(cfg.draft_threshold, patcher)
    sampling = cfg.temperature > 0
    sampled_drafts = sampling and cfg.draft != "greedy"
    engine = IncrementalEngine(model, patcher, cfg.max_new_bytes + K + 1, compile=compile_step, lookahead=K + 1)
    drafter = Drafter(em, engine)
    # identical prompts (n samples of one prompt) are prefilled once, by the BLT and the drafter alike
    unique, repeat = distinct_prompts(prompt_ids)
    with torch.inference_mode():
        state, logits, prompt_starts = engine.prefill(unique)
        drafter.prefill(unique, state)
        if repeat is not None:
            idx = torch.tensor(repeat, dtype=torch.int64, device=state.cursor.pos.device)
            state.select(idx)
            drafter.select(idx)
            logits, prompt_starts = logits[idx.to(logits.device)], [prompt_starts[i] for i in repeat]
    yield ("prompt_starts", prompt_starts)
    dev = state.cursor.pos.device
    rows = list(range(len(prompt_ids)))
    new: list[list[int]] = [[] for _ in prompt_ids]
    # the first new byte: the BLT's own, from the prompt's logits
    nxt = sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, gens).to(dev)
    flags = state.cursor.next_start.tolist()
    pending = [[(int(nxt[i]), logits[i], bool(flags[i]))] for i in range(len(rows))]
    while True:
        keep = []
        for i, r in enumerate(rows):
            reason = None
            for t, lg, s in pending[i]:
                new[r].append(t)
                reason = stops.reason(new[r])
                yield (r, t, lg if record_logits else None, s, reason)
                if reason is not None:
                    break
            if reason is None:
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(rows):
            idx = torch.tensor(keep, dtype=torch.int64, device=dev)
            state.select(idx)
            drafter.select(idx)
            nxt = nxt[idx]
            rows, gens = [rows[i] for i in keep], [gens[i] for i in keep]
        with torch.inference_mode():
            pending, nxt = _round(engine, state, drafter, nxt, K, threshold, sampled_drafts, cfg, gens,
                                  torch.tensor([cfg.max_new_bytes - len(new[r]) for r in rows], device=dev), stats)


def _round(engine: IncrementalEngine, state: Any, drafter: Drafter, nxt: torch.Tensor, K: int,
           threshold: float | None, sampled_drafts: bool, cfg: Any, gens: list[torch.Generator | None],
           remaining: torch.Tensor, stats: SpeculativeStats | None) -> tuple[list[list[tuple]], torch.Tensor]:
    """One round (module docstring): draft, verify in one step, accept, roll back. Returns per row the
    emitted ``(byte, logits, starts_patch)`` and the BLT's next byte (the last emitted one)."""
    dev = nxt.device
    start_pos, start_doc = state.cursor.pos.clone(), drafter.doc.clone()
    limit = (remaining - 1).clamp(min=0, max=K)  # drafts a row may keep: never past max_new_bytes
    tokens, qs, stepped = [nxt], [], 0
    for i in range(K):  # draft byte i + 1
        if i >= int(limit.max()):
            break
        dl = drafter.step(tokens[-1])  # (B, V): the drafter's next byte after tokens[i]
        stepped += 1
        if threshold is not None:
            limit = torch.where(entropy(dl).to(dev) > threshold, limit.clamp(max=i), limit)
        if i >= int(limit.max()):
            break
        d, q = _draft(dl, i < limit, sampled_drafts, cfg.temperature, cfg.top_k, cfg.top_p, gens)
        tokens.append(d.to(dev))
        qs.append(q)
    x = torch.stack(tokens, 1)  # (B, n): the BLT's byte and the drafts
    n = x.shape[1]
    if drafter.shared:  # the verification's own entropy-model pass steps these bytes again
        drafter.rollback(start_pos, start_doc)
    elif stepped < n:  # its own cache: every byte the BLT may keep
        drafter.step(tokens[-1])
    L, after = engine._call(state, x, compiled=engine.compile)  # (B, n, V): logits after each byte
    L = L.float()
    if cfg.temperature > 0:
        kept, bonus = _accept_sampled(L, x, limit, qs, cfg, gens)
    else:
        kept, bonus = _accept_greedy(L, x, limit)
    state.truncate(n - 1 - kept)
    drafter.keep(x, kept, start_pos, start_doc, state)
    flags = after.next_start.tolist()
    kept_l, x_l, bonus_l = kept.tolist(), x.tolist(), bonus.tolist()
    out = []
    for b in range(x.shape[0]):
        a = kept_l[b]
        out.append([(x_l[b][i + 1], L[b, i], flags[b][i]) for i in range(a)] + [(bonus_l[b], L[b, a], flags[b][a])])
    if stats is not None:
        stats.rounds += 1
        limit_l = limit.tolist()
        for b in range(x.shape[0]):
            for i in range(limit_l[b]):
                stats.drafted[i] += 1
                stats.accepted[i] += int(i < kept_l[b])
            stats.emitted += kept_l[b] + 1
            stats.kept_histogram[kept_l[b]] = stats.kept_histogram.get(kept_l[b], 0) + 1
    return out, bonus
