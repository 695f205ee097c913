"""Hash n-gram embeddings of the local encoder.

For every byte position j and n-gram size g, the ids ``x[j-g+1..j]`` (left-padded with 0 = BOE) are
hashed with a polynomial rolling hash ``sum_i x[j-g+1+i] * p^i`` (oldest byte times ``p^0``) in int64
with two's-complement wrap-around, then reduced with floor modulo into ``[0, vocab_size)``. This is
bit-exact with the reference (including the wrap-around, which the reference gets from torch's int64
overflow; we compute the wrapped prime powers explicitly so the result does not depend on how a device
evaluates ``p ** i``).

Tables are ordered function-major, then n-gram size: table ``f * len(sizes) + s`` embeds
``ngram_hash_ids(tokens, sizes[s], f, vocab)``. The embeddings are *added* to the byte embedding in that
order (the order matters in bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from torchblt.model.transformer import embedding

# Primes of the reference's hash functions (hash_index selects one).
HASH_PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)

_MASK64 = (1 << 64) - 1


def _wrapped_int64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _prime_powers(prime: int, group_size: int) -> list[int]:
    return [_wrapped_int64(pow(prime, i, 1 << 64)) for i in range(group_size)]


def _power_table(n_functions: int, group_sizes: list[int]) -> list[list[int]]:
    """Rows of :meth:`HashNgramEmbedding.ids`' ``(tables, g_max)`` matrix (zeros before each n-gram)."""
    g = max(group_sizes)
    return [[0] * (g - size) + _prime_powers(HASH_PRIMES[f], size) for f in range(n_functions) for size in group_sizes]


def ngram_hash_ids(
    tokens: torch.Tensor, group_size: int = 3, hash_index: int = 0, vocab_size: int = 500002
) -> torch.Tensor:
    """Hash ids of the n-grams ending at every position: ``(B, T) int64 -> (B, T) int64``."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    if not 0 <= hash_index < len(HASH_PRIMES):
        raise ValueError(f"hash_index must be in [0, {len(HASH_PRIMES)}), got {hash_index}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return _hash_ids(tokens, 0, [_prime_powers(HASH_PRIMES[hash_index], group_size)], vocab_size)[..., 0]


def _hash_ids(tokens: torch.Tensor, context: int, table: list[list[int]], vocab_size: int) -> torch.Tensor:
    """The hash ids of the positions of ``tokens (B, C + n)`` after its first ``context``, for every row of
    ``table`` (``(tables, g)`` prime powers, oldest byte first: :func:`_power_table`): ``(B, n, tables)``.
    Each position's window of the ``g`` bytes up to it (BOE = 0 before the text) times the powers, summed in
    int64 (wrapping on overflow, as the reference's), then reduced with floor modulo."""
    g = len(table[0])
    x = tokens.to(torch.int64)
    if context < g - 1:  # BOE before the text
        x, context = torch.nn.functional.pad(x, (g - 1 - context, 0), value=0), g - 1
    windows = x[:, context - (g - 1) :].unfold(1, g, 1)  # (B, n, g): the g bytes up to each position
    powers = torch.tensor(table, dtype=torch.int64, device=x.device)  # (tables, g)
    h = (windows[:, :, None, :] * powers).sum(-1)  # (B, n, tables), int64, wraps on overflow
    return torch.remainder(h, vocab_size)


class HashNgramEmbedding(nn.ModuleList):
    """``n_functions * len(group_sizes)`` embedding tables whose lookups are summed onto byte embeddings.

    A ``ModuleList`` so that parameter names are ``<name>.<i>.weight``, as in the released checkpoints.
    """

    def __init__(self, group_sizes: list[int], vocab_size: int, n_functions: int, dim: int) -> None:
        super().__init__(embedding(vocab_size, dim) for _ in range(n_functions * len(group_sizes)))
        self.group_sizes = list(group_sizes)
        self.vocab_size = vocab_size
        self.n_functions = n_functions
        self.power_table = _power_table(n_functions, self.group_sizes)  # computed once, not per call

    def ids(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Hash ids for every table, in table order (function-major, then n-gram size). ``context (B, C)``:
        the tokens before ``tokens`` (a decoding step's recent bytes; zeros = BOE where a text has fewer),
        so that the n-grams ending at ``tokens``' first positions are those of the whole text.

        Every table's hash in one product: each position's window of the largest n-gram (oldest byte
        first) times a ``(tables, g_max)`` matrix of prime powers, zero on the bytes older than a table's
        n-gram (:func:`_hash_ids`, which :func:`ngram_hash_ids` runs with one table: a zero term adds
        nothing and wrapping addition does not depend on the order, so the ids are identical); a decoding
        step is a handful of kernels instead of eight per table."""
        if tokens.shape[1] == 0:
            return [tokens.new_zeros(tokens.shape, dtype=torch.int64) for _ in range(len(self))]
        if context is None:
            return list(_hash_ids(tokens, 0, self.power_table, self.vocab_size).unbind(-1))
        tokens = torch.cat([context.to(tokens.dtype), tokens], dim=1)
        return list(_hash_ids(tokens, context.shape[1], self.power_table, self.vocab_size).unbind(-1))

    def add_to(self, embeds: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``embeds + table_0(ids_0) + table_1(ids_1) + ...`` summed in the reference's order."""
        for table, table_ids in zip(self, self.ids(tokens, context)):
            embeds = embeds + table(table_ids)
        return embeds
