"""Training data: sources, patching, packing, the resumable loader, entropy preprocessing, calibration.

``build_loader(DataConfig(...), rank, world_size)`` gives an infinite, exactly resumable iterator of
:class:`Batch`; :func:`iter_documents` reads documents once (e.g. for validation). Nothing here imports
the trainer or distributed code.
"""

from __future__ import annotations

from collections.abc import Iterator

from torchblt.data.config import DataConfig
from torchblt.data.loader import DataLoader, build_loader
from torchblt.data.packing import Batch
from torchblt.data.sources import BAD_RECORD_REASONS, Document, DocumentReader, new_stats, resolve_sources

__all__ = [
    "BAD_RECORD_REASONS",
    "Batch",
    "DataConfig",
    "DataLoader",
    "Document",
    "DocumentReader",
    "build_loader",
    "iter_documents",
    "new_stats",
    "resolve_sources",
]


def iter_documents(
    sources: list[str],
    text_field: str = "text",
    rank: int = 0,
    world_size: int = 1,
    stats: dict | None = None,
    max_doc_bytes: int = 64 * 2**20,
    on_bad_record: str = "skip",
) -> Iterator[bytes]:
    """Each document of ``sources`` once, as bytes (without BOS/EOS), in file order, sharded by rank.

    Bad records follow the policy of :mod:`torchblt.data.sources` and are counted in ``stats``.
    """
    reader = DocumentReader(
        sources,
        text_field,
        shard=rank,
        n_shards=world_size,
        shuffle_files=False,
        loop=False,
        max_doc_bytes=max_doc_bytes,
        on_bad_record=on_bad_record,
        stats=stats if stats is not None else new_stats(),
    )
    for doc in reader:
        yield doc.data
