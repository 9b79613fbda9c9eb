"""One server per SQLite data directory: an exclusive flock on DIR/server.lock, and one on
the database file itself (StoreFileLock).

A second server on the same directory would mark the first one's live runs INTERRUPTED at
start (and then resume them: one run in two processes), and `--recover-store` would rename
the file under a live writer. The kernel drops the lock when its holder dies, however it
dies, so a crash never leaves a stale lock behind. Servers that share runs use PostgreSQL.

The lock on DIR/server.lock alone misses a second directory whose runs.sqlite3 links to the
same file, and a server.lock removed under a live server; the flock on the database file's
inode holds in both cases. On Linux a flock and SQLite's POSIX (fcntl) byte-range locks on
the same file are independent: neither blocks the other (network file systems, where flock
may be emulated by fcntl, are no place for a WAL store anyway).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import threading
from typing import ClassVar

from .base import StoreError

LOCK_NAME = "server.lock"


class DataDirInUseError(StoreError):
    """Another live process holds the data directory."""


class DataDirLock:
    """Hold `data_dir` exclusively until `release()` (or the process ends); the lock file
    says which process holds it."""

    def __init__(self, data_dir: str | pathlib.Path) -> None:
        directory = pathlib.Path(data_dir)
        path = directory / LOCK_NAME
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"the data directory {directory} is not a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # never through a link: a server.lock pointing elsewhere would be truncated
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(
                    f"{path} is a symbolic link: expected the server's own lock file (remove "
                    "the link)"
                ) from None
            raise StoreError(
                f"the data directory {directory} cannot be written: {exc.strerror} ({path})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUseError(
                f"{directory} is in use by another hessian-server (pid {holder}, holding "
                f"{path}): one server per data directory; servers that share runs use "
                "PostgreSQL (--store)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        """Let the directory go (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StoreFileLock:
    """Hold the database file at `path` (resolved through links) exclusively until
    `release()`: an flock on its inode, whatever directory or name reaches it."""

    _held: ClassVar[set[tuple[int, int]]] = set()  # inodes this process holds
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str | pathlib.Path) -> None:
        resolved = pathlib.Path(path).resolve()
        with self._guard:
            # closing a descriptor drops every POSIX lock the process holds on the file,
            # SQLite's included: a file this process holds is refused without opening it
            st = os.stat(resolved)
            if (st.st_dev, st.st_ino) in self._held:
                raise DataDirInUseError(self._in_use(resolved, str(os.getpid())))
            fd = os.open(resolved, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DataDirInUseError(self._in_use(resolved, _flock_holder(st))) from None
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self._key: tuple[int, int] | None = (st.st_dev, st.st_ino)
            self._held.add(self._key)

    @staticmethod
    def _in_use(resolved: pathlib.Path, holder: str) -> str:
        """Why the file is refused: who holds it, and how two servers came to share it."""
        return (
            f"the run store {resolved} is in use by another hessian-server (pid {holder}, "
            "holding the database file itself: another --data-dir reaches this file through "
            f"a link, or {LOCK_NAME} was removed under a live server): one server per store; "
            "servers that share runs use PostgreSQL (--store)"
        )

    def release(self) -> None:
        """Let the file go (idempotent). Call it after closing this process's SQLite
        connections to the file: closing the descriptor drops their POSIX locks."""
        with self._guard:
            if self._key is not None:
                os.close(self._fd)
                self._held.discard(self._key)
                self._key = None

    def __enter__(self) -> StoreFileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock_holder(st: os.stat_result) -> str:
    """The pid holding an flock on the file `st` describes, from /proc/locks ("unknown")."""
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if "->" not in fields and "FLOCK" in fields and inode in fields:
                    return fields[fields.index(inode) - 1]
    except OSError:
        pass
    return "unknown"
