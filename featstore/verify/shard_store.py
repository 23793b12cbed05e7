"""verify of a shard store, local or remote: leftovers of builds, the index, the shard files against the
manifest, every shard scanned in worker processes (or sampled records), the counts, and the source listing."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Iterator

from featstore.errors import StoreError
from featstore.formats.index import Index, IndexEntry, local_index_file
from featstore.formats.layout import INDEX_NAME, PARTS_DIR, SHARD_MANIFEST, SHARDS_DIR
from featstore.formats.shardstore import list_store_shards
from featstore.storage import Storage, local_copy
from featstore.verify import fixes
from featstore.verify.checks import Expectations
from featstore.verify.leftovers import lock_names, temp_file_findings, unfinished_build_findings
from featstore.verify.listing import compare_listing, source_listing
from featstore.verify.pool import run_tasks
from featstore.verify.report import INFO_SUPERSEDED, Finding, Report
from featstore.verify.shard_scan import Indexed, ShardScan, check_entries, scan_shard_file


def verify_shard_store(storage: Storage, m: dict[str, Any], ex: Expectations, *, data_root: str | None,
                       sample: int | None, seed: int, workers: int, progress: bool) -> Report:
    """Check a shard store (see module docs); each shard's sha256 is taken while it streams."""
    check = ShardStoreCheck(storage, m, ex, data_root)
    check.check_leftovers()
    check.open_index()
    check.check_shard_files()
    if sample is None:
        for scan in run_tasks(scan_shard_file, check.scan_tasks(), workers, progress, "verify shards",
                              total=len(check.on_disk)):
            check.absorb_scan(scan)
    else:
        for scan in run_tasks(check_entries, check.sample_tasks(sample, seed), workers, progress, "verify (sample)"):
            check.report.absorb(scan)
    check.check_counts(sample is None)
    check.compare_with_sources(sample)
    return check.report


class ShardStoreCheck:
    """The state of one shard store's verification: its index, shard files and the report being filled."""

    def __init__(self, storage: Storage, m: dict[str, Any], ex: Expectations, data_root: str | None):
        self.storage, self.m, self.ex = storage, m, ex
        self.data_root = data_root  # --data-root: where the images are now, when they moved
        self.root: Path | str = storage.local_path() or storage.display
        self.report = Report(str(self.root), "shards")
        self.ix: Index | None = None
        self.rows: dict[str, Any] = {}  # shard -> index rows of its records
        self.sizes = list_store_shards(storage)
        self.on_disk = sorted(self.sizes)
        self.listed = {s["name"]: s for s in m.get("shards") or []}
        if ex.data_root is None:
            self.report.notes.append(f"data root {data_root or m.get('data_root')} not found: staleness and orphans not checked "
                                     f"(pass --data-root)")
            self.report.skip("stale", "data root not found")
            self.report.skip("orphan", "data root not found")

    def entries_of(self, shard: str) -> list[IndexEntry]:
        """The index entries of one shard (materialised a shard at a time: memory does not grow with the store)."""
        if self.ix is None:
            return []
        return [self.ix.entry(int(r)) for r in self.rows.get(shard, ())]

    def check_leftovers(self) -> None:
        """Temporary files, part files and locks of a build that is running or was interrupted."""
        st = self.storage
        self.report.add(*temp_file_findings(st.describe(n) for folder in ("", SHARDS_DIR) for n in st.list(folder)))
        traces = [st.describe(PARTS_DIR)] if _leftover(st, PARTS_DIR) else []
        traces += [st.describe(n) for n in lock_names(st.list(""))]
        self.report.add(*unfinished_build_findings(traces, self.ex.rebuild))

    def open_index(self) -> None:
        """Open ``index.fsi``; an unreadable index is a finding (every record then shows as unindexed)."""
        try:
            self.ix = Index(local_index_file(self.storage))
            self.rows = self.ix.rows_by_shard()
        except StoreError as e:
            self.report.add(Finding("index", INDEX_NAME, str(e), fixes.merge(self.root)))

    def check_shard_files(self) -> None:
        """The shards on disk are the manifest's, with its sizes, and every indexed shard exists."""
        root, rebuild, add = self.root, self.ex.rebuild, self.report.add
        for name in sorted(set(self.listed) - set(self.on_disk)):
            add(Finding("shard", name, "listed in the manifest but missing on disk",
                        f"run `featstore merge {root}` then `{rebuild}` to rebuild its records"))
        for name in sorted(set(self.on_disk) - set(self.listed)):
            add(Finding("shard", name, "on disk but not listed in the manifest", fixes.merge(root)))
        for name in self.rows:
            if name not in self.sizes:
                add(*(Finding("shard", e.key, f"indexed in shard {name}, which is missing", f"run `{rebuild}`")
                      for e in self.entries_of(name)))
        for name in self.on_disk:
            want = self.listed.get(name, {}).get("bytes")
            if want not in (None, self.sizes[name]):
                add(Finding("shard", name, f"size {self.sizes[name]} bytes, the manifest says {want} (truncated or "
                                           f"rewritten)", f"delete it, run `featstore merge {root}`, then `{rebuild}`"))

    def scan_tasks(self) -> Iterator[tuple[Storage, str, dict[str, Indexed], Expectations]]:
        """One full-scan task per shard on disk, with the index entries of that shard."""
        for s in self.on_disk:
            yield self.storage, s, {e.key: Indexed(e.offset, e.length, e.crc32) for e in self.entries_of(s)}, self.ex

    def sample_tasks(self, sample: int, seed: int) -> list[tuple[Storage, str, list[tuple[str, Indexed]], Expectations]]:
        """Tasks checking ``sample`` seeded records, grouped by shard."""
        live = [r for name in self.on_disk for r in self.rows.get(name, ())]
        rng = random.Random(seed)
        chosen = [self.ix.entry(int(r)) for r in rng.sample(live, min(sample, len(live)))] if self.ix else []
        groups: dict[str, list[tuple[str, Indexed]]] = {}
        for e in chosen:
            groups.setdefault(e.shard, []).append((e.key, Indexed(e.offset, e.length, e.crc32)))
        self.report.notes.append(f"--sample {sample}: checked {len(chosen)} of {len(live)} records; shard sha256 and "
                                 f"tar structure not checked")
        return [(self.storage, s, es, self.ex) for s, es in groups.items()]

    def absorb_scan(self, scan: ShardScan) -> None:
        """Take in one shard's scan and judge what needs every key: unindexed records, entries not found, sha256."""
        self.report.absorb(scan)
        root, rebuild = self.root, self.ex.rebuild
        for key, offset in scan.unindexed:
            if self.ix is not None and key in self.ix:
                self.report.info[INFO_SUPERSEDED] += 1
            else:
                self.report.add(Finding("index", key, f"record in shard {scan.shard} at offset {offset} is not in "
                                                      f"the index", fixes.merge(root)))
        seen = set(scan.seen)
        for e in self.entries_of(scan.shard):
            if e.key in seen:
                continue
            if scan.broken:
                self.report.add(Finding("shard", e.key, f"record lost: shard {e.shard} is truncated or unreadable",
                                        f"delete shards/{e.shard}, run `featstore merge {root}`, then `{rebuild}`"))
            else:
                self.report.add(Finding("index", e.key, f"index points at offset {e.offset} of {e.shard}, where no "
                                                        f"record of this key starts", fixes.merge(root)))
        want = self.listed.get(scan.shard, {}).get("sha256")
        if want and scan.sha256 != want:
            self.report.add(Finding("shard", scan.shard, f"sha256 {str(scan.sha256)[:16]}... differs from the "
                                                         f"manifest's {want[:16]}...",
                                    f"delete it, run `featstore merge {root}`, then `{rebuild}`"))

    def check_counts(self, full: bool) -> None:
        """The manifest's record counts agree with the index."""
        n_index = len(self.ix) if self.ix is not None else 0
        self.report.counts = {"manifest_records": self.m.get("processed_images"), "index_records": n_index,
                              "shards_on_disk": len(self.on_disk), "manifest_shards": len(self.listed),
                              "records_found": self.report.records_checked if full else None}
        if self.ix is None:
            return
        merge = fixes.merge(self.root)
        if self.m.get("processed_images") != n_index:
            self.report.add(Finding("count", SHARD_MANIFEST, f"processed_images is {self.m.get('processed_images')}, "
                                                             f"the index holds {n_index}", merge))
        records = (self.m.get("counts") or {}).get("records")
        if records not in (None, n_index):
            self.report.add(Finding("count", SHARD_MANIFEST, f"counts.records is {records}, the index holds {n_index}",
                                    merge))
        for name, s in self.listed.items():
            got = len(self.rows.get(name, ()))
            if s.get("records") is not None and s["records"] != got:
                self.report.add(Finding("count", name, f"manifest says {s['records']} records, the index has {got}",
                                        merge))

    def compare_with_sources(self, sample: int | None) -> None:
        """Missing, undecodable and orphan records against the build's recorded sources (full runs only)."""
        if sample is not None:
            self.report.skip("missing", "--sample checks records only")
            return
        if self.ix is None:
            return
        found, why_not = source_listing(self.m, self.data_root)
        with _local_ledger(self.storage, self.m.get("failures_ledger")) as ledger:
            stored = set(self.ix.keys()) if found is not None else set()
            compare_listing(self.report, found, why_not, stored, self.m, ledger, self.ex.rebuild)


def _leftover(storage: Storage, name: str) -> bool:
    """True when a file or non-empty folder/prefix ``name`` exists in the store."""
    local = storage.local_path(name)
    if local is not None:
        return local.exists()
    return storage.exists(name) or bool(storage.list(name))


@contextlib.contextmanager
def _local_ledger(storage: Storage, name: str | None) -> Iterator[Path | None]:
    """A local file holding the store's failures ledger (a temporary copy for a remote store), or None."""
    if not name or not storage.exists(name):
        yield None
        return
    with local_copy(storage, name) as path:
        yield path
