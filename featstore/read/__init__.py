"""The reader side: opening a store (:mod:`.open`, on what :func:`featstore.formats.locate.locate_store` finds),
the readers of each layout and their lookups (:mod:`.stores`, :mod:`.lookup`), records as training samples
(:mod:`.samples`), the drop-in per-image and per-sample loaders (:mod:`.dropin`), the stream and its epoch plans
(:mod:`.stream`, :mod:`.plans`, :mod:`.fetch`) and the workers' shared-memory slots (:mod:`.sharedpool`)."""

from featstore.formats.keys import key_for_path
from featstore.formats.store import Store
from featstore.read.dropin import load_cached_vggt_features, load_sample_features
from featstore.read.lookup import StoreReader
from featstore.read.open import AnyStore, open_location, open_remote_store, open_store
from featstore.read.samples import decode_sample, decode_to_sample, dequantize, record_to_sample
from featstore.read.stores import PerImageStore, ShardStore
from featstore.read.stream import FeatureStream, StreamLoader, stream

__all__ = ["open_store", "stream", "load_cached_vggt_features", "load_sample_features", "dequantize", "decode_sample",
           "record_to_sample", "decode_to_sample", "open_remote_store", "open_location", "Store", "StoreReader",
           "ShardStore", "PerImageStore", "AnyStore", "FeatureStream", "StreamLoader", "key_for_path"]
