"""Reading ``torch.distributed.checkpoint`` (DCP) folders without letting the files run code.

DCP stores a checkpoint as ``.metadata`` (the index) plus ``__<rank>_<n>.distcp`` data files. Stock DCP
reads ``.metadata`` with plain :func:`pickle.load` and every non-tensor ("byte") item with
``torch.load(weights_only=False)``: a crafted checkpoint can call ``os.system`` as soon as it is read.
Every DCP read in torchblt goes through :func:`dcp_load` instead, which closes both doors:

* ``.metadata`` is read once, by :func:`read_metadata`, with an unpickler that admits only the classes DCP
  metadata is made of (found by pickling the metadata of our own checkpoints: one process and FSDP2 on 2
  gloo processes, with optimizer state): the DCP metadata dataclasses, ``torch.Size``, ``torch`` dtypes and
  layouts (``torch.serialization._get_layout``), the memory-format enum and ``pathlib`` paths (the
  checkpoint id). Anything else (``os.system``, ``builtins.eval``, ...) is refused before it is called.
  The object read is the one used for loading (:class:`SafeFileSystemReader` serves it), so nothing can
  change between the check and the use.
* The index is checked: every data file is a plain name inside the checkpoint folder (no ``..``, no
  ``/``), no stream transforms (we never write any), and every referenced file exists and is long
  enough, so a truncated shard is reported by name before any tensor is overwritten.
* Byte items (optimizer hyper-parameters: floats, tuples, bools, parameter names) are read with
  ``torch.load(weights_only=True)`` by :class:`SafeLoadPlanner`; a byte item where the model has a
  tensor is refused. Tensor items were already read with ``weights_only=True`` by DCP itself.

Failures are :class:`~torchblt.formats.common.CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from torchblt.formats.common import CheckpointError

METADATA_FILE = ".metadata"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # name -> torch.layout, a table lookup
    *((m, c) for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "PurePosixPath", "WindowsPath",
                                                              "PureWindowsPath", "Path", "PurePath")),
})  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals DCP metadata is made of; ``persistent_load`` stays unset (refused)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_metadata(folder: str | os.PathLike[str]) -> Metadata:
    """``folder/.metadata`` through the restricted unpickler, checked against the files in ``folder``."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint's index)") from None
    except pickle.UnpicklingError as e:
        why = str(e)
        if why.startswith("refused global"):
            raise CheckpointError(
                f"{path}: refused to load: the pickle asks for {why.removeprefix('refused global ')}, which DCP "
                "metadata never contains (torchblt never lets a checkpoint run code)"
            ) from None
        raise CheckpointError(f"{path}: not a readable DCP index ({why})") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbled: any unpickling failure is a damaged file
        raise CheckpointError(f"{path}: not a readable DCP index ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"{path}: not a DCP index (holds a {type(metadata).__name__})")
    _check_storage(folder, metadata)
    return metadata


def _check_storage(folder: Path, metadata: Metadata) -> None:
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name, offset, length = getattr(info, "relative_path", None), getattr(info, "offset", None), getattr(
            info, "length", None)
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise CheckpointError(f"{folder / METADATA_FILE}: data file {name!r} is not a file inside the checkpoint")
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise CheckpointError(f"{folder / METADATA_FILE}: bad offset/length for {name}")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{folder / METADATA_FILE}: {name} uses stream transforms "
                                  f"{list(info.transform_descriptors)} (torchblt checkpoints have none)")
        needed[name] = max(needed.get(name, 0), offset + length)
    for name, size in sorted(needed.items()):
        try:
            actual = (folder / name).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{folder / name}: missing (listed in {METADATA_FILE})") from None
        if actual < size:
            raise CheckpointError(f"{folder / name}: truncated ({actual} bytes; the index needs {size})")


class SafeFileSystemReader(FileSystemReader):
    """A :class:`FileSystemReader` serving metadata read (once) by :func:`read_metadata`."""

    def __init__(self, path: str | os.PathLike[str], metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self.folder = Path(path)
        self._metadata = metadata if metadata is not None else read_metadata(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that byte items are unpickled with ``weights_only=True``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata is not None else None
        where = self.folder / info.relative_path if info is not None else self.folder
        if isinstance(self.state_dict.get(fqn), torch.Tensor):
            raise CheckpointError(f"{where}: {fqn} is stored as a pickled object where the model has a tensor")
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{where}: refused to load item {fqn}: it is not plain data (it would need to run code while "
                f"unpickling, which torchblt never allows): {str(e).splitlines()[0]}"
            ) from None
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{where}: item {fqn} is not readable ({type(e).__name__}: {e})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_load(state: dict[str, Any], folder: str | os.PathLike[str], metadata: Metadata | None = None) -> None:
    """``dcp.load(state)`` from ``folder`` in place, safely (see the module docstring).

    ``metadata``: an index already read (and checked) by :func:`read_metadata`; read now when None.
    """
    folder = Path(folder)
    reader = SafeFileSystemReader(folder, metadata)
    try:
        with warnings.catch_warnings():  # one process without a process group is a supported case
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(folder))
    except CheckpointException as e:
        raise checkpoint_failure(e, folder, "cannot read the checkpoint") from None


def checkpoint_failure(e: CheckpointException, folder: Path, what: str) -> BaseException:
    """The first failing rank's exception: a CheckpointError as it is, anything else as one naming ``folder``."""
    for _, (exc, _trace) in sorted(e.failures.items()):
        if isinstance(exc, (CheckpointError, KeyboardInterrupt)):
            return exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return CheckpointError(f"{folder}: {what} ({type(exc).__name__}: {first})")
    return CheckpointError(f"{folder}: {what}")
