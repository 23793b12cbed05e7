"""A store on object storage or any other fsspec filesystem (``s3://bucket/prefix``, ``gs://...``,
``memory://...``). fsspec is imported only here, lazily (``s3://`` needs ``s3fs``: ``pip install 'featstore[s3]'``)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

from featstore.errors import StoreError
from featstore.storage.base import DEFAULT_CHUNK_BYTES, DEFAULT_READ_AHEAD, Storage, join_name
from featstore.storage.redact import redact, register_secrets

# Backends whose create-if-absent is one atomic request (S3: ``If-None-Match: *``).
ATOMIC_CREATE_PROTOCOLS = frozenset({"s3", "s3a"})
# Backends that publish a PUT / completed multipart upload atomically under its final name.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})
S3_PROTOCOLS = frozenset({"s3", "s3a"})
Span = tuple[int, str, int, int]  # (range number, object name, start, end)


def _import_fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise StoreError("remote stores need fsspec (and a backend such as s3fs); install them with "
                         "`pip install 'featstore[s3]'`") from None
    return fsspec


@contextlib.contextmanager
def backend_errors(describe: Callable[[str], str], what: str, name: str) -> Iterator[None]:
    """Turn backend failures (other than a missing object) into one redacted StoreError naming the object."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, StoreError):
        raise
    except Exception as e:  # botocore/aiohttp/gcsfs raise many types; all become one actionable error
        raise StoreError(f"cannot {what} {describe(name)}: {type(e).__name__}: {redact(str(e))}. Check the URL, "
                         f"the credentials (--storage-options or the backend's environment variables and "
                         f"config files) and the endpoint") from None


def read_ahead_chunks(fetch: Callable[[str, int, int], bytes], spans: Iterable[Span], read_ahead: int
                      ) -> Iterator[tuple[int, bytes]]:
    """(range number, bytes) of each span in order, up to ``read_ahead`` of them fetched in background threads."""
    if read_ahead <= 0:
        for i, name, s, e in spans:
            yield i, fetch(name, s, e)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="featstore-readahead")
    pending: collections.deque[tuple[int, concurrent.futures.Future[bytes]]] = collections.deque()
    try:
        for i, name, s, e in spans:
            pending.append((i, pool.submit(fetch, name, s, e)))
            if len(pending) > read_ahead:
                j, fut = pending.popleft()
                yield j, fut.result()
        while pending:
            j, fut = pending.popleft()
            yield j, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def connect(url: str, storage_options: Mapping[str, Any], display: str) -> tuple[Any, str]:
    """The fsspec filesystem and root path of ``url``; StoreError when no installed backend serves it."""
    fsspec = _import_fsspec()
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as e:
        raise StoreError(f"{display} needs an fsspec backend that is not installed ({redact(str(e))}); "
                         f"for s3:// run `pip install 'featstore[s3]'`") from None
    except ValueError as e:
        raise StoreError(f"{display} is not a location fsspec knows ({redact(str(e))}); expected "
                         f"a local path or a URL such as s3://bucket/prefix") from None


def abort_s3_uploads(fs: Any, root: str, name_prefix: str) -> int:
    """Abort the unfinished multipart uploads under ``root`` (``bucket/prefix``) named ``name_prefix...``."""
    bucket, _, key_root = root.partition("/")
    wanted = join_name(key_root, name_prefix)
    aborted = 0
    for up in fs.list_multipart_uploads(bucket):
        if str(up.get("Key", "")).startswith(wanted):
            fs.abort_mpu(bucket, up["Key"], up["UploadId"])
            aborted += 1
    return aborted


class FsspecStorage(Storage):
    """An fsspec location (``protocol://root``); the filesystem is created lazily and anew after a fork."""

    is_local = False

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *, _root: str | None = None):
        self.url = url.rstrip("/") if not url.endswith("://") else url
        self.storage_options = dict(storage_options or {})
        register_secrets(self.storage_options)
        last = self.url.split("::")[-1]
        self.protocol = last.split("://", 1)[0].lower() if "://" in self.url else self.url.split("::")[0]
        self.atomic_create = self.protocol in ATOMIC_CREATE_PROTOCOLS
        self._fs: Any = None
        self._pid = -1
        self._root = _root

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d.update(_fs=None, _pid=-1)
        return d

    def __repr__(self) -> str:
        return f"FsspecStorage({self.display!r})"

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (created on first use in this process)."""
        if self._fs is None or self._pid != os.getpid():
            with self._errors("connect to", ""):
                fs, root = connect(self.url, self.storage_options, self.display)
            self._fs, self._pid = fs, os.getpid()
            if self._root is None:
                self._root = root.rstrip("/")
        return self._fs

    @property
    def root(self) -> str:
        """The backend's path of the store root (``bucket/prefix`` for s3)."""
        if self._root is None:
            _ = self.fs
        assert self._root is not None
        return self._root

    def path(self, name: str) -> str:
        """The backend's path of object ``name``."""
        return join_name(self.root, name)

    def describe(self, name: str = "") -> str:
        return redact(join_name(self.url, name))

    def sub(self, name: str) -> "FsspecStorage":
        child = FsspecStorage(join_name(self.url, name), self.storage_options,
                              _root=join_name(self._root, name) if self._root is not None else None)
        if self._fs is not None and self._pid == os.getpid():
            child._fs, child._pid = self._fs, self._pid
        return child

    def _errors(self, what: str, name: str) -> contextlib.AbstractContextManager[None]:
        return backend_errors(self.describe, what, name)

    def _invalidate(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def exists(self, name: str) -> bool:
        p = self.path(name)
        with self._errors("check", name):
            self._invalidate(p)
            try:
                return bool(self.fs.isfile(p))
            except FileNotFoundError:
                return False

    def size(self, name: str) -> int:
        p = self.path(name)
        with self._errors("stat", name):
            self._invalidate(p)
            info = self.fs.info(p)
            if info.get("type") == "directory":
                raise FileNotFoundError(errno.ENOENT, "not an object", self.describe(name))
            return int(info["size"])

    def read_bytes(self, name: str) -> bytes:
        p = self.path(name)
        with self._errors("read", name):
            self._invalidate(p)  # a whole-object read asks for the size first: never from a stale listing
            return bytes(self.fs.cat_file(p))

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with self._errors("read", name):
            return bytes(self.fs.cat_file(self.path(name), start=offset, end=offset + length))

    def iter_range(self, name: str, start: int = 0, end: int | None = None, *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, read_ahead: int = DEFAULT_READ_AHEAD) -> Iterator[bytes]:
        if end is None:
            end = self.size(name)
        for _, data in self.iter_ranges([(name, start, end)], chunk_bytes=chunk_bytes, read_ahead=read_ahead):
            yield data

    def iter_ranges(self, ranges: Iterable[tuple[str, int, int]], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    read_ahead: int = DEFAULT_READ_AHEAD) -> Iterator[tuple[int, bytes]]:
        """(range number, chunk) for consecutive chunks of each ``(name, start, end)`` in turn; up to ``read_ahead``
        chunks are fetched in the background, across range boundaries, so the next shard is already arriving."""
        spans = ((i, name, s, min(s + chunk_bytes, end)) for i, (name, start, end) in enumerate(ranges)
                 for s in range(start, end, chunk_bytes))
        return read_ahead_chunks(self._chunk, spans, read_ahead)

    def _chunk(self, name: str, start: int, end: int) -> bytes:
        data = self.read_range(name, start, end - start)
        if len(data) != end - start:
            raise StoreError(f"{self.describe(name)} ended early: wanted bytes {start}..{end}, got {len(data)} "
                             f"bytes; the object was replaced or truncated while being read")
        return data

    def list(self, folder: str = "") -> dict[str, int]:
        p = self.path(folder)
        with self._errors("list", folder):
            self._invalidate(p)
            try:
                entries = self.fs.ls(p, detail=True)
            except FileNotFoundError:
                return {}
        base = self.fs._strip_protocol(p).rstrip("/")
        out: dict[str, int] = {}
        for e in entries:
            full = self.fs._strip_protocol(e["name"]).rstrip("/")
            if e.get("type") == "file" and full.startswith(base + "/"):
                out[join_name(folder, full[len(base) + 1:])] = int(e.get("size") or 0)
        return out

    def publish_bytes(self, name: str, data: bytes) -> None:
        with self._errors("write", name):
            self._publish(name, lambda p: self.fs.pipe_file(p, bytes(data)))

    def publish_file(self, name: str, src: Path, *, move: bool = False, chunk_bytes: int | None = None) -> None:
        """Upload ``src`` as object ``name`` (multipart in ``chunk_bytes`` parts when large; s3fs's default)."""
        # s3fs uploads in parts of ``chunksize`` (default: the filesystem's default_block_size option).
        part = chunk_bytes or getattr(self.fs, "default_block_size", None) if self.protocol in S3_PROTOCOLS else None
        kw = {"chunksize": int(part)} if part else {}
        with self._errors("upload", name):
            self._publish(name, lambda p: self.fs.put_file(os.fspath(src), p, **kw))
        if move:
            with contextlib.suppress(OSError):
                os.unlink(src)

    def _publish(self, name: str, put: Callable[[str], Any]) -> None:
        # Object stores make a PUT or a completed multipart upload visible atomically; a filesystem-like
        # backend (sftp, smb, ...) gets a temporary name and a rename instead.
        final = self.path(name)
        if self.protocol in OBJECT_STORE_PROTOCOLS:
            put(final)
        else:
            tmp = join_name(self.root, f"{os.path.dirname(name)}/.{os.path.basename(name)}.tmp-{os.getpid()}")
            put(tmp)
            self.fs.mv(tmp, final)
        self._invalidate(final)

    @contextlib.contextmanager
    def open_publish(self, name: str) -> Iterator[IO[bytes]]:
        fd, tmp = tempfile.mkstemp(prefix=".featstore-upload-", suffix=os.path.basename(name))
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            self.publish_file(name, Path(tmp))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        p = self.path(name)
        with self._errors("create", name):
            try:
                self.fs.pipe_file(p, bytes(data), mode="create")
            except FileExistsError:
                return False
            finally:
                self._invalidate(p)
        return True

    def abort_incomplete_uploads(self, name_prefix: str) -> int:
        if self.protocol not in S3_PROTOCOLS:
            return 0
        with self._errors("list the unfinished uploads of", name_prefix):
            return abort_s3_uploads(self.fs, self.root, name_prefix)

    def delete(self, name: str) -> None:
        p = self.path(name)
        with self._errors("delete", name):
            try:
                self.fs.rm_file(p)
            except FileNotFoundError:
                pass
            finally:
                self._invalidate(p)
