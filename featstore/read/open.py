"""Opening a store for random access: :func:`open_store` on whatever :func:`featstore.formats.locate.locate_store`
finds at a path or URL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from featstore.errors import StoreError
from featstore.formats.locate import StoreLocation, locate_store
from featstore.read.stores import PerImageStore, ShardStore
from featstore.storage import DEFAULT_MAX_OPEN, is_remote

#: What :func:`open_store` returns; both classes implement :class:`featstore.formats.store.Store`.
AnyStore = ShardStore | PerImageStore


def open_location(loc: StoreLocation, *, max_open: int = DEFAULT_MAX_OPEN,
                  data_root: str | os.PathLike[str] | None = None) -> AnyStore:
    """The reader of a located store (``data_root``: where the images are now, when they moved)."""
    if loc.layout == "per-image":
        return PerImageStore(Path(loc.root), loc.document(), data_root=data_root)
    if loc.manifest is None:
        raise StoreError(f"shard store {loc.root} has no manifest yet; run `featstore merge {loc.root}`")
    if loc.is_remote:
        return ShardStore(loc.storage.display, loc.manifest, max_open=max_open, storage=loc.storage,
                          data_root=data_root)
    return ShardStore(Path(loc.root), loc.manifest, max_open=max_open, data_root=data_root)


def open_remote_store(url: str, storage_options: dict[str, Any] | None = None, *, max_open: int = DEFAULT_MAX_OPEN,
                      data_root: str | os.PathLike[str] | None = None) -> ShardStore:
    """Open a shard store on object storage (any fsspec URL): its manifest and index are fetched once."""
    store = open_location(locate_store(url, storage_options), max_open=max_open, data_root=data_root)
    assert isinstance(store, ShardStore)  # a remote location is always a shard store
    return store


def open_store(path: str | os.PathLike[str] | StoreLocation, *, max_open: int = DEFAULT_MAX_OPEN,
               data_root: str | os.PathLike[str] | None = None,
               storage_options: dict[str, Any] | None = None) -> AnyStore:
    """Open a shard store or a per-image cache root (found from its manifest) for random access.

    ``data_root``: where the images are now, when the data moved (another machine, another mount): image paths
    under it are looked up as the keys they had under the manifest's data root. A data root with legacy caches
    and no manifest opens as a per-image store rooted there. ``path`` may be an fsspec URL of a shard store
    (``s3://bucket/prefix``); ``storage_options`` go to its backend. ``path`` may also be what
    :func:`featstore.formats.locate.locate_store` already found.
    """
    if isinstance(path, StoreLocation):
        return open_location(path, max_open=max_open, data_root=data_root)
    if is_remote(path):
        return open_remote_store(str(path), storage_options, max_open=max_open, data_root=data_root)
    loc = locate_store(path)
    if data_root is not None and not Path(data_root).is_dir():
        raise StoreError(f"data_root {data_root} is not a directory; pass the folder that holds the images now")
    return open_location(loc, max_open=max_open, data_root=data_root)
