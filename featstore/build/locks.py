"""The build locks: one writer per output (and per rank) at a time, with safe takeover of a lock left by a
dead process.

The lock is a file created with ``O_CREAT | O_EXCL`` holding the owner's host, pid and start time. A
second job sees who holds it. A lock whose owner is on this host and no longer alive is stale and is
taken over (by rename, so two jobs racing for a stale lock cannot both win). Rank 0 of a build holds the
store's lock (``.featstore.lock``), every other rank its own (``.featstore.lock-build-<rank>``, see
:func:`lock_for_rank`); on object storage the lock is an object created only if absent.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from featstore.errors import LockError
from featstore.storage import Storage
from featstore.formats.layout import LOCK_NAME, rank_lock_name

log = logging.getLogger("featstore")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's owner record, or None when there is no lock."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": -1, "started": "?", "unreadable": True}


def is_stale(owner: dict[str, Any]) -> bool:
    """True when the owner was on this host and its process is gone (a crashed or killed build)."""
    return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))


def describe(owner: dict[str, Any]) -> str:
    """``host <h>, pid <p>, started <t>`` for messages."""
    return f"host {owner.get('host')}, pid {owner.get('pid')}, started {owner.get('started')}"


class BuildLock:
    """Context manager holding ``<dir>/.featstore.lock`` for the duration of a build."""

    def __init__(self, directory: Path, command: str = "featstore build"):
        self.path = Path(directory) / LOCK_NAME
        self.command = command
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise LockError naming the live holder otherwise."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LockError(f"cannot create the output folder {self.path.parent} ({e.strerror}); choose a "
                            f"writable output folder") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                fd = -1
            except OSError as e:
                raise LockError(f"cannot create the build lock {self.path} ({e.strerror}): the output folder is "
                                f"not writable; choose a writable output folder or fix its permissions") from None
            if fd < 0:
                owner = read_lock(self.path)
                if owner is None:
                    continue
                if not is_stale(owner):
                    raise LockError(f"another featstore job is writing {self.path.parent} ({describe(owner)}). "
                                    f"Wait for it to finish; if it is dead on another host, delete {self.path}")
                # Stale: move it aside atomically; only one racer's rename succeeds.
                aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                moved = read_lock(aside)
                if moved is not None and moved != owner:
                    # Another racer took the stale lock over between our read and our rename: give its
                    # fresh lock back (link fails if yet another job holds the name now).
                    try:
                        os.link(aside, self.path)
                    except OSError:
                        pass
                os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise LockError(f"could not take the build lock {self.path}; retry")

    def release(self) -> None:
        """Drop the lock if we hold it."""
        if self.held:
            try:
                owner = read_lock(self.path)
                if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                    self.path.unlink()
            finally:
                self.held = False

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RankLock(BuildLock):
    """The lock of a non-zero rank: the same mechanism, one file per rank (``.featstore.lock-<name>``)."""

    def __init__(self, directory: Path, name: str):
        super().__init__(directory, command=f"featstore build ({name})")
        self.path = Path(directory) / rank_lock_name(name)


class StorageLock:
    """The build lock of a store on object storage: an object created only if absent (S3 ``If-None-Match: *``).

    Where the backend cannot create conditionally, a warning says that a second builder cannot be refused
    reliably. A lock left by a dead process on this host is taken over; one from another host must be
    deleted by hand (the message names it).
    """

    def __init__(self, storage: Storage, name: str = LOCK_NAME, command: str = "featstore build"):
        self.storage, self.name, self.command = storage, name, command
        self.held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(self.name))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"host": "?", "pid": -1, "started": "?", "unreadable": True}

    def acquire(self) -> None:
        """Create the lock object; raise LockError naming the live holder when it exists."""
        if not self.storage.atomic_create:
            log.warning("%s cannot create objects conditionally: a second builder writing the same store at the "
                        "same time cannot be refused; run one build per store", self.storage.display)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}
        for _ in range(3):
            if self.storage.create_exclusive(self.name, json.dumps(me).encode()):
                self.held = True
                return
            owner = self._owner()
            if owner is None:
                continue
            if not is_stale(owner):
                where = self.storage.describe(self.name)
                raise LockError(f"another featstore job is writing {self.storage.display} ({describe(owner)}). "
                                f"Wait for it to finish; if it is dead on another host, delete {where}")
            self.storage.delete(self.name)  # stale: its owner on this host is gone
        raise LockError(f"could not take the build lock {self.storage.describe(self.name)}; retry")

    def release(self) -> None:
        """Delete the lock object if this process holds it."""
        if self.held:
            try:
                owner = self._owner()
                if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                    self.storage.delete(self.name)
            finally:
                self.held = False

    def __enter__(self) -> "StorageLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def rank_name(gid: int) -> str:
    """The name of rank ``gid``'s lock and messages: ``build-00003``."""
    return f"build-{gid:05d}"


def lock_for_rank(gid: int, out: Path, store: Storage | None = None) -> BuildLock | StorageLock:
    """The lock rank ``gid`` holds while it builds: the store's lock for rank 0, its own for every other rank;
    in the local folder ``out``, or as an object of the remote ``store`` when one is given."""
    command = f"featstore build (rank {gid})"
    if store is not None:
        return StorageLock(store, LOCK_NAME if gid == 0 else rank_lock_name(rank_name(gid)), command=command)
    if gid == 0:
        return BuildLock(out, command=command)
    return RankLock(out, rank_name(gid))
