"""Named crash points for crash-consistency tests.

``FEATSTORE_KILL_AT=<point>[:<n>]`` makes the process SIGKILL itself the n-th time (default 1st) it
reaches ``<point>``. Unset (always, outside tests) this is a dictionary lookup and nothing more.

Points, in the order a build meets them: ``atomic-before-rename`` (every atomic file write: build.json,
ledgers, part files, index, manifest, per-image caches), ``shard-opened``, ``record-appended``,
``batch-queued``, ``shard-tar-closed``, ``shard-before-rename``, ``shard-after-rename``,
``shard-before-upload``, ``shard-after-upload`` (a remote store's shard, uploaded once closed),
``per-image-written``, ``part-index-written``, ``merge-before-index``, ``merge-before-manifest``,
``merge-before-cleanup``. ``tools/crash_driver.py`` kills builds and exports at a schedule of them (some at
their n-th hit): ``SHARD_KILLS``, ``PER_IMAGE_KILLS`` and ``EXPORT_*_KILLS`` there.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter = Counter()


def crash_point(name: str) -> None:
    """Die here, abruptly, if the environment asks for it (a test of what a crash at this instant leaves)."""
    spec = os.environ.get("FEATSTORE_KILL_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
