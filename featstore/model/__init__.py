"""VGGT aggregator: own implementation that loads official checkpoints (see docs/model.md)."""

from featstore.model.aggregator import VGGTAggregator
from featstore.model.checkpoint import NAMED_SOURCES, load_vggt, state_dict_fingerprint
from featstore.model.config import VGGTConfig, get_config
from featstore.model.joint import joint_features
from featstore.model.precision import PRECISION_NAMES, Precision, get_precision, resolve_precision
from featstore.model.stream import StreamCache, stack_caches
from featstore.model.weights import rule_state_dict

__all__ = [
    "NAMED_SOURCES", "PRECISION_NAMES", "Precision", "StreamCache", "VGGTAggregator", "VGGTConfig", "get_config",
    "get_precision", "joint_features", "load_vggt", "resolve_precision", "rule_state_dict", "stack_caches",
    "state_dict_fingerprint",
]
