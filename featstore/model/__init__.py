"""VGGT aggregator: own implementation that loads official checkpoints (see docs/model.md)."""

from featstore.model.aggregator import VGGTAggregator
from featstore.model.checkpoint import NAMED_SOURCES, load_vggt, state_dict_fingerprint
from featstore.model.config import VGGTConfig, get_config
from featstore.model.stream import StreamCache, stack_caches
from featstore.model.weights import rule_state_dict

__all__ = [
    "NAMED_SOURCES", "StreamCache", "VGGTAggregator", "VGGTConfig", "get_config", "load_vggt",
    "rule_state_dict", "stack_caches", "state_dict_fingerprint",
]
