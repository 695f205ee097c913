"""Process group set-up and ``parallelize(model, mesh, cfg)``: activation checkpointing, ``torch.compile``
and FSDP2 applied to a plain module.

One process needs no process group. Under ``torchrun`` (``WORLD_SIZE`` > 1) we initialise ``nccl`` on GPU
or ``gloo`` on CPU and build a 1-D device mesh. With ``data_parallel: fsdp`` every transformer block and
cross-attention layer is its own ``fully_shard`` unit, then the root; with ``data_parallel: replicate``
the same code runs on a 2-D (replicate, shard=1) mesh, i.e. DDP-equivalent replication with FSDP2's
hooks. On GPU, parameters are gathered in bf16 and gradients reduced in fp32
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); a single GPU uses ``torch.autocast``.
Parameter names never change (no wrapper modules), so checkpoints stay in the reference layout.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

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
                mixed_precision: bool = False) -> nn.Module:
    """Apply activation checkpointing, per-block ``torch.compile`` and (with a mesh) FSDP2, in place."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for block in blocks(model):
            block.compile()
    if mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
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
