"""A store in a local folder: ``pread`` on cached file handles, atomic temp + fsync + rename writes."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import IO, Iterator

from featstore.runtime.fsutil import atomic_open, atomic_write_bytes, fsync_dir
from featstore.storage.base import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_OPEN, DEFAULT_READ_AHEAD, Storage, join_name
from featstore.storage.mapped import MappedFile, OpenFiles


class LocalStorage(Storage):
    """A local folder; shard files stay open in an LRU of ``max_open`` (:class:`OpenFiles`)."""

    is_local = True
    atomic_create = True

    def __init__(self, root: Path | str, max_open: int = DEFAULT_MAX_OPEN):
        self.root = Path(root)
        self.max_open = max(1, max_open)
        self._files = OpenFiles(self.root, self.max_open)

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
        """The open file ``name`` (mapped on its first :meth:`MappedFile.view`); keep the reference until the read
        returns."""
        return self._files.get(name)

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
                out[join_name(folder, e.name)] = e.stat().st_size
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
        self._files.close()
