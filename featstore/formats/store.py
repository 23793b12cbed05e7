"""The one reading interface of a store, whatever its layout: what export and verify code against.

``loader.ShardStore`` (tar shards + index) and ``loader.PerImageStore`` (``<image>.vggt_cache.pt`` files)
implement it; ``loader.open_store`` returns one of them. Layout-specific reads (a shard store's index and
raw record bytes) stay on the concrete classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from featstore.formats.record import Record


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
