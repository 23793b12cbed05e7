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

import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from featstore.discover.annotations import (AnnotationRecord, MalformedLine, StrPath, as_list,
                                            expand_annotation_sources, find_annotation_files,
                                            iter_annotation_records, record_data_path, relative_to)
from featstore.discover.references import ImageResolver, ResolvedImage
from featstore.discover.result import Discovery, MissingFrame, SourceStats
from featstore.errors import AnnotationError
from featstore.formats.keys import SAMPLE_KEY_PREFIX, frames_key

REFERENCE_FRAMES = ("first", "last")
JANUSVLN_HISTORY = 8  # JanusVLN's max_history_images / --num_history: up to 9 frames per sample


def _check_reference_frame(reference_frame: str) -> None:
    if reference_frame not in REFERENCE_FRAMES:
        raise ValueError(f"reference frame {reference_frame!r} is not one of {', '.join(REFERENCE_FRAMES)}")


@dataclass(frozen=True)
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
    """One training sample to build: the sample (key, frame keys in training order) and its frame paths."""

    sample: Sample
    paths: tuple[str, ...]

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

def _sample_from_record(rec: AnnotationRecord, resolver: ImageResolver
                        ) -> tuple[str | None, list[ResolvedImage | str]] | None:
    """(id, resolved frames or the missing reference) of one annotation record; None when it names no frames."""
    try:
        refs = frames_of_record(rec.record)
    except ValueError:
        return None
    if not refs:
        return None
    bases = resolver.bases(record_data_path(rec.record), os.path.dirname(os.path.abspath(rec.file)))
    frames: list[ResolvedImage | str] = [resolver.resolve_in(r, bases) or r for r in refs]
    raw_id = rec.record.get("id")
    return (None if raw_id is None or isinstance(raw_id, (dict, list)) else str(raw_id)), frames


def _unique_ids(found: list[tuple[AnnotationRecord, str | None, list]]) -> set[str]:
    """Ids that name one frame list only (an id reused for other frames falls back to the frame digest)."""
    frames_of: dict[str, set[tuple]] = {}
    for _, sid, frames in found:
        if sid is not None:
            frames_of.setdefault(sid, set()).add(tuple(f.key if isinstance(f, ResolvedImage) else f for f in frames))
    return {sid for sid, lists in frames_of.items() if len(lists) == 1}


def _sample_entry(stats: list[SourceStats], root: str, data_path: str | None, found: Discovery) -> dict[str, Any]:
    """The manifest's ``sources`` entry of a sample discovery from annotation files."""
    files = [{"file": relative_to(s.file, root), "records": s.records, "samples": s.samples, "missing": s.missing}
             for s in stats]
    return {"method": "annotations", "annotations": files, "data_path": data_path, "samples": len(found.items),
            "missing": len(found.missing), "malformed_lines": len(found.malformed)}


def _collect(found: list[tuple[AnnotationRecord, str | None, list]], resolver: ImageResolver, reference_frame: str,
             stats: dict[str, SourceStats]) -> tuple[dict[str, SampleItem], dict[str, MissingFrame]]:
    """The samples of the parsed records (first of each key kept) and those that miss a frame."""
    unique = _unique_ids(found)
    items: dict[str, SampleItem] = {}
    missing: dict[str, MissingFrame] = {}
    for rec, sid, frames in found:
        s = stats[os.fspath(rec.file)]
        keys = [f.key if isinstance(f, ResolvedImage) else resolver.key_for(f) for f in frames]
        sample = make_sample(keys, reference_frame, sid if sid in unique else None)
        lost = next((f for f in frames if not isinstance(f, ResolvedImage)), None)
        if lost is not None:
            s.missing += sample.key not in missing
            missing.setdefault(sample.key, MissingFrame(sample.key, lost, os.fspath(rec.file), rec.line,
                                                        frame=resolver.key_for(lost)))
        elif sample.key not in items:
            s.samples += 1
            items[sample.key] = SampleItem(sample, tuple(str(f.path) for f in frames))  # type: ignore[union-attr]
    return items, missing


def samples_from_annotations(data_root: StrPath, files: list[str], reference_frame: str = "first",
                             data_path: str | None = None, strict: bool = False) -> Discovery:
    """One sample per annotation record (``images``, ``history_images`` + ``current_image``, or ``image``),
    keyed by its ``id`` when unique across the files, else by the digest of its frames."""
    resolver = ImageResolver(data_root, data_path)
    malformed: list[MalformedLine] = []
    stats = {f: SourceStats(f, "annotations") for f in files}
    found = []
    for rec in iter_annotation_records(files, strict, malformed):
        stats[os.fspath(rec.file)].records += 1
        got = _sample_from_record(rec, resolver)
        if got is not None:
            found.append((rec, *got))
    items, missing = _collect(found, resolver, reference_frame, stats)
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
                     history: int | None = None, history_pad: bool = False) -> Discovery:
    """The training samples of a context build: with ``history``, JanusVLN's samples of every episode folder;
    else one per record of the given annotation files, or of those ``find_annotation_files`` finds."""
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
    return samples_from_annotations(root, files, reference_frame, data_path, strict)
