"""Exception types. Every message says what was expected, what was found, and what to do."""

from __future__ import annotations


class FeatstoreError(Exception):
    """Base class for all errors featstore raises on purpose."""


class CheckpointError(FeatstoreError):
    """A VGGT checkpoint is missing, unreadable, or does not match the model config."""


class ImageError(FeatstoreError):
    """An image cannot be decoded or preprocessed (recorded in the failures ledger, never fatal to a build)."""


class RecordError(FeatstoreError):
    """A stored record is malformed, corrupt, or fails its checksum."""


class StoreError(FeatstoreError):
    """A store (shards + index + manifest, or per-image caches) is missing, inconsistent, or busy."""


class LockError(StoreError):
    """Another featstore job holds the output's build lock."""


class AnnotationError(FeatstoreError):
    """An annotation or image-list file is missing or cannot be parsed."""
