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
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import shlex
import sys
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import torch
from tqdm import tqdm

from featstore.errors import AnnotationError, FeatstoreError, StoreError
from featstore.formats.index import Index, IndexEntry, local_index_file
from featstore.formats.keys import CacheLayout, image_path_of, key_from_member
from featstore.formats.manifest import find_manifest, read_manifest, read_store_manifest, shape_key
from featstore.formats.perimage import read_pt
from featstore.formats.record import Record, crc32_of, decode_record, dtype_name, lossy_max_abs
from featstore.formats.layout import INDEX_NAME, LOCK_NAME, PARTS_DIR, PER_IMAGE_MANIFEST, PER_IMAGE_STATE_DIR, SHARDS_DIR
from featstore.formats.shards import parse_shard_name
from featstore.formats.storage import (FsspecStorage, Storage, add_storage_options_argument, is_remote, local_copy,
                                       local_path_of, parse_location, redact, storage_options_of)
from featstore.fsutil import is_temp_name
from featstore.staleness import frames_changed, is_checkable, source_changed

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
    "undecodable": "listed image that cannot be decoded, so it has no feature",
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
    skipped: dict[str, str] = field(default_factory=dict)  # check kind -> why it did not run

    def skip(self, kind: str, why: str) -> None:
        """Note that a check did not run (printed as ``skipped``, never as ``ok``)."""
        self.skipped.setdefault(kind, why)

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
                "skipped": self.skipped, "recompute": self.recompute}

    def print_summary(self, out: Any = None) -> None:
        """A short table per check plus the first few problems of each kind."""
        out = out or sys.stdout
        groups = self.by_kind()
        print(f"featstore verify {self.path} ({self.layout}): {self.records_checked} records checked", file=out)
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
        "context": (manifest.get("context") or {}).get("mode", "image"),
        "data_root": data_root if data_root and os.path.isdir(data_root) else None,
        "rebuild": manifest.get("_rebuild_cmd", "featstore build"),
    }


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
    if meta.get("context") == "sample" or ex.get("context") == "sample":
        out += check_sample_record(rec, ex)
        return out, info
    if ex["data_root"] is not None:
        img = image_path_of(rec.key, ex["data_root"])
        try:
            st = os.stat(img)
        except OSError:
            out.append(("orphan", f"source image {img} does not exist",
                        "restore the image, or rebuild the store from the current image list"))
            return out, info
        src = meta.get("source") or {}
        if is_checkable(src):
            try:
                stale = source_changed(img, src)
            except OSError as e:
                out.append(("orphan", f"source image {img} cannot be read ({e.strerror})",
                            "restore the image or its permissions"))
                return out, info
            if stale:
                what = "content (sha256)" if src.get("sha256") else "size or mtime"
                out.append(("stale", f"source image changed after the build: its {what} differs (recorded size "
                                     f"{src.get('size')}, mtime_ns {src.get('mtime_ns')}; now {st.st_size}, "
                                     f"{st.st_mtime_ns})", f"re-run `{ex['rebuild']} --rebuild-stale`"))
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
    layout = CacheLayout(croot)
    for key in keys:
        p = layout.path(key)
        fix = f"delete {p} and re-run `{ex['rebuild']}`"
        try:
            rec = read_pt(p, key=key)
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


def _rebuild_cmd(m: dict[str, Any], out: Path | None, per_image: bool) -> str:
    """The `featstore build` command that resumes this store: its data root, model, sources and every
    setting that differs from the defaults (dtype always: its default depends on the machine)."""
    root = m.get("data_root") or "DATA_ROOT"
    args = ["featstore build", "--data-root", shlex.quote(str(root)), "--model",
            shlex.quote(str(m.get("vggt_model_path") or "MODEL"))]
    if per_image:
        args += ["--format", "per-image"] + (["--out", shlex.quote(str(m["cache_root"]))] if m.get("cache_root") else [])
    elif out is not None:
        args += ["--out", shlex.quote(str(out))]
    src = m.get("sources") or {}
    if not src.get("auto") and not src.get("scan"):
        for a in src.get("annotations") or []:
            args += ["--annotations", shlex.quote(os.path.join(str(root), a["file"]))]
        if src.get("image_list"):
            args += ["--image-list", shlex.quote(os.path.join(str(root), src["image_list"]["file"]))]
    if src.get("data_path"):
        args += ["--data-path", shlex.quote(src["data_path"])]
    return " ".join(args + _setting_flags(m))


def _setting_flags(m: dict[str, Any]) -> list[str]:
    flags = []
    pre = m.get("preprocess") or {}
    if pre.get("mode") not in (None, "crop"):
        flags += ["--preprocess", str(pre["mode"])]
    if pre.get("apply_exif"):
        flags.append("--apply-exif")
    if m.get("dtype"):
        flags += ["--dtype", str(m["dtype"])]
    depth = ((m.get("model") or {}).get("config") or {}).get("depth")
    layers = [int(i) for i in m.get("layers") or []]
    if layers and (not isinstance(depth, int) or layers != [depth - 2]):
        flags.append("--layers=" + ",".join(map(str, layers)))
    if m.get("tokens") == "all":
        flags += ["--tokens", "all"]
    if m.get("source_fingerprint") == "sha256":
        flags.append("--hash-inputs")
    return flags


def check_sample_record(rec: Record, ex: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A sample record's own consistency (frames, kept frame, grid vs tensor) and, with the data root, that its
    frames exist and are unchanged (any changed frame makes the sample stale)."""
    meta, rebuild = rec.meta, f"re-run `{ex['rebuild']} --no-skip-existing`"
    frames, grid, kept = meta.get("frames"), meta.get("grid"), meta.get("kept")
    if not (isinstance(frames, list) and frames and isinstance(kept, int) and 0 <= kept < len(frames)
            and isinstance(grid, list) and len(grid) == 2):
        return [("layout", f"sample record has no valid frames/kept/grid (frames {str(frames)[:80]}, kept {kept}, "
                           f"grid {grid})", rebuild)]
    tokens = grid[0] * grid[1] + (0 if (ex.get("tokens") or meta.get("tokens")) != "all" else 5)
    out = []
    if rec.features.shape[-2] != tokens:
        out.append(("layout", f"features have {rec.features.shape[-2]} tokens, its grid {grid[0]}x{grid[1]} means "
                              f"{tokens}", rebuild))
    if ex["data_root"] is None:
        return out
    paths = [image_path_of(f, ex["data_root"]) for f in frames]
    gone = [p for p in paths if not os.path.isfile(p)]
    if gone:
        return out + [("orphan", f"frame {gone[0]} of the sample does not exist",
                       "restore the frame, or rebuild the store from the current annotations")]
    try:
        if frames_changed(paths, meta.get("frame_sources") or []):
            out.append(("stale", "a frame of the sample changed after the build (or the record notes no frames)",
                        f"re-run `{ex['rebuild']} --rebuild-stale`"))
    except OSError as e:
        out.append(("orphan", f"a frame of the sample cannot be read ({e.strerror})", "restore the frame"))
    return out


def source_listing(m: dict[str, Any], data_root: str | None) -> tuple[Any, str | None]:
    """The images the store should hold: its recorded sources repeated under the data root (``--data-root``, else
    the manifest's), or a scan of an explicit ``--data-root`` for stores that recorded none; (None, why) otherwise."""
    from featstore.sources import discover_images, discover_recorded

    root = data_root or m.get("data_root")
    if not root or not os.path.isdir(root):
        return None, f"data root {root} not found; pass --data-root"
    try:
        if (m.get("context") or {}).get("mode") == "sample":
            return _recorded_samples(root, m), None
        if m.get("sources"):
            return discover_recorded(root, m["sources"]), None
        if data_root:
            return discover_images(root), None
    except AnnotationError as e:
        return None, str(e)
    return None, "the manifest records no image sources; pass --data-root to compare with a scan of it"


def _recorded_samples(root: str, m: dict[str, Any]) -> Any:
    """The samples a sample store should hold: its recorded annotation files or episode folders, again."""
    from featstore.errors import AnnotationError
    from featstore.sources import discover_samples

    src, ctx = m.get("sources") or {}, m.get("context") or {}
    if src.get("method") == "episodes":
        hist = src.get("history") or ctx.get("history") or {}
        return discover_samples(root, reference_frame=ctx.get("reference_frame", "first"),
                                history=int(hist.get("frames", 8)), history_pad=bool(hist.get("pad")))
    files = [a["file"] if os.path.isabs(a["file"]) else os.path.join(root, a["file"]) for a in src.get("annotations") or []]
    for f in files:
        if not os.path.isfile(f):
            raise AnnotationError(f"annotation file {f} recorded in the manifest no longer exists")
    if not files:
        raise AnnotationError("the manifest records no sample sources")
    return discover_samples(root, annotations=files, data_path=src.get("data_path"),
                            reference_frame=ctx.get("reference_frame", "first"))


def _failure_reasons(ledger: Path | None) -> dict[str, str]:
    """key -> error from a build's failures ledger (images that could not be decoded)."""
    reasons: dict[str, str] = {}
    if ledger is None or not ledger.is_file():
        return reasons
    for line in ledger.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            reasons[str(row["key"])] = str(row.get("error") or "cannot be decoded")
        except (ValueError, KeyError, TypeError):
            continue
    return reasons


def _decode_problem(path: Path, mode: str) -> str | None:
    """Why an image cannot be decoded and preprocessed, or None when it can."""
    from featstore.errors import ImageError
    from featstore.preprocess import preprocess_image

    try:
        preprocess_image(path, mode)
    except ImageError as e:
        return str(e)
    return None


PROBE_MISSING = 20  # missing images decoded to tell "not built yet" from "cannot be decoded"


def _compare_listing(report: Report, found: Any, why_not: str | None, stored: set[str], m: dict[str, Any],
                     ledger: Path | None) -> None:
    if found is None:
        report.skip("missing", why_not or "no source listing")
        report.notes.append(f"missing images not checked: {why_not}")
        return
    listing = {it.key for it in found.items}
    paths = {it.key: it.path for it in found.items if hasattr(it, "path")}  # sample stores: no single image
    failed = _failure_reasons(ledger)
    mode = (m.get("preprocess") or {}).get("mode") or "crop"
    fix_image = (f"replace the image with a readable one (or drop it from the annotations), then re-run "
                 f"`{m['_rebuild_cmd']}`")
    for n, key in enumerate(sorted(listing - stored)):
        reason = failed.get(key) or (_decode_problem(paths[key], mode) if n < PROBE_MISSING and key in paths else None)
        what = "image" if key in paths else "sample (a frame)"
        if reason:
            report.add("undecodable", key, f"{what} cannot be decoded, so it has no feature: {reason}", fix_image)
        else:
            report.add("missing", key, f"{what.split()[0]} has no stored feature",
                       f"re-run `{m['_rebuild_cmd']}` (resumes)")
    already = {p.key for p in report.problems if p.kind == "orphan"}
    for key in sorted(stored - listing - already):
        report.add("orphan", key, "feature whose image is not in the source listing",
                   "rebuild the store from the current image list, or restore the image")
    if found.missing:
        where = f" (each listed in {m['missing_ledger']})" if m.get("missing_ledger") else ""
        report.info[f"annotated images that do not exist{where}"] = len(found.missing)
    report.counts.update(listed_images=len(listing))


def verify_shard_store(location: Path | Storage, m: dict[str, Any], *, data_root: str | None, sample: int | None,
                       seed: int, workers: int, progress: bool) -> Report:
    """Check a shard store, local or remote (see module docs); each shard's sha256 is taken while it streams."""
    storage = parse_location(location)
    root: Path | str = storage.local_path() or storage.display
    report = Report(str(root), "shards")
    m["_rebuild_cmd"] = _rebuild_cmd(dict(m, data_root=data_root or m.get("data_root")), root, False)
    ex = expectations(m, data_root or m.get("data_root"))
    if ex["data_root"] is None:
        report.notes.append(f"data root {data_root or m.get('data_root')} not found: staleness and orphans not checked "
                            f"(pass --data-root)")
        report.skip("stale", "data root not found")
        report.skip("orphan", "data root not found")
    _stray_files(report, storage, ["", SHARDS_DIR])
    for leftover in (PARTS_DIR, LOCK_NAME):
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
    if sample is not None:
        report.skip("missing", "--sample checks records only")
    elif ix is not None:
        found, why_not = source_listing(m, data_root)
        with _local_ledger(storage, m.get("failures_ledger")) as ledger:
            _compare_listing(report, found, why_not, set(ix.keys()) if found is not None else set(), m, ledger)
    return report


@contextlib.contextmanager
def _local_ledger(storage: Storage, name: str | None) -> Iterator[Path | None]:
    """A local file holding the store's failures ledger (a temporary copy for a remote store), or None."""
    if not name or not storage.exists(name):
        yield None
        return
    with local_copy(storage, name) as path:
        yield path


def _scan_with_other_keys(storage: Storage, shard: str, indexed: dict[str, tuple[str, int, int, int]], ex: dict[str, Any],
                          full: bool) -> dict[str, Any]:
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


def verify_per_image(mpath: Path | None, root: Path, m: dict[str, Any], *, data_root: str | None,
                     sample: int | None, seed: int, workers: int, progress: bool) -> Report:
    """Check per-image caches (featstore-written or legacy) under the cache root."""
    from featstore.loader import scan_per_image

    # caches beside the images: the manifest lies in the data root, wherever that is now
    droot = data_root or (m.get("data_root") if m.get("cache_root") else None) or str(root)
    croot = root  # the manifest's folder: the cache root (mirrored caches) or the data root, wherever it is now
    report = Report(str(croot), "per-image")
    m["_rebuild_cmd"] = _rebuild_cmd(dict(m, data_root=droot), None, True)
    ex = expectations(m, droot)
    if ex["data_root"] is None:
        report.skip("stale", "data root not found")
        report.skip("orphan", "data root not found")
    if mpath is None:
        report.notes.append(f"no {PER_IMAGE_MANIFEST}: counts and provenance could not be compared with a manifest")
    for dirpath, _, files in os.walk(croot):
        for name in files:
            if is_temp_name(name):
                p = os.path.join(dirpath, name)
                report.add("stray", p, "temporary file left by an interrupted writer",
                           f"if no featstore build is running, delete {p}")
    if (croot / PER_IMAGE_STATE_DIR).exists():
        report.add("stray", str(croot / PER_IMAGE_STATE_DIR), "a build is running or was interrupted",
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
    if sample is not None:
        report.skip("missing", "--sample checks records only")
    else:
        found, why_not = source_listing(m, data_root or m.get("data_root"))
        ledger = (mpath.parent / m["failures_ledger"]) if mpath is not None and m.get("failures_ledger") else None
        _compare_listing(report, found, why_not, set(keys), m, ledger)
    return report


def recompute(report: Report, store_path: Path | Storage, model_path: str, n: int, seed: int, data_root: str | None) -> None:
    """Re-run the model on ``n`` seeded records and compare with the stored features (worst error reported)."""
    from featstore.extract import Extractor
    from featstore.loader import open_store
    from featstore.model import load_vggt

    if isinstance(store_path, FsspecStorage):
        store: Any = open_store(store_path.url, storage_options=store_path.storage_options)
    else:
        store = open_store(store_path, data_root=data_root)
    m = store.manifest
    droot = store.data_root
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
    ext = Extractor(model, layers, torch.float32, m.get("tokens") or "patch")
    for key in chosen:
        rec = store.record(key)
        dt = rec.features.dtype
        fresh = recompute_record(rec, ext, pre, droot)
        for name in names:
            tol = RECOMPUTE_TOL.get(dtype_name(dt), 1e-3)
            want = fresh[name][0].to(dt).float()
            got = rec.tensors[name].float()
            if want.shape != got.shape:
                report.add("recompute", key, f"tensor {name!r}: stored shape {list(got.shape)}, model gives "
                                             f"{list(want.shape)}", f"re-run `{m.get('_rebuild_cmd', 'featstore build')}"
                                                                    f" --no-skip-existing`")
                continue
            peak = float(want.abs().max().clamp_min(1e-12))
            err = float((want - got).abs().max()) / peak
            tol += lossy_max_abs(rec, name) / peak  # a lossy record may differ by the bound it was written with
            tol_used = tol if tol_used is None else max(tol_used, tol)
            if worst_key is None or err > worst:
                worst, worst_key = err, key
            if err > tol:
                report.add("recompute", key, f"tensor {name!r}: relative error {err:.3g} exceeds {tol:.3g} for "
                                             f"{dtype_name(dt)} (stored error bound included)",
                           "rebuild with the model this store claims, or check the --model given to verify")
    report.recompute = {"checked": len(chosen), "worst_error": worst, "worst_key": worst_key, "tolerance": tol_used,
                        "model": model.fingerprint}
    if m.get("model", {}).get("fingerprint") not in (None, model.fingerprint):
        report.notes.append(f"--model fingerprint {model.fingerprint[:12]} differs from the store's "
                            f"{m['model']['fingerprint'][:12]}")


def recompute_record(rec: Record, ext: Any, pre: dict[str, Any], data_root: str) -> dict[str, torch.Tensor]:
    """The record's tensors computed afresh: its image, or for a sample record its frames streamed as training
    streams them (causal over frames, the kept frame's tokens)."""
    from featstore.preprocess import preprocess_image

    opts = {"apply_exif": bool(pre.get("apply_exif")), "image_size": int(pre.get("target_size") or 518)}
    mode = pre.get("mode") or "crop"
    if rec.meta.get("context") != "sample":
        return ext.run(preprocess_image(image_path_of(rec.key, data_root), mode, **opts)[None])
    frames = list(rec.meta["frames"])
    order = frames if rec.meta.get("reference_frame", "first") == "first" else frames[::-1]
    images = torch.stack([preprocess_image(image_path_of(f, data_root), mode, **opts) for f in order])[None]
    with torch.inference_mode():
        out = ext.model(images, layers=ext.layers, causal=True)
    start = int(ext.model.patch_start_idx) if ext.tokens == "patch" else 0
    return {n: out[i][:, -1:, start:] for n, i in zip(ext.names, ext.layers)}  # [1, 1, P, C] like ext.run


def verify(path: Path | str, *, data_root: str | None = None, sample: int | None = None, seed: int = 0,
           workers: int | None = None, progress: bool = False, recompute_n: int = 0,
           model: str | None = None, storage_options: dict[str, Any] | None = None) -> Report:
    """Verify a shard store or per-image cache root; raises StoreError when verification cannot run.

    ``path`` may be an fsspec URL of a shard store (``s3://bucket/prefix``); ``storage_options`` go to its backend.
    """
    from featstore.loader import scan_per_image

    workers = workers or min(8, os.cpu_count() or 1)
    remote: Storage | None = parse_location(str(path), storage_options) if is_remote(path) else None
    mpath: Path | None = None
    if remote is not None:
        m = read_store_manifest(remote)
    else:
        path = local_path_of(path)
        if not path.exists():
            raise StoreError(f"{path} does not exist; pass a shard store folder, a data root or a manifest")
        try:
            mpath = find_manifest(path)
        except StoreError:
            if not (path.is_dir() and next(scan_per_image(path), None) is not None):
                raise
        m = read_manifest(mpath) if mpath is not None else {"layout": "per-image", "data_root": str(path)}
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise StoreError(f"--data-root {data_root} is not a directory; pass the folder that holds the images now")
        data_root = str(Path(data_root).resolve())
    model_note = None
    if recompute_n and not model:
        model = recorded_model(m)
        model_note = f"--recompute uses the manifest's model {model} (pass --model to choose another)"
    kw = dict(data_root=data_root, sample=sample, seed=seed, workers=workers, progress=progress)
    if remote is not None:
        report = verify_shard_store(remote, m, **kw)
    elif m.get("layout") == "per-image":
        report = verify_per_image(mpath, mpath.parent if mpath else path, m, **kw)
    else:
        assert mpath is not None
        report = verify_shard_store(mpath.parent, m, **kw)
    if recompute_n:
        if model_note:
            report.notes.append(model_note)
        recompute(report, remote or path, model, recompute_n, seed, data_root)
    else:
        report.skip("recompute", "pass --recompute N")
    return report


def recorded_model(m: dict[str, Any]) -> str:
    """The model the manifest says the store was built with, when it can be loaded here (a built-in name or
    an existing path); StoreError otherwise."""
    from featstore.model.checkpoint import NAMED_SOURCES

    recorded = str(m.get("vggt_model_path") or "")
    if recorded in NAMED_SOURCES or (recorded and Path(recorded).exists()):
        return recorded
    where = f"the manifest's model {recorded!r} is not a built-in name or an existing path" if recorded else \
        "the manifest records no model"
    raise StoreError(f"--recompute needs --model PATH (the checkpoint the store was built with): {where}")


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore verify``."""
    from featstore.cli import HelpFormatter
    p = sub.add_parser(
        "verify", help="check that a store is complete and right",
        formatter_class=HelpFormatter,
        description="Check a shard store or a data root with per-image caches: counts, every record (decode, "
                    "checksum, dtype/shape, finite values, provenance, stale sources), the images the build's "
                    "recorded sources name, shard sha256/size/tar structure, stray temporary files and the index. "
                    "Checks that could not run are printed as skipped. Exit 0: everything holds; 1: problems "
                    "found; 2: verification could not run. See docs/verify.md.")
    p.add_argument("path", help="shard store folder or URL (s3://bucket/prefix, any fsspec URL), per-image "
                                "cache/data root, or a manifest file")
    p.add_argument("--data-root", help="where the images are now (default: the manifest's data root); the store's "
                                       "recorded sources are listed there to find missing images and orphan "
                                       "features, or, for a store that recorded none, the folder is scanned")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="re-run the model on N seeded records and compare within the stored dtype's tolerance")
    p.add_argument("--model", help="checkpoint for --recompute ('tiny' for the test model); default: the model "
                                   "the manifest records, when it is a built-in name or an existing path")
    p.add_argument("--sample", type=int, metavar="N", help="check only N seeded records (fast partial check)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample and --recompute")
    p.add_argument("--json", nargs="?", const="", metavar="REPORT",
                   help="write the machine-readable report to the file REPORT, or to stdout with --json - (the "
                        "table then goes to stderr)")
    p.add_argument("--workers", type=int, help="checking processes (default: the number of CPUs, at most 8; "
                                               "machine-dependent)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_verify)


def _usage_problem(args: argparse.Namespace) -> str | None:
    if args.json == "":
        return "--json needs a value: give a file path for the report, or - to write it to stdout"
    for flag, value, low in (("--workers", args.workers, 1), ("--recompute", args.recompute, 0),
                             ("--sample", args.sample, 1)):
        if value is not None and value < low:
            return f"{flag} {value}: expected an integer of at least {low}"
    return None


def _write_json(target: str, doc: dict[str, Any]) -> None:
    if target == "-":
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    from featstore.fsutil import atomic_write_json

    atomic_write_json(Path(target), doc)


def _cmd_verify(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        log.error("%s", problem)
        return 2
    try:
        report = verify(args.path, data_root=args.data_root, sample=args.sample, seed=args.seed,
                        workers=args.workers, progress=args.progress and sys.stderr.isatty(),
                        recompute_n=args.recompute, model=args.model, storage_options=storage_options_of(args))
    except (FeatstoreError, OSError, ValueError) as e:
        log.error("verification could not run: %s", e)
        if args.json:
            _write_json(args.json, {"path": redact(str(args.path)), "ok": False, "exit_code": 2, "error": redact(str(e))})
        return 2
    report.print_summary(sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        _write_json(args.json, report.to_json())
    return report.exit_code
