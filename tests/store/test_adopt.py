"""Start-up adoption of plain PEFT dirs dropped directly under adapters_dir."""

from __future__ import annotations

import shutil
from pathlib import Path

from adapters_store.spec import BaseModelSpec
from adapters_store.store import AdapterStore
from tests.store.conftest import write_adapter


def test_plain_dir_is_adopted_once_and_served_under_its_name(tmp_path: Path, base_spec: BaseModelSpec,
                                                             peft_adapter_dir: Path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(peft_adapter_dir, root / "dropped")
    store, report = AdapterStore.open(root, base_spec, 4 << 20)
    assert [m.key for m in report.adopted] == ["dropped@1"] and report.skipped == {}
    assert store.get("dropped").origin == "adopt"
    store.load("dropped")
    registered = store.register_dir("dropped", write_adapter(tmp_path / "v2", base_spec, seed=3))
    assert registered.version == 2
    store, report = AdapterStore.open(root, base_spec, 4 << 20)  # restart: nothing new to adopt
    assert report.adopted == [] and store.versions("dropped") == [1, 2]


def test_changed_dropped_dir_becomes_next_version(tmp_path: Path, base_spec: BaseModelSpec) -> None:
    root = tmp_path / "adapters"
    write_adapter(root / "drop", base_spec, seed=0)
    store, _ = AdapterStore.open(root, base_spec, 4 << 20)
    write_adapter(root / "drop", base_spec, seed=1)  # user retrained in place
    store, report = AdapterStore.open(root, base_spec, 4 << 20)
    assert [m.key for m in report.adopted] == ["drop@2"]


def test_invalid_dropped_dirs_are_skipped_with_reason(tmp_path: Path, base_spec: BaseModelSpec) -> None:
    root = tmp_path / "adapters"
    write_adapter(root / "too-wide", base_spec, r=64)
    write_adapter(root / "bad name", base_spec)
    write_adapter(root / "fine", base_spec)
    (root / "not-an-adapter").mkdir()
    store, report = AdapterStore.open(root, base_spec, 4 << 20)
    assert [m.name for m in report.adopted] == ["fine"]
    assert "rank 64 exceeds" in report.skipped["too-wide"]
    assert "not a valid adapter name" in report.skipped["bad name"]
    assert store.names() == ["fine"]


def test_delete_removes_the_dropped_dir_so_it_stays_gone(tmp_path: Path, base_spec: BaseModelSpec) -> None:
    root = tmp_path / "adapters"
    write_adapter(root / "temp", base_spec)
    store, _ = AdapterStore.open(root, base_spec, 4 << 20)
    store.delete("temp")
    assert not (root / "temp").exists()
    store, report = AdapterStore.open(root, base_spec, 4 << 20)
    assert report.adopted == [] and store.names() == []
