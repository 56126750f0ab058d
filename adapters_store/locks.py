"""Locks of the adapter store: per-name writer locks and ownership of in-progress temp directories.

``NameLocks.hold(name)`` serialises writers of one name across threads (an in-process lock per name) and across
processes (``fcntl.flock`` on ``<lock_dir>/<name>.lock``; lock files are never deleted, so two processes always
lock the same inode). ``owned_tempdir`` creates a temp directory whose owner holds a flock on ``<dir>.lock``
while alive; ``remove_abandoned`` deletes the temp directories whose owner died (the kernel dropped its lock). A lock file
left by an owner that died before creating its directory stays behind (a few bytes; removing it could race a
live owner).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class NameLocks:
    """Writer locks keyed by adapter name; re-entrant use from one thread is not supported."""

    def __init__(self, lock_dir: Path) -> None:
        self.lock_dir = Path(lock_dir)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._thread_locks: dict[str, threading.Lock] = {}

    def _thread_lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._thread_locks.setdefault(name, threading.Lock())

    @contextmanager
    def hold(self, name: str, blocking: bool = True) -> Iterator[None]:
        """Hold the writer lock of ``name``; with ``blocking=False`` raise ``BlockingIOError`` if it is taken."""
        tlock = self._thread_lock(name)
        if not tlock.acquire(blocking):
            raise BlockingIOError(f"the writer lock of {name!r} is held by another thread")
        try:
            fd = os.open(self.lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                yield
            finally:
                os.close(fd)  # closing drops the flock
        finally:
            tlock.release()


@contextmanager
def owned_tempdir(parent: Path) -> Iterator[Path]:
    """A fresh directory under ``parent``, removed on exit, marked as in use by a flock on its ``.lock`` file."""
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / uuid.uuid4().hex
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)  # lock file first, then the directory
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def remove_abandoned(parent: Path) -> list[str]:
    """Delete temp directories under ``parent`` whose owner is gone; return their names."""
    removed: list[str] = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        if entry.suffix == ".lock":
            continue
        lock_path = entry.with_name(entry.name + ".lock")
        if lock_path.exists() and not _lock_is_free(lock_path):
            continue  # a live writer owns it
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def _lock_is_free(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
