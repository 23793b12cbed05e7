"""The :class:`Storage` interface: objects under one root, addressed by relative posix names (``"index.fsi"``,
``"shards/x.tar"``). :mod:`featstore.storage.local` and :mod:`featstore.storage.remote` implement it.

Objects only ever appear complete: a local file is written to a temporary name, fsynced and renamed; a remote
object is uploaded under its final name in one PUT, or as a multipart upload that becomes visible only when it
completes, so a reader never sees a torn object.
"""

from __future__ import annotations

import abc
import contextlib
import io
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from featstore.constants import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_OPEN, DEFAULT_READ_AHEAD

__all__ = ["Storage", "ChunkStream", "join_name", "DEFAULT_CHUNK_BYTES", "DEFAULT_MAX_OPEN", "DEFAULT_READ_AHEAD"]


def join_name(root: str, name: str) -> str:
    """``root/name`` for posix-style names (``name`` stripped of slashes; an empty name is the root)."""
    name = name.strip("/")
    if not name:
        return root
    return f"{root.rstrip('/')}/{name}" if root else name


class Storage(abc.ABC):
    """Objects under one root, addressed by relative posix names: read, ranged read (one request), chunked
    sequential read with read-ahead, list, exists, publish a complete object, conditional create and delete."""

    is_local: bool = True
    #: True when :meth:`create_exclusive` is one atomic operation (a second racer always loses).
    atomic_create: bool = True

    @property
    def display(self) -> str:
        """The root, safe for messages and files (no credentials)."""
        return self.describe("")

    @abc.abstractmethod
    def describe(self, name: str = "") -> str:
        """The location of ``name``, safe for messages and files."""

    def local_path(self, name: str = "") -> Path | None:
        """The local filesystem path of ``name``; None for a remote store."""
        return None

    @abc.abstractmethod
    def sub(self, name: str) -> "Storage":
        """The storage rooted at folder/prefix ``name``."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """True when object ``name`` exists (fresh: no cached listing is trusted)."""

    @abc.abstractmethod
    def size(self, name: str) -> int:
        """Size of object ``name`` in bytes (FileNotFoundError when absent)."""

    @abc.abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """The whole object ``name`` (FileNotFoundError when absent)."""

    @abc.abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``name`` from ``offset`` in one request (fewer only at the object's end)."""

    @abc.abstractmethod
    def iter_range(self, name: str, start: int = 0, end: int | None = None, *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, read_ahead: int = DEFAULT_READ_AHEAD) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of ``name`` as consecutive chunks, the next ``read_ahead`` fetched in the background."""

    def iter_ranges(self, ranges: Iterable[tuple[str, int, int]], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    read_ahead: int = DEFAULT_READ_AHEAD) -> Iterator[tuple[int, bytes]]:
        """(range number, chunk) for consecutive chunks of each ``(name, start, end)`` in turn."""
        for i, (name, start, end) in enumerate(ranges):
            for data in self.iter_range(name, start, end, chunk_bytes=chunk_bytes, read_ahead=read_ahead):
                yield i, data

    def open_sequential(self, name: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        read_ahead: int = DEFAULT_READ_AHEAD) -> IO[bytes]:
        """A read-only binary stream over the whole of ``name`` (remote: chunked, with read-ahead)."""
        return io.BufferedReader(ChunkStream(self.iter_range(name, chunk_bytes=chunk_bytes, read_ahead=read_ahead)),
                                 buffer_size=1 << 20)

    @abc.abstractmethod
    def list(self, folder: str = "") -> dict[str, int]:
        """Objects directly inside ``folder``: relative name (``folder/x``) -> size; empty when it is absent."""

    @abc.abstractmethod
    def publish_bytes(self, name: str, data: bytes) -> None:
        """Make ``data`` the complete object ``name`` (readers see the old object or the new one, never a part)."""

    @abc.abstractmethod
    def publish_file(self, name: str, src: Path, *, move: bool = False) -> None:
        """Make the local file ``src`` the complete object ``name``; ``move`` lets a local store rename it."""

    @abc.abstractmethod
    def open_publish(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A binary file to write; it becomes the complete object ``name`` only if the block exits cleanly."""

    @abc.abstractmethod
    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create ``name`` holding ``data`` unless it exists: True when created, False when it already existed."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove object ``name`` (no error when it is already gone)."""

    def abort_incomplete_uploads(self, name_prefix: str) -> int:
        """Abort unfinished multipart uploads of objects named ``name_prefix...`` (a killed writer's); returns how
        many. Only S3 has them; elsewhere nothing is left and this returns 0."""
        return 0

    def close(self) -> None:
        """Release cached handles (reopened on next use)."""


class ChunkStream(io.RawIOBase):
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
