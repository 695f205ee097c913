"""Hash n-gram embedding tables sharded by rows across the data-parallel ranks.

The hash tables are most of a BLT's parameters (blt-1b: 3.07 B of 4.53 B) but a step reads a few of
their rows. Under FSDP every step would all-gather each table whole and reduce-scatter its dense
gradient; here each rank *owns* a contiguous block of rows of every table (a ``DTensor`` with placement
``Shard(0)``, kept out of FSDP) and a lookup exchanges only the rows the batch touches:

1. every rank hashes its tokens (``ids (B, T)`` per table) and keeps the distinct ``(table, row)`` keys,
   ordered by the rank that owns the row (owner = ``row // rows_per_rank``);
2. ``all_to_all`` of the key counts, then of the keys: each owner learns which of its rows are wanted;
3. the owner gathers them from its local shards and ``all_to_all`` sends them back; every position then
   reads its row from the received ones, and the embeddings are added in the reference's table order;
4. backward: the row gradients (summed over the positions of a rank) go back to their owners by the
   reverse ``all_to_all``; the owner adds them into its shard's gradient and divides by the world size,
   which is FSDP's gradient averaging, so the result is the plain path's within fp32 summation order.

Neither a table nor its gradient is ever gathered whole, and the optimizer (AdamW) state of a row lives
on its owner only. The parameter names do not change and the tables are ordinary DTensors, so DCP
saves and reshards them like FSDP's parameters and ``get_model_state_dict(full_state_dict=True)``
exports them. Per step and rank the tables cost ``2 * keys * dim * bytes`` (forward rows + backward
gradients) instead of about ``3 * params * bytes`` (all-gather in forward and backward, reduce-scatter).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["local_slices", "shard_hash_tables", "sharded_tables"]


def local_slices(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``(local tensor, its slices of the global tensor)``: the shard of a DTensor, or a plain tensor whole."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def sharded_tables(model: nn.Module) -> list[nn.Parameter]:
    """The row-sharded hash tables of ``model`` (empty if :func:`shard_hash_tables` was not applied)."""
    emb = getattr(model, "encoder_hash_tok_embedding", None)
    return [t.weight for t in emb] if emb is not None and getattr(emb, "row_mesh", None) is not None else []


def shard_hash_tables(model: nn.Module, mesh) -> list[nn.Parameter]:
    """Make ``model``'s hash tables row-sharded DTensors over the 1-D ``mesh`` and route lookups through
    the row exchange. Returns the table parameters (to keep out of FSDP). Works on the meta device."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    emb = getattr(model, "encoder_hash_tok_embedding", None)
    if emb is None:
        return []
    for table in emb:
        w = table.weight.detach()
        if w.is_meta:
            dt = distribute_tensor(w, mesh, [Shard(0)])
        else:  # a real tensor: keep this rank's rows (every rank holds the same full table)
            probe = distribute_tensor(torch.empty_like(w, device="meta"), mesh, [Shard(0)])
            _, index = local_slices(probe)
            dt = DTensor.from_local(w[index].clone(), mesh, [Shard(0)], shape=w.shape, stride=w.stride())
        table.weight = nn.Parameter(dt)
    emb.row_mesh = mesh
    emb.add_to = types.MethodType(_sharded_add_to, emb)  # instance attribute: the module's code is unchanged
    return [t.weight for t in emb]


def _sharded_add_to(self, embeds: torch.Tensor, tokens: torch.Tensor, ids: list[torch.Tensor] | None = None):
    """``HashNgramEmbedding.add_to`` with row-sharded tables (see the module docstring)."""
    ids = ids if ids is not None else self.ids(tokens)
    group = self.row_mesh.get_group()
    world = dist.get_world_size(group)
    n_tables, vocab = len(ids), self.vocab_size
    per_rank = -(-vocab // world)  # rows of every table on each rank (the last ranks may hold fewer)
    span = n_tables * per_rank  # keys of one owner: table * per_rank + local row
    flat = torch.stack([i.reshape(-1) for i in ids])  # (tables, B*T)
    owner = flat // per_rank
    table_index = torch.arange(n_tables, device=flat.device)[:, None]
    keys = owner * span + table_index * per_rank + (flat - owner * per_rank)
    unique, inverse = torch.unique(keys.reshape(-1), sorted=True, return_inverse=True)  # grouped by owner
    send_counts = torch.bincount(unique // span, minlength=world)
    shards = [t.weight.to_local() for t in self]
    rows = _RowExchange.apply(unique % span, send_counts, group, per_rank, *shards)  # (U, E)
    looked_up = rows[inverse].reshape(n_tables, *ids[0].shape, rows.shape[-1])  # (tables, B, T, E)
    for t in range(n_tables):
        embeds = embeds + looked_up[t].to(embeds.dtype)
    return embeds


def _all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    return recv


class _RowExchange(torch.autograd.Function):
    """Rows ``keys`` (local keys, grouped by owner) of the row-sharded tables; gradients go back to the owners."""

    @staticmethod
    def forward(ctx, keys, send_counts, group, per_rank, *shards):  # type: ignore[override]
        world = dist.get_world_size(group)
        recv_counts_t = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts_t, send_counts, group=group)
        send, recv = send_counts.tolist(), recv_counts_t.tolist()
        wanted = _all_to_all(keys, send, recv, group)  # keys of rows this rank owns, from every rank
        table, row = wanted // per_rank, wanted % per_rank
        out = shards[0].new_empty((len(wanted), shards[0].shape[1]))
        for t, shard in enumerate(shards):
            m = table == t
            out[m] = shard[row[m]]
        ctx.save_for_backward(table, row)
        ctx.meta = (send, recv, group, world, [s.shape for s in shards])
        return _all_to_all(out, recv, send, group)

    @staticmethod
    def backward(ctx, grad_rows):  # type: ignore[override]
        table, row = ctx.saved_tensors
        send, recv, group, world, shapes = ctx.meta
        grads_in = _all_to_all(grad_rows, send, recv, group)  # (R, E): gradients of the rows this rank owns
        grads = []
        for t, shape in enumerate(shapes):
            m = table == t
            g = grad_rows.new_zeros(shape)
            g.index_add_(0, row[m], grads_in[m])
            grads.append(g.div_(world))  # FSDP averages gradients over ranks; so do we
        return (None, None, None, None, *grads)
