"""Next-byte sampling: pure functions over logits, randomness only from an explicit ``torch.Generator``.

Shape legend: B rows, V vocabulary (260).

``temperature == 0`` is greedy (argmax, lowest index on ties). Otherwise the logits are divided by the
temperature, then top-k keeps the ``k`` largest (``0`` = all), then top-p (nucleus) keeps the smallest
set of most likely bytes whose probability reaches ``top_p`` (``1.0`` = all; the most likely byte is
always kept), and one byte is drawn from the renormalised distribution.

Every row draws from its own generator (:func:`row_generators`), so a row's sample does not depend on
which other rows share its batch: the plain and the cached generators, batched or not, consume random
numbers identically.
"""

from __future__ import annotations

import torch


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ``ValueError`` naming the bad field."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature-scaled logits ``(B, V)`` with the bytes outside top-k / top-p set to ``-inf`` (fp32)."""
    x = logits.float() / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a byte when the bytes before it already reach top_p (so the first byte always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next byte ids ``(B,)`` int64 from logits ``(B, V)``; ``generators[b]`` drives row b's draw."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    B = probs.shape[0]
    gens = generators if generators is not None else [None] * B
    out = [torch.multinomial(probs[b], 1, generator=gens[b]) for b in range(B)]
    return torch.cat(out).to(torch.int64)


def row_generators(
    n_rows: int, device: torch.device, seed: int | None = None, generator: torch.Generator | None = None
) -> list[torch.Generator | None]:
    """One generator per row: row ``i`` is seeded ``seed + i``; an explicit ``generator`` is shared by all
    rows (drawn in row order); neither: ``None`` (torch's global RNG)."""
    if generator is not None:
        return [generator] * n_rows
    if seed is None:
        return [None] * n_rows
    gens = []
    for i in range(n_rows):
        g = torch.Generator(device=device)
        g.manual_seed(int(seed) + i)
        gens.append(g)
    return gens
