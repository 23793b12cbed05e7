"""A node-local cache of a remote store's shards (``stream(url, cache_dir=DIR, cache_limit="200GB")`` or
``$FEATSTORE_CACHE_DIR`` / ``$FEATSTORE_CACHE_LIMIT``): each shard is downloaded once, whole, and read from
local disk in every later epoch, by every worker and rank of the node.

Correctness first:

- A shard is downloaded to a temporary name, checked against the size and sha256 the store's manifest
  records for it, and only then renamed into place; a cached file is named by that sha256 (or, for a
  manifest without one, by the store, the shard, its size and the manifest's digest), so a rebuilt store
  never serves old bytes.
- Every record read from a cached shard is checked against the crc32 its index entry records; a mismatch
  (a corrupt cached file) discards the file with one warning and downloads it again.
- One lock file per shard (``flock``): one process downloads while the others wait for that shard (or read
  others); readers hold it shared while they read, and eviction (least recently used first, down to
  ``cache_limit``) only removes a shard whose lock it can take exclusively, never one a reader has open.
- A full disk, or any failure to cache, falls back to reading from the bucket, with one warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

from featstore.errors import StoreError
from featstore.formats.layout import SHARDS_DIR
from featstore.formats.locate import StoreLocation
from featstore.runtime.fsutil import fsync_dir
from featstore.storage import DEFAULT_CHUNK_BYTES, DEFAULT_READ_AHEAD, MappedFile, Storage

log = logging.getLogger("featstore")
CACHE_DIR_ENV = "FEATSTORE_CACHE_DIR"
CACHE_LIMIT_ENV = "FEATSTORE_CACHE_LIMIT"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)
_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(what: str, message: str, *args: Any) -> None:
    """Log a warning the first time ``what`` happens in this process."""
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    log.warning(message, *args)


def cache_limit_bytes(value: int | str | None, where: str = "cache_limit") -> int | None:
    """``cache_limit`` as bytes: an int, or text such as ``200GB`` or ``1.5TiB`` (KB/MB/GB are powers of 1000)."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value < 1:
            raise StoreError(f"{where}={value}: expected a positive number of bytes such as 200GB")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise StoreError(f"{where}={value!r} is not a size: expected a number with an optional unit, e.g. 200GB")
    base = 1024 if m.group(3) else 1000
    return max(1, int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " ")))


def cache_from(loc: StoreLocation, cache_dir: str | os.PathLike[str] | None,
               cache_limit: int | str | None) -> "ShardCache | None":
    """The shard cache a stream over ``loc`` uses: none for a local store or when no cache folder is given."""
    where = "cache_dir"
    if cache_dir is None and os.environ.get(CACHE_DIR_ENV):
        cache_dir, where = os.environ[CACHE_DIR_ENV], CACHE_DIR_ENV
    if cache_limit is None and os.environ.get(CACHE_LIMIT_ENV):
        limit = cache_limit_bytes(os.environ[CACHE_LIMIT_ENV], CACHE_LIMIT_ENV)
    else:
        limit = cache_limit_bytes(cache_limit)
    if cache_dir is None or not loc.is_remote:
        return None
    root = Path(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{where} {root}: cannot create the cache folder ({e.strerror}); pass a writable folder "
                         f"on local disk") from None
    assert loc.manifest is not None
    return ShardCache(root, limit, loc.manifest, loc.storage.display)


class CachedShard:
    """A cached shard held open for reading (its lock held shared until :meth:`close`); records are read as views
    of its map, so nothing is copied before decoding."""

    def __init__(self, path: Path, lock_fd: int):
        self.path, self._lock_fd = path, lock_fd
        self.file = MappedFile(path)

    def read(self, offset: int, length: int) -> memoryview | None:
        """``length`` bytes at ``offset`` (a read-only view), or None when the file is shorter."""
        return self.file.view(offset, length)

    def close(self) -> None:
        self.file.close()  # a view still decoding keeps the map until it is released
        os.close(self._lock_fd)  # releases the shared lock


class ShardCache:
    """Whole shards of one remote store under ``root`` (see the module docs)."""

    def __init__(self, root: Path, limit: int | None, manifest: Mapping[str, Any], store: str):
        self.root, self.limit, self.store = root, limit, store
        self.shards = {s["name"]: s for s in manifest.get("shards") or [] if isinstance(s, Mapping)}
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()
        self._manifest_digest = digest

    def name_of(self, shard: str) -> str:
        """The cached file's stem: the shard's sha256, or a digest of where it is and what the manifest said."""
        sha = (self.shards.get(shard) or {}).get("sha256")
        if sha:
            return f"sha256-{sha}"
        basis = f"{self.store}\0{shard}\0{(self.shards.get(shard) or {}).get('bytes')}\0{self._manifest_digest}"
        return "store-" + hashlib.sha256(basis.encode()).hexdigest()

    def _paths(self, shard: str) -> tuple[Path, Path]:
        stem = self.name_of(shard)
        return self.root / f"{stem}.tar", self.root / f"{stem}.lock"

    def _valid(self, path: Path, shard: str) -> bool:
        want = (self.shards.get(shard) or {}).get("bytes")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        return want is None or size == int(want)

    def open(self, shard: str, storage: Storage) -> CachedShard | None:
        """The cached shard, downloaded first if needed; None when it cannot be cached (then read the bucket)."""
        data, lock = self._paths(shard)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            for _ in range(3):
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._valid(data, shard):
                    with contextlib.suppress(OSError):
                        os.utime(data)  # most recently used
                    return CachedShard(data, fd)
                fcntl.flock(fd, fcntl.LOCK_EX)  # one process downloads; the others wait here
                if not self._valid(data, shard) and not self._download(shard, storage, data):
                    os.close(fd)
                    return None
            raise OSError(errno.EAGAIN, "the cached shard kept disappearing")
        except OSError as e:
            os.close(fd)
            warn_once(f"cache-open-{e.errno}", "cannot use the shard cache %s (%s); reading from the bucket",
                      self.root, e)
            return None

    def discard(self, shard: str, why: str) -> None:
        """Remove a cached shard found corrupt (once no reader holds it) so the next open downloads it again."""
        data, lock = self._paths(shard)
        warn_once(f"corrupt-{shard}", "cached shard %s of %s is corrupt (%s): discarding it and downloading it "
                  "again", data, self.store, why)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                data.unlink()
        finally:
            os.close(fd)

    def _download(self, shard: str, storage: Storage, dest: Path) -> bool:
        """Download a shard (temp name, size and sha256 checked, renamed); False when it cannot be cached."""
        info = self.shards.get(shard) or {}
        want = info.get("bytes")
        if want is not None and self.limit is not None and int(want) > self.limit:
            warn_once("too-big", "shard %s (%s bytes) is larger than the cache limit (%d bytes); reading it from "
                      "the bucket", shard, want, self.limit)
            return False
        if want is not None:
            self.evict(int(want))
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            digest = _fetch(storage, f"{SHARDS_DIR}/{shard}", tmp)
            size = tmp.stat().st_size
            if (want is not None and size != int(want)) or (info.get("sha256") and digest != info["sha256"]):
                raise StoreError(f"shard {shard} of {self.store} does not match its manifest (got {size} bytes, "
                                 f"sha256 {digest}); was the store rebuilt while it was read?")
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            return True
        except (OSError, StoreError) as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            warn_once("full" if full else f"download-{shard}", "cannot cache shard %s in %s (%s); reading it from the "
                      "bucket", shard, self.root, "the disk is full" if full else e)
            return False

    def entries(self) -> Iterator[tuple[float, int, Path]]:
        """(last use, bytes, path) of every cached shard."""
        for p in self.root.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                yield st.st_mtime, st.st_size, p

    def evict(self, incoming: int = 0) -> None:
        """Remove least recently used shards no reader holds until ``incoming`` more bytes fit under the limit."""
        if self.limit is None:
            return
        with _exclusive(self.root / ".evict.lock"):
            cached = sorted(self.entries())
            total = sum(size for _, size, _ in cached) + incoming
            for _, size, path in cached:
                if total <= self.limit:
                    return
                if _remove_unheld(path):
                    total -= size


def _fetch(storage: Storage, name: str, tmp: Path) -> str:
    """Download object ``name`` to ``tmp`` (fsynced); its sha256."""
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for chunk in storage.iter_range(name, chunk_bytes=DEFAULT_CHUNK_BYTES, read_ahead=DEFAULT_READ_AHEAD):
            h.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def _remove_unheld(path: Path) -> bool:
    """Delete a cached shard unless a reader holds its lock; True when it is gone."""
    fd = os.open(path.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
