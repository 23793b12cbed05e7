"""The training samples of a context build (``discover_samples``): one per annotation record (``images``,
``history_images`` + ``current_image``, or ``image``), keyed by its ``id`` when unique across the files, else
by the digest of its frames; or JanusVLN's samples of every episode folder (``--history``)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence, Union

from featstore.discover.annotations import (AnnotationRecord, MalformedLine, StrPath, as_list,
                                            expand_annotation_sources, find_annotation_files,
                                            iter_annotation_records, record_data_path, relative_to)
from featstore.discover.references import ImageResolver
from featstore.discover.result import Discovery, MissingFrame, SourceStats
from featstore.discover.samples import Sample, SampleItem, episode_samples, frames_of_record
from featstore.errors import AnnotationError
from featstore.formats.keys import SAMPLE_KEY_PREFIX, frames_key
from featstore.runtime.gcpause import paused_gc


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
        self._bases: dict[tuple[str | None, str], tuple[str, ...]] = {}

    def bases(self, record: dict, file: str) -> tuple[str, ...]:
        """The folders a record's references resolve in (one tuple per data path and annotation file)."""
        data_path = record_data_path(record)
        got = self._bases.get((data_path, file))
        if got is None:
            got = self._bases[(data_path, file)] = self.resolver.bases(data_path, os.path.dirname(os.path.abspath(file)))
        return got

    def _resolve(self, ref: str, bases: tuple[str, ...]) -> tuple[str, str | None]:
        found = self.resolver.locate(ref, bases)
        hit = self.memo[(bases, ref)] = (self.resolver.key_for(ref), None) if found is None else found[:2]
        return hit

    def of(self, refs: list[str], bases: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str | None, ...], str | None]:
        """(keys, paths, the first reference that does not exist)."""
        memo, keys, paths, lost = self.memo, [], [], None
        for ref in refs:
            hit = memo.get((bases, ref)) or self._resolve(ref, bases)
            keys.append(hit[0])
            paths.append(hit[1])
            if hit[1] is None and lost is None:
                lost = ref
        return tuple(keys), tuple(paths), lost


def _parse(rec: AnnotationRecord, frames: _Frames, keep: Callable[[dict], bool]) -> _Parsed | None:
    """The frames of one annotation record; None when it names none."""
    try:
        refs = frames_of_record(rec.record)
    except ValueError:
        return None
    if not refs:
        return None
    keys, paths, lost = frames.of(refs, frames.bases(rec.record, os.fspath(rec.file)))
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
    samples = _SampleSet(resolver, reference_frame, stats, depends, keep_annotations)
    with paused_gc():
        for rec in iter_annotation_records(files, strict, malformed):
            stats[os.fspath(rec.file)].records += 1
            parsed = _parse(rec, frames, keep)
            if parsed is not None:
                found.append(parsed)
        unique = _unique_ids(found)
        for p in found:
            samples.add(p, unique)
        del found, frames  # the parsed records and the resolution memo: the samples hold what they need
        items = sorted(samples.items.values(), key=lambda i: i.key)
    missing = samples.missing
    out = Discovery(items, [missing[k] for k in sorted(missing)], malformed,
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
