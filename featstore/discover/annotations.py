"""Annotation files and the annotation records they hold, each with the file and line it came from.

* ``find_annotation_files(data_root, exclude=()) -> list[Path]``: every ``*.jsonl`` and ``annotations.json``
  under the data root, recursively (sorted by relative path). Hidden folders, featstore's output folders
  (``vggt_featstore/``, any folder holding a store: ``index.fsi``, or ``build.json`` beside ``shards/``,
  and the ``exclude`` folders) and featstore's own files (ledgers, manifests) are never sources.
* ``iter_annotation_records(files, strict=False, malformed=None) -> Iterator[AnnotationRecord]``: the
  records of ``.jsonl`` files (one per line; ``line`` is the 1-based line) and ``.json`` files (a list,
  ``{"data": [...]}``, a dict of lists, or one record; ``line`` is the 0-based record index), in file order.
  A malformed line is skipped and appended to ``malformed`` as a :class:`MalformedLine` (``strict=True``
  raises AnnotationError naming ``file:line`` instead).
* ``record_image_refs(record) -> list[str]``: the image paths a record names, in frame order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

from featstore.discover.scan import scan_files
from featstore.errors import AnnotationError
from featstore.formats.layout import OWN_FILE_NAMES

ANNOTATION_JSON = "annotations.json"
IMAGE_REF_FIELDS = ("images", "image", "history_images", "current_image")

StrPath = Union[str, "os.PathLike[str]"]


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


def relative_to(path: str, root: str) -> str:
    """``path`` as a posix path relative to ``root`` when inside it, else as given."""
    prefix = root.rstrip(os.sep) + os.sep
    return Path(path[len(prefix):]).as_posix() if path.startswith(prefix) else path


def _is_annotation_name(name: str) -> bool:
    return (name.lower().endswith(".jsonl") or name == ANNOTATION_JSON) and name not in OWN_FILE_NAMES


def find_annotation_files(data_root: StrPath, exclude: Iterable[StrPath] = ()) -> list[Path]:
    """Every ``*.jsonl`` / ``annotations.json`` under ``data_root``, recursively, sorted by relative path
    (the scan policy of :mod:`featstore.discover.scan`; featstore's own ledgers are never returned)."""
    root = os.path.abspath(os.fspath(data_root))
    found = [f.path for f in scan_files(root, _is_annotation_name, [os.fspath(e) for e in exclude])]
    return [Path(p) for p in sorted(found, key=lambda p: relative_to(p, root))]


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


def is_record(obj: Any) -> bool:
    """An annotation record: a JSON object naming at least one image field."""
    return isinstance(obj, dict) and any(k in obj for k in IMAGE_REF_FIELDS)


def _records_from_json(obj: Any) -> list[dict]:
    """Records held by a parsed ``.json`` document: a list, ``{"data": [...]}``, a dict of lists, or one record."""
    if isinstance(obj, list):
        return [r for r in obj if isinstance(r, dict)]
    if not isinstance(obj, dict):
        return []
    if is_record(obj):
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


def _parse_line(raw: bytes) -> tuple[list[dict] | None, str | None]:
    """(records of one .jsonl line, None) or (None, why it is malformed); ([], None) for a blank line."""
    try:
        text = raw.decode("utf-8")
        if not text.strip():
            return [], None
        obj = json.loads(text)
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    objs = obj if isinstance(obj, list) else [obj]
    if not all(isinstance(o, dict) for o in objs):
        return None, f"a JSON {type(obj).__name__}, not a record (a JSON object)"
    return objs, None


def _jsonl_records(path: str, strict: bool, malformed: list[MalformedLine] | None) -> Iterator[AnnotationRecord]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise _open_error(path, exc) from None
    where = Path(path)
    with f:
        for number, raw in enumerate(f, 1):
            objs, error = _parse_line(raw)
            if objs is None:
                _malformed(path, number, str(error), strict, malformed)
                continue
            for o in objs:
                yield AnnotationRecord(where, number, o)


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
    where = Path(path)
    for index, record in enumerate(_records_from_json(doc)):
        yield AnnotationRecord(where, index, record)


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
    try:
        names = sorted(e.name for e in os.scandir(directory) if e.is_file() and not e.name.startswith(".")
                       and e.name.lower().endswith((".jsonl", ".json")) and e.name not in OWN_FILE_NAMES)
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            if any(is_record(r.record) for r in iter_annotation_records(path, strict=True)):
                found.append(path)
        except AnnotationError:
            continue
    return found


def as_list(annotations: StrPath | Sequence[StrPath] | None) -> list[str]:
    """The ``annotations`` argument of discovery as a list of paths."""
    if annotations is None:
        return []
    if isinstance(annotations, (str, os.PathLike)):
        return [os.fspath(annotations)]
    return [os.fspath(a) for a in annotations]


def expand_annotation_sources(annotations: list[str]) -> list[str]:
    """Given annotation files and folders -> the annotation files (absolute, first mention kept)."""
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
