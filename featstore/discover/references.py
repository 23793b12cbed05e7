"""Image references of annotation records resolved to files and keys.

Resolution: an absolute path is used as it is. A relative path is looked up, first hit wins, in
``data_root/<data_path>`` (the record's ``data_path`` field, else the ``data_path`` argument), then
``data_root``, then the folder of the annotation / list file. The key is the posix path relative to the data
root, or the absolute posix path for an image outside it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from featstore.formats.keys import key_under, root_prefixes

StrPath = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved to an existing file: its key, the path as found, and the file's real path."""

    key: str
    path: Path
    real: str


class ImageResolver:
    """Resolves image references under one data root (see the module docs), caching folder real paths."""

    def __init__(self, data_root: StrPath, data_path: str | None = None, *, trust_files: bool = False):
        self.root = os.path.abspath(os.fspath(data_root))
        self.data_path = data_path
        self.trust_files = trust_files  # every reference names a file as written: nothing is looked up on disk
        self._prefixes = root_prefixes(self.root)
        self._real_dirs: dict[str, str] = {}

    def key_for(self, path: str) -> str:
        """Posix path relative to the data root, or the absolute posix path outside it (`path` is normalised)."""
        return key_under(path, self._prefixes)

    def bases(self, data_path: str | None = None, annotation_dir: str | None = None) -> tuple[str, ...]:
        """The folders a relative reference is looked up in, in order."""
        bases = []
        data_path = data_path or self.data_path
        if data_path:
            bases.append(os.path.normpath(os.path.join(self.root, data_path)))
        bases.append(self.root)
        if annotation_dir:
            bases.append(annotation_dir)
        return tuple(dict.fromkeys(bases))

    def candidates(self, ref: str, bases: tuple[str, ...]) -> list[str]:
        """The normalised paths a reference may name, in lookup order."""
        found = [ref] if os.path.isabs(ref) else [os.path.join(b, ref) for b in bases]
        return [os.path.normpath(c) for c in found]

    def real_file(self, path: str) -> str | None:
        """The resolved real path of a regular file, or None when `path` is not one."""
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(path)
                return real if os.path.isfile(real) else None
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        folder, name = os.path.split(path)
        real_dir = self._real_dirs.get(folder)
        if real_dir is None:
            real_dir = self._real_dirs[folder] = os.path.realpath(folder)
        return os.path.join(real_dir, name)

    def locate(self, ref: str, bases: tuple[str, ...]) -> tuple[str, str, str] | None:
        """(key, path, real path) of the first candidate that is a file, or None (with ``trust_files``: the
        first candidate, unchecked)."""
        if self.trust_files:
            first = os.path.normpath(ref if os.path.isabs(ref) else os.path.join(bases[0], ref))
            key = self.key_for(first)
            return (ref if key == ref else key), first, first  # one string for the two
        for candidate in self.candidates(ref, bases):
            real = self.real_file(candidate)
            if real is not None:
                return self.key_for(candidate), candidate, real
        return None

    def resolve_in(self, ref: str, bases: tuple[str, ...]) -> ResolvedImage | None:
        """Resolve against given base folders; None when no candidate is a file (see :meth:`locate`)."""
        found = self.locate(ref, bases)
        return None if found is None else ResolvedImage(found[0], Path(found[1]), found[2])

    def resolve(self, ref: str, data_path: str | None = None,
                annotation_file: StrPath | None = None) -> ResolvedImage | None:
        """Resolve one reference of a record (its ``data_path``, the annotation file it came from)."""
        folder = os.path.dirname(os.path.abspath(os.fspath(annotation_file))) if annotation_file else None
        return self.resolve_in(ref, self.bases(data_path, folder))


def resolve_image_ref(ref: str, data_root: StrPath, data_path: str | None = None,
                      annotation_file: StrPath | None = None) -> tuple[str, Path] | None:
    """(key, path) of the image one record reference names, or None when it does not exist."""
    found = ImageResolver(data_root).resolve(ref, data_path, annotation_file)
    return (found.key, found.path) if found is not None else None
