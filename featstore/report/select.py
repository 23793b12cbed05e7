"""Which records a report shows and which it reads for its statistics: seeded, so a report is repeatable."""

from __future__ import annotations

import random
from typing import Sequence

#: The most records the distributions read (a larger store is sampled, and the page says so).
MAX_STATS_RECORDS = 256


def choose_records(keys: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` keys (all when there are fewer) drawn with ``seed`` from the sorted keys, in sorted order."""
    ordered = sorted(keys)
    if n >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, n))


def stats_records(keys: Sequence[str], seed: int, limit: int = MAX_STATS_RECORDS) -> tuple[list[str], bool]:
    """The keys the statistics read: every key, or ``limit`` seeded ones; and whether it is a sample."""
    chosen = choose_records(keys, limit, seed + 1)  # not the same draw as the feature maps'
    return chosen, len(chosen) < len(keys)
