"""Image discovery: which images a build processes, and the key each one is stored under.

Public building blocks (sample context and image discovery are both built on them):

* ``find_annotation_files(data_root, exclude=()) -> list[Path]``: every ``*.jsonl`` and ``annotations.json``
  under the data root, recursively (sorted by relative path). Hidden folders, featstore's output folders
  (``vggt_featstore/``, any folder holding a store: ``index.fsi``, or ``build.json`` beside ``shards/``,
  and the ``exclude`` folders) and featstore's own files (ledgers, manifests) are never sources.
* ``iter_annotation_records(files, strict=False, malformed=None) -> Iterator[AnnotationRecord]``: the
  records of ``.jsonl`` files (one per line; ``line`` is the 1-based line) and ``.json`` files (a list,
  ``{"data": [...]}``, a dict of lists, or one record; ``line`` is the 0-based record index), in file order,
  each with its ``file`` and ``line``. A malformed line is skipped and appended to ``malformed`` as a
  :class:`MalformedLine` (``strict=True`` raises AnnotationError naming ``file:line`` instead).
* ``record_image_refs(record) -> list[str]``: the image paths a record names, in frame order (``images``
  list or string, ``image``, ``history_images`` then ``current_image``).
* ``resolve_image_ref(ref, data_root, data_path=None, annotation_file=None) -> (key, path) | None``: one
  reference resolved with the rules below, or None when the image does not exist. ``ImageResolver`` does
  the same with caching for many references (``resolve`` returns a :class:`ResolvedImage`).

Resolution: an absolute path is used as it is. A relative path is looked up, first hit wins, in
``data_root/<data_path>`` (the record's ``data_path`` field, else the ``data_path`` argument), then
``data_root``, then the folder of the annotation / list file. The key is the posix path relative to the data
root, or the absolute posix path for an image outside it.

``discover_images`` combines the sources: annotation files (explicit, or found by ``find_annotation_files``
when ``find_annotations=True``), an image list (one path per line; blank and ``#`` lines skipped), or else a
recursive scan for jpg, jpeg, png, webp and bmp files in any letter case. Items are de-duplicated by the real
path of the file they reach (two spellings or links to one file give one item, keyed by the smallest key;
the others are in ``Discovery.aliases``) and sorted by key. ``Discovery`` also tells, per source, how many
records and images it named, which referenced images are missing (with the file and line naming them), and
which lines were malformed; ``Discovery.to_record`` is what the manifest stores and ``discover_recorded``
repeats a recorded discovery (what ``featstore verify`` compares a store with).
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

from featstore.errors import AnnotationError
from featstore.discover.samples import SampleItem, episode_samples, frames_of_record, make_sample
from featstore.formats.keys import key_under, root_prefixes
from featstore.formats.layout import BUILD_CONFIG, INDEX_NAME, OWN_FILE_NAMES, SHARDS_DIR, STORE_DIR

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})
ANNOTATION_JSON = "annotations.json"
#: featstore's own files, never read as annotation sources wherever they lie.
IMAGE_REF_FIELDS = ("images", "image", "history_images", "current_image")

StrPath = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class ImageItem:
    """One image to process: its store key (posix, relative to the data root) and its file path."""

    key: str
    path: Path


@dataclass(frozen=True)
class AnnotationRecord:
    """One annotation record and where it came from (``line``: 1-based for .jsonl, record index for .json)."""

    file: Path
    line: int
    record: dict


@dataclass(frozen=True)
class MalformedLine:
    """An annotation line (or a whole .json file) that could not be parsed; it was skipped."""

    file: str
    line: int
    error: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.error}"


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved to an existing file: its key, the path as found, and the file's real path."""

    key: str
    path: Path
    real: str


@dataclass(frozen=True)
class MissingImage:
    """A referenced image that does not exist, with the first source (file, line) naming it."""

    key: str
    path: str
    file: str
    line: int
    references: int = 1

    def to_json(self) -> dict[str, Any]:
        """One line of the missing-images ledger."""
        return {"key": self.key, "path": self.path, "annotation": self.file, "line": self.line,
                "references": self.references}


@dataclass
class SourceStats:
    """What one source file named: records, distinct images found, distinct images missing, malformed lines."""

    file: str
    kind: str  # "annotations" or "image-list"
    records: int = 0
    images: int = 0
    missing: int = 0
    malformed_lines: int = 0


@dataclass
class Discovery:
    """What discovery found: sorted unique items, missing references, the sources read and their counts."""

    items: list[ImageItem]
    missing: list[str] = field(default_factory=list)  # keys, sorted
    sources: list[str] = field(default_factory=list)
    looked_in: list[str] = field(default_factory=list)
    missing_refs: list[MissingImage] = field(default_factory=list)  # sorted by key
    malformed: list[MalformedLine] = field(default_factory=list)
    source_stats: list[SourceStats] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # other key of an item's file -> the item's key
    auto: bool = False  # annotation files found by find_annotation_files
    scanned: bool = False
    data_path: str | None = None

    def to_record(self, data_root: StrPath) -> dict[str, Any]:
        """The manifest's ``sources`` entry: how images were chosen, relative to the data root where possible."""
        root = os.path.abspath(os.fspath(data_root))

        def rel(p: str) -> str:
            return _relative_to(p, root)

        files = [dict(vars(s), file=rel(s.file)) for s in self.source_stats]
        return {"method": "scan" if self.scanned else ("annotations (found)" if self.auto else "given"),
                "annotations": [f for f in files if f["kind"] == "annotations"],
                "image_list": next((f for f in files if f["kind"] == "image-list"), None),
                "scan": self.scanned, "auto": self.auto, "data_path": self.data_path,
                "images": len(self.items), "missing": len(self.missing), "malformed_lines": len(self.malformed)}


def _relative_to(path: str, root: str) -> str:
    prefix = root.rstrip(os.sep) + os.sep
    return Path(path[len(prefix):]).as_posix() if path.startswith(prefix) else path


# ---------------------------------------------------------------- annotation files

def _is_annotation_name(name: str) -> bool:
    return (name.lower().endswith(".jsonl") or name == ANNOTATION_JSON) and name not in OWN_FILE_NAMES


def _is_store_folder(names: set[str]) -> bool:
    """A folder featstore writes a shard store into (its contents are never sources)."""
    return INDEX_NAME in names or (BUILD_CONFIG in names and SHARDS_DIR in names)


def _listing(folder: str) -> list[os.DirEntry] | None:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return None


def find_annotation_files(data_root: StrPath, exclude: Iterable[StrPath] = ()) -> list[Path]:
    """Every ``*.jsonl`` / ``annotations.json`` under ``data_root``, recursively, sorted by relative path.

    Hidden folders, featstore's output folders and ``exclude`` folders are skipped, and featstore's own
    ledgers are never returned; linked folders are followed once each (loops end).
    """
    root = os.path.abspath(os.fspath(data_root))
    skip = {os.path.realpath(os.fspath(e)) for e in exclude}
    visited: set[str] = set()
    found: list[str] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in visited or real in skip:
            continue
        visited.add(real)
        entries = _listing(folder)
        if entries is None or (folder != root and _is_store_folder({e.name for e in entries})):
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    if e.name != STORE_DIR:
                        stack.append(e.path)
                elif _is_annotation_name(e.name) and e.is_file():
                    found.append(e.path)
            except OSError:
                continue
    return [Path(p) for p in sorted(found, key=lambda p: _relative_to(p, root))]


# ---------------------------------------------------------------- annotation records

def record_image_refs(record: Any) -> list[str]:
    """The image paths one annotation record names, in frame order (``images``, ``image``,
    ``history_images``, ``current_image``); non-string entries are ignored."""
    if not isinstance(record, dict):
        return []
    refs: list[str] = []
    for name in IMAGE_REF_FIELDS:
        value = record.get(name)
        if isinstance(value, str):
            refs.append(value)
        elif isinstance(value, (list, tuple)):
            refs.extend(v for v in value if isinstance(v, str))
    return refs


def record_data_path(record: dict, default: str | None = None) -> str | None:
    """The folder (under the data root) a record's relative paths resolve against first."""
    value = record.get("data_path")
    return value if isinstance(value, str) and value else default


def _is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and any(k in obj for k in IMAGE_REF_FIELDS)


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


def _open_error(path: str, exc: Exception) -> AnnotationError:
    return AnnotationError(f"cannot read annotation file {path}: {type(exc).__name__}: {exc}; check that it "
                           "exists and is readable (UTF-8 .jsonl, one JSON record per line, or a .json list)")


def _malformed(path: str, line: int, error: str, strict: bool, malformed: list[MalformedLine] | None) -> None:
    bad = MalformedLine(path, line, error)
    if strict:
        raise AnnotationError(f"{bad}; fix the line, or drop --strict-annotations to skip malformed lines")
    if malformed is not None:
        malformed.append(bad)


def _jsonl_records(path: str, strict: bool, malformed: list[MalformedLine] | None) -> Iterator[AnnotationRecord]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise _open_error(path, exc) from None
    with f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                obj = json.loads(text)
            except UnicodeDecodeError as exc:
                _malformed(path, number, f"not UTF-8 ({exc.reason} at byte {exc.start})", strict, malformed)
                continue
            except json.JSONDecodeError as exc:
                _malformed(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})", strict, malformed)
                continue
            objs = obj if isinstance(obj, list) else [obj]
            if not all(isinstance(o, dict) for o in objs):
                _malformed(path, number, f"a JSON {type(obj).__name__}, not a record (a JSON object)", strict,
                           malformed)
                continue
            for o in objs:
                yield AnnotationRecord(Path(path), number, o)


def _json_records(path: str, strict: bool, malformed: list[MalformedLine] | None) -> Iterator[AnnotationRecord]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        _malformed(path, 1, f"not UTF-8 ({exc.reason} at byte {exc.start}); file skipped", strict, malformed)
        return
    except json.JSONDecodeError as exc:
        _malformed(path, exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno}); file skipped", strict,
                   malformed)
        return
    for index, record in enumerate(_records_from_json(doc)):
        yield AnnotationRecord(Path(path), index, record)


def iter_annotation_records(files: StrPath | Iterable[StrPath], strict: bool = False,
                            malformed: list[MalformedLine] | None = None) -> Iterator[AnnotationRecord]:
    """The records of annotation files in order, each with its file and line (see the module docs).

    Malformed lines are skipped and appended to ``malformed``; ``strict=True`` raises AnnotationError
    naming the file and line instead. An unreadable file is always an AnnotationError.
    """
    for f in [files] if isinstance(files, (str, os.PathLike)) else files:
        path = os.fspath(f)
        reader = _jsonl_records if path.lower().endswith(".jsonl") else _json_records
        yield from reader(path, strict, malformed)


def read_annotation_records(path: StrPath) -> list[dict]:
    """Parse one ``.jsonl`` or ``.json`` annotation file into records; raises AnnotationError naming the
    file (and line) when it cannot be read or parsed."""
    return [r.record for r in iter_annotation_records(path, strict=True)]


def _annotation_files_in(directory: str) -> list[str]:
    """Top-level ``*.jsonl`` / ``*.json`` files of a folder given as a source that hold at least one record."""
    entries = _listing(directory) or []
    names = [e.name for e in entries if e.is_file() and not e.name.startswith(".")
             and e.name.lower().endswith((".jsonl", ".json")) and e.name not in OWN_FILE_NAMES]
    found = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            if any(_is_record(r.record) for r in iter_annotation_records(path, strict=True)):
                found.append(path)
        except AnnotationError:
            continue
    return found


# ---------------------------------------------------------------- resolving and keying

class ImageResolver:
    """Resolves image references under one data root (see the module docs), caching folder real paths."""

    def __init__(self, data_root: StrPath, data_path: str | None = None):
        self.root = os.path.abspath(os.fspath(data_root))
        self.data_path = data_path
        self._prefixes = root_prefixes(self.root)
        self._real_dirs: dict[str, str] = {}

    def key_for(self, path: str) -> str:
        """Posix path relative to the data root, or the absolute posix path outside it (`path` is normalised)."""
        return key_under(path, self._prefixes)

    def bases(self, data_path: str | None = None, annotation_dir: str | None = None) -> tuple[str, ...]:
        """The folders a relative reference is looked up in, in order."""
        bases = []
        data_path = data_path or self.data_path
        if data_path:
            bases.append(os.path.normpath(os.path.join(self.root, data_path)))
        bases.append(self.root)
        if annotation_dir:
            bases.append(annotation_dir)
        return tuple(dict.fromkeys(bases))

    def candidates(self, ref: str, bases: tuple[str, ...]) -> list[str]:
        """The normalised paths a reference may name, in lookup order."""
        found = [ref] if os.path.isabs(ref) else [os.path.join(b, ref) for b in bases]
        return [os.path.normpath(c) for c in found]

    def real_file(self, path: str) -> str | None:
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
        real_dir = self._real_dirs.get(folder)
        if real_dir is None:
            real_dir = self._real_dirs[folder] = os.path.realpath(folder)
        return os.path.join(real_dir, name)

    def resolve_in(self, ref: str, bases: tuple[str, ...]) -> ResolvedImage | None:
        """Resolve against given base folders; None when no candidate is a file."""
        for candidate in self.candidates(ref, bases):
            real = self.real_file(candidate)
            if real is not None:
                return ResolvedImage(self.key_for(candidate), Path(candidate), real)
        return None

    def resolve(self, ref: str, data_path: str | None = None,
                annotation_file: StrPath | None = None) -> ResolvedImage | None:
        """Resolve one reference of a record (its ``data_path``, the annotation file it came from)."""
        folder = os.path.dirname(os.path.abspath(os.fspath(annotation_file))) if annotation_file else None
        return self.resolve_in(ref, self.bases(data_path, folder))


def resolve_image_ref(ref: str, data_root: StrPath, data_path: str | None = None,
                      annotation_file: StrPath | None = None) -> tuple[str, Path] | None:
    """(key, path) of the image one record reference names, or None when it does not exist."""
    found = ImageResolver(data_root).resolve(ref, data_path, annotation_file)
    return (found.key, found.path) if found is not None else None


class _Collector:
    """Adds resolved images (de-duplicated by real path) and missing references, per source."""

    def __init__(self, data_root: str, data_path: str | None):
        self.resolver = ImageResolver(data_root, data_path)
        self.root = self.resolver.root
        self.by_real: dict[str, tuple[str, str]] = {}  # real path -> (key, path as found)
        self.other_keys: dict[str, set[str]] = {}  # real path -> further keys naming it
        self.missing: dict[str, MissingImage] = {}
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
            old = self.missing[outcome[0]]
            self.missing[outcome[0]] = MissingImage(old.key, old.path, old.file, old.line, old.references + 1)
        seen.add(outcome)

    def _resolve(self, ref: str, bases: tuple[str, ...], where: tuple[str, int]) -> tuple[str, bool]:
        for b in bases:
            self.looked_in.setdefault(b, None)
        hit = self.resolver.resolve_in(ref, bases)
        if hit is not None:
            self.add_file(hit.key, str(hit.path), hit.real)
            return hit.real, True
        path = self.resolver.candidates(ref, bases)[0]
        key = self.resolver.key_for(path)
        old = self.missing.get(key)
        self.missing[key] = (MissingImage(key, path, where[0], where[1]) if old is None
                             else MissingImage(old.key, old.path, old.file, old.line, old.references + 1))
        return key, False

    def result(self, sources: list[str], **fields: Any) -> Discovery:
        pairs = sorted(self.by_real.values())
        aliases = {k: self.by_real[real][0] for real, ks in self.other_keys.items() for k in ks}
        return Discovery(items=[ImageItem(key, Path(path)) for key, path in pairs],
                         missing=sorted(self.missing), sources=sources, looked_in=list(self.looked_in),
                         missing_refs=[self.missing[k] for k in sorted(self.missing)], aliases=aliases, **fields)


def _count(stats: SourceStats, seen: set[tuple[str, bool]]) -> None:
    stats.images = sum(1 for _, found in seen if found)
    stats.missing = len(seen) - stats.images


# ---------------------------------------------------------------- directory scan

def _is_image_name(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _scan_folder(collector: _Collector, folder: str, real_folder: str, subdirs: list[tuple[str, str]],
                 linked: list[tuple[str, str]], top: str) -> None:
    """Add the images of one folder; queue its plain subfolders and (separately) its symlinked ones."""
    entries = _listing(folder)
    if entries is None or (folder != top and _is_store_folder({e.name for e in entries})):
        return
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        try:
            is_link = entry.is_symlink()
            if entry.is_dir():
                if name == STORE_DIR:
                    continue
                if is_link:
                    linked.append((entry.path, os.path.realpath(entry.path)))
                else:
                    subdirs.append((entry.path, os.path.join(real_folder, name)))
            elif _is_image_name(name) and entry.is_file():
                real = os.path.realpath(entry.path) if is_link else os.path.join(real_folder, name)
                collector.add_file(collector.resolver.key_for(entry.path), entry.path, real)
        except OSError:
            continue


def scan_images(collector: _Collector, top: str, exclude: Iterable[str] = ()) -> None:
    """Add every image file under `top`, recursively. Plain folders are walked first; symlinked folders
    afterwards in sorted order, each real folder at most once (so loops end and keys are deterministic).
    Hidden entries, featstore's output folders, ``exclude`` folders and non-image files are skipped."""
    real_top = os.path.realpath(top)
    skip = {os.path.realpath(e) for e in exclude}
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
        if real_folder in skip:
            continue
        visited.add(real_folder)
        _scan_folder(collector, folder, real_folder, subdirs, linked, top)


# ---------------------------------------------------------------- entry points

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


def discover_images(data_root: StrPath, *, annotations: StrPath | Sequence[StrPath] = (),
                    image_list: StrPath | None = None, data_path: str | None = None,
                    find_annotations: bool = False, exclude: Iterable[StrPath] = (),
                    strict: bool = False) -> Discovery:
    """Find the images to process under `data_root`: from annotation files and/or an image list; when
    neither is given, from the annotation files ``find_annotation_files`` finds (``find_annotations=True``)
    or else a recursive scan. ``exclude`` folders (a build's output) are never read."""
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        raise AnnotationError(f"data root is not a directory: {root}; pass the folder that holds the images")
    collector = _Collector(root, data_path)
    skip = [os.path.abspath(os.fspath(e)) for e in exclude]
    files = _expand_annotation_sources(_as_list(annotations))
    auto = False
    if not files and not _as_list(annotations) and image_list is None and find_annotations:
        files = [str(p) for p in find_annotation_files(root, skip)]
        auto = bool(files)
    malformed: list[MalformedLine] = []
    stats = _add_annotations(collector, files, strict, malformed)
    sources = list(files)
    if image_list is not None:
        list_path = os.path.abspath(os.fspath(image_list))
        sources.append(list_path)
        stats.append(_add_image_list(collector, list_path))
    scanned = not files and not _as_list(annotations) and image_list is None
    if scanned:
        sources.append(f"scan:{collector.root}")
        scan_images(collector, collector.root, skip)
    return collector.result(sources, malformed=malformed, source_stats=stats, auto=auto, scanned=scanned,
                            data_path=data_path)


def discover_recorded(data_root: StrPath, record: dict[str, Any]) -> Discovery:
    """Repeat a discovery recorded by :meth:`Discovery.to_record` (the same files, image list, data path or
    scan) under ``data_root``; raises AnnotationError when a recorded file is gone."""
    root = os.path.abspath(os.fspath(data_root))

    def where(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(root, p)

    if record.get("scan"):
        return discover_images(root, data_path=record.get("data_path"))
    files = [where(a["file"]) for a in record.get("annotations") or []]
    for f in files:
        if not os.path.isfile(f):
            raise AnnotationError(f"annotation file {f} recorded in the manifest no longer exists")
    listed = record.get("image_list")
    return discover_images(root, annotations=files, image_list=where(listed["file"]) if listed else None,
                           data_path=record.get("data_path"))


# ---------------------------------------------------------------- training samples (--context sample)

@dataclass
class SampleDiscovery:
    """Samples found for a context build, the samples that cannot be built (a frame missing), and the record
    of how they were found (``to_record`` is the manifest's ``sources`` entry)."""

    items: list[SampleItem]
    missing: list[dict[str, Any]] = field(default_factory=list)  # {"key", "frame", "path", "annotation", "line"}
    malformed: list[MalformedLine] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


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


def samples_from_annotations(data_root: StrPath, files: list[str], reference_frame: str = "first",
                             data_path: str | None = None, strict: bool = False) -> SampleDiscovery:
    """One sample per annotation record (``images``, ``history_images`` + ``current_image``, or ``image``),
    keyed by its ``id`` when unique across the files, else by the digest of its frames."""
    resolver = ImageResolver(data_root, data_path)
    malformed: list[MalformedLine] = []
    found, per_file = [], {f: {"file": f, "records": 0, "samples": 0, "missing": 0} for f in files}
    for rec in iter_annotation_records(files, strict, malformed):
        per_file[os.fspath(rec.file)]["records"] += 1
        got = _sample_from_record(rec, resolver)
        if got is not None:
            found.append((rec, *got))
    unique = _unique_ids(found)
    items: dict[str, SampleItem] = {}
    missing: dict[str, dict[str, Any]] = {}
    for rec, sid, frames in found:
        stats = per_file[os.fspath(rec.file)]
        keys = [f.key if isinstance(f, ResolvedImage) else resolver.key_for(f) for f in frames]
        sample = make_sample(keys, reference_frame, sid if sid in unique else None)
        lost = next((f for f in frames if not isinstance(f, ResolvedImage)), None)
        if lost is not None:
            stats["missing"] += sample.key not in missing
            missing.setdefault(sample.key, {"key": sample.key, "frame": resolver.key_for(lost), "path": lost,
                                            "annotation": os.fspath(rec.file), "line": rec.line})
        elif sample.key not in items:
            stats["samples"] += 1
            items[sample.key] = SampleItem(sample, tuple(str(f.path) for f in frames))  # type: ignore[union-attr]
    root = os.path.abspath(os.fspath(data_root))
    record = {"method": "annotations", "annotations": [dict(s, file=_relative_to(s["file"], root))
                                                       for s in per_file.values()],
              "data_path": data_path, "samples": len(items), "missing": len(missing),
              "malformed_lines": len(malformed)}
    return SampleDiscovery(sorted(items.values(), key=lambda i: i.key), sorted(missing.values(), key=lambda m: m["key"]),
                           malformed, record)


def samples_from_episodes(data_root: StrPath, history: int, pad: bool = False, reference_frame: str = "first",
                          exclude: Iterable[StrPath] = ()) -> SampleDiscovery:
    """JanusVLN's samples from episode folders: every folder holding images is an episode, its frames sorted
    by name, one sample per frame (frames chosen by the history rule)."""
    found = discover_images(data_root, exclude=exclude)
    episodes: dict[str, list[ImageItem]] = {}
    for item in found.items:
        episodes.setdefault(posixpath.dirname(item.key), []).append(item)
    items = []
    for folder in sorted(episodes):
        frames = sorted(episodes[folder], key=lambda i: posixpath.basename(i.key))
        path_of = {i.key: str(i.path) for i in frames}
        for sample in episode_samples([i.key for i in frames], history, pad, reference_frame):
            items.append(SampleItem(sample, tuple(path_of[k] for k in sample.frames)))
    record = {"method": "episodes", "scan": True, "episodes": len(episodes), "frames": len(found.items),
              "history": {"frames": history, "pad": pad, "rule": "janusvln"}, "samples": len(items), "missing": 0}
    return SampleDiscovery(items, record=record)


def discover_samples(data_root: StrPath, *, annotations: StrPath | Sequence[StrPath] = (), data_path: str | None = None,
                     exclude: Iterable[StrPath] = (), strict: bool = False, reference_frame: str = "first",
                     history: int | None = None, history_pad: bool = False) -> SampleDiscovery:
    """The training samples of a context build: with ``history``, JanusVLN's samples of every episode folder;
    else one per record of the given annotation files, or of those ``find_annotation_files`` finds."""
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        raise AnnotationError(f"data root is not a directory: {root}; pass the folder that holds the images")
    if history is not None:
        if _as_list(annotations):
            raise AnnotationError("--history builds samples from episode folders and --annotations from annotation "
                                  "records: pass one of them")
        return samples_from_episodes(root, history, history_pad, reference_frame, exclude)
    files = _expand_annotation_sources(_as_list(annotations))
    if not files and not _as_list(annotations):
        files = [str(p) for p in find_annotation_files(root, [os.path.abspath(os.fspath(e)) for e in exclude])]
    if not files:
        raise AnnotationError(f"--context sample needs samples: no annotation files (*.jsonl, annotations.json) under "
                              f"{root}; pass --annotations FILE, or --history 8 to make JanusVLN's samples from "
                              "episode folders")
    return samples_from_annotations(root, files, reference_frame, data_path, strict)
