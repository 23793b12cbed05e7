"""Deduplicated samples: training samples whose features are necessarily equal are computed and stored once.

Two samples share one record when they have the same ordered frame list and the same reference frame (the
context mode is one per build) and their frame transform input is the same: a sample whose transform reads
its own annotation record (``SampleItem.own_input``, or ``transform_depends_on`` true for its record, such as
a record with ``spar_info``) is always its own record. The record of a group of one keeps the sample's key;
a group of several is keyed by the frame digest (:func:`featstore.formats.keys.frames_key`), which
``get_sample(frames)`` finds directly. ``RecordPlan.ids`` lists every annotation id that maps to the
record: the build stores them (record meta ``ids``) so ``aliases.fsi`` maps each id to the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from featstore.discover.samples import Sample, SampleItem
from featstore.discover.training import DependsOn, depends_predicate
from featstore.formats.keys import frames_key
from featstore.runtime.gcpause import paused_gc


@dataclass(frozen=True, slots=True)
class RecordPlan(SampleItem):
    """One record to compute and store, and the samples it stands for: a :class:`SampleItem` (its key, frames
    and paths are the record's) plus ``ids`` (the annotation ids that map to it, sorted) and ``samples``
    (how many annotation records or episode steps it serves)."""

    ids: tuple[str, ...] = field(default=(), compare=False)
    samples: int = field(default=1, compare=False)


def _group_key(item: SampleItem, depends: Callable[[Mapping[str, Any]], bool] | None) -> tuple:
    own = item.own_input or (depends is not None and item.annotation is not None and depends(item.annotation))
    if own:
        return ("own", item.key)
    return ("frames", item.sample.reference_frame, item.sample.frames)


def _plan(group: list[SampleItem]) -> RecordPlan:
    first = group[0]
    if len(group) == 1:
        ids = () if first.sample.id is None else (first.sample.id,)
        return RecordPlan(first.sample, first.paths, first.annotation, first.own_input, first.count, ids=ids,
                          samples=first.count)
    ids = tuple(sorted({i.sample.id for i in group if i.sample.id is not None}))
    count = sum(i.count for i in group)
    sample = first.sample
    if len(group) > 1:
        sample = Sample(frames_key(sample.frames, sample.reference_frame), sample.frames, sample.reference_frame)
    return RecordPlan(sample, first.paths, first.annotation, first.own_input, first.count, ids=ids, samples=count)


def dedup_samples(samples: Iterable[SampleItem], *, transform_depends_on: DependsOn = None) -> list[RecordPlan]:
    """Group ``samples`` into the records to compute (sorted by key), each with the ids mapping to it (see
    the module docs). ``transform_depends_on``: field names, or a predicate on a sample's annotation record,
    telling which samples' frame transform reads their own record (those samples need their record kept:
    ``discover_samples(..., transform_depends_on=...)`` does that)."""
    depends = depends_predicate(transform_depends_on)
    with paused_gc():
        return _dedup(samples, depends)


def _dedup(samples: Iterable[SampleItem], depends: Callable[[Mapping[str, Any]], bool] | None) -> list[RecordPlan]:
    groups: dict[tuple, SampleItem | list[SampleItem]] = {}  # a list only once a second sample joins
    for item in samples:
        key = _group_key(item, depends)
        got = groups.setdefault(key, item)
        if got is not item:
            if isinstance(got, list):
                got.append(item)
            else:
                groups[key] = [got, item]
    plans = [_plan(g if isinstance(g, list) else [g]) for g in groups.values()]
    del groups
    plans.sort(key=lambda p: p.key)
    return plans


def dedup_counts(plans: Iterable[RecordPlan]) -> tuple[int, int]:
    """(samples, records) of a deduplicated plan: what the build reports as "N records for M samples"."""
    records = samples = 0
    for p in plans:
        records += 1
        samples += p.samples
    return samples, records
