"""The build's throughput series: what each build process appends to ``build_stats/rank-<gid>.json``.

One small JSON document per build process (a few KB: at most :data:`MAX_POINTS` points per run, the last
:data:`MAX_RUNS` runs kept), read by ``featstore report``::

    {"format": "featstore-build-stats", "version": 1,
     "fields": ["t", "records", "decode_wait_s", "model_s", "write_s"],
     "runs": [{"gid": 0, "started": 1796195978.8, "interval_s": 0.5, "points": [[0.0, 0, 0.0, 0.0, 0.0], ...]}]}

Each point is cumulative since the run's start: ``t`` seconds, ``records`` written, and the seconds the main
thread waited for decoded input (``decode_wait_s``), spent launching the model (``model_s``; on CPU the model
itself), and the writer thread spent writing (``write_s``). A run that outgrows :data:`MAX_POINTS` keeps every
other point (the first and the last always) and samples half as often.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featstore.errors import StoreError
from featstore.formats.layout import BUILD_STATS_DIR, PER_IMAGE_BUILD_STATS_DIR, build_stats_name
from featstore.runtime.fsutil import is_temp_name

if TYPE_CHECKING:
    from featstore.storage import Storage

FORMAT = "featstore-build-stats"
VERSION = 1
FIELDS = ("t", "records", "decode_wait_s", "model_s", "write_s")
MAX_POINTS = 120
MAX_RUNS = 16


@dataclass
class BuildStatsRun:
    """One build run of one process: when it started, how often it sampled, and its cumulative points."""

    gid: int
    started: float
    interval_s: float
    points: list[list[float]] = field(default_factory=list)

    def add(self, point: list[float]) -> None:
        """Append a point (one value per :data:`FIELDS`); thins the series to stay within :data:`MAX_POINTS`."""
        if len(point) != len(FIELDS):
            raise ValueError(f"a build stats point has {len(FIELDS)} values {FIELDS}, not {len(point)}")
        self.points.append([round(float(v), 4) for v in point])
        if len(self.points) > MAX_POINTS:
            last = self.points[-1]
            self.points = self.points[:-1:2] + [last]
            self.interval_s *= 2

    def to_json(self) -> dict[str, Any]:
        """The run's JSON form."""
        return {"gid": self.gid, "started": self.started, "interval_s": self.interval_s, "points": self.points}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "BuildStatsRun":
        """A run read from ``where`` (StoreError when it is not of the documented form)."""
        try:
            points = [[float(v) for v in p] for p in d["points"]]
            run = cls(int(d["gid"]), float(d["started"]), float(d["interval_s"]), points)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"build stats {where} holds a malformed run ({e}); delete the file (it only feeds "
                             f"`featstore report`)") from None
        if any(len(p) != len(FIELDS) for p in points):
            raise StoreError(f"build stats {where}: points must have {len(FIELDS)} values {FIELDS}")
        return run


def encode_build_stats(runs: list[BuildStatsRun]) -> bytes:
    """The file's bytes for ``runs`` (only the last :data:`MAX_RUNS` are kept)."""
    doc = {"format": FORMAT, "version": VERSION, "fields": list(FIELDS),
           "runs": [r.to_json() for r in runs[-MAX_RUNS:]]}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def decode_build_stats(data: bytes, where: str) -> list[BuildStatsRun]:
    """The runs a build stats file holds; StoreError naming ``where`` when it is not one."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise StoreError(f"build stats {where} is not JSON ({e}); delete the file (it only feeds `featstore "
                         f"report`)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("runs"), list):
        raise StoreError(f"build stats {where} is not a {FORMAT} document")
    if int(doc.get("version", 0)) > VERSION:
        raise StoreError(f"build stats {where} has version {doc.get('version')}, newer than this featstore reads "
                         f"({VERSION}); upgrade featstore")
    return [BuildStatsRun.from_json(r, where) for r in doc["runs"]]


def read_process_runs(storage: "Storage", layout: str, gid: int) -> list[BuildStatsRun]:
    """The runs build process ``gid`` recorded so far (none when it has no file, or an unreadable one: a new
    build then starts the file afresh)."""
    name = build_stats_name(layout, gid)
    try:
        return decode_build_stats(storage.read_bytes(name), storage.describe(name))
    except (FileNotFoundError, StoreError):
        return []


def write_process_runs(storage: "Storage", layout: str, gid: int, runs: list[BuildStatsRun]) -> None:
    """Replace process ``gid``'s file with ``runs`` (atomically)."""
    storage.publish_bytes(build_stats_name(layout, gid), encode_build_stats(runs))


def read_build_stats(storage: "Storage", layout: str) -> tuple[list[BuildStatsRun], list[str]]:
    """Every run every build process of the store recorded, oldest first, and a message per unreadable file."""
    folder = BUILD_STATS_DIR if layout == "shards" else PER_IMAGE_BUILD_STATS_DIR
    runs: list[BuildStatsRun] = []
    problems: list[str] = []
    for name in sorted(storage.list(folder)):
        if is_temp_name(name.rsplit("/", 1)[-1]) or not name.endswith(".json"):
            continue
        try:
            runs += decode_build_stats(storage.read_bytes(name), storage.describe(name))
        except (OSError, StoreError) as e:
            problems.append(str(e))
    return sorted(runs, key=lambda r: (r.started, r.gid)), problems
