"""Bits per byte: the one evaluation that BLT, byte and BPE models share, used by ``blt eval``, by the
trainer's validation and by the lm-eval adapter (so they can never disagree).

Definition (what counts)
------------------------
Each document becomes ``[BOS] + its UTF-8 bytes + [EOS]`` (``count_eos=False``: no EOS). Every position
after the BOS is a *target*: each byte and the final EOS are predicted from everything before them in the
document, and their natural-log cross-entropies are summed into ``nats``. The BOS is never predicted.
The EOS counts as one byte, so::

    n_targets     = n_bytes + n_documents          (n_bytes + 0 with count_eos=False)
    nats_per_byte = nats / n_targets
    bpb           = nats_per_byte / ln 2

A model whose next-byte distribution is uniform over the 260 ids therefore scores exactly
``log2(260) = 8.022``. A BPE model (:mod:`torchblt.baselines.bpe`) predicts tokens, not bytes; its summed
token cross-entropy (its EOS included) is divided by the same ``n_targets``, so all three kinds of model
are on one scale, as in the BLT paper (§4.6: ``BPB = L_CE / (ln 2 * n_bytes)``).

Long documents (sliding windows)
--------------------------------
A document longer than the context (``context_bytes`` tokens, BOS and EOS included) is cut into
overlapping windows of at most ``context_bytes`` tokens. The first window starts at the BOS and scores
all its targets; each later window starts ``ceil(context_bytes / 2)`` tokens before the first target not
yet scored (or earlier for the last window, so that it is full) and scores only the new targets. So every
target is scored exactly once, with at least ``context_bytes / 2`` tokens of left context except in the
first window. A window that does not start at the BOS starts mid-document, as rows of packed training
batches do.

BLT patching
------------
Each window is patched on its own (``patcher.patch(window, include_next_token=True)``; entropy patchers
run their entropy model on the window), its first patch split off so the first token is a patch alone,
as the forward requires. ``mean_patch_length`` is the number of tokens fed to the model divided by the
number of patches holding them (summed over windows; the BOS patch counts, a last patch that holds only
the next-token slot does not), so byte patching gives exactly 1. Windows of different lengths are
batched with right padding; padding is causal-invisible (it only follows real tokens) and forms a patch of
its own, so a batched result equals the one-window-at-a-time result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchblt.model.blt import BLT
from torchblt.model.config import BPEConfig
from torchblt.model.entropy_model import EntropyModel
from torchblt.patching import Patcher, split_first_patch
from torchblt.tokenizer import BOE_ID, BOS_ID, EOS_ID, OFFSET

__all__ = [
    "BPBResult",
    "Window",
    "default_context",
    "document_tokens",
    "evaluate_bpb",
    "make_windows",
    "score_sequences",
]

LN2 = math.log(2.0)


@dataclass
class BPBResult:
    """Totals of one evaluation. ``bpb`` and ``nats_per_byte`` are per target (bytes + one EOS per document)."""

    bpb: float
    nats_per_byte: float
    n_bytes: int  # UTF-8 bytes of the documents (EOS not included)
    n_documents: int
    n_targets: int  # predictions scored: n_bytes + n_documents (or n_bytes with count_eos=False)
    nats: float  # summed cross-entropy over the targets
    mean_patch_length: float | None  # None for byte models
    n_windows: int = 0
    context_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @staticmethod
    def combine(results: list[BPBResult]) -> BPBResult:
        """Totals over several results (e.g. per-file results into one)."""
        nats = sum(r.nats for r in results)
        n_targets = sum(r.n_targets for r in results)
        tokens = sum(r.extra.get("n_tokens_patched", 0) for r in results)
        patches = sum(r.extra.get("n_patches", 0) for r in results)
        has_patches = any(r.mean_patch_length is not None for r in results)
        extra: dict[str, Any] = {}
        if has_patches:
            extra = {"n_tokens_patched": tokens, "n_patches": patches}
        return BPBResult(
            bpb=nats / n_targets / LN2 if n_targets else float("nan"),
            nats_per_byte=nats / n_targets if n_targets else float("nan"),
            n_bytes=sum(r.n_bytes for r in results),
            n_documents=sum(r.n_documents for r in results),
            n_targets=n_targets,
            nats=nats,
            mean_patch_length=(tokens / patches if patches else None) if has_patches else None,
            n_windows=sum(r.n_windows for r in results),
            context_bytes=max((r.context_bytes for r in results), default=0),
            extra=extra,
        )


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` of sequence ``seq``; targets ``[score_from, end)`` are scored (score_from >= start+1)."""

    seq: int
    start: int
    end: int
    score_from: int


def make_windows(seq: int, length: int, context: int, first_target: int = 1) -> list[Window]:
    """Windows of at most ``context`` tokens scoring targets ``first_target .. length-1`` exactly once.

    Every window starts ``ceil(context / 2)`` tokens before its first new target, or earlier when that
    still fits (at the sequence start, and for the last window, which is made full).
    """
    if context < 2:
        raise ValueError(f"context_bytes must be at least 2, got {context}")
    keep = (context + 1) // 2  # left context of every scored target (except near the start)
    windows = []
    nxt = max(first_target, 1)
    while nxt < length:
        start = max(0, min(nxt - keep, length - context))
        end = min(start + context, length)
        windows.append(Window(seq, start, end, nxt))
        nxt = end
    return windows


def default_context(model: nn.Module) -> int:
    """Context in tokens a model was built for: the local models' RoPE/training length for a BLT,
    the transformer's ``max_seqlen`` for a byte or BPE LM."""
    if isinstance(model, BLT):
        c = model.config
        return min(c.encoder.max_seqlen, c.decoder.max_seqlen)
    cfg = getattr(model, "config", None)
    t = getattr(cfg, "transformer", None)
    if t is not None:
        return t.max_seqlen
    raise ValueError(f"cannot tell the context length of a {type(model).__name__}; pass context_bytes")


# --------------------------------------------------------------------------- scoring engine


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_patch_lengths(lengths: torch.Tensor, seq_lens: torch.Tensor, T: int) -> torch.Tensor:
    """Rows summing to ``seq_len + 1`` -> rows summing to ``T + 1``: the padding becomes one more patch."""
    pad = (T - seq_lens).to(lengths.dtype)  # (B,)
    B, P = lengths.shape
    out = torch.zeros(B, P + 1, dtype=lengths.dtype, device=lengths.device)
    out[:, :P] = lengths
    n_real = (lengths > 0).sum(1)  # (B,)
    out[torch.arange(B, device=lengths.device), n_real] = pad
    keep = (out != 0).any(0)
    keep[0] = True
    last = int(keep.nonzero().max().item()) + 1
    return out[:, :last]


@torch.no_grad()
def _forward_batch(
    model: nn.Module, rows: list[list[int]], patcher: Patcher | None, device: torch.device
) -> tuple[torch.Tensor, int, int]:
    """Log-probabilities ``(B, T, V)`` of right-padded ``rows``; tokens fed and patches used (BLT)."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), BOE_ID, dtype=torch.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    tokens = tokens.to(device)
    seq_lens = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device)
    n_patches = 0
    if isinstance(model, BLT):
        assert patcher is not None
        lengths, _ = patcher.patch(tokens, include_next_token=True, seq_lens=seq_lens)
        lengths = split_first_patch(lengths)
        # patches holding at least one real token (not the last one when it is only the next-token slot)
        patch_starts = torch.cumsum(lengths, dim=1) - lengths
        n_patches = int(((lengths > 0) & (patch_starts < seq_lens[:, None])).sum().item())
        if bool((seq_lens < T).any()):
            lengths = _pad_patch_lengths(lengths, seq_lens, T)
        logits = model(tokens, lengths)
    else:
        logits = model(tokens)
    return F.log_softmax(logits.float(), dim=-1), int(seq_lens.sum().item()), n_patches


@dataclass
class WindowScores:
    """Scores of one window's targets ``[window.score_from, window.end)``."""

    window: Window
    logprobs: torch.Tensor  # (n,) float32: log p(target | everything before it in the window)
    greedy: torch.Tensor  # (n,) bool: the target is the argmax


def _iter_window_scores(
    model: nn.Module,
    sequences: Iterable[tuple[int, list[int], int]],
    *,
    patcher: Patcher | None,
    context: int,
    batch_size: int,
    device: torch.device,
    stats: dict[str, int],
) -> Iterator[tuple[list[int], WindowScores]]:
    """Score ``(seq_id, tokens, first_target)`` sequences in batches of windows; yields per window."""
    pending: list[tuple[list[int], Window]] = []

    def flush() -> Iterator[tuple[list[int], WindowScores]]:
        # longest first: fewer padded positions per batch
        pending.sort(key=lambda p: p[1].end - p[1].start, reverse=True)
        for i in range(0, len(pending), batch_size):
            chunk = pending[i : i + batch_size]
            rows = [toks[w.start : w.end] for toks, w in chunk]
            logp, n_tok, n_patch = _forward_batch(model, rows, patcher, device)
            stats["n_tokens_patched"] += n_tok
            stats["n_patches"] += n_patch
            stats["n_windows"] += len(chunk)
            for b, (toks, w) in enumerate(chunk):
                lo, hi = w.score_from - w.start, w.end - w.start
                targets = torch.tensor(toks[w.score_from : w.end], dtype=torch.int64, device=logp.device)
                pred = logp[b, lo - 1 : hi - 1]  # (n, V): position i predicts token i+1
                lp = pred.gather(1, targets[:, None])[:, 0]
                greedy = pred.argmax(-1) == targets
                yield toks, WindowScores(w, lp.cpu(), greedy.cpu())
        pending.clear()

    buffer_windows = batch_size * 8
    for seq_id, toks, first_target in sequences:
        for w in make_windows(seq_id, len(toks), context, first_target):
            pending.append((toks, w))
        if len(pending) >= buffer_windows:
            yield from flush()
    if pending:
        yield from flush()


def _resolve(
    model: nn.Module, patcher: Patcher | None, context_bytes: int | None, device: Any
) -> tuple[Patcher | None, int, torch.device]:
    if not isinstance(model, (BLT, EntropyModel)) and not hasattr(model, "config"):
        raise ValueError(f"model must be a BLT or a byte/BPE language model, got {type(model).__name__}")
    if isinstance(model, BLT):
        patcher = patcher if patcher is not None else Patcher.for_model(model)
        if patcher.mode == "entropy" and patcher.entropy_model is None:
            raise ValueError(
                "this BLT uses entropy patching but has no entropy model: pass --entropy-model DIR "
                "(or load_model(..., entropy_model=DIR), or a Patcher with an entropy_model)"
            )
    context = default_context(model) if context_bytes is None else int(context_bytes)
    if context < 2:
        raise ValueError(f"context_bytes must be at least 2, got {context_bytes}")
    dev = torch.device(device) if device is not None else _model_device(model)
    return patcher, context, dev


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    sequences: list[list[int]],
    *,
    first_targets: list[int] | None = None,
    patcher: Patcher | None = None,
    context_bytes: int | None = None,
    batch_size: int = 8,
    device: Any = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-target log-probabilities and greedy flags of token sequences (each starting with a BOS or any
    context), with the same windows and patching as :func:`evaluate_bpb`.

    Returns, for each sequence, ``(logprobs (n,), greedy (n,))`` over targets ``first_target .. len-1``
    (``first_targets`` default 1: every token after the first).
    """
    patcher, context, dev = _resolve(model, patcher, context_bytes, device)
    firsts = first_targets or [1] * len(sequences)
    parts: dict[int, list[WindowScores]] = {i: [] for i in range(len(sequences))}
    stats = {"n_tokens_patched": 0, "n_patches": 0, "n_windows": 0}
    items = ((i, list(s), f) for i, (s, f) in enumerate(zip(sequences, firsts)))
    for _, ws in _iter_window_scores(
        model, items, patcher=patcher, context=context, batch_size=batch_size, device=dev, stats=stats
    ):
        parts[ws.window.seq].append(ws)
    out = []
    for i in range(len(sequences)):
        ws = sorted(parts[i], key=lambda w: w.window.score_from)
        if ws:
            out.append((torch.cat([w.logprobs for w in ws]), torch.cat([w.greedy for w in ws])))
        else:
            out.append((torch.zeros(0), torch.zeros(0, dtype=torch.bool)))
    return out


def document_tokens(doc: bytes | str, count_eos: bool = True) -> tuple[list[int], int]:
    """``[BOS] + bytes (+ [EOS])`` for the byte vocabulary, and the document's byte count."""
    if isinstance(doc, str):
        doc = doc.encode("utf-8", errors="ignore")
    elif not isinstance(doc, (bytes, bytearray, memoryview)):
        raise ValueError(f"documents must be bytes or str, got {type(doc).__name__}")
    data = bytes(doc)
    return [BOS_ID, *(b + OFFSET for b in data), *([EOS_ID] if count_eos else [])], len(data)


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module,
    documents: Iterable[bytes | str],
    *,
    patcher: Patcher | None = None,
    context_bytes: int | None = None,
    batch_size: int = 8,
    device: Any = None,
    max_documents: int | None = None,
    count_eos: bool = True,
    progress: Callable[[int], None] | None = None,
) -> BPBResult:
    """Bits per byte of ``model`` on ``documents`` (see the module docstring for the exact definition).

    ``model``: a :class:`BLT` (patched per window by ``patcher``, default ``Patcher.for_model(model)``), a byte LM
    (:class:`EntropyModel`) or a BPE LM (an :class:`EntropyModel` whose config is a
    :class:`~torchblt.model.config.BPEConfig`, which brings its tokenizer). ``context_bytes``: window length in tokens (default: what the model was built for, see
    :func:`default_context`). ``progress(n_bytes)`` is called as documents are read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_documents is not None and max_documents < 0:
        raise ValueError(f"max_documents must be >= 0, got {max_documents}")
    patcher, context, dev = _resolve(model, patcher, context_bytes, device)
    # a BPE model's config brings its tokenizer; byte models use bytes
    config = getattr(model, "config", None)
    encode = config.document_tokens if isinstance(config, BPEConfig) else document_tokens
    was_training = model.training
    model.eval()
    counts = {"n_bytes": 0, "n_documents": 0, "n_targets": 0}

    def sequences() -> Iterator[tuple[int, list[int], int]]:
        for i, doc in enumerate(documents):
            if max_documents is not None and i >= max_documents:
                return
            toks, n = encode(doc, count_eos=count_eos)
            counts["n_bytes"] += n
            counts["n_documents"] += 1
            counts["n_targets"] += n + int(count_eos)
            if progress is not None:
                progress(n)
            yield i, toks, 1

    stats = {"n_tokens_patched": 0, "n_patches": 0, "n_windows": 0}
    nats = 0.0
    try:
        for _, ws in _iter_window_scores(
            model, sequences(), patcher=patcher, context=context, batch_size=batch_size, device=dev, stats=stats
        ):
            nats -= float(ws.logprobs.double().sum())
    finally:
        model.train(was_training)
    n_targets = counts["n_targets"]
    is_blt = isinstance(model, BLT)
    extra: dict[str, Any] = {}
    if is_blt:
        extra = {"n_tokens_patched": stats["n_tokens_patched"], "n_patches": stats["n_patches"]}
    return BPBResult(
        bpb=nats / n_targets / LN2 if n_targets else float("nan"),
        nats_per_byte=nats / n_targets if n_targets else float("nan"),
        n_bytes=counts["n_bytes"],
        n_documents=counts["n_documents"],
        n_targets=n_targets,
        nats=nats,
        mean_patch_length=(stats["n_tokens_patched"] / stats["n_patches"] if stats["n_patches"] else None)
        if is_blt
        else None,
        n_windows=stats["n_windows"],
        context_bytes=context,
        extra=extra,
    )
