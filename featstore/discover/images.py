"""Which images a per-image build processes, and the key each one is stored under (``discover_images``).

Sources: annotation files (explicit, or found by ``find_annotation_files`` when ``find_annotations=True``),
an image list (one path per line; blank and ``#`` lines skipped), or else a recursive scan for jpg, jpeg,
png, webp and bmp files in any letter case. Items are de-duplicated by the real path of the file they reach
(two spellings or links to one file give one item, keyed by the smallest key; the others are in
``Discovery.aliases``) and sorted by key. ``Discovery.manifest_entry`` is what the manifest stores and
``discover_recorded`` repeats a recorded discovery (what ``featstore verify`` compares a store with).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from featstore.discover.annotations import (MalformedLine, StrPath, as_list, expand_annotation_sources,
                                            find_annotation_files, iter_annotation_records, record_data_path,
                                            record_image_refs, relative_to)
from featstore.discover.references import ImageResolver
from featstore.discover.result import Discovery, MissingFrame, SourceStats
from featstore.discover.scan import scan_images
from featstore.errors import AnnotationError


@dataclass(frozen=True)
class ImageItem:
    """One image to process: its store key (posix, relative to the data root) and its file path."""

    key: str
    path: Path


class _Collector:
    """Adds resolved images (de-duplicated by real path) and missing references, per source."""

    def __init__(self, data_root: str, data_path: str | None, trust_files: bool = False):
        self.resolver = ImageResolver(data_root, data_path, trust_files=trust_files)
        self.root = self.resolver.root
        self.by_real: dict[str, tuple[str, str]] = {}  # real path -> (key, path as found)
        self.other_keys: dict[str, set[str]] = {}  # real path -> further keys naming it
        self.missing: dict[str, MissingFrame] = {}
        self.looked_in: dict[str, None] = {self.root: None}
        self._memo: dict[tuple[tuple[str, ...], str], tuple[str, bool]] = {}  # -> (real path, True) | (key, False)

    def add_file(self, key: str, path: str, real: str) -> None:
        old = self.by_real.get(real)
        if old is None:
            self.by_real[real] = (key, path)
        elif key != old[0]:
            self.other_keys.setdefault(real, set()).add(max(key, old[0]))
            if key < old[0]:
                self.by_real[real] = (key, path)

    def add_ref(self, ref: str, bases: tuple[str, ...], where: tuple[str, int], seen: set[tuple[str, bool]]) -> None:
        """Resolve one reference and add it, or note it missing (the first file and line naming it are kept);
        ``seen`` collects (real path, True) or (missing key, False) per source, for its counts."""
        memo = (bases, ref)
        outcome = self._memo.get(memo)
        if outcome is None:
            outcome = self._memo[memo] = self._resolve(ref, bases, where)
        elif not outcome[1]:
            self._note_missing(outcome[0], "", where)
        seen.add(outcome)

    def _note_missing(self, key: str, path: str, where: tuple[str, int]) -> None:
        old = self.missing.get(key)
        self.missing[key] = (MissingFrame(key, path, where[0], where[1]) if old is None
                             else MissingFrame(old.key, old.path, old.file, old.line, old.references + 1))

    def _resolve(self, ref: str, bases: tuple[str, ...], where: tuple[str, int]) -> tuple[str, bool]:
        for b in bases:
            self.looked_in.setdefault(b, None)
        hit = self.resolver.resolve_in(ref, bases)
        if hit is not None:
            self.add_file(hit.key, str(hit.path), hit.real)
            return hit.real, True
        path = self.resolver.candidates(ref, bases)[0]
        key = self.resolver.key_for(path)
        self._note_missing(key, path, where)
        return key, False

    def result(self, sources: list[str], **fields: Any) -> Discovery:
        pairs = sorted(self.by_real.values())
        aliases = {k: self.by_real[real][0] for real, ks in self.other_keys.items() for k in ks}
        return Discovery(items=[ImageItem(key, Path(path)) for key, path in pairs],
                         missing=[self.missing[k] for k in sorted(self.missing)], sources=sources,
                         looked_in=list(self.looked_in), aliases=aliases, **fields)


def _count(stats: SourceStats, seen: set[tuple[str, bool]]) -> None:
    stats.images = sum(1 for _, found in seen if found)
    stats.missing = len(seen) - stats.images


def _read_image_list(path: str) -> list[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1)]
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"cannot read image list {path}: {type(exc).__name__}: {exc}; expected a UTF-8 "
                              "text file with one image path per line") from exc
    return [(n, line) for n, line in lines if line and not line.startswith("#")]


def _add_annotations(collector: _Collector, files: list[str], strict: bool,
                     malformed: list[MalformedLine]) -> list[SourceStats]:
    stats = []
    for path in files:
        s = SourceStats(path, "annotations")
        seen: set[tuple[str, bool]] = set()
        before = len(malformed)
        folder = os.path.dirname(path)
        for rec in iter_annotation_records(path, strict, malformed):
            s.records += 1
            refs = record_image_refs(rec.record)
            if refs:
                bases = collector.resolver.bases(record_data_path(rec.record), folder)
                for ref in refs:
                    collector.add_ref(ref, bases, (path, rec.line), seen)
        s.malformed_lines = len(malformed) - before
        _count(s, seen)
        stats.append(s)
    return stats


def _add_image_list(collector: _Collector, list_path: str) -> SourceStats:
    s = SourceStats(list_path, "image-list")
    seen: set[tuple[str, bool]] = set()
    bases = collector.resolver.bases(None, os.path.dirname(list_path))
    for number, ref in _read_image_list(list_path):
        s.records += 1
        collector.add_ref(ref, bases, (list_path, number), seen)
    _count(s, seen)
    return s


def _scan(collector: _Collector, exclude: Iterable[str]) -> None:
    """Add every image file under the data root (the one scan policy)."""
    for f in scan_images(collector.root, exclude):
        collector.add_file(collector.resolver.key_for(f.path), f.path, f.real)


def manifest_entry(found: Discovery, root: str, data_path: str | None) -> dict[str, Any]:
    """The manifest's ``sources`` entry of an image discovery, relative to the data root where possible."""
    files = [{"file": relative_to(s.file, root), "kind": s.kind, "records": s.records, "images": s.images,
              "missing": s.missing, "malformed_lines": s.malformed_lines} for s in found.source_stats]
    return {"method": "scan" if found.scanned else ("annotations (found)" if found.auto else "given"),
            "annotations": [f for f in files if f["kind"] == "annotations"],
            "image_list": next((f for f in files if f["kind"] == "image-list"), None),
            "scan": found.scanned, "auto": found.auto, "data_path": data_path,
            "images": len(found.items), "missing": len(found.missing), "malformed_lines": len(found.malformed)}


def discover_images(data_root: StrPath, *, annotations: StrPath | Sequence[StrPath] = (),
                    image_list: StrPath | None = None, data_path: str | None = None,
                    find_annotations: bool = False, exclude: Iterable[StrPath] = (),
                    strict: bool = False, trust_files: bool = False) -> Discovery:
    """Find the images to process under `data_root`: from annotation files and/or an image list; when
    neither is given, from the annotation files ``find_annotation_files`` finds (``find_annotations=True``)
    or else a recursive scan. ``exclude`` folders (a build's output) are never read. ``trust_files``: an
    annotated image is taken to exist as named (nothing looked up; ``featstore plan --assume-size``)."""
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        raise AnnotationError(f"data root is not a directory: {root}; pass the folder that holds the images")
    collector = _Collector(root, data_path, trust_files)
    skip = [os.path.abspath(os.fspath(e)) for e in exclude]
    given = as_list(annotations)
    files = expand_annotation_sources(given)
    auto = False
    if not files and not given and image_list is None and find_annotations:
        files = [str(p) for p in find_annotation_files(root, skip)]
        auto = bool(files)
    malformed: list[MalformedLine] = []
    stats = _add_annotations(collector, files, strict, malformed)
    sources = list(files)
    if image_list is not None:
        list_path = os.path.abspath(os.fspath(image_list))
        sources.append(list_path)
        stats.append(_add_image_list(collector, list_path))
    scanned = not files and not given and image_list is None
    if scanned:
        sources.append(f"scan:{collector.root}")
        _scan(collector, skip)
    found = collector.result(sources, malformed=malformed, source_stats=stats, auto=auto, scanned=scanned)
    found.manifest_entry = manifest_entry(found, collector.root, data_path)
    return found


def discover_recorded(data_root: StrPath, entry: dict[str, Any]) -> Discovery:
    """Repeat a discovery recorded as a manifest ``sources`` entry (the same files, image list, data path or
    scan) under ``data_root``; raises AnnotationError when a recorded file is gone."""
    root = os.path.abspath(os.fspath(data_root))

    def where(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(root, p)

    if entry.get("scan"):
        return discover_images(root, data_path=entry.get("data_path"))
    files = [where(a["file"]) for a in entry.get("annotations") or []]
    for f in files:
        if not os.path.isfile(f):
            raise AnnotationError(f"annotation file {f} recorded in the manifest no longer exists")
    listed = entry.get("image_list")
    return discover_images(root, annotations=files, image_list=where(listed["file"]) if listed else None,
                           data_path=entry.get("data_path"))
