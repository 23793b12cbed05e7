"""Training samples: the ordered frame lists whose per-sample (causal context) features are cached.

A JanusVLN training sample is an ordered list of frames, chronological with the current frame last. Its
VGGT features are computed by streaming the frames one at a time through the aggregator (fresh KV cache)
and keeping the patch tokens of the *last frame fed*. With ``reference_frame="last"`` JanusVLN reverses
the list before streaming, so the kept tokens are the oldest frame's, with the newer frames as context.

Sample keys (:func:`sample_key`): the record's ``id`` when there is one, else the frame-list key
:func:`featstore.formats.keys.frames_key` (frames being the ordered frame keys in training order).

``discover_samples`` finds the samples of a context build: one per annotation record (``images``,
``history_images`` + ``current_image``, or ``image``), or JanusVLN's samples of every episode folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Iterable, Mapping, Protocol, Sequence, Union

import numpy as np

from featstore.discover.annotations import (AnnotationRecord, MalformedLine, StrPath, as_list,
                                            expand_annotation_sources, find_annotation_files,
                                            iter_annotation_records, record_data_path, relative_to)
from featstore.discover.references import ImageResolver
from featstore.discover.result import Discovery, MissingFrame, SourceStats
from featstore.errors import AnnotationError
from featstore.formats.keys import SAMPLE_KEY_PREFIX, frames_key

REFERENCE_FRAMES = ("first", "last")
JANUSVLN_HISTORY = 8  # JanusVLN's max_history_images / --num_history: up to 9 frames per sample


def _check_reference_frame(reference_frame: str) -> None:
    if reference_frame not in REFERENCE_FRAMES:
        raise ValueError(f"reference frame {reference_frame!r} is not one of {', '.join(REFERENCE_FRAMES)}")


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sample: `frames` are frame keys in training order (chronological, current frame last)."""

    key: str
    frames: tuple[str, ...]
    reference_frame: str = "first"
    id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", tuple(self.frames))
        if not self.frames:
            raise ValueError(f"sample {self.key!r} has no frames")
        if not all(isinstance(f, str) and f for f in self.frames):
            raise ValueError(f"sample {self.key!r}: every frame key must be a non-empty string")
        _check_reference_frame(self.reference_frame)


def stream_order(sample: Sample) -> tuple[str, ...]:
    """The frames in the order they are fed to the model: as given for 'first', reversed for 'last'."""
    return sample.frames if sample.reference_frame == "first" else sample.frames[::-1]


def kept_index(sample: Sample) -> int:
    """Index into `sample.frames` of the frame whose tokens are kept (the last frame fed)."""
    return len(sample.frames) - 1 if sample.reference_frame == "first" else 0


def janusvln_history(i: int, history: int = JANUSVLN_HISTORY) -> list[int]:
    """JanusVLN's frame indices for step `i` of an episode: ``range(i+1)`` if ``i <= history``, else
    ``numpy.linspace(0, i, history+1, dtype=int)`` (i=20, history=8 gives 0,2,5,7,10,12,15,17,20)."""
    if i < 0 or history < 0:
        raise ValueError(f"step {i} and history {history} must be non-negative")
    if i <= history:
        return list(range(i + 1))
    return [int(j) for j in np.linspace(0, i, history + 1, dtype=int)]


def janusvln_history_padded(i: int, history: int = JANUSVLN_HISTORY) -> list[int]:
    """The front-padding variant (NewJanusVLN): like :func:`janusvln_history`, with frame 0 repeated in front
    until there are ``history+1`` frames (i=2, history=8 gives 0,0,0,0,0,0,0,1,2)."""
    idx = janusvln_history(i, history)
    return [0] * (history + 1 - len(idx)) + idx


def sample_key(frames: Sequence[str], reference_frame: str = "first", id: str | None = None) -> str:
    """The record's `id` when given, else a stable digest of the ordered frame keys and the reference frame
    (the rule is in the module docstring)."""
    _check_reference_frame(reference_frame)
    if id is not None:
        if not isinstance(id, str) or not id:
            raise ValueError(f"sample id {id!r} must be a non-empty string")
        return id
    return frames_key(frames, reference_frame)


def make_sample(frames: Sequence[str], reference_frame: str = "first", id: str | None = None) -> Sample:
    """A :class:`Sample` keyed by :func:`sample_key`."""
    return Sample(sample_key(frames, reference_frame, id), tuple(frames), reference_frame, id)


def episode_samples(frame_keys: Sequence[str], history: int = JANUSVLN_HISTORY, pad: bool = False,
                    reference_frame: str = "first") -> list[Sample]:
    """One sample per frame of an episode (frames in episode order), built with JanusVLN's history rule
    (`pad=True`: the front-padding variant)."""
    rule = janusvln_history_padded if pad else janusvln_history
    return [make_sample([frame_keys[j] for j in rule(i, history)], reference_frame) for i in range(len(frame_keys))]


def _string_list(record: dict[str, Any], field: str) -> list[str]:
    value = record[field]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"annotation field {field!r} must be a path or a list of paths, got {value!r:.80}")
    return list(items)


def frames_of_record(record: dict[str, Any]) -> list[str] | None:
    """An annotation record's ordered frame references: ``images``, or ``history_images`` + ``current_image``
    (history then current), or ``image``; None when the record has none of them (or an empty list)."""
    if "images" in record:
        frames = _string_list(record, "images")
    elif "history_images" in record and "current_image" in record:
        if not isinstance(record["current_image"], str) or not record["current_image"]:
            raise ValueError(f"annotation field 'current_image' must be a path, got {record['current_image']!r:.80}")
        frames = _string_list(record, "history_images") + [record["current_image"]]
    elif "image" in record:
        frames = _string_list(record, "image")
    else:
        return None
    return frames or None


class RecordItem(Protocol):
    """What one record is built from: its key and an ordered list of frames (keys and file paths, in training
    order). A per-image record (``pipeline.WorkItem``) is a one-frame sample; a :class:`SampleItem` has many."""

    @property
    def key(self) -> str: ...

    @property
    def frames(self) -> tuple[str, ...]: ...

    @property
    def paths(self) -> tuple[str, ...]: ...

    @property
    def owner_frame(self) -> str:
        """The frame whose key decides which rank builds the record (``resume.rank_share``)."""
        ...


@dataclass(frozen=True)
class SampleItem:
    """One training sample to build: the sample (key, frame keys in training order) and its frame paths;
    ``annotation``: its annotation record, when kept (a frame transform reads it); ``own_input``: the frame
    transform reads this record's own fields, so it never shares a record with another sample; ``count``:
    the annotation records that named this sample (same key)."""

    sample: Sample
    paths: tuple[str, ...]
    annotation: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    own_input: bool = field(default=False, compare=False)
    count: int = field(default=1, compare=False)

    @property
    def key(self) -> str:
        """The record key."""
        return self.sample.key

    @property
    def frames(self) -> tuple[str, ...]:
        """The frame keys in training order."""
        return self.sample.frames

    @property
    def owner_frame(self) -> str:
        """The first frame streamed: the samples sharing a prefix tree go to one rank and share its work."""
        return stream_order(self.sample)[0]

    @property
    def kept_path(self) -> str:
        """Path of the frame whose tokens the record keeps."""
        return self.paths[kept_index(self.sample)]


# ---------------------------------------------------------------- discovering the samples

#: Which annotation records a frame transform reads: None (no transform, or one that reads no record
#: field), field names (a record holding any of them), or a predicate on the record.
DependsOn = Union[Callable[[Mapping[str, Any]], bool], Collection[str], None]


def depends_predicate(depends_on: DependsOn) -> Callable[[Mapping[str, Any]], bool] | None:
    """``depends_on`` as a predicate on an annotation record (None when nothing depends)."""
    if depends_on is None or callable(depends_on):
        return depends_on
    fields = tuple(depends_on)
    return (lambda record: any(f in record for f in fields)) if fields else None


def transform_input_key(frames: Sequence[str], reference_frame: str, record: Mapping[str, Any]) -> str:
    """The key of a sample whose frame transform reads its own record and that has no unique id: the digest
    of its frames and the whole record (records equal in both are the same sample)."""
    payload = json.dumps([reference_frame, *frames, record], ensure_ascii=True, sort_keys=True,
                         separators=(",", ":"), default=str)
    return SAMPLE_KEY_PREFIX + "t" + hashlib.sha256(payload.encode("ascii")).hexdigest()[:31]


@dataclass(frozen=True, slots=True)
class _Parsed:
    """One annotation record that names frames: where it is, its id, its frame keys and paths (None for a
    frame that does not exist), the first reference that does not exist, and the record when it is kept."""

    file: str
    line: int
    id: str | None
    keys: tuple[str, ...]
    paths: tuple[str | None, ...]
    lost: str | None
    record: dict | None


class _Frames:
    """Resolves a record's frame references once per (folders, reference): (key, path), or (key, None) for
    an image that does not exist (keyed by the reference as written)."""

    def __init__(self, resolver: ImageResolver):
        self.resolver = resolver
        self.memo: dict[tuple[tuple[str, ...], str], tuple[str, str | None]] = {}

    def _one(self, ref: str, bases: tuple[str, ...]) -> tuple[str, str | None]:
        hit = self.memo.get((bases, ref))
        if hit is None:
            found = self.resolver.resolve_in(ref, bases)
            hit = self.memo[(bases, ref)] = ((self.resolver.key_for(ref), None) if found is None
                                             else (found.key, str(found.path)))
        return hit

    def of(self, refs: list[str], bases: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str | None, ...], str | None]:
        """(keys, paths, the first reference that does not exist)."""
        hits = [self._one(r, bases) for r in refs]
        lost = next((r for r, h in zip(refs, hits) if h[1] is None), None)
        return tuple(h[0] for h in hits), tuple(h[1] for h in hits), lost


def _parse(rec: AnnotationRecord, frames: _Frames, keep: Callable[[dict], bool]) -> _Parsed | None:
    """The frames of one annotation record; None when it names none."""
    try:
        refs = frames_of_record(rec.record)
    except ValueError:
        return None
    if not refs:
        return None
    bases = frames.resolver.bases(record_data_path(rec.record), os.path.dirname(os.path.abspath(rec.file)))
    keys, paths, lost = frames.of(refs, bases)
    raw_id = rec.record.get("id")
    sid = None if raw_id is None or isinstance(raw_id, (dict, list)) else str(raw_id)
    return _Parsed(os.fspath(rec.file), rec.line, sid, keys, paths, lost, rec.record if keep(rec.record) else None)


def _unique_ids(found: list[_Parsed]) -> set[str]:
    """Ids that name one frame list only (an id reused for other frames falls back to the frame digest)."""
    first: dict[str, tuple] = {}
    reused: set[str] = set()
    for p in found:
        if p.id is not None and first.setdefault(p.id, p.keys) != p.keys:
            reused.add(p.id)
    return set(first) - reused


class _SampleSet:
    """The samples of parsed records (the first of each key kept, the others counted) and those missing a frame."""

    def __init__(self, resolver: ImageResolver, reference_frame: str, stats: dict[str, SourceStats],
                 depends: Callable[[Mapping[str, Any]], bool] | None, keep_annotations: bool):
        self.resolver, self.reference_frame, self.stats = resolver, reference_frame, stats
        self.depends, self.keep_annotations = depends, keep_annotations
        self.items: dict[str, SampleItem] = {}
        self.missing: dict[str, MissingFrame] = {}

    def _key(self, p: _Parsed, keys: Sequence[str], unique: set[str]) -> tuple[str, str | None, bool]:
        """(record key, the id it keeps, whether its transform reads its own record)."""
        sid = p.id if p.id in unique else None
        own = self.depends is not None and p.record is not None and self.depends(p.record)
        if sid is not None:
            return sid, sid, own
        if own:
            return transform_input_key(keys, self.reference_frame, p.record or {}), None, True
        return frames_key(keys, self.reference_frame), None, False

    def add(self, p: _Parsed, unique: set[str]) -> None:
        s = self.stats[p.file]
        key, sid, own = self._key(p, p.keys, unique)
        if p.lost is not None:
            s.missing += key not in self.missing
            self.missing.setdefault(key, MissingFrame(key, p.lost, p.file, p.line, frame=self.resolver.key_for(p.lost)))
            return
        old = self.items.get(key)
        if old is not None:
            self.items[key] = replace(old, count=old.count + 1)
            return
        s.samples += 1
        annotation = p.record if (own or self.keep_annotations) else None
        self.items[key] = SampleItem(Sample(key, p.keys, self.reference_frame, sid),
                                     p.paths, annotation, own_input=own)  # type: ignore[arg-type]


def _sample_entry(stats: list[SourceStats], root: str, data_path: str | None, found: Discovery) -> dict[str, Any]:
    """The manifest's ``sources`` entry of a sample discovery from annotation files."""
    files = [{"file": relative_to(s.file, root), "records": s.records, "samples": s.samples, "missing": s.missing}
             for s in stats]
    return {"method": "annotations", "annotations": files, "data_path": data_path, "samples": len(found.items),
            "missing": len(found.missing), "malformed_lines": len(found.malformed)}


def samples_from_annotations(data_root: StrPath, files: list[str], reference_frame: str = "first",
                             data_path: str | None = None, strict: bool = False, *,
                             transform_depends_on: DependsOn = None, keep_annotations: bool = False,
                             trust_files: bool = False) -> Discovery:
    """One sample per annotation record (``images``, ``history_images`` + ``current_image``, or ``image``),
    keyed by its ``id`` when unique across the files, else by the digest of its frames (see
    :func:`discover_samples` for the keywords)."""
    resolver = ImageResolver(data_root, data_path, trust_files=trust_files)
    depends = depends_predicate(transform_depends_on)
    keep = (lambda r: True) if keep_annotations else (depends or (lambda r: False))
    malformed: list[MalformedLine] = []
    stats = {f: SourceStats(f, "annotations") for f in files}
    frames, found = _Frames(resolver), []
    for rec in iter_annotation_records(files, strict, malformed):
        stats[os.fspath(rec.file)].records += 1
        parsed = _parse(rec, frames, keep)
        if parsed is not None:
            found.append(parsed)
    unique = _unique_ids(found)
    samples = _SampleSet(resolver, reference_frame, stats, depends, keep_annotations)
    for p in found:
        samples.add(p, unique)
    items, missing = samples.items, samples.missing
    out = Discovery(sorted(items.values(), key=lambda i: i.key), [missing[k] for k in sorted(missing)], malformed,
                    sources=list(files), source_stats=list(stats.values()), looked_in=[resolver.root])
    out.manifest_entry = _sample_entry(out.source_stats, resolver.root, data_path, out)
    return out


def samples_from_episodes(data_root: StrPath, history: int, pad: bool = False, reference_frame: str = "first",
                          exclude: Iterable[StrPath] = ()) -> Discovery:
    """JanusVLN's samples from episode folders: every folder holding images is an episode, its frames sorted
    by name, one sample per frame (frames chosen by the history rule)."""
    from featstore.discover.images import discover_images

    found = discover_images(data_root, exclude=exclude)
    episodes: dict[str, list[Any]] = {}
    for item in found.items:
        episodes.setdefault(posixpath.dirname(item.key), []).append(item)
    items = []
    for folder in sorted(episodes):
        frames = sorted(episodes[folder], key=lambda i: posixpath.basename(i.key))
        path_of = {i.key: str(i.path) for i in frames}
        for sample in episode_samples([i.key for i in frames], history, pad, reference_frame):
            items.append(SampleItem(sample, tuple(path_of[k] for k in sample.frames)))
    entry = {"method": "episodes", "scan": True, "episodes": len(episodes), "frames": len(found.items),
             "history": {"frames": history, "pad": pad, "rule": "janusvln"}, "samples": len(items), "missing": 0}
    return Discovery(items, manifest_entry=entry, sources=found.sources, looked_in=found.looked_in, scanned=True)


def discover_samples(data_root: StrPath, *, annotations: StrPath | Sequence[StrPath] = (), data_path: str | None = None,
                     exclude: Iterable[StrPath] = (), strict: bool = False, reference_frame: str = "first",
                     history: int | None = None, history_pad: bool = False, transform_depends_on: DependsOn = None,
                     keep_annotations: bool = False, trust_files: bool = False) -> Discovery:
    """The training samples of a context build: with ``history``, JanusVLN's samples of every episode folder;
    else one per record of the given annotation files, or of those ``find_annotation_files`` finds.

    ``transform_depends_on`` (field names or a predicate): records the frame transform reads are samples of
    their own (keyed by their unique id, else by :func:`transform_input_key`) and keep their record;
    ``keep_annotations``: every sample keeps its record (for a frame transform); ``trust_files``: frames are
    taken as the annotation files name them, no image is looked at (``featstore plan --assume-size``)."""
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        raise AnnotationError(f"data root is not a directory: {root}; pass the folder that holds the images")
    if history is not None:
        if as_list(annotations):
            raise AnnotationError("--history builds samples from episode folders and --annotations from annotation "
                                  "records: pass one of them")
        return samples_from_episodes(root, history, history_pad, reference_frame, exclude)
    files = expand_annotation_sources(as_list(annotations))
    if not files and not as_list(annotations):
        files = [str(p) for p in find_annotation_files(root, [os.path.abspath(os.fspath(e)) for e in exclude])]
    if not files:
        raise AnnotationError(f"--context sample needs samples: no annotation files (*.jsonl, annotations.json) under "
                              f"{root}; pass --annotations FILE, or --history 8 to make JanusVLN's samples from "
                              "episode folders")
    return samples_from_annotations(root, files, reference_frame, data_path, strict,
                                    transform_depends_on=transform_depends_on, keep_annotations=keep_annotations,
                                    trust_files=trust_files)
