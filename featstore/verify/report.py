"""What verify finds: the typed :class:`Finding`, the kinds of finding, the information counters, and the
:class:`Report` that collects them and prints the table or writes the JSON report."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

SHOW_PER_KIND = 5

KINDS: dict[str, str] = {
    "corrupt": "record does not decode or fails its checksum",
    "nonfinite": "record holds NaN or Inf values",
    "layout": "tensor dtype or shape differs from the manifest",
    "provenance": "model, layers, preprocessing or tokens differ from the manifest",
    "stale": "source image changed after the record was built",
    "orphan": "record whose source image no longer exists",
    "missing": "image without a stored feature",
    "undecodable": "listed image that cannot be decoded, so it has no feature",
    "duplicate": "key stored twice in one shard or file set",
    "shard": "shard file missing, wrong size/sha256, unreadable tar or unexpected member",
    "index": "index entry does not point at its record's bytes, or a record is not indexed",
    "count": "manifest counts disagree with the index or the files",
    "stray": "temporary file left by a crashed writer, or an unfinished build",
    "recompute": "stored features differ from a fresh model run beyond the dtype's tolerance",
}

# Information counters (not problems); their texts are the keys of the JSON report's "info".
INFO_SUPERSEDED = "superseded records (a newer copy is indexed)"
INFO_LEGACY_RECORDS = "legacy records (no metadata: provenance and staleness not checkable)"
INFO_LEGACY_CACHES = "legacy caches (no metadata: checksum not checkable)"
INFO_NO_FINGERPRINT = "records without a source fingerprint (staleness not checkable)"


@dataclass(frozen=True)
class Finding:
    """One problem: its kind (a key of :data:`KINDS`), the record or file it concerns, what is wrong, and what
    to do about it."""

    kind: str
    key: str
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; expected one of {sorted(KINDS)}")

    def to_json(self) -> dict[str, str]:
        """The report's ``problems`` entry (``message`` is the detail, the field name the report has always had)."""
        return {"kind": self.kind, "key": self.key, "message": self.detail, "fix": self.fix}


@dataclass
class CheckedBatch:
    """What one worker task (a shard, or a batch of per-image files) found."""

    findings: list[Finding] = field(default_factory=list)
    info: Counter = field(default_factory=Counter)
    records: int = 0


@dataclass
class Report:
    """Everything verify found; ``exit_code`` is 0 (ok) or 1 (problems)."""

    path: str
    layout: str
    records_checked: int = 0
    problems: list[Finding] = field(default_factory=list)
    info: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    recompute: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # check kind -> why it did not run

    def skip(self, kind: str, why: str) -> None:
        """Note that a check did not run (printed as ``skipped``, never as ``ok``)."""
        self.skipped.setdefault(kind, why)

    def add(self, *findings: Finding) -> None:
        """Record problems."""
        self.problems.extend(findings)

    def absorb(self, batch: CheckedBatch) -> None:
        """Take in what a worker task found."""
        self.problems.extend(batch.findings)
        self.info.update(batch.info)
        self.records_checked += batch.records

    def keys_of(self, kind: str) -> set[str]:
        """The keys named by the problems of one kind so far."""
        return {p.key for p in self.problems if p.kind == kind}

    @property
    def exit_code(self) -> int:
        """0 when nothing is wrong, else 1."""
        return 1 if self.problems else 0

    def by_kind(self) -> dict[str, list[Finding]]:
        """Problems grouped by kind, in the order of :data:`KINDS`."""
        out: dict[str, list[Finding]] = {}
        for p in self.problems:
            out.setdefault(p.kind, []).append(p)
        return {k: out[k] for k in KINDS if k in out}

    def to_json(self) -> dict[str, Any]:
        """The machine-readable report."""
        return {"path": self.path, "layout": self.layout, "ok": not self.problems, "exit_code": self.exit_code,
                "records_checked": self.records_checked, "counts": self.counts,
                "problem_counts": {k: len(v) for k, v in self.by_kind().items()},
                "problems": [p.to_json() for p in self.problems], "info": dict(self.info), "notes": self.notes,
                "skipped": self.skipped, "recompute": self.recompute}

    def print_summary(self, out: TextIO | None = None) -> None:
        """A short table per check plus the first few problems of each kind."""
        out = out or sys.stdout
        print(f"featstore verify {self.path} ({self.layout}): {self.records_checked} records checked", file=out)
        self._print_table(out)
        self._print_problems(out)
        print("OK: every check passed" if not self.problems else f"FAILED: {len(self.problems)} problem(s)", file=out)

    def _print_table(self, out: TextIO) -> None:
        groups = self.by_kind()
        for k, desc in KINDS.items():
            n = len(groups.get(k, []))
            if not n and k in self.skipped:
                print(f"  skipped {k:<11} {'-':>7}  {desc} (not run: {self.skipped[k]})", file=out)
                continue
            print(f"  {'FAIL   ' if n else 'ok     '} {k:<11} {n:>7}  {desc}", file=out)
        for k, v in sorted(self.info.items()):
            print(f"  info {k:<30} {v}", file=out)
        for note in self.notes:
            print(f"  note: {note}", file=out)
        if self.recompute:
            r = self.recompute
            print(f"  recompute: {r.get('checked', 0)} records, worst relative error {r.get('worst_error')} "
                  f"({r.get('worst_key')}), tolerance {r.get('tolerance')}", file=out)

    def _print_problems(self, out: TextIO) -> None:
        for k, v in self.by_kind().items():
            print(f"{k}: {len(v)} problem(s)", file=out)
            for p in v[:SHOW_PER_KIND]:
                print(f"  - {p.key}: {p.detail}" + (f"\n    fix: {p.fix}" if p.fix else ""), file=out)
            if len(v) > SHOW_PER_KIND:
                print(f"  ... and {len(v) - SHOW_PER_KIND} more (see --json)", file=out)
