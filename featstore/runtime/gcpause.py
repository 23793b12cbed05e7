"""Pausing Python's cyclic garbage collector while a pass builds millions of small acyclic objects (annotation
records into samples, samples into records): each collection would walk every object built so far, which made
discovering 612k samples take half again as long. Reference counting still frees everything as usual."""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block (re-enabled after it if it was on)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
