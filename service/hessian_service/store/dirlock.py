"""One server per SQLite data directory: an exclusive flock on DIR/server.lock.

A second server on the same directory would mark the first one's live runs INTERRUPTED at
start (and then resume them: one run in two processes), and `--recover-store` would rename
the file under a live writer. The kernel drops the lock when its holder dies, however it
dies, so a crash never leaves a stale lock behind. Servers that share runs use PostgreSQL.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib

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
