"""featstore: precompute, store, verify and stream frozen-backbone (VGGT) image features for training.

Public API (imported lazily so ``import featstore`` stays cheap):

* :func:`load_vggt` - the VGGT aggregator from an official checkpoint (or ``"tiny"``)
* :func:`preprocess_image` - the model's own preprocessing (``crop``, ``pad``, ``janusvln``)
* :func:`open_store` - random access to a store, by key or image path (``data_root=`` when the images moved)
* :func:`stream` - a DDP- and worker-safe webdataset IterableDataset over a shard store
* :func:`load_cached_vggt_features` - drop-in replacement for per-image cache loading in training code
* :func:`load_sample_features` - a training sample's features (its frames as causal context) from a sample store
* :func:`dequantize` - int8 samples read with ``dequantize=False`` back to their stored dtype (on any device)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_vggt": "featstore.model",
    "preprocess_image": "featstore.model.preprocess",
    "open_store": "featstore.read",
    "stream": "featstore.read",
    "load_cached_vggt_features": "featstore.read",
    "load_sample_features": "featstore.read",
    "dequantize": "featstore.read",
}

__all__ = ["__version__", *_EXPORTS]


def __dir__() -> list[str]:
    return sorted({n for n in globals() if n.startswith("__")} | set(__all__))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'featstore' has no attribute {name!r}")
