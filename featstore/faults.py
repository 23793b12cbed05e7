"""Named crash points for crash-consistency tests.

``FEATSTORE_KILL_AT=<point>[:<n>]`` makes the process SIGKILL itself the n-th time (default 1st) it
reaches ``<point>``. Unset (always, outside tests) this is a dictionary lookup and nothing more.

Points, in the order a shard build meets them: ``atomic-before-rename`` (every atomic file write),
``shard-opened``, ``record-appended``, ``batch-queued``, ``shard-tar-closed``, ``shard-before-rename``,
``shard-after-rename``, ``per-image-written``, ``part-index-written``, ``merge-before-index``,
``merge-before-manifest``, ``merge-before-cleanup``. ``tools/crash_driver.py`` kills a build at 20 instants
(some points at their n-th hit).
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
