"""Spare files: a registration overwrites a pre-written file and stores exactly the source's bytes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from adapters_store import spares
from adapters_store.spec import BaseModelSpec
from adapters_store.store import STORE_DIR, AdapterStore

WEIGHTS = "adapter_model.safetensors"


def ready_spares(store: AdapterStore, timeout_s: float = 20.0) -> list[Path]:
    """The spare files, once the background thread has written at least one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted((store.root / STORE_DIR / ".spare").glob("*.spare"))
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError("no spare file was written")


def test_a_registration_overwrites_a_spare_and_stores_exactly_the_source(
        store: AdapterStore, make_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spares, "MIN_BYTES", 1024)  # the tiny model's adapters are KBs, not MBs
    big, small = make_adapter(r=16, seed=1), make_adapter(r=4, seed=2)
    store.register_dir("big", big)  # no spare yet: written fresh, and spares of its size are asked for
    spare = ready_spares(store)[0]
    inode, spare_size = spare.stat().st_ino, spare.stat().st_size
    assert spare_size >= (big / WEIGHTS).stat().st_size > (small / WEIGHTS).stat().st_size
    assert spare.read_bytes() == bytes(spare_size)  # zeros, never another adapter's data

    m = store.register_dir("small", small)

    stored = store.path("small") / WEIGHTS
    assert stored.stat().st_ino == inode  # the spare, renamed into place
    assert stored.read_bytes() == (small / WEIGHTS).read_bytes()  # overwritten and cut to size
    assert store.load("small").meta["sha256"] == m.sha256  # the manifest's digest checks out on disk
    assert store.load("big").rank == 16


def test_no_spares_when_disabled(tmp_path: Path, base_spec: BaseModelSpec, make_adapter,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spares, "MIN_BYTES", 1024)
    store = AdapterStore.open(tmp_path / "adapters", base_spec, 4 << 20, spare_files=0)[0]
    for i in range(2):
        store.register_dir(f"a{i}", make_adapter(r=16, seed=i))
    time.sleep(0.3)
    assert list((store.root / STORE_DIR / ".spare").iterdir()) == []
    assert [store.load(f"a{i}").rank for i in range(2)] == [16, 16]


def test_start_up_removes_half_written_spares_and_keeps_finished_ones(tmp_path: Path,
                                                                      base_spec: BaseModelSpec) -> None:
    spare_dir = tmp_path / "adapters" / STORE_DIR / ".spare"
    spare_dir.mkdir(parents=True)
    (spare_dir / "dead.writing").write_bytes(bytes(10))
    (spare_dir / "done.spare").write_bytes(bytes(10))

    AdapterStore.open(tmp_path / "adapters", base_spec, 4 << 20)

    assert sorted(p.name for p in spare_dir.iterdir()) == ["done.spare"]


def test_every_registration_is_followed_by_a_full_set_of_spares(
        store: AdapterStore, make_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spares, "MIN_BYTES", 1024)
    for i in range(4):
        store.register_dir(f"n{i}", make_adapter(r=16, seed=i))
        deadline = time.monotonic() + 20
        while len(ready_spares(store)) < 2:  # the default keeps two
            assert time.monotonic() < deadline, "the spares were not refilled"
            time.sleep(0.02)
