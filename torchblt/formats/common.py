"""Helpers shared by the format adapters: building a model from its config, strict weight loading."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from torchblt.model.blt import BLT
from torchblt.model.config import BLTConfig
from torchblt.model.entropy_model import EntropyModel, EntropyModelConfig
from torchblt.validation import resolve_dtype  # noqa: F401  (formats.common.resolve_dtype, as before)


def read_config_json(folder: Path) -> dict | None:
    """``folder/config.json`` as a dict, or None when it is missing or not a JSON object (format sniffing)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and what is wrong."""


def build_model(config: BLTConfig | EntropyModelConfig, device: str | torch.device = "meta") -> BLT | EntropyModel:
    """An uninitialised model (on the meta device by default: no memory, no init cost)."""
    with torch.device(device):
        return BLT(config) if isinstance(config, BLTConfig) else EntropyModel(config)


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, *,
                           take: bool = False) -> None:
    """Load ``state`` into ``model`` (built on meta or real) or raise listing every mismatch.

    Storage contract: after loading, no parameter shares memory with a tensor the caller keeps, nor with
    another parameter, so training one model never changes another model or the caller's tensors.

    * ``take=False`` (default): every tensor is copied (converted to the model's dtype on the way). The
      caller's ``state`` stays as it was and independent of the model; two models loaded from one dict
      are independent. Costs one copy of ``state``.
    * ``take=True``: the caller hands ``state`` over, e.g. a dict just read from a file that nothing else
      holds (safetensors, ``torch.load``): its tensors become the parameters as they are (no copy, no extra
      memory: a blt-1b load needs one copy of the weights, not two). Tensors whose memory overlaps another
      entry's (tied or aliased weights in the file) are copied, and ``state`` is emptied, so it cannot be
      loaded into a second model by accident.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(
                f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:10])}")
        raise CheckpointError(f"{source}: weights do not match the model config: " + " | ".join(parts))
    for k, v in state.items():
        if not v.is_floating_point() and expected[k].is_floating_point():
            raise CheckpointError(f"{source}: tensor {k} has dtype {v.dtype}, expected floating point")
    aliased = _aliased(state) if take else set()
    weights = {
        k: v.to(dtype=expected[k].dtype, copy=not take or k in aliased)  # take: no copy unless aliased
        for k, v in state.items()
    }
    model.load_state_dict(weights, strict=True, assign=True)
    if take:
        state.clear()
    # non-persistent buffers (RoPE frequencies) are not in checkpoints: recompute them on a real device
    for module in model.modules():
        rope = getattr(module, "rope", None)
        if rope is not None and rope.inv_freq.is_meta:
            rope.inv_freq = rope._inv_freq(torch.device("cpu"))


def _aliased(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensor's bytes overlap those of another key's tensor, but for one of each overlapping
    group (conservative: by address range, so interleaved strided views count as overlapping)."""
    spans = []
    for i, (k, v) in enumerate(state.items()):
        if v.numel() == 0 or v.device.type == "meta":
            continue
        start = v.untyped_storage().data_ptr() + v.storage_offset() * v.element_size()
        extent = 1 + sum((n - 1) * st for n, st in zip(v.shape, v.stride()))
        spans.append((start, i, start + extent * v.element_size(), k))
    out, end = set(), -1
    for start, _, stop, k in sorted(spans):  # at equal starts the key that comes first keeps the memory
        if start < end:
            out.add(k)
        end = max(end, stop)
    return out
