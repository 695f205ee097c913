"""Checkpoint tensors that can be read by slices, so that each training rank reads only its shards.

:func:`open_weights(folder)` returns the model config and ``{name: LazyTensor}`` for the formats whose
files allow it: ours and the reference's Hugging Face layout (``model.safetensors``: the JSON header is
parsed and a slice of rows, which is one contiguous byte range, is read with ``os.pread``, so nothing
else of the file enters memory) and the reference's ``consolidated.pth`` (``torch.load(mmap=True,
weights_only=True)``: a slice touches just its pages). Names, shapes and dtypes are checked against the
model exactly as :func:`torchblt.load_model` checks them. The ``transformers`` layout stores the hash
tables concatenated and renames every tensor; it is not opened lazily (:func:`open_weights` returns
``None`` and the trainer reads it whole on rank 0).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchblt.formats.common import CheckpointError, build_model, load_state_dict_strict

__all__ = ["LazyTensor", "open_weights"]

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


@dataclass
class LazyTensor:
    """A checkpoint tensor not read yet: ``shape``, ``dtype`` and ``read(index)`` (a tuple of slices).

    ``source`` is ``(path, byte offset)`` of a row-major tensor in a file, or a memory-mapped tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    source: Any

    def read(self, index: tuple[slice, ...] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The slice ``index`` (default: all); with ``out`` (a tensor of the slice's shape) it is written there,
        straight from the file when ``out`` is a contiguous CPU tensor of the same dtype."""
        full = tuple(slice(0, n) for n in self.shape)
        index = index if index is not None else full
        if isinstance(self.source, torch.Tensor):
            return self._into(self.source[index], out)
        path, offset = self.source
        start, stop = (index[0] if index else slice(0, 1)).indices(self.shape[0] if self.shape else 1)[:2]
        row_bytes = math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()
        rest = index[1:]
        whole_rows = all(r == f for r, f in zip(rest, full[1:]))
        direct = (out is not None and whole_rows and out.dtype == self.dtype and out.device.type == "cpu"
                  and out.is_contiguous())
        buf = out if direct else torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        assert buf is not None
        with open(path, "rb") as f:
            f.seek(offset + start * row_bytes)
            n = f.readinto(memoryview(buf.view(torch.uint8).numpy()).cast("B")) if buf.numel() else 0
        if n != (stop - start) * row_bytes:
            raise CheckpointError(f"{path}: truncated (a tensor ends after the end of the file)")
        if direct:
            return buf
        if not self.shape:
            buf = buf.reshape(())
        return self._into(buf if whole_rows else buf[(slice(None), *rest)], out)

    @staticmethod
    def _into(t: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return t.clone()
        out.copy_(t)
        return out


def _safetensors(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a safetensors file, from its header (8-byte length + JSON); no tensor data is read."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not an object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r}: bad or unsupported header entry {info!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor {name!r}: its byte range does not fit its shape or the file")
        out[name] = LazyTensor(shape, dtype, (str(path), 8 + n + begin))
    return out


def open_weights(path: str | os.PathLike[str]) -> tuple[Any, dict[str, LazyTensor]] | None:
    """``(config, lazy tensors)`` of a model folder (or hub id), or ``None`` for a format without slices."""
    from torchblt.formats import _resolve_path, detect_format

    folder = _resolve_path(path)
    fmt = detect_format(folder)
    if fmt == "torchblt":
        from torchblt.formats.native import read_native_config

        config = read_native_config(folder)
        weights = _safetensors(folder / "model.safetensors")
    elif fmt == "reference-hf":
        from torchblt.formats.reference import config_from_reference_folder

        config = config_from_reference_folder(folder)
        weights = _safetensors(folder / "model.safetensors")
    elif fmt == "consolidated":
        from torchblt.formats.consolidated import _weights_file, read_consolidated_config, read_weights

        config = read_consolidated_config(folder)
        weights_file = _weights_file(folder)
        assert weights_file is not None
        state = read_weights(weights_file)  # weights_only=True, mmap=True: nothing is read yet
        weights = {k: LazyTensor(tuple(v.shape), v.dtype, v) for k, v in state.items()}
    else:
        return None
    # the same strict checks as load_model (names, shapes, floating point), on meta tensors: no data read
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in weights.items()}
    load_state_dict_strict(build_model(config, device="meta"), meta, source=str(folder))
    return config, weights
