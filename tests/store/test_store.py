"""AdapterStore: versions, restart, concurrency, crash safety, load integrity, delete, no pickle written."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

import adapters_store.files as files_mod
from adapters_store.errors import AdapterInvalid, AdapterNotFound
from adapters_store.spec import BaseModelSpec
from adapters_store.store import AdapterStore
from adapters_store.files import PICKLE_SUFFIXES


def test_register_real_peft_adapter_and_load_back(store: AdapterStore, peft_adapter_dir: Path) -> None:
    m = store.register_dir("math", peft_adapter_dir, description="sums", examples=["2+2?", "7*6?"])
    assert (m.name, m.version, m.kind, m.rank, m.alpha) == ("math", 1, "peft_lora", 4, 8.0)
    assert m.target_modules == ("q_proj", "v_proj") and m.origin == "register"
    assert m.base_fingerprint == store.base.fingerprint and m.size_bytes > 0
    import hashlib
    assert m.sha256 == hashlib.sha256((peft_adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    w = store.load("math")
    from adapters_store.kinds import load_adapter_dir
    ref = load_adapter_dir(peft_adapter_dir)
    assert set(w.modules) == set(ref.modules)
    for k, pair in ref.modules.items():
        assert torch.equal(w.modules[k].A, pair.A) and torch.equal(w.modules[k].B, pair.B)
    assert store.examples("math") == ["2+2?", "7*6?"]
    assert w.meta["version"] == 1


def test_digests_taken_while_copying_match_the_stored_bytes(store: AdapterStore, make_adapter) -> None:
    """The copy hashes what it writes: the manifest equals a fresh read of the stored files, also for the
    weights' digest over several weights files."""
    src = make_adapter(seed=3)
    shutil.copy(src / "adapter_model.safetensors", src / "extra.safetensors")
    m = store.register_dir("two", src)
    fresh = files_mod.digest_tree(store.path("two"))
    assert m.files == fresh.files and set(m.files) >= {"adapter_model.safetensors", "extra.safetensors"}
    assert m.sha256 == fresh.sha256 and m.size_bytes == fresh.size_bytes
    assert m.sha256 != m.files["adapter_model.safetensors"]  # two weights files: the digest covers both


def test_versions_are_monotonic_and_survive_reopen(store: AdapterStore, make_adapter, base_spec: BaseModelSpec) -> None:
    for seed in range(3):
        store.register_dir("chat", make_adapter(seed=seed))
    store.register_dir("code", make_adapter(seed=9))
    reopened, report = AdapterStore.open(store.root, base_spec, store.max_upload_bytes)
    assert report.adopted == [] and report.skipped == {}
    assert reopened.versions("chat") == [1, 2, 3]
    assert [m.key for m in reopened.list()] == ["chat@3", "code@1"]
    assert reopened.get("chat", 2).version == 2
    assert reopened.register_dir("chat", make_adapter(seed=5)).version == 4


def test_versions_are_not_reused_after_delete(store: AdapterStore, make_adapter) -> None:
    store.register_dir("x", make_adapter())
    store.register_dir("x", make_adapter(seed=1))
    store.delete("x")
    assert store.versions("x") == [] and not (store.root / ".store" / "x").exists()
    assert store.register_dir("x", make_adapter(seed=2)).version == 3


def test_not_found_names_known_adapters(store: AdapterStore, make_adapter) -> None:
    store.register_dir("alpha", make_adapter())
    with pytest.raises(AdapterNotFound, match="alpha"):
        store.get("beta")
    with pytest.raises(AdapterNotFound, match=r"versions: \[1\]"):
        store.get("alpha", 7)
    with pytest.raises(AdapterNotFound):
        store.delete("beta")


def test_concurrent_registrations_of_one_name_are_serialised(store: AdapterStore, make_adapter) -> None:
    srcs = [make_adapter(seed=i) for i in range(8)]
    results, errors = [], []
    barrier = threading.Barrier(8)

    def work(src: Path) -> None:
        barrier.wait()
        try:
            results.append(store.register_dir("busy", src))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(m.version for m in results) == list(range(1, 9))
    assert store.versions("busy") == list(range(1, 9))
    for m in results:  # every version holds exactly the weights its registration reported
        assert store.get("busy", m.version).sha256 == m.sha256
        store.load("busy", m.version)
    assert len({m.sha256 for m in results}) == 8


def test_crash_mid_write_keeps_previous_version(store: AdapterStore, make_adapter, monkeypatch) -> None:
    store.register_dir("safe", make_adapter(seed=0))
    real_copy = files_mod.copy_file
    calls = []

    def copy_then_crash(src: Path, dst: Path, *args) -> None:
        calls.append(src)
        if len(calls) == 2:
            dst.write_bytes(b"half")
            raise OSError("disk vanished")
        real_copy(src, dst, *args)

    monkeypatch.setattr(files_mod, "copy_file", copy_then_crash)
    with pytest.raises(OSError, match="disk vanished"):
        store.register_dir("safe", make_adapter(seed=1))
    monkeypatch.undo()
    assert [m.key for m in store.list()] == ["safe@1"]
    assert store.versions("safe") == [1]
    store.load("safe")
    assert list((store.root / ".store" / ".tmp").iterdir()) == []


def test_failed_sync_of_the_copy_commits_nothing(store: AdapterStore, make_adapter, monkeypatch) -> None:
    """The copy is synced in a thread while it is validated; a sync error fails the registration, which leaves
    the previous version serving and no temp dir behind."""
    store.register_dir("safe", make_adapter(seed=0))
    real_fsync, synced = os.fsync, []

    def failing_fsync(fd: int) -> None:
        if threading.current_thread().name == "clora-fsync":
            synced.append(fd)
            raise OSError("I/O error on writeback")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="writeback"):
        store.register_dir("safe", make_adapter(seed=1))
    monkeypatch.undo()
    assert synced and store.versions("safe") == [1]
    store.load("safe")
    assert list((store.root / ".store" / ".tmp").iterdir()) == []


def test_stale_temp_dir_of_a_dead_writer_is_removed_at_open(store: AdapterStore, make_adapter,
                                                            base_spec: BaseModelSpec) -> None:
    store.register_dir("one", make_adapter())
    stale = store.root / ".store" / ".tmp" / "deadbeef"
    (stale / "v" / "adapter").mkdir(parents=True)
    (stale / "v" / "adapter" / "adapter_config.json").write_text("{}")
    (stale.with_name("deadbeef.lock")).touch()  # its owner's flock died with the owner
    reopened, _ = AdapterStore.open(store.root, base_spec, store.max_upload_bytes)
    assert not stale.exists() and not stale.with_name("deadbeef.lock").exists()
    assert [m.key for m in reopened.list()] == ["one@1"]


def test_load_refuses_files_changed_on_disk(store: AdapterStore, make_adapter) -> None:
    store.register_dir("tamper", make_adapter())
    weights = store.path("tamper") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterInvalid, match="damaged on disk.*adapter_model.safetensors"):
        store.load("tamper")


def test_pickle_only_adapter_is_refused_with_convert_hint(store: AdapterStore, make_adapter) -> None:
    src = make_adapter()
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    with pytest.raises(AdapterInvalid, match=r"adapter_model\.bin.*safe_serialization=True") as e:
        store.register_dir("pkl", src)
    assert e.value.param == "file"
    assert store.versions("pkl") == []


def test_no_pickle_file_is_ever_written(store: AdapterStore, make_adapter) -> None:
    src = make_adapter()
    (src / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (src / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    store.register_dir("clean", src)
    written = [p for p in store.root.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert written == []
    assert sorted(store.get("clean").files) == ["adapter_config.json", "adapter_model.safetensors"]


def test_delete_removes_files(store: AdapterStore, make_adapter) -> None:
    store.register_dir("gone", make_adapter())
    path = store.path("gone")
    store.delete("gone")
    assert not path.exists() and store.names() == []
    assert list((store.root / ".store" / ".trash").iterdir()) == []
    with pytest.raises(AdapterNotFound):
        store.load("gone")


def test_adapter_for_another_base_model_is_refused_at_load(store: AdapterStore, make_adapter,
                                                            base_spec: BaseModelSpec) -> None:
    store.register_dir("old", make_adapter())
    other = BaseModelSpec("0123456789abcdef", base_spec.module_shapes, base_spec.target_modules, 16)
    with pytest.raises(Exception, match="registered for base model"):
        AdapterStore(store.root, other, store.max_upload_bytes).load("old")


def test_symlinked_file_in_source_dir_is_refused(store: AdapterStore, make_adapter, tmp_path: Path) -> None:
    src = make_adapter()
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (src / "notes.json").symlink_to(secret)
    with pytest.raises(AdapterInvalid, match="notes.json is a symlink"):
        store.register_dir("link", src)
    shutil.rmtree(src)
