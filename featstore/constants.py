"""featstore's names and defaults, each defined once (values only: helpers that touch the disk live in
``runtime/`` and ``formats/``).

Who uses what: the image size and patch rule (preprocessing, build options, resume, verify's recompute, the
model config), the reader's open-file and read-ahead defaults (``storage/``, ``read/``), and the named
models ``load_vggt`` builds without a checkpoint (the model, the build, verify).
"""

from __future__ import annotations

from types import MappingProxyType

#: The official VGGT input size (pixels): the default ``--image-size`` and the size of stores that recorded none.
DEFAULT_IMAGE_SIZE = 518
#: JanusVLN's copy of ``load_and_preprocess_images`` resizes to 644.
JANUSVLN_IMAGE_SIZE = 644
#: VGGT's patch side (pixels): every preprocessed side is a multiple of it.
PATCH_SIZE = 14
#: Shard files a reader keeps open at once (the storage's LRU of mapped files).
DEFAULT_MAX_OPEN = 64
#: Chunks a sequential or ranged read fetches ahead in the background.
DEFAULT_READ_AHEAD = 2
#: Bytes per chunk of a sequential or ranged read.
DEFAULT_CHUNK_BYTES = 8 << 20
#: Models ``load_vggt`` builds from the golden weight rule, no checkpoint needed: name -> model config name.
NAMED_MODELS = MappingProxyType({"tiny": "tiny", "vggt-1b-random": "vggt-1b"})


def is_patch_multiple(size: object) -> bool:
    """True when ``size`` is a positive int multiple of :data:`PATCH_SIZE` (the rule every image size follows)."""
    return isinstance(size, int) and not isinstance(size, bool) and size > 0 and size % PATCH_SIZE == 0
