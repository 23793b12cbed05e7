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


class OptionError(FeatstoreError):
    """A flag or environment value is invalid (the message names it as the user set it)."""


def describe_load_error(e: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file: objects that could run code,
    a corrupt or truncated file, or an OS error."""
    text = str(e)
    if isinstance(e, OSError) and not isinstance(e, EOFError):
        return f"it cannot be read ({e.strerror or type(e).__name__})"
    if "Unsupported global" in text or "is not an allowed global" in text or "GLOBAL" in text:
        return ("it contains objects other than tensors and plain data, which featstore refuses to unpickle "
                "(it could run code)")
    if (isinstance(e, EOFError) or "Weights only load failed" in text or "PytorchStreamReader" in text
            or "invalid load key" in text or "zip archive" in text):
        return "the file is corrupt or truncated (not a complete torch.save file)"
    return (text.splitlines() or [type(e).__name__])[0]
