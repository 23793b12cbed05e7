"""The reader side: the one store opener, lookups, training samples, the stream and its worker slots."""

from featstore.read.loader import (decode_sample, dequantize, load_cached_vggt_features, load_sample_features,
                                   open_store, stream)

__all__ = ["open_store", "stream", "load_cached_vggt_features", "load_sample_features", "dequantize", "decode_sample"]
