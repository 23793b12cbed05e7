"""Where a store lives: a local folder, or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``).

This is the one module that knows the difference. :func:`parse_location` turns a location into a
:class:`Storage` whose methods take names relative to the store root (``"index.fsi"``,
``"shards/x.tar"``): read, ranged read (one request), chunked sequential read with read-ahead, list,
exists, publish a complete object, conditional create and delete. Local paths (and ``file://`` URLs) are
served with plain ``os`` calls and never import fsspec; every other protocol goes through fsspec (``s3://``
needs ``s3fs``: ``pip install 'featstore[s3]'``).

Objects only ever appear complete: a local file is written to a temporary name, fsynced and renamed
(:mod:`featstore.runtime.fsutil`); a remote object is uploaded under its final name in one PUT, or as a multipart
upload that becomes visible only when it completes, so a reader never sees a torn object.

Secrets never leave the process: every string option whose name looks like a credential (``key``,
``secret``, ``token``, ``password``, ...) and the standard credential environment variables are
registered, and :func:`redact` removes them, URL user info and signed-URL query strings from any text
meant for a message, a log line or a file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import io
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

from featstore.errors import StoreError
from featstore.runtime.fsutil import atomic_open, atomic_write_bytes, file_sha256, fsync_dir, pretty_json

from featstore.constants import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_OPEN, DEFAULT_READ_AHEAD

REDACTED = "***"

# A URL with a protocol fsspec could serve, or an fsspec chain such as ``simplecache::s3://...``.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")
# Backends whose create-if-absent is one atomic request (S3: ``If-None-Match: *``).
ATOMIC_CREATE_PROTOCOLS = frozenset({"s3", "s3a"})
# Backends that publish a PUT / completed multipart upload atomically under its final name.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})
S3_PROTOCOLS = frozenset({"s3", "s3a"})


# --- redaction -------------------------------------------------------------------------------------------
_SECRET_OPTION_RE = re.compile(r"key|secret|token|passw|credential|signature|sas|connection_string|auth",
                               re.IGNORECASE)
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET", "GOOGLE_OAUTH_ACCESS_TOKEN", "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET", "FSSPEC_S3_TOKEN",
)
_MIN_SECRET_LEN = 4  # shorter values would garble messages if replaced everywhere
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]+@")
_QUERY_RE = re.compile(r"(?P<url>[A-Za-z][A-Za-z0-9+.\-]*://[^\s?#'\"]*)\?[^\s'\"]*")
_SIGNED_PARAM_RE = re.compile(r"(?i)\b(X-Amz-[A-Za-z-]+|Signature|Sig|AWSAccessKeyId|Expires|sv|se|sp|token)=[^&\s'\"]+")


def _secret_values(value: Any, secret_name: bool) -> Iterator[str]:
    if isinstance(value, str):
        if secret_name and len(value) >= _MIN_SECRET_LEN:
            yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _secret_values(v, secret_name or bool(_SECRET_OPTION_RE.search(str(k))))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _secret_values(v, secret_name)


def register_secrets(storage_options: Mapping[str, Any] | None) -> None:
    """Remember the credential values in ``storage_options`` and the environment so :func:`redact` hides them."""
    found = set(_secret_values(dict(storage_options or {}), False))
    found.update(v for name in SECRET_ENV_VARS if len(v := os.environ.get(name, "")) >= _MIN_SECRET_LEN)
    if found:
        with _secrets_lock:
            _secrets.update(found)
        install_log_redaction()


def redact_url(url: str) -> str:
    """``url`` without user info and query string (where signed URLs carry their signature)."""
    url = _USERINFO_RE.sub(lambda m: f"{m['scheme']}{REDACTED}@", url)
    return _QUERY_RE.sub(lambda m: f"{m['url']}?{REDACTED}", url)


def redact(text: str) -> str:
    """``text`` with every registered secret, URL user info and signed-URL parameter replaced by ``***``."""
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    text = redact_url(text)
    return _SIGNED_PARAM_RE.sub(lambda m: f"{m[1]}={REDACTED}", text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's formatted message (see :func:`redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_log_filter = RedactingFilter()


def install_log_redaction() -> None:
    """Attach the redacting filter to featstore's logger and the root logger's handlers (idempotent)."""
    for logger in (logging.getLogger("featstore"), logging.getLogger()):
        if _log_filter not in logger.filters:
            logger.addFilter(_log_filter)
        for h in logger.handlers:
            if _log_filter not in h.filters:
                h.addFilter(_log_filter)


def storage_options_from_json(text: str, flag: str = "--storage-options") -> dict[str, Any]:
    """Parse ``--storage-options`` JSON into a dict; the message of a bad value never echoes it (secrets)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}); expected a JSON object such "
                         f"as '{{\"anon\": true}}' or '{{\"client_kwargs\": {{\"endpoint_url\": \"http://...\"}}}}'"
                         ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object (got a JSON {type(value).__name__}); expected e.g. "
                         f"'{{\"anon\": true}}'")
    register_secrets(value)
    return value


STORAGE_OPTIONS_HELP = ("options for the fsspec backend of a URL store, as JSON (e.g. '{\"anon\": true}' or "
                        "'{\"client_kwargs\": {\"endpoint_url\": \"http://host:9000\"}}'), or @FILE to read the "
                        "JSON from a file (keeps secrets out of the process list). Default: the backend's standard "
                        "environment variables and config files (AWS_*, ~/.aws). Never written to any file or log")


def add_storage_options_argument(parser: Any) -> None:
    """Add ``--storage-options JSON|@FILE`` to an argparse parser (parsed by :func:`storage_options_of`)."""
    parser.add_argument("--storage-options", metavar="JSON", default=None, help=STORAGE_OPTIONS_HELP)


def storage_options_of(args: Any) -> dict[str, Any] | None:
    """The parsed ``--storage-options`` of a CLI namespace (None when not given); ValueError when bad."""
    text = getattr(args, "storage_options", None)
    if not text:
        return None
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--storage-options {text}: cannot read the file ({e.strerror}); pass @FILE with a "
                             f"JSON object, or the JSON itself") from None
    return storage_options_from_json(text)


# --- locations -------------------------------------------------------------------------------------------
def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL other than ``file://`` (those need fsspec and a backend)."""
    if not isinstance(location, str):
        return False
    return bool(_URL_RE.match(location)) and not location.startswith("file://")


def local_path_of(location: str | os.PathLike[str]) -> Path:
    """The local path of a plain path or a ``file://`` URL."""
    s = os.fspath(location)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if s.startswith("file://"):
        s = s[len("file://"):]
        if s.startswith("localhost/"):
            s = s[len("localhost"):]
    return Path(s)


def parse_location(location: "str | os.PathLike[str] | Storage",
                   storage_options: Mapping[str, Any] | None = None) -> "Storage":
    """A :class:`Storage` for a local path, ``file://`` URL or any fsspec URL (``s3://bucket/prefix``)."""
    if isinstance(location, Storage):
        return location
    if is_remote(location):
        return FsspecStorage(str(location), storage_options)
    return LocalStorage(local_path_of(location))


def _join(root: str, name: str) -> str:
    name = name.strip("/")
    if not name:
        return root
    return f"{root.rstrip('/')}/{name}" if root else name


class Storage:
    """Objects under one root, addressed by relative posix names. Subclasses: local and fsspec."""

    is_local: bool = True
    #: True when :meth:`create_exclusive` is one atomic operation (a second racer always loses).
    atomic_create: bool = True

    @property
    def display(self) -> str:
        """The root, safe for messages and files (no credentials)."""
        return self.describe("")

    def describe(self, name: str = "") -> str:
        """The location of ``name``, safe for messages and files."""
        raise NotImplementedError

    def local_path(self, name: str = "") -> Path | None:
        """The local filesystem path of ``name``; None for a remote store."""
        return None

    def sub(self, name: str) -> "Storage":
        """The storage rooted at folder/prefix ``name``."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        """True when object ``name`` exists (fresh: no cached listing is trusted)."""
        raise NotImplementedError

    def size(self, name: str) -> int:
        """Size of object ``name`` in bytes (FileNotFoundError when absent)."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        """The whole object ``name`` (FileNotFoundError when absent)."""
        raise NotImplementedError

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``name`` from ``offset`` in one request (fewer only at the object's end)."""
        raise NotImplementedError

    def iter_range(self, name: str, start: int = 0, end: int | None = None, *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, read_ahead: int = DEFAULT_READ_AHEAD) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of ``name`` as consecutive chunks, the next ``read_ahead`` fetched in the background."""
        raise NotImplementedError

    def iter_ranges(self, ranges: Iterable[tuple[str, int, int]], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    read_ahead: int = DEFAULT_READ_AHEAD) -> Iterator[tuple[int, bytes]]:
        """(range number, chunk) for consecutive chunks of each ``(name, start, end)`` in turn."""
        for i, (name, start, end) in enumerate(ranges):
            for data in self.iter_range(name, start, end, chunk_bytes=chunk_bytes, read_ahead=read_ahead):
                yield i, data

    def open_sequential(self, name: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        read_ahead: int = DEFAULT_READ_AHEAD) -> IO[bytes]:
        """A read-only binary stream over the whole of ``name`` (remote: chunked, with read-ahead)."""
        return io.BufferedReader(_ChunkStream(self.iter_range(name, chunk_bytes=chunk_bytes, read_ahead=read_ahead)),
                                 buffer_size=1 << 20)

    def list(self, folder: str = "") -> dict[str, int]:
        """Objects directly inside ``folder``: relative name (``folder/x``) -> size; empty when it is absent."""
        raise NotImplementedError

    def publish_bytes(self, name: str, data: bytes) -> None:
        """Make ``data`` the complete object ``name`` (readers see the old object or the new one, never a part)."""
        raise NotImplementedError

    def publish_file(self, name: str, src: Path, *, move: bool = False) -> None:
        """Make the local file ``src`` the complete object ``name``; ``move`` lets a local store rename it."""
        raise NotImplementedError

    @contextlib.contextmanager
    def open_publish(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file to write; it becomes the complete object ``name`` only if the block exits cleanly."""
        raise NotImplementedError
        yield  # pragma: no cover

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create ``name`` holding ``data`` unless it exists: True when created, False when it already existed."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove object ``name`` (no error when it is already gone)."""
        raise NotImplementedError

    def abort_incomplete_uploads(self, name_prefix: str) -> int:
        """Abort unfinished multipart uploads of objects named ``name_prefix...`` (a killed writer's); returns how
        many. Only S3 has them; elsewhere nothing is left and this returns 0."""
        return 0

    def close(self) -> None:
        """Release cached handles (reopened on next use)."""


class _ChunkStream(io.RawIOBase):
    """A sequential raw stream over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._buf, self._pos = chunks, memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()


# --- local -----------------------------------------------------------------------------------------------
class MappedFile:
    """An open file (a shard) and, once a compressed record is read from it, a read-only map of the whole file.

    Compressed records decode straight from the map (the page cache), so their bytes are never copied. The
    file's size is checked before every view, so a shard truncated after it was mapped gives a short read
    (RecordError), not SIGBUS, and one that grew is mapped again.
    """

    def __init__(self, path: Path):
        self.file = open(path, "rb", buffering=0)
        self.map: mmap.mmap | None = None

    def fileno(self) -> int:
        return self.file.fileno()

    def view(self, offset: int, length: int) -> memoryview | None:
        """``length`` bytes at ``offset`` as a read-only view of the map, or None if the file is shorter."""
        end = offset + length
        if length <= 0 or os.fstat(self.file.fileno()).st_size < end:
            return None
        m = self.map
        if m is None or len(m) < end:
            m = self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        start = offset - offset % mmap.PAGESIZE
        m.madvise(mmap.MADV_WILLNEED, start, end - start)  # one read-ahead of the whole record when it is cold
        return memoryview(m)[offset:end]

    def close(self) -> None:
        self.file.close()
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a decode still holds a view: the map closes when that view is released
                pass


class LocalStorage(Storage):
    """A local folder: ``pread`` on cached file handles, atomic temp + fsync + rename writes."""

    is_local = True
    atomic_create = True

    def __init__(self, root: Path | str, max_open: int = DEFAULT_MAX_OPEN):
        self.root = Path(root)
        self.max_open = max(1, max_open)
        self._files: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d.update(_files=collections.OrderedDict(), _lock=None, _pid=-1)
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def describe(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def local_path(self, name: str = "") -> Path:
        return self.root / name if name else self.root

    def sub(self, name: str) -> "LocalStorage":
        return LocalStorage(self.root / name, self.max_open)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def mapped_file(self, name: str) -> MappedFile:
        """The open file ``name`` (kept in an LRU of ``max_open``; mapped on its first :meth:`MappedFile.view`).
        Keep the reference until the read returns: an eviction drops the LRU's, it does not close the file."""
        # Handles opened before a fork are shared with the parent: start afresh in a new process.
        if self._pid != os.getpid():
            self._files, self._lock, self._pid = collections.OrderedDict(), threading.Lock(), os.getpid()
        with self._lock:
            f = self._files.get(name)
            if f is None:
                f = MappedFile(self.root / name)
                self._files[name] = f
                while len(self._files) > self.max_open:
                    # Dropped, not closed: a thread still reading keeps its reference; CPython closes it after.
                    self._files.popitem(last=False)
            else:
                self._files.move_to_end(name)
            return f

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        f = self.mapped_file(name)
        return os.pread(f.fileno(), length, offset)

    def iter_range(self, name: str, start: int = 0, end: int | None = None, *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, read_ahead: int = DEFAULT_READ_AHEAD) -> Iterator[bytes]:
        # The kernel's readahead does the prefetching for a local file.
        with open(self.root / name, "rb") as f:
            f.seek(start)
            pos = start
            while end is None or pos < end:
                data = f.read(chunk_bytes if end is None else min(chunk_bytes, end - pos))
                if not data:
                    break
                pos += len(data)
                yield data

    def open_sequential(self, name: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        read_ahead: int = DEFAULT_READ_AHEAD) -> IO[bytes]:
        return open(self.root / name, "rb")

    def list(self, folder: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            entries = list(os.scandir(self.root / folder))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for e in entries:
            if e.is_file():
                out[_join(folder, e.name)] = e.stat().st_size
        return out

    def publish_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.root / name, data)

    def publish_file(self, name: str, src: Path, *, move: bool = False) -> None:
        dest = self.root / name
        if move:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            fsync_dir(dest.parent)
            return
        with atomic_open(dest, "wb", needed=Path(src).stat().st_size) as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, DEFAULT_CHUNK_BYTES)

    @contextlib.contextmanager
    def open_publish(self, name: str) -> Iterator[IO[bytes]]:
        with atomic_open(self.root / name, "wb") as f:
            yield f

    def create_exclusive(self, name: str, data: bytes) -> bool:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


# --- fsspec ----------------------------------------------------------------------------------------------
def _import_fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise StoreError("remote stores need fsspec (and a backend such as s3fs); install them with "
                         "`pip install 'featstore[s3]'`") from None
    return fsspec


class FsspecStorage(Storage):
    """An fsspec location (``protocol://root``); the filesystem is created lazily and anew after a fork."""

    is_local = False

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *, _root: str | None = None):
        self.url = url.rstrip("/") if not url.endswith("://") else url
        self.storage_options = dict(storage_options or {})
        register_secrets(self.storage_options)
        self.protocol = self.url.split("::")[-1].split("://", 1)[0].lower() if "://" in self.url else self.url.split("::")[0]
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
            fsspec = _import_fsspec()
            with self._errors("connect to", ""):
                try:
                    fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
                except ImportError as e:
                    raise StoreError(f"{self.display} needs an fsspec backend that is not installed ({redact(str(e))}); "
                                     f"for s3:// run `pip install 'featstore[s3]'`") from None
                except ValueError as e:
                    raise StoreError(f"{self.display} is not a location fsspec knows ({redact(str(e))}); expected "
                                     f"a local path or a URL such as s3://bucket/prefix") from None
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
        return _join(self.root, name)

    def describe(self, name: str = "") -> str:
        return redact(_join(self.url, name))

    def sub(self, name: str) -> "FsspecStorage":
        child = FsspecStorage(_join(self.url, name), self.storage_options,
                              _root=_join(self._root, name) if self._root is not None else None)
        if self._fs is not None and self._pid == os.getpid():
            child._fs, child._pid = self._fs, self._pid
        return child

    @contextlib.contextmanager
    def _errors(self, what: str, name: str) -> Iterator[None]:
        """Turn backend failures (other than a missing object) into one redacted StoreError naming the object."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, StoreError):
            raise
        except Exception as e:  # botocore/aiohttp/gcsfs raise many types; all become one actionable error
            kind = type(e).__name__
            raise StoreError(f"cannot {what} {self.describe(name)}: {kind}: {redact(str(e))}. Check the URL, "
                             f"the credentials (--storage-options or the backend's environment variables and "
                             f"config files) and the endpoint") from None

    def _invalidate(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def exists(self, name: str) -> bool:
        p = self.path(name)
        with self._errors("check", name):
            self._invalidate(p)
            try:
                return self.fs.isfile(p)
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
        """(range number, chunk) for consecutive chunks of each ``(name, start, end)`` in turn.

        Up to ``read_ahead`` chunks are fetched in the background, across range boundaries, so the next
        shard is already arriving while the current one is consumed.
        """
        spans = ((i, name, s, min(s + chunk_bytes, end)) for i, (name, start, end) in enumerate(ranges)
                 for s in range(start, end, chunk_bytes))
        if read_ahead <= 0:
            for i, name, s, e in spans:
                yield i, self._chunk(name, s, e)
            return
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="featstore-readahead")
        pending: collections.deque[tuple[int, concurrent.futures.Future[bytes]]] = collections.deque()
        try:
            for i, name, s, e in spans:
                pending.append((i, pool.submit(self._chunk, name, s, e)))
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
        out: dict[str, int] = {}
        base = self.fs._strip_protocol(p).rstrip("/")
        for e in entries:
            full = self.fs._strip_protocol(e["name"]).rstrip("/")
            if e.get("type") != "file" or not full.startswith(base + "/"):
                continue
            out[_join(folder, full[len(base) + 1:])] = int(e.get("size") or 0)
        return out

    def _put_kwargs(self, chunk_bytes: int | None) -> dict[str, Any]:
        # s3fs uploads in parts of ``chunksize`` (default: the filesystem's default_block_size option).
        if self.protocol not in S3_PROTOCOLS:
            return {}
        chunk_bytes = chunk_bytes or getattr(self.fs, "default_block_size", None)
        return {"chunksize": int(chunk_bytes)} if chunk_bytes else {}

    def publish_bytes(self, name: str, data: bytes) -> None:
        with self._errors("write", name):
            self._publish(name, lambda p: self.fs.pipe_file(p, bytes(data)))

    def publish_file(self, name: str, src: Path, *, move: bool = False, chunk_bytes: int | None = None) -> None:
        """Upload ``src`` as object ``name`` (multipart in ``chunk_bytes`` parts when large; s3fs's default)."""
        kw = self._put_kwargs(chunk_bytes)
        with self._errors("upload", name):
            self._publish(name, lambda p: self.fs.put_file(os.fspath(src), p, **kw))
        if move:
            with contextlib.suppress(OSError):
                os.unlink(src)

    def _publish(self, name: str, put: Any) -> None:
        # Object stores make a PUT or a completed multipart upload visible atomically; a filesystem-like
        # backend (sftp, smb, ...) gets a temporary name and a rename instead.
        final = self.path(name)
        if self.protocol in OBJECT_STORE_PROTOCOLS:
            put(final)
        else:
            tmp = _join(self.root, f"{os.path.dirname(name)}/.{os.path.basename(name)}.tmp-{os.getpid()}")
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
        bucket, _, key_root = self.root.partition("/")
        wanted = _join(key_root, name_prefix)
        aborted = 0
        with self._errors("list the unfinished uploads of", name_prefix):
            for up in self.fs.list_multipart_uploads(bucket):
                if str(up.get("Key", "")).startswith(wanted):
                    self.fs.abort_mpu(bucket, up["Key"], up["UploadId"])
                    aborted += 1
        return aborted

    def delete(self, name: str) -> None:
        p = self.path(name)
        with self._errors("delete", name):
            try:
                self.fs.rm_file(p)
            except FileNotFoundError:
                pass
            finally:
                self._invalidate(p)


# --- helpers over any storage -----------------------------------------------------------------------------
@contextlib.contextmanager
def local_file_to_publish(storage: Storage, name: str) -> Iterator[Path]:
    """A local path to write object ``name`` through; a remote store gets the file uploaded after the block.

    For a local store this is the final path itself (the writer makes its own write atomic, e.g. with
    :func:`featstore.runtime.fsutil.atomic_open`); nothing is uploaded when the block raises.
    """
    local = storage.local_path(name)
    if local is not None:
        yield local
        return
    stage = Path(tempfile.mkdtemp(prefix="featstore-stage-"))
    try:
        path = stage / os.path.basename(name)
        yield path
        storage.publish_file(name, path, move=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def local_copy(storage: Storage, name: str) -> Iterator[Path]:
    """A local file holding object ``name``: the file itself when local, else a temporary download."""
    local = storage.local_path(name)
    if local is not None:
        yield local
        return
    fd, tmp = tempfile.mkstemp(prefix="featstore-copy-", suffix=os.path.basename(name))
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in storage.iter_range(name):
                f.write(chunk)
        yield Path(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def staging_dir(storage: Storage, gid: int) -> Path:
    """This host's local folder where rank ``gid`` writes shards bound for the remote ``storage``.

    Deterministic (per store and rank) so that a resumed build finds and clears what a killed one left;
    ``FEATSTORE_STAGING_DIR`` or the system temporary folder holds it.
    """
    base = os.environ.get("FEATSTORE_STAGING_DIR") or tempfile.gettempdir()
    tag = hashlib.sha256(redact(storage.display).encode()).hexdigest()[:16]
    return Path(base) / f"featstore-staging-{os.getuid()}" / f"{tag}-{gid:05d}"


def reset_staging_dir(path: Path) -> None:
    """Empty a staging folder (its rank's lock is held, so anything there is a killed run's leftover)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def publish_json(storage: Storage, name: str, obj: Any) -> None:
    """Write ``obj`` as pretty JSON to object ``name`` atomically (same text as ``fsutil.atomic_write_json``)."""
    storage.publish_bytes(name, pretty_json(obj))


def read_json(storage: Storage, name: str) -> Any:
    """Parse object ``name`` as JSON (FileNotFoundError when absent, ValueError when not JSON)."""
    return json.loads(storage.read_bytes(name))


def sha256_of(storage: Storage, name: str) -> str:
    """sha256 hex digest of object ``name``, streamed (a local file through ``fsutil.file_sha256``)."""
    local = storage.local_path(name)
    if local is not None:
        return file_sha256(local)
    h = hashlib.sha256()
    for chunk in storage.iter_range(name):
        h.update(chunk)
    return h.hexdigest()


__all__ = ["staging_dir", "reset_staging_dir", "local_file_to_publish", "local_copy", "publish_json", "read_json", "sha256_of", "add_storage_options_argument", "storage_options_of", "Storage", "LocalStorage", "FsspecStorage", "parse_location", "is_remote", "local_path_of", "redact",
           "redact_url", "register_secrets", "storage_options_from_json", "install_log_redaction",
           "ATOMIC_CREATE_PROTOCOLS"]
