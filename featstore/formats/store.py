"""The one reading interface of a store, whatever its layout: what export and verify code against.

``featstore.read.ShardStore`` (tar shards + index) and ``featstore.read.PerImageStore`` (``<image>.vggt_cache.pt``
files) implement it; ``featstore.read.open_store`` returns one of them. A shard store's own reads (its index and
a record's stored bytes) are :class:`ShardStoreReads`, so code outside the reader (export) needs no reader class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from featstore.formats.index import Index, IndexEntry
from featstore.formats.record import Record

if TYPE_CHECKING:
    from featstore.storage import Storage


@runtime_checkable
class Store(Protocol):
    """A store opened for reading: its manifest, its keys, and each key's record."""

    layout: str  # "shards" or "per-image" (the manifest's layout)
    manifest: dict[str, Any]
    root: Path | str  # the store folder, or its URL for a remote shard store
    data_root: str | None  # where the images are (the manifest's, or the data_root it was opened with)

    @property
    def context(self) -> dict[str, Any]:
        """What a record is: ``{"mode": "image"}`` or ``{"mode": "sample", "reference_frame": ..., ...}``."""
        ...

    def keys(self) -> list[str]:
        """Every stored key, sorted."""
        ...

    def record(self, key: str) -> Record:
        """Every tensor and the metadata of ``key``'s record (KeyError when absent)."""
        ...

    def __contains__(self, image: object) -> bool:
        """True when the store holds ``image`` (a key or an image path)."""
        ...

    def __len__(self) -> int:
        """How many records the store holds."""
        ...

    def close(self) -> None:
        """Release open files (the store reopens them on next use)."""
        ...


@runtime_checkable
class ShardStoreReads(Store, Protocol):
    """A shard store opened for reading: a :class:`Store` with its index, its storage and raw record reads."""

    storage: "Storage"

    @property
    def index(self) -> Index:
        """The store's index (memory-mapped; fetched once for a remote store)."""
        ...

    def read_bytes(self, e: IndexEntry) -> memoryview:
        """The stored bytes of the record ``e`` points at (exactly ``e.length``, or RecordError)."""
        ...
