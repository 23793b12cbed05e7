"""``featstore verify``: prove a store is complete and right, or name every record that is not.

Checks (docs/verify.md has the full list): counts (manifest vs index vs files vs source listing), every
record (decodes, checksums, dtype/shape, finite values, provenance, staleness of its source image), shard
files (size and sha256 against the manifest, tar structure, stray temporary files, index entries pointing
at the right bytes), and optionally a recompute of N records with the model.

Shards are checked in worker processes, each reading its shard once, sequentially: the same bytes feed the
sha256, the tar walk and the record decoder. Exit status: 0 all good, 1 problems found, 2 could not run.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import sys
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import torch
from tqdm import tqdm

from featstore.errors import FeatstoreError, StoreError
from featstore.formats.index import INDEX_NAME, Index, IndexEntry, local_index_file
from featstore.formats.keys import key_from_member
from featstore.formats.manifest import (PER_IMAGE_MANIFEST, PER_IMAGE_SUFFIX, find_manifest, read_manifest,
                                        read_store_manifest, shape_key)
from featstore.formats.perimage import read_pt
from featstore.formats.record import Record, crc32_of, decode_record, dtype_name
from featstore.formats.shards import SHARDS_DIR, parse_shard_name
from featstore.formats.storage import (Storage, add_storage_options_argument, is_remote, local_path_of,
                                       parse_location, storage_options_of)
from featstore.fsutil import is_temp_name

log = logging.getLogger("featstore")
SHOW_PER_KIND = 5
# Relative error (max |stored - recomputed| / max |recomputed|) accepted per storage dtype.
RECOMPUTE_TOL = {"float32": 1e-3, "float16": 4e-3, "bfloat16": 1.6e-2, "float64": 1e-6}

KINDS: dict[str, str] = {
    "corrupt": "record does not decode or fails its checksum",
    "nonfinite": "record holds NaN or Inf values",
    "layout": "tensor dtype or shape differs from the manifest",
    "provenance": "model, layers, preprocessing or tokens differ from the manifest",
    "stale": "source image changed after the record was built",
    "orphan": "record whose source image no longer exists",
    "missing": "image without a stored feature",
    "duplicate": "key stored twice in one shard or file set",
    "shard": "shard file missing, wrong size/sha256, unreadable tar or unexpected member",
    "index": "index entry does not point at its record's bytes, or a record is not indexed",
    "count": "manifest counts disagree with the index or the files",
    "stray": "temporary file left by a crashed writer, or an unfinished build",
    "recompute": "stored features differ from a fresh model run beyond the dtype's tolerance",
}


@dataclass
class Problem:
    """One finding: its kind, the record (or file) it concerns, what is wrong and what to do."""

    kind: str
    key: str
    message: str
    fix: str = ""


@dataclass
class Report:
    """Everything verify found; ``exit_code`` is 0 (ok) or 1 (problems)."""

    path: str
    layout: str
    records_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    info: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    recompute: dict[str, Any] = field(default_factory=dict)

    def add(self, kind: str, key: str, message: str, fix: str = "") -> None:
        """Record a problem."""
        self.problems.append(Problem(kind, key, message, fix))

    @property
    def exit_code(self) -> int:
        """0 when nothing is wrong, else 1."""
        return 1 if self.problems else 0

    def by_kind(self) -> dict[str, list[Problem]]:
        """Problems grouped by kind, in the order of :data:`KINDS`."""
        out: dict[str, list[Problem]] = {}
        for p in self.problems:
            out.setdefault(p.kind, []).append(p)
        return {k: out[k] for k in list(KINDS) + sorted(set(out) - set(KINDS)) if k in out}

    def to_json(self) -> dict[str, Any]:
        """The machine-readable report."""
        return {"path": self.path, "layout": self.layout, "ok": not self.problems, "exit_code": self.exit_code,
                "records_checked": self.records_checked, "counts": self.counts,
                "problem_counts": {k: len(v) for k, v in self.by_kind().items()},
                "problems": [asdict(p) for p in self.problems], "info": dict(self.info), "notes": self.notes,
                "recompute": self.recompute}

    def print_summary(self, out: Any = None) -> None:
        """A short table per check plus the first few problems of each kind."""
        out = out or sys.stdout
        groups = self.by_kind()
        print(f"featstore verify {self.path} ({self.layout}): {self.records_checked} records checked", file=out)
        for k, desc in KINDS.items():
            n = len(groups.get(k, []))
            print(f"  {'FAIL' if n else 'ok  '} {k:<11} {n:>7}  {desc}", file=out)
        for k, v in sorted(self.info.items()):
            print(f"  info {k:<30} {v}", file=out)
        for note in self.notes:
            print(f"  note: {note}", file=out)
        if self.recompute:
            r = self.recompute
            print(f"  recompute: {r.get('checked', 0)} records, worst relative error {r.get('worst_error')} "
                  f"({r.get('worst_key')}), tolerance {r.get('tolerance')}", file=out)
        for k, v in groups.items():
            print(f"{k}: {len(v)} problem(s)", file=out)
            for p in v[:SHOW_PER_KIND]:
                print(f"  - {p.key}: {p.message}" + (f"\n    fix: {p.fix}" if p.fix else ""), file=out)
            if len(v) > SHOW_PER_KIND:
                print(f"  ... and {len(v) - SHOW_PER_KIND} more (see --json)", file=out)
        print("OK: every check passed" if not self.problems else f"FAILED: {len(self.problems)} problem(s)", file=out)


# --- record checks (run in worker processes: plain data in, plain data out) ------------------------------
def expectations(manifest: dict[str, Any], data_root: str | None) -> dict[str, Any]:
    """The picklable facts every record is checked against."""
    tensors = manifest.get("tensors") or {}
    return {
        "dtypes": {n: t.get("dtype") for n, t in tensors.items() if isinstance(t, dict)},
        "layers": {n: t.get("layer") for n, t in tensors.items() if isinstance(t, dict)},
        "shapes": set((manifest.get("feature_shapes") or {}).keys()),
        "model": (manifest.get("model") or {}).get("fingerprint"),
        "preprocess": (manifest.get("preprocess") or {}).get("mode"),
        "tokens": manifest.get("tokens"),
        "data_root": data_root if data_root and os.path.isdir(data_root) else None,
        "rebuild": manifest.get("_rebuild_cmd", "featstore build"),
    }


def image_path_of(key: str, data_root: str) -> str:
    """Where the source image of ``key`` lives."""
    return key if key.startswith("/") else os.path.join(data_root, key)


def check_record(rec: Record, ex: dict[str, Any]) -> tuple[list[tuple[str, str, str]], Counter]:
    """Content checks of one decoded record: returns (kind, message, fix) problems and info counters."""
    out: list[tuple[str, str, str]] = []
    info: Counter = Counter()
    rebuild = f"re-run `{ex['rebuild']} --no-skip-existing` (or delete the record's shard/file, merge, and resume)"
    for name, t in rec.tensors.items():
        want = ex["dtypes"].get(name)
        if want and dtype_name(t.dtype) != want:
            out.append(("layout", f"tensor {name!r} is {dtype_name(t.dtype)}, the manifest says {want}", rebuild))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            out.append(("nonfinite", f"tensor {name!r} has {bad} NaN/Inf values", rebuild))
    if ex["shapes"] and shape_key(rec.features.shape) not in ex["shapes"]:
        out.append(("layout", f"features shape {list(rec.features.shape)} is not among the manifest's "
                              f"{sorted(ex['shapes'])}", rebuild))
    meta = rec.meta
    if meta.get("legacy"):
        info["legacy records (no metadata: provenance and staleness not checkable)"] += 1
    else:
        if ex["model"] and meta.get("model") != ex["model"]:
            out.append(("provenance", f"model fingerprint {str(meta.get('model'))[:12]} differs from the "
                                      f"manifest's {ex['model'][:12]}", rebuild))
        layers = meta.get("layers")
        if ex["layers"] and layers is not None and {k: v for k, v in layers.items()} != ex["layers"]:
            out.append(("provenance", f"layers {layers} differ from the manifest's {ex['layers']}", rebuild))
        if ex["preprocess"] and meta.get("preprocess") not in (None, ex["preprocess"]):
            out.append(("provenance", f"preprocess {meta.get('preprocess')!r} differs from the manifest's "
                                      f"{ex['preprocess']!r}", rebuild))
        if ex["tokens"] and meta.get("tokens") not in (None, ex["tokens"]):
            out.append(("provenance", f"tokens {meta.get('tokens')!r} differ from the manifest's {ex['tokens']!r}",
                        rebuild))
    if ex["data_root"] is not None:
        img = image_path_of(rec.key, ex["data_root"])
        try:
            st = os.stat(img)
        except OSError:
            out.append(("orphan", f"source image {img} does not exist",
                        "restore the image, or rebuild the store from the current image list"))
            return out, info
        src = meta.get("source") or {}
        if "size" in src and "mtime_ns" in src:
            if (int(src["size"]), int(src["mtime_ns"])) != (st.st_size, st.st_mtime_ns):
                stale = True
                if src.get("sha256"):
                    with open(img, "rb") as f:
                        stale = hashlib.sha256(f.read()).hexdigest() != src["sha256"]
                if stale:
                    out.append(("stale", f"source image changed after the build (recorded size {src['size']}, "
                                         f"mtime_ns {src['mtime_ns']}; now {st.st_size}, {st.st_mtime_ns})",
                                f"re-run `{ex['rebuild']} --rebuild-stale`"))
        else:
            info["records without a source fingerprint (staleness not checkable)"] += 1
    return out, info


class _HashingReader(io.RawIOBase):
    """Sequential reader that hashes and counts every byte it hands out (one pass over a shard)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        b = self.f.read(n)
        self.sha.update(b)
        self.pos += len(b)
        return b

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def scan_shard_file(storage: Storage, shard: str, indexed: dict[str, tuple[str, int, int, int]], ex: dict[str, Any],
                    full: bool) -> dict[str, Any]:
    """Check one shard in a single sequential pass; ``indexed`` maps key -> (shard, offset, length, crc32)."""
    probs: list[tuple[str, str, str, str]] = []
    info: Counter = Counter()
    seen: list[str] = []
    fix_shard = (f"delete shards/{shard}, run `featstore merge STORE`, then re-run `{ex['rebuild']}` to rebuild "
                 f"its records")
    records = 0
    members: Counter = Counter()
    with storage.open_sequential(f"{SHARDS_DIR}/{shard}") as f:  # remote: chunked GETs with read-ahead
        hr = _HashingReader(f)
        try:
            with tarfile.open(fileobj=hr, mode="r|") as tar:  # type: ignore[call-overload]
                for m in tar:
                    if not m.isfile():
                        continue
                    key = key_from_member(m.name)
                    if key is None:
                        probs.append(("shard", f"{shard}:{m.name}", "unexpected tar member", fix_shard))
                        continue
                    members[key] += 1
                    if members[key] == 2:
                        probs.append(("duplicate", key, f"stored twice in shard {shard}", fix_shard))
                    ent = indexed.get(key)
                    fobj = tar.extractfile(m)
                    data = fobj.read() if fobj is not None else b""
                    if len(data) != m.size:
                        probs.append(("shard", key, f"record truncated in shard {shard} ({len(data)} of {m.size} "
                                                    f"bytes)", fix_shard))
                        continue
                    if ent is None:
                        probs.append(("index", key, f"record in shard {shard} at offset {m.offset_data} is not in "
                                                    f"the index", "run `featstore merge STORE` to rebuild the index"))
                        continue
                    if ent[0] != shard:
                        info["superseded records (a newer copy is indexed)"] += 1
                        continue
                    if ent[1] != m.offset_data:
                        # Seen at another offset of the index's own shard: the index is wrong.
                        continue
                    seen.append(key)
                    records += 1
                    if ent[2] != len(data) or ent[3] != crc32_of(data):
                        probs.append(("index", key, f"index length/crc32 ({ent[2]}, {ent[3]:08x}) differ from the "
                                                    f"stored bytes ({len(data)}, {crc32_of(data):08x}) in {shard}",
                                      fix_shard))
                    try:
                        rec = decode_record(data)
                    except FeatstoreError as e:
                        probs.append(("corrupt", key, f"in shard {shard} at offset {m.offset_data}: {e}", fix_shard))
                        continue
                    if rec.key != key:
                        probs.append(("corrupt", key, f"member holds the record of {rec.key!r}", fix_shard))
                        continue
                    found, extra = check_record(rec, ex)
                    probs += [(kind, key, msg, fix) for kind, msg, fix in found]
                    info.update(extra)
            while hr.read(1 << 22):
                pass
        except (tarfile.TarError, EOFError, OSError) as e:
            probs.append(("shard", shard, f"tar structure is broken ({e}); shard may be truncated", fix_shard))
    return {"shard": shard, "problems": probs, "info": info, "seen": seen, "records": records,
            "sha256": hr.sha.hexdigest(), "bytes": hr.pos}


def check_entries(storage: Storage, shard: str, entries: list[tuple[str, int, int, int]], ex: dict[str, Any]
                  ) -> dict[str, Any]:
    """Check sampled records of one shard by reading only their bytes (``--sample``)."""
    probs: list[tuple[str, str, str, str]] = []
    info: Counter = Counter()
    fix = f"re-run `{ex['rebuild']} --no-skip-existing`, or run `featstore verify` without --sample for details"
    try:
        for key, off, length, crc in entries:
            data = storage.read_range(f"{SHARDS_DIR}/{shard}", off, length)
            if len(data) != length or crc32_of(data) != crc:
                probs.append(("index", key, f"bytes at offset {off} of {shard} do not match the index entry "
                                            f"(length {len(data)}/{length}, crc32 {crc32_of(data):08x}/{crc:08x})", fix))
                continue
            try:
                rec = decode_record(data)
            except FeatstoreError as e:
                probs.append(("corrupt", key, f"in shard {shard}: {e}", fix))
                continue
            found, extra = check_record(rec, ex)
            probs += [(kind, key, msg, fx) for kind, msg, fx in found]
            info.update(extra)
    finally:
        storage.close()
    return {"shard": shard, "problems": probs, "info": info, "seen": [e[0] for e in entries],
            "records": len(entries), "sha256": None, "bytes": None}


def check_per_image_files(croot: str, keys: list[str], ex: dict[str, Any]) -> dict[str, Any]:
    """Check a batch of per-image cache files."""
    probs: list[tuple[str, str, str, str]] = []
    info: Counter = Counter()
    for key in keys:
        p = os.path.join(croot, key + PER_IMAGE_SUFFIX)
        fix = f"delete {p} and re-run `{ex['rebuild']}`"
        try:
            rec = read_pt(Path(p), key=key)
        except (FeatstoreError, OSError) as e:
            probs.append(("corrupt", key, str(e), fix))
            continue
        if rec.meta.get("legacy"):
            info["legacy caches (no metadata: checksum not checkable)"] += 1
        elif rec.key != key:
            probs.append(("provenance", key, f"file holds the record of {rec.key!r}", fix))
        found, extra = check_record(rec, ex)
        probs += [(kind, key, msg, fix if kind != "stale" else fx) for kind, msg, fx in found]
        info.update(extra)
    return {"shard": None, "problems": probs, "info": info, "seen": keys, "records": len(keys)}


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run_tasks(fn: Any, tasks: Iterable[tuple], workers: int, progress: bool, desc: str,
               total: int | None = None) -> Iterator[dict[str, Any]]:
    """Run ``fn(*task)`` for each task, in worker processes when there is more than one of each.

    Tasks are taken lazily and at most ``2 * workers`` are in flight, so memory stays bounded.
    """
    tasks = iter(tasks) if total is not None else list(tasks)
    total = total if total is not None else len(tasks)  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, unit="file", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or total <= 1:
            for t in tasks:
                yield fn(*t)
                bar.update(1)
            return
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        call = lambda_free(fn)
        with cf.ProcessPoolExecutor(min(workers, total), mp_context=ctx, initializer=_init_worker) as pool:
            pending: collections.deque = collections.deque()
            for t in tasks:
                pending.append(pool.submit(call, t))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
                    bar.update(1)
            while pending:
                yield pending.popleft().result()
                bar.update(1)
    finally:
        bar.close()


class lambda_free:
    """Picklable adapter calling ``fn(*args)`` (ProcessPoolExecutor.map passes one argument)."""

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, args: tuple) -> Any:
        return self.fn(*args)


def _absorb(report: Report, res: dict[str, Any]) -> None:
    for kind, key, msg, fix in res["problems"]:
        report.add(kind, key, msg, fix)
    report.info.update(res["info"])
    report.records_checked += res["records"]


def _stray_files(report: Report, storage: Storage, folders: Iterable[str]) -> None:
    for folder in folders:
        for name in storage.list(folder):
            if is_temp_name(name.rsplit("/", 1)[-1]):
                where = storage.describe(name)
                report.add("stray", where, "temporary file left by an interrupted writer",
                           f"if no featstore build is running, delete {where}")


def _leftover(storage: Storage, name: str) -> bool:
    """True when a file or non-empty folder/prefix ``name`` exists in the store."""
    local = storage.local_path(name)
    if local is not None:
        return local.exists()
    return storage.exists(name) or bool(storage.list(name))


def _listing(data_root: str | None) -> set[str] | None:
    from featstore.sources import discover_images

    if not data_root or not os.path.isdir(data_root):
        return None
    return {it.key for it in discover_images(data_root).items}


def _rebuild_cmd(m: dict[str, Any], out: Path | None, per_image: bool) -> str:
    cmd = f"featstore build --data-root {m.get('data_root') or 'DATA_ROOT'} --model {m.get('vggt_model_path') or 'MODEL'}"
    if per_image:
        cmd += " --format per-image" + (f" --out {m['cache_root']}" if m.get("cache_root") else "")
    elif out is not None:
        cmd += f" --out {out}"
    return cmd


def verify_shard_store(location: Path | Storage, m: dict[str, Any], *, data_root: str | None, sample: int | None,
                       seed: int, workers: int, progress: bool) -> Report:
    """Check a shard store, local or remote (see module docs); each shard's sha256 is taken while it streams."""
    storage = parse_location(location)
    root: Path | str = storage.local_path() or storage.display
    report = Report(str(root), "shards")
    m["_rebuild_cmd"] = _rebuild_cmd(m, root, False)
    ex = expectations(m, data_root or m.get("data_root"))
    if ex["data_root"] is None:
        report.notes.append(f"data root {data_root or m.get('data_root')} not found: staleness and orphans not checked "
                            f"(pass --data-root)")
    _stray_files(report, storage, ["", SHARDS_DIR])
    for leftover in ("parts", ".featstore.lock"):
        if _leftover(storage, leftover):
            report.add("stray", storage.describe(leftover), "a build is running or was interrupted",
                       f"wait for the build, or re-run `{m['_rebuild_cmd']}` to finish it")
    try:
        ix: Index | None = Index(local_index_file(storage))
        rows = ix.rows_by_shard()
    except StoreError as e:
        report.add("index", INDEX_NAME, str(e), f"run `featstore merge {root}`")
        ix, rows = None, {}

    def entries_of(shard: str) -> list[IndexEntry]:
        # Entries are materialised one shard at a time, so memory does not grow with the store.
        assert ix is not None
        return [ix.entry(int(r)) for r in rows.get(shard, ())]

    sizes = {n.rsplit("/", 1)[-1]: size for n, size in storage.list(SHARDS_DIR).items()
             if parse_shard_name(n.rsplit("/", 1)[-1])}
    on_disk = sorted(sizes)
    listed = {s["name"]: s for s in m.get("shards") or []}
    for name in sorted(set(listed) - set(on_disk)):
        report.add("shard", name, "listed in the manifest but missing on disk",
                   f"run `featstore merge {root}` then `{m['_rebuild_cmd']}` to rebuild its records")
    for name in sorted(set(on_disk) - set(listed)):
        report.add("shard", name, "on disk but not listed in the manifest", f"run `featstore merge {root}`")
    for name in rows:
        if name not in on_disk:
            for e in entries_of(name):
                report.add("shard", e.key, f"indexed in shard {name}, which is missing", f"run `{m['_rebuild_cmd']}`")
    for name in on_disk:
        size = sizes[name]
        if name in listed and listed[name].get("bytes") not in (None, size):
            report.add("shard", name, f"size {size} bytes, the manifest says {listed[name]['bytes']} (truncated "
                                      f"or rewritten)", f"delete it, run `featstore merge {root}`, then "
                                                        f"`{m['_rebuild_cmd']}`")
    results: Iterable[dict[str, Any]]
    if sample is not None:
        rng = random.Random(seed)
        live = [r for name in on_disk for r in rows.get(name, ())]
        chosen = [ix.entry(int(r)) for r in rng.sample(live, min(sample, len(live)))] if ix is not None else []
        groups: dict[str, list[tuple[str, int, int, int]]] = {}
        for e in chosen:
            groups.setdefault(e.shard, []).append((e.key, e.offset, e.length, e.crc32))
        tasks = [(storage, s, es, ex) for s, es in groups.items()]
        report.notes.append(f"--sample {sample}: checked {len(chosen)} of {len(live)} records; shard sha256 and tar "
                            f"structure not checked")
        results = _run_tasks(check_entries, tasks, workers, progress, "verify (sample)")
    else:
        tasks = ((storage, s, {e.key: (s, e.offset, e.length, e.crc32) for e in entries_of(s)}, ex, True)
                 for s in on_disk)
        results = _run_tasks(_scan_with_other_keys, tasks, workers, progress, "verify shards", total=len(on_disk))
    for res in results:
        _absorb(report, res)
        for key, where in res.get("unindexed", []):
            if ix is not None and key in ix:
                report.info["superseded records (a newer copy is indexed)"] += 1
            else:
                report.add("index", key, f"record in shard {res['shard']} at offset {where} is not in the index",
                           f"run `featstore merge {root}`")
        if sample is None:
            seen = set(res["seen"])
            broken = any(p[0] == "shard" and p[1] == res["shard"] for p in res["problems"])
            for e in entries_of(res["shard"]) if ix is not None else []:
                if e.key not in seen:
                    if broken:
                        report.add("shard", e.key, f"record lost: shard {e.shard} is truncated or unreadable",
                                   f"delete shards/{e.shard}, run `featstore merge {root}`, then `{m['_rebuild_cmd']}`")
                    else:
                        report.add("index", e.key, f"index points at offset {e.offset} of {e.shard}, where no "
                                                   f"record of this key starts", f"run `featstore merge {root}`")
            want = listed.get(res["shard"], {}).get("sha256")
            if want and res["sha256"] != want:
                report.add("shard", res["shard"], f"sha256 {res['sha256'][:16]}... differs from the manifest's "
                                                  f"{want[:16]}...", f"delete it, run `featstore merge {root}`, then "
                                                                     f"`{m['_rebuild_cmd']}`")
    n_index = len(ix) if ix is not None else 0
    report.counts = {"manifest_records": m.get("processed_images"), "index_records": n_index,
                     "shards_on_disk": len(on_disk), "manifest_shards": len(listed),
                     "records_found": report.records_checked if sample is None else None}
    if ix is not None:
        if m.get("processed_images") != n_index:
            report.add("count", "manifest.json", f"processed_images is {m.get('processed_images')}, the index holds "
                                                 f"{n_index}", f"run `featstore merge {root}`")
        if (m.get("counts") or {}).get("records") not in (None, n_index):
            report.add("count", "manifest.json", f"counts.records is {m['counts']['records']}, the index holds {n_index}",
                       f"run `featstore merge {root}`")
        for name, s in listed.items():
            got = len(rows.get(name, ()))
            if s.get("records") is not None and s["records"] != got:
                report.add("count", name, f"manifest says {s['records']} records, the index has {got}",
                           f"run `featstore merge {root}`")
    if data_root and ix is not None:  # the source listing is O(images) anyway; only then hold every key
        _compare_listing(report, data_root, set(ix.keys()), m)
    return report


def _scan_with_other_keys(storage: Storage, shard: str, indexed: dict[str, tuple[str, int, int, int]],
                          ex: dict[str, Any], full: bool) -> dict[str, Any]:
    """:func:`scan_shard_file`, moving "not in this shard's index" findings to the parent (it knows all keys)."""
    res = scan_shard_file(storage, shard, indexed, ex, full)
    keep, unindexed = [], []
    for p in res["problems"]:
        if p[0] == "index" and "is not in the index" in p[2]:
            unindexed.append((p[1], p[2].split("offset ")[1].split(" ")[0]))
        else:
            keep.append(p)
    res["problems"], res["unindexed"] = keep, unindexed
    return res


def _compare_listing(report: Report, data_root: str | None, stored: set[str], m: dict[str, Any]) -> None:
    if not data_root:
        return
    listing = _listing(data_root)
    if listing is None:
        report.add("count", str(data_root), "--data-root does not exist", "pass the folder holding the images")
        return
    already = {p.key for p in report.problems if p.kind == "orphan"}
    for key in sorted(listing - stored):
        report.add("missing", key, "image has no stored feature", f"re-run `{m['_rebuild_cmd']}` (resumes)")
    for key in sorted(stored - listing - already):
        report.add("orphan", key, "feature whose image is not in the source listing",
                   "rebuild the store from the current image list, or restore the image")
    report.counts.update(listed_images=len(listing))


def verify_per_image(mpath: Path | None, root: Path, m: dict[str, Any], *, data_root: str | None,
                     sample: int | None, seed: int, workers: int, progress: bool) -> Report:
    """Check per-image caches (featstore-written or legacy) under the cache root."""
    from featstore.loader import scan_per_image

    droot = data_root or m.get("data_root") or str(root)
    croot = Path(m["cache_root"]) if m.get("cache_root") else root
    report = Report(str(croot), "per-image")
    m["_rebuild_cmd"] = _rebuild_cmd(dict(m, data_root=droot), None, True)
    ex = expectations(m, droot)
    if mpath is None:
        report.notes.append(f"no {PER_IMAGE_MANIFEST}: counts and provenance could not be compared with a manifest")
    for dirpath, _, files in os.walk(croot):
        for name in files:
            if is_temp_name(name):
                p = os.path.join(dirpath, name)
                report.add("stray", p, "temporary file left by an interrupted writer",
                           f"if no featstore build is running, delete {p}")
    if (croot / ".featstore").exists():
        report.add("stray", str(croot / ".featstore"), "a build is running or was interrupted",
                   f"wait for it, or re-run `{m['_rebuild_cmd']}` to finish it")
    keys = list(scan_per_image(croot))
    todo = keys
    if sample is not None:
        todo = sorted(random.Random(seed).sample(keys, min(sample, len(keys))))
        report.notes.append(f"--sample {sample}: checked {len(todo)} of {len(keys)} cache files")
    n = max(1, workers)
    chunk = max(1, -(-len(todo) // (n * 4)))
    tasks = [(str(croot), todo[i:i + chunk], ex) for i in range(0, len(todo), chunk)]
    for res in _run_tasks(check_per_image_files, tasks, workers, progress, "verify caches"):
        _absorb(report, res)
    report.counts = {"manifest_records": m.get("processed_images"), "files_found": len(keys)}
    if mpath is not None and m.get("processed_images") is not None and m["processed_images"] != len(keys):
        report.add("count", str(mpath), f"processed_images is {m['processed_images']}, {len(keys)} cache files exist",
                   f"re-run `{m['_rebuild_cmd']}` (resumes and rewrites the manifest)")
    _compare_listing(report, droot, set(keys), m)
    return report


def recompute(report: Report, store_path: Path | Storage, model_path: str, n: int, seed: int, data_root: str | None) -> None:
    """Re-run the model on ``n`` seeded records and compare with the stored features (worst error reported)."""
    from featstore.extract import Extractor
    from featstore.loader import open_store
    from featstore.model import load_vggt
    from featstore.preprocess import preprocess_image

    if isinstance(store_path, Storage):
        from featstore.loader import open_remote_store
        store: Any = open_remote_store(store_path.url, store_path.storage_options)  # type: ignore[attr-defined]
    else:
        store = open_store(store_path)
    m = store.manifest
    droot = data_root or m.get("data_root")
    names = [k for k, v in (m.get("tensors") or {}).items() if isinstance(v, dict) and v.get("layer") is not None]
    if not names:
        report.notes.append("recompute skipped: the manifest does not say which layers were stored")
        return
    layers = tuple(int(m["tensors"][k]["layer"]) for k in names)
    model = load_vggt(model_path, device="cpu")
    pre = m.get("preprocess") or {}
    keys = store.keys()
    chosen = random.Random(seed).sample(keys, min(n, len(keys)))
    worst, worst_key, tol_used = 0.0, None, None
    for key in chosen:
        rec = store.record(key)
        dt = rec.features.dtype
        ext = Extractor(model, layers, torch.float32, m.get("tokens") or "patch")
        img = preprocess_image(image_path_of(key, droot), pre.get("mode") or "crop",
                               apply_exif=bool(pre.get("apply_exif")))
        fresh = ext.run(img[None])
        tol = RECOMPUTE_TOL.get(dtype_name(dt), 1e-3)
        tol_used = tol
        for name in names:
            want = fresh[name][0].to(dt).float()
            got = rec.tensors[name].float()
            if want.shape != got.shape:
                report.add("recompute", key, f"tensor {name!r}: stored shape {list(got.shape)}, model gives "
                                             f"{list(want.shape)}", f"re-run `{m.get('_rebuild_cmd', 'featstore build')}"
                                                                    f" --no-skip-existing`")
                continue
            err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
            if worst_key is None or err > worst:
                worst, worst_key = err, key
            if err > tol:
                report.add("recompute", key, f"tensor {name!r}: relative error {err:.3g} exceeds {tol} for "
                                             f"{dtype_name(dt)}", "rebuild with the model this store claims, "
                                                                  "or check the --model given to verify")
    report.recompute = {"checked": len(chosen), "worst_error": worst, "worst_key": worst_key, "tolerance": tol_used,
                        "model": model.fingerprint}
    if m.get("model", {}).get("fingerprint") not in (None, model.fingerprint):
        report.notes.append(f"--model fingerprint {model.fingerprint[:12]} differs from the store's "
                            f"{m['model']['fingerprint'][:12]}")


def verify(path: Path | str, *, data_root: str | None = None, sample: int | None = None, seed: int = 0,
           workers: int | None = None, progress: bool = False, recompute_n: int = 0,
           model: str | None = None, storage_options: dict[str, Any] | None = None) -> Report:
    """Verify a shard store or per-image cache root; raises StoreError when verification cannot run.

    ``path`` may be an fsspec URL of a shard store (``s3://bucket/prefix``); ``storage_options`` go to its backend.
    """
    from featstore.loader import scan_per_image

    workers = workers or min(8, os.cpu_count() or 1)
    if data_root is not None:
        data_root = str(Path(data_root).resolve())
    if is_remote(path):
        storage = parse_location(str(path), storage_options)
        report = verify_shard_store(storage, read_store_manifest(storage), data_root=data_root, sample=sample,
                                    seed=seed, workers=workers, progress=progress)
        if recompute_n:
            _recompute_checked(report, storage, recompute_n, seed, data_root, model)
        return report
    path = local_path_of(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist; pass a shard store folder, a data root or a manifest")
    try:
        mpath: Path | None = find_manifest(path)
    except StoreError:
        if not (path.is_dir() and next(scan_per_image(path), None) is not None):
            raise
        mpath = None
    m = read_manifest(mpath) if mpath is not None else {"layout": "per-image", "data_root": str(path)}
    kw = dict(data_root=data_root, sample=sample, seed=seed, workers=workers, progress=progress)
    if m.get("layout") == "per-image":
        report = verify_per_image(mpath, mpath.parent if mpath else path, m, **kw)
    else:
        assert mpath is not None
        report = verify_shard_store(mpath.parent, m, **kw)
    if recompute_n:
        _recompute_checked(report, path, recompute_n, seed, data_root, model)
    return report


def _recompute_checked(report: Report, store: Path | Storage, n: int, seed: int, data_root: str | None,
                       model: str | None) -> None:
    if not model:
        raise StoreError("--recompute needs --model PATH (the checkpoint the store was built with)")
    recompute(report, store, model, n, seed, data_root)


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore verify``."""
    from featstore.cli import HelpFormatter
    p = sub.add_parser(
        "verify", help="check that a store is complete and right",
        formatter_class=HelpFormatter,
        description="Check a shard store or a data root with per-image caches: counts, every record (decode, "
                    "checksum, dtype/shape, finite values, provenance, stale sources), shard sha256/size/tar "
                    "structure, stray temporary files and the index. Exit 0: everything holds; 1: problems "
                    "found; 2: verification could not run. See docs/verify.md.")
    p.add_argument("path", help="shard store folder or URL (s3://bucket/prefix, any fsspec URL), per-image "
                                "cache/data root, or a manifest file")
    p.add_argument("--data-root", help="re-scan the images here to count missing images and orphan features "
                                       "(default for per-image stores: the manifest's data root)")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="re-run the model on N seeded records and compare within the stored dtype's tolerance")
    p.add_argument("--model", help="checkpoint for --recompute ('tiny' for the test model)")
    p.add_argument("--sample", type=int, metavar="N", help="check only N seeded records (fast partial check)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample and --recompute")
    p.add_argument("--json", type=Path, metavar="REPORT", help="write the machine-readable report here")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="checking processes")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        report = verify(args.path, data_root=args.data_root, sample=args.sample, seed=args.seed,
                        workers=args.workers, progress=args.progress and sys.stderr.isatty(),
                        recompute_n=args.recompute, model=args.model, storage_options=storage_options_of(args))
    except (FeatstoreError, OSError, ValueError) as e:
        log.error("verification could not run: %s", e)
        if args.json:
            args.json.write_text(json.dumps({"path": str(args.path), "ok": False, "exit_code": 2, "error": str(e)}))
        return 2
    report.print_summary()
    if args.json:
        from featstore.fsutil import atomic_write_json

        atomic_write_json(args.json, report.to_json())
    return report.exit_code
