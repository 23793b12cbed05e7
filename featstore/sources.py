"""Image discovery: which images a build processes, and the key each one is stored under.

Three kinds of source, combined when several are given:

* annotation files: ``.jsonl`` (one record per line) or ``.json`` (a list of records, ``{"data": [...]}``,
  a dict of such lists, or one record). A record names images with ``images`` (list or string), ``image``
  (string or list), or ``history_images`` + ``current_image``. A directory given as an annotation source
  means every top-level ``*.jsonl`` / ``*.json`` in it that parses as annotation records.
* an image list: one path per line (blank lines and lines starting with ``#`` are skipped; surrounding
  whitespace is stripped).
* a recursive scan of the data root for jpg, jpeg, png, webp and bmp files in any letter case, used only
  when neither annotations nor an image list are given.

A relative path is looked up, first hit wins, in ``data_root/<data_path>`` (the record's ``data_path``
field, else the ``data_path`` argument), then ``data_root``, then the folder of the annotation / list file.
Absolute paths are used as they are. Images that exist nowhere are reported in ``Discovery.missing``.

Items are de-duplicated by the resolved real path of the file they reach (two paths or symlinks to one
file give one item, keyed by the smallest of their keys) and sorted by key. The key is the posix path relative to the
data root, or the absolute posix path for an image outside it.

`auto_annotations` is the rule for builds that name no source: annotation files at the top level of the
data root (``*.jsonl`` and ``annotations.json``) are used if there are any, otherwise the data root is scanned.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

from featstore.errors import AnnotationError
from featstore.formats.keys import key_under, root_prefixes

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})
OUTPUT_DIR_NAME = "vggt_featstore"
CACHE_SUFFIX = ".vggt_cache.pt"
ANNOTATION_SUFFIXES = (".jsonl", ".json")

StrPath = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class ImageItem:
    """One image to process: its store key (posix, relative to the data root) and its file path."""

    key: str
    path: Path


@dataclass
class Discovery:
    """What discovery found: sorted unique items, referenced-but-missing images, the sources read and the
    folders searched (for "no images found" messages)."""

    items: list[ImageItem]
    missing: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    looked_in: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- annotation records

def record_image_refs(record: Any) -> list[str]:
    """The image paths one annotation record names (``images``, ``image``, ``history_images`` and
    ``current_image``, in that order); non-string entries are ignored."""
    if not isinstance(record, dict):
        return []
    refs: list[str] = []
    for name in ("images", "image", "history_images", "current_image"):
        value = record.get(name)
        if isinstance(value, str):
            refs.append(value)
        elif isinstance(value, (list, tuple)):
            refs.extend(v for v in value if isinstance(v, str))
    return refs


def _is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and any(k in obj for k in ("images", "image", "history_images", "current_image"))


def _records_from_json(obj: Any) -> list[dict]:
    """Records held by a parsed ``.json`` document: a list, ``{"data": [...]}``, a dict of lists, or one record."""
    if isinstance(obj, list):
        return [r for r in obj if isinstance(r, dict)]
    if not isinstance(obj, dict):
        return []
    if _is_record(obj):
        return [obj]
    records: list[dict] = []
    for value in obj.values():
        if isinstance(value, list):
            records.extend(r for r in value if isinstance(r, dict))
    return records


def read_annotation_records(path: StrPath) -> list[dict]:
    """Parse one ``.jsonl`` or ``.json`` annotation file into records; raises AnnotationError naming the
    file (and line) when it cannot be read or parsed."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            if path.lower().endswith(".jsonl"):
                return list(_jsonl_records(f, path))
            return _records_from_json(json.load(f))
    except AnnotationError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"cannot read annotation file {path}: {type(exc).__name__}: {exc}; expected "
                              "UTF-8 .jsonl (one JSON record per line) or .json (a list of records)") from exc


def _jsonl_records(lines: Iterable[str], path: str) -> Iterator[dict]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{path}:{number}: not valid JSON ({exc}); every non-blank line of a "
                                  ".jsonl file must be one JSON record") from exc
        if isinstance(obj, dict):
            yield obj
        elif isinstance(obj, list):
            yield from (r for r in obj if isinstance(r, dict))


def _annotation_files_in(directory: str) -> list[str]:
    """Top-level ``*.jsonl`` / ``*.json`` files of a directory that parse and hold at least one record."""
    found = []
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith(".")
                       and e.name.lower().endswith(ANNOTATION_SUFFIXES))
    for name in names:
        path = os.path.join(directory, name)
        try:
            records = read_annotation_records(path)
        except AnnotationError:
            continue
        if any(_is_record(r) for r in records):
            found.append(path)
    return found


def auto_annotations(data_root: StrPath) -> list[Path]:
    """Annotation files at the top level of the data root (``*.jsonl`` and ``annotations.json``, sorted);
    an empty list means "scan the data root for images" (what users' scripts do)."""
    root = os.fspath(data_root)
    try:
        with os.scandir(root) as entries:
            names = [e.name for e in entries if e.is_file() and not e.name.startswith(".")
                     and (e.name.lower().endswith(".jsonl") or e.name == "annotations.json")]
    except OSError:
        return []
    return [Path(root, n) for n in sorted(names)]


# ---------------------------------------------------------------- resolving and keying

class _Collector:
    """Resolves references against base folders, de-duplicates by resolved real path and builds keys."""

    def __init__(self, data_root: str):
        self.root = os.path.abspath(data_root)
        self.real_root = os.path.realpath(self.root)
        self._prefixes = root_prefixes(self.root)
        self.by_real: dict[str, tuple[str, str]] = {}  # real path -> (key, path as found)
        self.missing: dict[str, None] = {}
        self.looked_in: dict[str, None] = {self.root: None}
        self._resolved: set[tuple[tuple[str, ...], str]] = set()
        self._real_dirs: dict[str, str] = {}

    def key_for(self, path: str) -> str:
        """Posix path relative to the data root, or the absolute posix path outside it (`path` is normalised)."""
        return key_under(path, self._prefixes)

    def add_file(self, path: str, real: str) -> None:
        key = self.key_for(path)
        old = self.by_real.get(real)
        if old is None or key < old[0]:
            self.by_real[real] = (key, path)

    def _real_dir(self, folder: str) -> str:
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = os.path.realpath(folder)
        return real

    def _real_file(self, path: str) -> str | None:
        """The resolved real path of a regular file, or None when `path` is not one."""
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(path)
                return real if os.path.isfile(real) else None
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        folder, name = os.path.split(path)
        return os.path.join(self._real_dir(folder), name)

    def add_ref(self, ref: str, bases: tuple[str, ...]) -> None:
        """Resolve one referenced path (first existing file among the bases) and add it, or note it missing."""
        memo = (bases, ref)
        if memo in self._resolved:
            return
        self._resolved.add(memo)
        candidates = [ref] if os.path.isabs(ref) else [os.path.join(b, ref) for b in bases]
        candidates = [os.path.normpath(c) for c in candidates]
        for candidate in candidates:
            real = self._real_file(candidate)
            if real is not None:
                self.add_file(candidate, real)
                return
        self.missing[self.key_for(candidates[0])] = None

    def bases(self, data_path: str | None, source_dir: str | None) -> tuple[str, ...]:
        """The folders a relative reference is looked up in, in order."""
        bases = []
        if data_path:
            bases.append(os.path.normpath(os.path.join(self.root, data_path)))
        bases.append(self.root)
        if source_dir:
            bases.append(source_dir)
        unique = tuple(dict.fromkeys(bases))
        for b in unique:
            self.looked_in.setdefault(b, None)
        return unique

    def result(self, sources: list[str]) -> Discovery:
        pairs = sorted(self.by_real.values())
        return Discovery(items=[ImageItem(key, Path(path)) for key, path in pairs],
                         missing=sorted(self.missing), sources=sources, looked_in=list(self.looked_in))


# ---------------------------------------------------------------- directory scan

def _is_image_name(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _scan_folder(collector: _Collector, folder: str, real_folder: str,
                 subdirs: list[tuple[str, str]], linked: list[tuple[str, str]]) -> None:
    """Add the images of one folder; queue its plain subfolders and (separately) its symlinked ones."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        try:
            is_link = entry.is_symlink()
            if entry.is_dir():
                if name == OUTPUT_DIR_NAME:
                    continue
                if is_link:
                    linked.append((entry.path, os.path.realpath(entry.path)))
                else:
                    subdirs.append((entry.path, os.path.join(real_folder, name)))
            elif _is_image_name(name) and entry.is_file():
                real = os.path.realpath(entry.path) if is_link else os.path.join(real_folder, name)
                collector.add_file(entry.path, real)
        except OSError:
            continue


def scan_images(collector: _Collector, top: str) -> None:
    """Add every image file under `top`, recursively. Plain folders are walked first; symlinked folders
    afterwards in sorted order, each real folder at most once (so loops end and keys are deterministic).
    Hidden entries, featstore's output folder and non-image files are skipped."""
    real_top = os.path.realpath(top)
    visited = {real_top}
    subdirs: list[tuple[str, str]] = [(top, real_top)]
    linked: list[tuple[str, str]] = []
    while subdirs or linked:
        if not subdirs:
            linked.sort(reverse=True)
            path, real = linked.pop()
            if real in visited or not os.path.isdir(real):
                continue
            visited.add(real)
            subdirs.append((path, real))
        folder, real_folder = subdirs.pop()
        visited.add(real_folder)
        _scan_folder(collector, folder, real_folder, subdirs, linked)


# ---------------------------------------------------------------- entry point

def _as_list(annotations: StrPath | Sequence[StrPath] | None) -> list[str]:
    if annotations is None:
        return []
    if isinstance(annotations, (str, os.PathLike)):
        return [os.fspath(annotations)]
    return [os.fspath(a) for a in annotations]


def _expand_annotation_sources(annotations: list[str]) -> list[str]:
    files: list[str] = []
    for source in annotations:
        if os.path.isdir(source):
            files.extend(_annotation_files_in(source))
        elif os.path.isfile(source):
            files.append(source)
        else:
            raise AnnotationError(f"annotation file not found: {source}; pass an existing .jsonl/.json file "
                                  "or a folder holding them")
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


def _read_image_list(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"cannot read image list {path}: {type(exc).__name__}: {exc}; expected a UTF-8 "
                              "text file with one image path per line") from exc
    return [line for line in lines if line and not line.startswith("#")]


def discover_images(data_root: StrPath, *, annotations: StrPath | Sequence[StrPath] = (),
                    image_list: StrPath | None = None, data_path: str | None = None) -> Discovery:
    """Find the images to process under `data_root` from annotation files, an image list, or (when neither
    is given) a recursive scan; returns sorted, de-duplicated items plus the missing references."""
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        raise AnnotationError(f"data root is not a directory: {root}; pass the folder that holds the images")
    collector = _Collector(root)
    requested = _as_list(annotations)
    sources: list[str] = []
    for ann in _expand_annotation_sources(requested):
        sources.append(ann)
        ann_dir = os.path.dirname(ann)
        for record in read_annotation_records(ann):
            refs = record_image_refs(record)
            if refs:
                rec_path = record.get("data_path")
                bases = collector.bases(rec_path if isinstance(rec_path, str) else data_path, ann_dir)
                for ref in refs:
                    collector.add_ref(ref, bases)
    if image_list is not None:
        list_path = os.path.abspath(os.fspath(image_list))
        sources.append(list_path)
        bases = collector.bases(data_path, os.path.dirname(list_path))
        for ref in _read_image_list(list_path):
            collector.add_ref(ref, bases)
    if not requested and image_list is None:
        sources.append(f"scan:{collector.root}")
        scan_images(collector, collector.root)
    return collector.result(sources)
