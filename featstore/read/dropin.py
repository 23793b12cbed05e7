"""Drop-in readers for existing training code: one image's cached features (:func:`load_cached_vggt_features`,
a replacement for per-image ``torch.load``) and one training sample's (:func:`load_sample_features`), with
the store taken from ``$FEATSTORE_STORE`` when not given."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

import torch

from featstore.errors import StoreError
from featstore.formats.keys import cache_file_beside
from featstore.formats.layout import PER_IMAGE_SUFFIX
from featstore.formats.perimage import read_pt
from featstore.read.open import AnyStore, open_store
from featstore.read.stores import PerImageStore, ShardStore
from featstore.runtime.env import data_root_override, store_path, use_vggt_cache

log = logging.getLogger("featstore")
_default_stores: dict[Any, AnyStore] = {}
_announced = False
_announce_lock = threading.Lock()


def _announce(where: str) -> None:
    global _announced
    with _announce_lock:
        if not _announced and use_vggt_cache():
            log.info("VGGT feature cache enabled (%s)", where)
            _announced = True


def load_cached_vggt_features(image_path: str | os.PathLike[str], store: AnyStore | str | os.PathLike[str] | None = None
                              ) -> torch.Tensor | None:
    """The cached features of one image, or None: a drop-in for per-image ``torch.load`` cache loading.

    ``store`` is an open store or a store path; by default ``$FEATSTORE_STORE``, else the per-image cache
    file beside the image (``<image>.vggt_cache.pt``). A store given by path opens with ``$FEATSTORE_DATA_ROOT``
    as its data root when set (the images moved, see :func:`open_store`).
    """
    if store is None:
        store = store_path()
    if store is not None and not isinstance(store, (ShardStore, PerImageStore)):
        where = (os.fspath(store), data_root_override())
        if where not in _default_stores:
            _default_stores[where] = open_store(where[0], data_root=where[1])
        store = _default_stores[where]
    if store is not None:
        _announce(f"{store.layout} store {store.root}")
        return store.get(image_path)
    _announce(f"per-image caches {PER_IMAGE_SUFFIX} beside the images")
    try:
        return read_pt(cache_file_beside(image_path)).features
    except FileNotFoundError:
        return None


def load_sample_features(frames: Sequence[str | os.PathLike[str]],
                         store: AnyStore | str | os.PathLike[str] | None = None,
                         *, id: Any = None) -> torch.Tensor | None:
    """The cached features of one training sample (``[1, h*w, C]``; joint stores ``[S, h*w, C]``), or None:
    the drop-in for the VGGT loop of a
    training step. ``frames`` are the sample's frame paths in training order (current frame last); ``store``
    is an open sample store or its path (default ``$FEATSTORE_STORE``); ``id``: look up by annotation id."""
    if store is None:
        store = store_path()
        if store is None:
            raise StoreError("load_sample_features needs a sample store: pass store=PATH or set FEATSTORE_STORE "
                             "to a store built with featstore build --context sample")
    if not isinstance(store, (ShardStore, PerImageStore)):
        key = os.fspath(store)
        if key not in _default_stores:
            _default_stores[key] = open_store(key)
        store = _default_stores[key]
    _announce(f"{store.layout} sample store {store.root}")
    return store.get_sample(None if id is not None else frames, id=id)
