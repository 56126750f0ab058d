"""Spare files: weights are written over a file prepared ahead of need instead of into a new one.

A new file's page-cache pages and disk blocks are allocated as it is written; on this VM that took 15-29 ms for
8.8 MB (an r 16 adapter on SmolLM2's q/k/v/o, float32), against 1.4-3.5 ms for overwriting a file of that size
written and synced a second earlier, and its fsync 5-7 ms against 2-3 (the probe wrote ten of each, in
alternation). A registration waits on that write, so the store keeps ``keep`` spare files, written and synced by
a background thread at the lowest CPU priority, and a copy takes one: renames it into place, overwrites it and
truncates it to the bytes written. Databases recycle log segments for the same reason.

Spares live in ``<dir>/*.spare``; a spare is written as ``*.writing`` and renamed when synced, so a crash leaves
no half-written spare under the name ``take`` looks for (``*.writing`` files are removed at start-up). Taking is
an atomic rename, safe across threads and processes sharing the directory. A spare holds zeros, never data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # smaller files are written fresh: their allocation costs little
MAX_BYTES = 256 << 20  # spares are never made larger than this, whatever was last written
_ZEROS = bytes(1 << 20)


class SpareFiles:
    """Up to ``keep`` spare files in ``directory``, each the size of the latest file that took one (rounded up to
    a MiB). ``keep=0`` disables them: ``take`` then always answers False."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.dir = Path(directory)
        self.keep = keep
        self._size = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.dir.glob("*.writing"):
            leftover.unlink(missing_ok=True)

    def take(self, dst: Path, size: int) -> bool:
        """Move a spare to ``dst`` (which must not exist) for a file of ``size`` bytes; the caller opens it
        ``r+b``, writes and truncates. False when none is ready (or the file is too small to gain): write fresh."""
        if self.keep <= 0 or size < MIN_BYTES:
            return False
        taken = False
        for spare in sorted(self.dir.glob("*.spare")):
            try:
                os.rename(spare, dst)  # atomic: a spare goes to one taker
                taken = True
                break
            except FileNotFoundError:  # another taker had it
                continue
        self._want(size)  # after the rename, so the refill counts what is left
        return taken

    def _want(self, size: int) -> None:
        """Keep spares of ``size`` (rounded up to a MiB) ready from now on."""
        with self._wake:
            self._size = min(-(-size // MIN_BYTES) * MIN_BYTES, MAX_BYTES)
            if self._thread is None:
                self._thread = threading.Thread(target=self._refill, name="clora-spares", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _refill(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: nice applies to this thread alone
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            with self._wake:
                while len(list(self.dir.glob("*.spare"))) >= self.keep:
                    self._wake.wait()
                size = self._size
            try:
                self._write_one(size)
            except OSError as e:  # a full disk costs the speed-up, never a registration
                log.warning("could not prepare a spare file in %s: %s", self.dir, e)
                with self._wake:
                    self._wake.wait()

    def _write_one(self, size: int) -> None:
        tmp = self.dir / f"{uuid.uuid4().hex}.writing"
        try:
            with open(tmp, "xb") as fh:
                for start in range(0, size, len(_ZEROS)):
                    fh.write(_ZEROS[: min(len(_ZEROS), size - start)])
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, tmp.with_suffix(".spare"))
        finally:
            tmp.unlink(missing_ok=True)
