"""From a model built on the meta device (and sharded by :func:`~torchblt.train.distributed.parallelize`)
to real tensors, holding only this rank's shards, never the whole model.

* :func:`init_weights` — random init: ``to_empty`` on the device, then the model's own ``init_weights``
  with every truncated-normal draw made for the *full* parameter (one parameter at a time) and only this
  rank's slice kept. The random stream is consumed exactly as in one process, so any world size starts
  from the same weights as a one-process run.
* :func:`load_shards` — weights from a checkpoint whose tensors can be read by slices
  (:func:`torchblt.formats.lazy.open_weights`: safetensors, memory-mapped ``consolidated.pth``): every
  rank reads just the rows of its shards.
* :func:`load_from_rank0` — any other checkpoint: rank 0 reads the full state dict, which is broadcast
  tensor by tensor and sharded (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``).

A DCP training checkpoint needs none of these: ``dcp.load`` reads each rank's shards directly
(:func:`torchblt.train.checkpoint.load_model_weights`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchblt.train.hash_sharding import local_slices

__all__ = ["init_weights", "load_from_rank0", "load_shards", "reset_buffers", "shard_exact_init"]


def reset_buffers(model: nn.Module) -> None:
    """Recompute the non-persistent buffers (RoPE frequencies) after ``to_empty``."""
    for module in model.modules():
        rope = getattr(module, "rope", None)
        if rope is not None and hasattr(rope, "reset_parameters"):
            rope.reset_parameters()


@contextlib.contextmanager
def shard_exact_init() -> Iterator[None]:
    """While active, ``nn.init.trunc_normal_`` on a DTensor draws the full tensor and keeps the local slice."""
    from torch.distributed.tensor import DTensor

    original = nn.init.trunc_normal_

    def trunc_normal_(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(tensor, DTensor):
            return original(tensor, *args, **kwargs)
        local, index = local_slices(tensor)
        full = torch.empty(tensor.shape, dtype=local.dtype, device=local.device)
        original(full, *args, **kwargs)
        with torch.no_grad():
            local.copy_(full[index])
        return tensor

    nn.init.trunc_normal_ = trunc_normal_  # type: ignore[assignment]
    try:
        yield
    finally:
        nn.init.trunc_normal_ = original  # type: ignore[assignment]


def init_weights(model: nn.Module, device: torch.device) -> None:
    """Materialise ``model`` (meta, possibly sharded) on ``device`` with its ``init_weights`` scheme."""
    model.to_empty(device=device)
    with torch.no_grad(), shard_exact_init():
        model.init_weights()  # type: ignore[operator]


def load_shards(model: nn.Module, weights: Mapping[str, Any], device: torch.device) -> None:
    """Materialise ``model`` on ``device`` from ``weights`` (name -> lazy tensor with ``.read(index)``),
    reading only this rank's slice of every tensor. ``weights`` must match the model (checked by the caller)."""
    model.to_empty(device=device)
    reset_buffers(model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            local, index = local_slices(tensor)
            if local.numel():
                weights[name].read(index, out=local)


def load_from_rank0(model: nn.Module, state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Materialise ``model`` on ``device`` from a full ``state`` held by rank 0 only (None elsewhere)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    reset_buffers(model)
    if not dist.is_initialized():
        assert state is not None
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(state[name].to(tensor.dtype))
        return
    if state is not None:
        own = model.state_dict()
        state = {k: v.to(device=device, dtype=own[k].dtype) for k, v in state.items()}
    set_model_state_dict(model, state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
