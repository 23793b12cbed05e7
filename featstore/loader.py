"""The public reader names under their original module path (``featstore.loader.decode_sample`` and friends).

The reader lives in :mod:`featstore.read`; this module only keeps the import path existing training code uses.
"""

from featstore.read import (FeatureStream, PerImageStore, ShardStore, Store, StreamLoader, decode_sample, dequantize,
                            key_for_path, load_cached_vggt_features, load_sample_features, open_store, stream)

__all__ = ["open_store", "stream", "load_cached_vggt_features", "load_sample_features", "dequantize", "decode_sample",
           "Store", "ShardStore", "PerImageStore", "FeatureStream", "StreamLoader", "key_for_path"]
