"""Open shard files for reading: :class:`MappedFile` (a file and, on demand, a read-only map of it) and
:class:`OpenFiles`, the one least-recently-used set of them a local store keeps."""

from __future__ import annotations

import collections
import mmap
import os
import threading
from pathlib import Path


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

    def will_need(self, offset: int, length: int) -> None:
        """Start reading ``length`` bytes at ``offset`` into the page cache (``posix_fadvise`` WILLNEED): the kernel
        queues the whole range at once instead of one readahead window per synchronous read."""
        if length > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.file.fileno(), offset, length, os.POSIX_FADV_WILLNEED)

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


class OpenFiles:
    """At most ``max_open`` :class:`MappedFile` under a root, least recently used dropped first; a new process
    (a forked DataLoader worker) starts with none, since handles opened before a fork are the parent's."""

    def __init__(self, root: Path, max_open: int):
        self.root, self.max_open = root, max(1, max_open)
        self._files: collections.OrderedDict[str, MappedFile] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> tuple[Path, int]:
        return self.root, self.max_open

    def __setstate__(self, state: tuple[Path, int]) -> None:
        OpenFiles.__init__(self, *state)  # a fresh, empty set in the unpickling process

    def __len__(self) -> int:
        return len(self._files)

    def get(self, name: str) -> MappedFile:
        """The open file ``name``. Keep the reference until the read returns: an eviction drops the LRU's, it
        does not close the file."""
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

    def close(self) -> None:
        """Close every file held (they reopen on next use)."""
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
