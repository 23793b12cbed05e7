"""THE directory walk: every folder scan of featstore (image scans, annotation files, per-image caches) goes
through :func:`walk_files`, so one policy decides links and hidden entries.

Policy: entries whose name starts with ``.`` are never entered or returned; plain folders are walked first
(depth first, in name order: a folder's files, then each subfolder), then symlinked folders in sorted order of their path, each real folder at most once (so link loops end and
what is reached through a link is keyed by its plain path when it has one); file links are followed (a
file's ``real`` path has links resolved); unreadable folders and entries are skipped. ``prune(name, names)``
may skip a folder (not the top) by its name and the names it holds; ``exclude`` folders are skipped by real
path.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, NamedTuple

Prune = Callable[[str, "set[str]"], bool]


class WalkedFile(NamedTuple):
    """A file the walk reached: its path as reached (through the folders walked) and its real path."""

    path: str
    real: str


def _entries(folder: str) -> list[os.DirEntry] | None:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return None


class _Walk:
    """The folders still to walk: plain ones (a stack) and symlinked ones (walked after every plain one)."""

    def __init__(self, top: str, exclude: Iterable[str]):
        self.top = top
        real_top = os.path.realpath(top)
        self.skip = {os.path.realpath(os.fspath(e)) for e in exclude}
        self.visited = {real_top}
        self.plain: list[tuple[str, str]] = [(top, real_top)]
        self.linked: list[tuple[str, str]] = []

    def next_folder(self) -> tuple[str, str] | None:
        """(path, real path) of the next folder to read, or None when the walk is over."""
        while self.plain or self.linked:
            if not self.plain:
                self.linked.sort(reverse=True)
                path, real = self.linked.pop()
                if real in self.visited or not os.path.isdir(real):
                    continue
                self.visited.add(real)
                self.plain.append((path, real))
            folder, real_folder = self.plain.pop()
            if real_folder not in self.skip:
                self.visited.add(real_folder)
                return folder, real_folder
        return None

    def files_of(self, folder: str, real_folder: str, accept: Callable[[str], bool],
                 prune: Prune | None) -> list[WalkedFile]:
        """The accepted files of one folder; queues its subfolders."""
        entries = _entries(folder)
        if entries is None or (prune and folder != self.top and prune(os.path.basename(folder),
                                                                      {e.name for e in entries})):
            return []
        found, subfolders = [], []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_link = e.is_symlink()
                if e.is_dir():
                    if is_link:
                        self.linked.append((e.path, os.path.realpath(e.path)))
                    else:
                        subfolders.append((e.path, os.path.join(real_folder, e.name)))
                elif accept(e.name) and e.is_file():
                    real = os.path.realpath(e.path) if is_link else os.path.join(real_folder, e.name)
                    found.append(WalkedFile(e.path, real))
            except OSError:
                continue
        self.plain.extend(reversed(subfolders))  # a stack: the first subfolder by name is walked next
        return found


def walk_files(top: str | os.PathLike[str], accept: Callable[[str], bool], *, exclude: Iterable[str] = (),
               prune: Prune | None = None) -> Iterator[WalkedFile]:
    """Every file under ``top`` whose name ``accept`` takes, with the module's policy for links and hidden
    entries; folder by folder, each folder's files in name order."""
    walk = _Walk(os.fspath(top), exclude)
    while (nxt := walk.next_folder()) is not None:
        yield from walk.files_of(nxt[0], nxt[1], accept, prune)
