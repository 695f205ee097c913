"""Hash n-gram embedding tables for training: sharded by rows across the data-parallel ranks, with
row-sparse gradients.

The hash tables are most of a BLT's parameters (blt-1b: 3.07 B of 4.53 B) but a step reads a few of
their rows. Under FSDP every step would all-gather each table whole and reduce-scatter its dense
gradient; here each rank *owns* a contiguous block of rows of every table (a ``DTensor`` with placement
``Shard(0)``, kept out of FSDP; in one process the whole table) and a lookup exchanges only the rows
the batch touches:

1. every rank hashes its tokens (``ids (B, T)`` per table) and keeps the distinct ``(table, row)`` keys,
   ordered by the rank that owns the row (owner = ``row // rows_per_rank``);
2. ``all_to_all`` of the key counts, then of the keys: each owner learns which of its rows are wanted;
3. the owner gathers them from its local shards and ``all_to_all`` sends them back; every position then
   reads its row from the received ones, and the embeddings are added in the reference's table order;
4. backward: the row gradients (summed over the positions of a rank) go back to their owners by the
   reverse ``all_to_all`` and are divided by the world size (FSDP's gradient averaging). They are kept
   as rows (``table.row_grads``), never as a dense gradient: ``param.grad`` stays ``None``.

:func:`clip_gradients` + :func:`optimizer_step` then do what ``clip_grad_norm_`` + ``AdamW.step`` do,
exactly in math: the gradient norm over the dense gradients and the rows, one clip factor, the
optimizer's AdamW step for the dense parameters, and for the tables torch's fused AdamW kernel on one
chunk of rows at a time, fed the chunk's gradient (zero except on the touched rows: untouched rows get
the zero gradient's update, their moments decay and the weight decay applies), in the optimizer's own
state entries (``step``, ``exp_avg``, ``exp_avg_sq``), so DCP checkpoints hold them like any other
parameter's and reshard them. Neither a table nor its gradient is ever gathered whole, the gradient is
never dense beyond one chunk (2^26 elements), and a row's AdamW state lives on its owner only. Per step
and rank the tables communicate ``2 * keys * dim * 4`` bytes (forward rows + backward gradients)
instead of about ``2-3 * params * bytes`` (all-gathers, reduce-scatter).
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["clip_gradients", "init_adamw_state", "local_slices", "optimizer_step", "row_tables", "shard_hash_tables",
           "zero_row_grads"]

_UPDATE_CHUNK = 1 << 26  # elements of a table updated at once (its dense gradient chunk: 256 MB in fp32)


def local_slices(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``(local tensor, its slices of the global tensor)``: the shard of a DTensor, or a plain tensor whole."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def row_tables(model: nn.Module) -> list[nn.Embedding]:
    """The hash tables of ``model`` handled here (empty unless :func:`shard_hash_tables` was applied)."""
    emb = getattr(model, "encoder_hash_tok_embedding", None)
    return list(emb) if emb is not None and getattr(emb, "row_sharded", False) else []


def shard_hash_tables(model: nn.Module, mesh=None) -> list[nn.Parameter]:
    """Make ``model``'s hash tables row-sharded DTensors over the 1-D ``mesh`` (``None``: one process,
    the tables stay whole) with row-sparse gradients, and route lookups through the row exchange.
    Returns the table parameters (to keep out of FSDP). Works on the meta device. The training step
    must then use :func:`clip_gradients`, :func:`optimizer_step` and :func:`zero_row_grads` (the tables'
    ``.grad`` stays None)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    emb = getattr(model, "encoder_hash_tok_embedding", None)
    if emb is None:
        return []
    for table in emb:
        table.row_grads = []  # (rows, gradients) of this rank's rows, per backward
        if mesh is None:
            continue
        w = table.weight.detach()
        if w.is_meta:
            dt = distribute_tensor(w, mesh, [Shard(0)])
        else:  # a real tensor: keep this rank's rows (every rank holds the same full table)
            probe = distribute_tensor(torch.empty_like(w, device="meta"), mesh, [Shard(0)])
            _, index = local_slices(probe)
            dt = DTensor.from_local(w[index].clone(), mesh, [Shard(0)], shape=w.shape, stride=w.stride())
        table.weight = nn.Parameter(dt)
    emb.row_sharded = True
    emb.row_group = mesh.get_group() if mesh is not None else None
    emb.add_to = types.MethodType(_sharded_add_to, emb)  # instance attribute: the module's code is unchanged
    return [t.weight for t in emb]


def _sharded_add_to(self, embeds: torch.Tensor, tokens: torch.Tensor, ids: list[torch.Tensor] | None = None):
    """``HashNgramEmbedding.add_to`` with row-sharded tables (see the module docstring)."""
    ids = ids if ids is not None else self.ids(tokens)
    group = self.row_group
    world = dist.get_world_size(group) if group is not None else 1
    n_tables, vocab = len(ids), self.vocab_size
    per_rank = -(-vocab // world)  # rows of every table on each rank (the last ranks may hold fewer)
    span = n_tables * per_rank  # keys of one owner: table * per_rank + local row
    flat = torch.stack([i.reshape(-1) for i in ids])  # (tables, B*T)
    owner = flat // per_rank
    table_index = torch.arange(n_tables, device=flat.device)[:, None]
    keys = owner * span + table_index * per_rank + (flat - owner * per_rank)
    unique, inverse = torch.unique(keys.reshape(-1), sorted=True, return_inverse=True)  # grouped by owner
    send_counts = torch.bincount(unique // span, minlength=world)
    shards = [local_slices(t.weight)[0] for t in self]
    rows = _RowExchange.apply(unique % span, send_counts, group, per_rank, list(self), *shards)  # (U, E)
    looked_up = rows[inverse].reshape(n_tables, *ids[0].shape, rows.shape[-1])  # (tables, B, T, E)
    for t in range(n_tables):
        embeds = embeds + looked_up[t].to(embeds.dtype)
    return embeds


def _all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    if group is None:
        return send
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    return recv


class _RowExchange(torch.autograd.Function):
    """Rows ``keys`` (local keys, grouped by owner) of the row-sharded tables; their gradients go back to
    the owners and are kept as rows on the tables (``row_grads``)."""

    @staticmethod
    def forward(ctx, keys, send_counts, group, per_rank, tables, *shards):  # type: ignore[override]
        world = dist.get_world_size(group) if group is not None else 1
        if group is not None:
            recv_counts_t = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts_t, send_counts, group=group)
        else:
            recv_counts_t = send_counts
        send, recv = send_counts.tolist(), recv_counts_t.tolist()
        wanted = _all_to_all(keys, send, recv, group)  # keys of rows this rank owns, from every rank
        table, row = wanted // per_rank, wanted % per_rank
        out = shards[0].new_empty((len(wanted), shards[0].shape[1]))
        for t, shard in enumerate(shards):
            m = table == t
            out[m] = shard[row[m]]
        ctx.save_for_backward(table, row)
        ctx.meta = (send, recv, group, world, tables)
        return _all_to_all(out, recv, send, group)

    @staticmethod
    def backward(ctx, grad_rows):  # type: ignore[override]
        table, row = ctx.saved_tensors
        send, recv, group, world, tables = ctx.meta
        grads_in = _all_to_all(grad_rows, send, recv, group)  # (R, E): gradients of the rows this rank owns
        for t, module in enumerate(tables):
            m = table == t
            if bool(m.any()):
                module.row_grads.append((row[m], grads_in[m] / world))  # FSDP averages over ranks; so do we
        return (None,) * (5 + len(tables))


# ------------------------------------------------------------------ the optimizer step with row gradients


def _coalesced(module: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The table's row gradients of this step, one per distinct row (summed over backwards and ranks)."""
    if not module.row_grads:
        return None
    rows = torch.cat([r for r, _ in module.row_grads])
    grads = torch.cat([g for _, g in module.row_grads])
    unique, inverse = torch.unique(rows, return_inverse=True)
    summed = grads.new_zeros((len(unique), grads.shape[1])).index_add_(0, inverse, grads)
    return unique, summed


def _init_adamw(param: torch.Tensor, state: dict, group: dict) -> None:
    """The state ``torch.optim.AdamW`` creates for ``param`` at its first step."""
    fused = bool(group.get("fused")) or bool(group.get("capturable"))
    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's AdamW state (zeros, step 0) as AdamW would. Loading a checkpoint into an
    optimizer without state otherwise makes DCP take a step with zero gradients for every parameter,
    which allocates a dense gradient for each hash table."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and not optimizer.state[p]:
                _init_adamw(p, optimizer.state[p], group)


def zero_row_grads(model: nn.Module) -> None:
    for module in row_tables(model):
        module.row_grads = []


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """``clip_grad_norm_(model.parameters(), max_norm)`` for a model whose hash tables may have row
    gradients (the rows are summed per row and clipped too); returns the total norm of all gradients."""
    tables = row_tables(model)
    table_params = {id(m.weight) for m in tables}
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in table_params]
    dense_norm = torch.nn.utils.get_total_norm(dense) if dense else torch.zeros(())
    if hasattr(dense_norm, "full_tensor"):
        dense_norm = dense_norm.full_tensor()
    rows_sq = torch.zeros((), dtype=torch.float32, device=dense_norm.device)
    for module in tables:
        c = _coalesced(module)
        module.row_grads = [c] if c is not None else []
        if c is not None:
            rows_sq = rows_sq + c[1].float().pow(2).sum().to(rows_sq.device)
    group = model.encoder_hash_tok_embedding.row_group if tables else None
    if group is not None:  # every row lives on exactly one rank: the squares add up over ranks
        dist.all_reduce(rows_sq, group=group)
    total = math.sqrt(float(dense_norm.float()) ** 2 + float(rows_sq))
    coef = min(1.0, max_norm / (total + 1e-6)) if math.isfinite(total) else 1.0
    if coef < 1.0:
        for g in [*dense, *(c[1] for m in tables for c in m.row_grads)]:
            g.mul_(coef)
    return total


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` (AdamW), plus the same AdamW update of the hash tables from their row gradients."""
    optimizer.step()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for module in row_tables(model):
        grads = module.row_grads[0] if module.row_grads else None
        _adamw_rows(module.weight, optimizer, group_of[id(module.weight)], grads)


@torch.no_grad()
def _adamw_rows(param: torch.Tensor, optimizer: torch.optim.Optimizer, group: dict,
                grads: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """AdamW on every row of one table whose gradient is zero except on ``grads = (rows, gradients)``:
    torch's fused AdamW kernel, chunk by chunk, on a dense gradient of one chunk at a time."""
    from torch.optim.adamw import adamw

    state = optimizer.state[param]
    if not state:
        _init_adamw(param, state, group)
    p, m, v = (local_slices(t)[0] for t in (param, state["exp_avg"], state["exp_avg_sq"]))
    rows, g = grads if grads is not None else (None, None)
    step = state["step"].to(p.device)  # (the functional call increments a copy, once per chunk)
    chunk = max(1, _UPDATE_CHUNK // max(1, p[0].numel() if p.dim() else 1))
    for a in range(0, p.shape[0], chunk):
        b = min(a + chunk, p.shape[0])
        dense = torch.zeros_like(p[a:b])
        if rows is not None:  # rows are sorted: this chunk's are one slice of them
            lo, hi = (int(i) for i in torch.searchsorted(rows, torch.tensor([a, b], device=rows.device)))
            dense.index_add_(0, rows[lo:hi] - a, g[lo:hi].to(dense.dtype))
        adamw([p[a:b]], [dense], [m[a:b]], [v[a:b]], [], [step.clone()], fused=True, amsgrad=False,
              beta1=group["betas"][0], beta2=group["betas"][1], lr=float(group["lr"]),
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
    state["step"] += 1
