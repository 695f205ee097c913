"""Process group set-up and ``parallelize(model, mesh, cfg)``: activation checkpointing, ``torch.compile``,
row-sharded hash tables and FSDP2 applied to a plain module (real or on the meta device).

One process needs no process group. Under ``torchrun`` (``WORLD_SIZE`` > 1) we initialise ``nccl`` on GPU
or ``gloo`` on CPU and build a 1-D device mesh. With ``data_parallel: fsdp`` every transformer block and
cross-attention layer is its own ``fully_shard`` unit, then the root; a BLT's hash n-gram tables are
sharded by rows instead (``hash_sharding="rows"``, :mod:`torchblt.train.hash_sharding`: lookups exchange
only the rows a batch touches, gradients stay rows; in one process too) and kept out of FSDP;
``hash_sharding="fsdp"`` leaves them plain parameters in the root unit. With ``data_parallel: replicate`` the same code runs on a 2-D (replicate, shard=1) mesh, i.e.
DDP-equivalent replication with FSDP2's hooks (tables included). On GPU, parameters are gathered in bf16
and gradients reduced in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); a single
GPU uses ``torch.autocast``. Parameter names never change (no wrapper modules), so checkpoints stay in
the reference layout.

:func:`count_collectives` measures the logical volume of every collective a block of code issues.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchblt.model.cross_attention import CrossAttention
from torchblt.model.transformer import TransformerBlock


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} asked for but CUDA is not available")
    return torch.device(name)


def init_distributed(device_name: str = "auto", data_parallel: str = "fsdp") -> DistInfo:
    """Join the ``torchrun`` process group if there is one (environment ``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size == 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device, build_mesh(device, world_size, data_parallel))


def build_mesh(device: torch.device, world_size: int, data_parallel: str):
    from torch.distributed.device_mesh import init_device_mesh

    if data_parallel == "replicate":
        return init_device_mesh(device.type, (world_size, 1), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated units: transformer blocks and cross-attention layers, in module order."""
    return [m for m in model.modules() if isinstance(m, (TransformerBlock, CrossAttention))]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward (non-reentrant); names stay unchanged."""
    for block in blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)  # type: ignore[method-assign]


def parallelize(model: nn.Module, mesh, *, compile: bool = False, activation_checkpointing: bool = False,
                mixed_precision: bool = False, hash_sharding: str = "rows") -> nn.Module:
    """Apply activation checkpointing, per-block ``torch.compile`` and (with a mesh) row-sharded hash
    tables + FSDP2, in place. Works on a model built on the meta device (materialise it afterwards,
    :mod:`torchblt.train.materialize`)."""
    if hash_sharding not in ("rows", "fsdp"):
        raise ValueError(f"train.hash_sharding: must be 'rows' or 'fsdp', got {hash_sharding!r}")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for block in blocks(model):
            block.compile()
    if mesh is None:
        if hash_sharding == "rows":  # one process: the tables keep row gradients (no dense gradient memory)
            from torchblt.train.hash_sharding import shard_hash_tables

            shard_hash_tables(model, None)
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ignored: set[nn.Parameter] = set()
    if hash_sharding == "rows" and mesh.ndim == 1:
        from torchblt.train.hash_sharding import shard_hash_tables

        ignored = set(shard_hash_tables(model, mesh))
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs, ignored_params=ignored or None)
    return model


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks, in fp64 (metrics are never reduced in bf16)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class CollectiveVolume:
    """Bytes of the collectives issued on this rank, by operation (see :func:`count_collectives`)."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


_COUNTED = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
            "all_reduce", "broadcast", "all_to_all_single")
_TENSOR_ARGS = ("output", "input", "output_tensor", "input_tensor", "tensor")


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveVolume]:
    """Count the logical volume (bytes) of every collective issued inside the block on this rank: the
    gathered output of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce or
    broadcast, the larger of input and output of an all-to-all. Wraps the ``torch.distributed`` functions
    (which FSDP2 and :mod:`torchblt.train.hash_sharding` call)."""
    volume = CollectiveVolume()
    originals = {name: getattr(dist, name) for name in _COUNTED if hasattr(dist, name)}

    def wrap(name: str, fn):
        def counted(*args, **kwargs):
            tensors = [a for a in [*args[:2], *(kwargs.get(k) for k in _TENSOR_ARGS)] if isinstance(a, torch.Tensor)]
            n = max(t.numel() * t.element_size() for t in tensors)  # the larger side is the logical volume
            volume.bytes[name] = volume.bytes.get(name, 0) + n
            volume.calls[name] = volume.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield volume
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
