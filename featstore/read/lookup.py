"""What ``store[x]``, ``x in store``, ``store.get(x)`` and ``store.get_sample(...)`` accept, for every store layout:
:class:`StoreReader`, the abstract base of the readers in :mod:`featstore.read.stores`.

An image is named by its key, an absolute path, or a path relative to the current directory, resolved under
the data root (and under the manifest's original data root when the store was opened with another
``data_root``); a training sample by its ordered frames or its annotation id.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from featstore.formats.aliases import SAMPLE_CONTEXTS
from featstore.discover.samples import sample_key
from featstore.errors import StoreError
from featstore.formats.keys import key_for_path, key_under, root_prefixes
from featstore.formats.record import Record


class StoreReader(abc.ABC):
    """A store opened for reading (implements :class:`featstore.formats.store.Store`): the lookups by key, path or
    training sample, over what each layout provides (:meth:`_has_key`, :meth:`features_of`, :meth:`record`, ...)."""

    layout: str  # "shards" or "per-image"
    manifest: dict[str, Any]
    root: Path | str
    data_root: str | None

    @abc.abstractmethod
    def _has_key(self, key: str) -> bool:
        """True when the store holds exactly ``key``."""

    @abc.abstractmethod
    def features_of(self, key: str) -> torch.Tensor:
        """The ``features`` tensor stored under exactly ``key``."""

    @abc.abstractmethod
    def record(self, key: str) -> Record:
        """Every tensor and the metadata of ``key``'s record (a key or an image path, like ``store[x]``)."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every stored key, sorted."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many records the store holds."""

    def close(self) -> None:
        """Release open files (the store reopens them on next use)."""

    def _alias_features(self, key: str) -> torch.Tensor | None:
        """The features a frame digest names in a store keyed by annotation ids; None where there is no alias."""
        return None

    # --- images --------------------------------------------------------------------------------------------
    def _root_prefixes(self) -> list[tuple[str, ...]]:
        cached: list[tuple[str, ...]] | None = getattr(self, "_prefixes", None)
        if cached is None:
            roots = dict.fromkeys(str(r) for r in (self.data_root, self.manifest.get("data_root")) if r)
            cached = self._prefixes = [root_prefixes(r) for r in roots]
        return cached

    def _keys_of_path(self, absolute: str) -> list[str]:
        """Keys of an absolute path under each data root (through links only when the plain path is under none)."""
        keys = [key_under(absolute, pre) for pre in self._root_prefixes() if absolute.startswith(pre)]
        if not keys:
            real = os.path.realpath(absolute)
            keys = [key_under(real, pre) for pre in self._root_prefixes() if real.startswith(pre)]
        return keys + [Path(absolute).as_posix()]

    def _candidates(self, image: str | os.PathLike[str]) -> Iterator[str]:
        """Keys ``image`` may stand for, most likely first; path resolution only runs when the plain key misses."""
        p = os.fspath(image)
        if not isinstance(p, str):
            raise TypeError(f"expected a key or a path, not {type(image).__name__}")
        if not os.path.isabs(p):
            parts = p.split("/")
            plain = "" not in parts and "." not in parts
            yield p if plain else Path(p).as_posix().removeprefix("./")  # Path only where it changes the key
        yield from self._keys_of_path(os.path.abspath(p))

    def lookup(self, image: Any) -> str | None:
        """The stored key ``image`` (a key or an image path) stands for, or None when the store lacks it."""
        try:
            return next((k for k in self._candidates(image) if self._has_key(k)), None)
        except TypeError:
            return None

    def key_for(self, image_path: str | os.PathLike[str]) -> str:
        """The key of an image (a key, an absolute path, or a path relative to the current directory): the stored
        key it stands for, else its posix path relative to the data root (absolute outside it)."""
        found = self.lookup(image_path)
        if found is not None:
            return found
        p = os.fspath(image_path)
        return key_for_path(os.path.abspath(p), self.data_root) if os.path.isabs(p) or os.path.exists(p) \
            else key_for_path(p, self.data_root)

    def __contains__(self, image: object) -> bool:
        return self.lookup(image) is not None

    def _key_or_error(self, image: Any) -> str:
        key = self.lookup(image)
        if key is None:
            raise KeyError(image)
        return key

    def get(self, image: str | os.PathLike[str], default: Any = None) -> torch.Tensor | Any:
        """The features of an image (key or path, see the class docs), or ``default`` when the store lacks it."""
        key = self.lookup(image)
        return self.features_of(key) if key is not None else default

    def __getitem__(self, image: str | os.PathLike[str]) -> torch.Tensor:
        return self.features_of(self._key_or_error(image))

    # --- training samples ----------------------------------------------------------------------------------
    @property
    def context(self) -> dict[str, Any]:
        """The store's context settings: ``{"mode": "image"}`` or ``{"mode": "sample", "reference_frame", ...}``."""
        return dict(self.manifest.get("context") or {"mode": "image"})

    def _require_samples(self) -> None:
        if self.context.get("mode") not in SAMPLE_CONTEXTS:
            raise StoreError(f"{self.root} holds one record per image, not per training sample: look images up with "
                             "store.get(image_path), or build a sample store with --context sample")

    def sample_key(self, frames: Sequence[str | os.PathLike[str]]) -> str:
        """The frame-digest key of a sample (frames in training order, paths or keys, as for ``get``)."""
        keys = [self.key_for(f) for f in frames]
        return sample_key(keys, str(self.context.get("reference_frame", "first")))

    def get_sample(self, frames: Sequence[str | os.PathLike[str]] | None = None, *, id: Any = None,
                   default: Any = None) -> torch.Tensor | Any:
        """The features of a training sample (``[1, h*w, C]``; joint stores ``[S, h*w, C]``), or ``default``
        when the store does not hold it.

        ``frames``: the sample's frame paths in training order (chronological, current frame last, before any
        ``reference_frame: last`` reversal: the store applies its own setting); or ``id``: its annotation id.
        """
        if (frames is None) == (id is None):
            raise TypeError("get_sample takes the sample's frames or its id=, not both or neither")
        self._require_samples()
        key = str(id) if id is not None else self.sample_key(frames or [])
        if key in self:
            return self[key]
        found = self._alias_features(key)  # a frame digest, or an id of a deduplicated record
        return default if found is None else found
