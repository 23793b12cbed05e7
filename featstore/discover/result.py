"""THE result of every discovery (images or training samples): what can be built, what cannot (a frame that
does not exist, with the annotation line naming it), the lines skipped, and how it was all found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MissingFrame:
    """A record that cannot be built because a frame it names does not exist, with the first source (file,
    line) naming it. For an image record the frame is the record itself (``frame`` is None)."""

    key: str
    path: str
    file: str
    line: int
    references: int = 1
    frame: str | None = None

    @property
    def frame_key(self) -> str:
        """The key of the frame that does not exist."""
        return self.key if self.frame is None else self.frame

    def to_json(self) -> dict[str, Any]:
        """One line of the missing ledger (``missing.jsonl``)."""
        if self.frame is None:
            return {"key": self.key, "path": self.path, "annotation": self.file, "line": self.line,
                    "references": self.references}
        return {"key": self.key, "frame": self.frame, "path": self.path, "annotation": self.file,
                "line": self.line}


@dataclass
class SourceStats:
    """What one source file (annotation file or image list) named: records, distinct images found (or
    samples made), distinct images (or samples) missing, malformed lines."""

    file: str
    kind: str  # "annotations" or "image-list"
    records: int = 0
    images: int = 0
    missing: int = 0
    malformed_lines: int = 0
    samples: int = 0


@dataclass
class Discovery:
    """What discovery found: ``items`` (``ImageItem`` or ``SampleItem``, sorted by key, unique), ``missing``
    (sorted by key), the malformed lines skipped, the sources read and ``manifest_entry`` (the manifest's
    ``sources``: how the items were chosen, paths relative to the data root where possible)."""

    items: list[Any]
    missing: list[MissingFrame] = field(default_factory=list)
    malformed: list[Any] = field(default_factory=list)  # MalformedLine
    manifest_entry: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    looked_in: list[str] = field(default_factory=list)
    source_stats: list[SourceStats] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # other key of an item's file -> the item's key
    auto: bool = False  # annotation files found by find_annotation_files
    scanned: bool = False

    @property
    def missing_keys(self) -> list[str]:
        """The keys of the records that cannot be built, sorted."""
        return [m.key for m in self.missing]
