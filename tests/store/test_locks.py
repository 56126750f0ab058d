"""The per-name writer lock excludes other processes and other threads; temp dirs of live owners survive."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adapters_store.locks import NameLocks, owned_tempdir, remove_abandoned

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys
from pathlib import Path
from adapters_store.locks import NameLocks
with NameLocks(Path(sys.argv[1])).hold("shared"):
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def test_lock_excludes_another_process(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "locked"
        locks = NameLocks(tmp_path)
        with pytest.raises(BlockingIOError):
            with locks.hold("shared", blocking=False):
                pass
        with locks.hold("other", blocking=False):  # other names are independent
            pass
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        with locks.hold("shared"):
            pass
    finally:
        child.kill()
        child.wait()


def test_lock_excludes_another_thread(tmp_path: Path) -> None:
    locks = NameLocks(tmp_path)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.hold("n"):
            held.set()
            release.wait()

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    with pytest.raises(BlockingIOError):
        with locks.hold("n", blocking=False):
            pass
    release.set()
    t.join()
    with locks.hold("n", blocking=False):
        pass


def test_live_owner_tempdir_is_not_removed(tmp_path: Path) -> None:
    with owned_tempdir(tmp_path) as d:
        (d / "x").write_text("work in progress")
        assert remove_abandoned(tmp_path) == []
        assert (d / "x").exists()
    assert list(tmp_path.iterdir()) == []
