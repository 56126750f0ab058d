"""Archive uploads: good .zip/.tar.gz accepted (with and without a top folder); every attack refused."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from adapters_store.archive import safe_extract
from adapters_store.errors import AdapterInvalid, AdapterTooLarge
from adapters_store.store import AdapterStore

MiB = 1 << 20


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _tgz(path: Path, members: dict[str, bytes], special: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special or []:
            tf.addfile(info)
    return path


def _adapter_files(src: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in src.iterdir()}


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
@pytest.mark.parametrize("prefix", ["", "my-adapter/", "./"])
def test_good_archive_registers(store: AdapterStore, make_adapter, tmp_path: Path, fmt: str, prefix: str) -> None:
    src = make_adapter()
    members = _adapter_files(src, prefix) | {prefix + "training_args.bin": b"\x80\x04pickle"}
    archive = (_zip if fmt == "zip" else _tgz)(tmp_path / f"up.{fmt}", members)
    m = store.register_archive("packed", archive, examples=["hi"])
    assert m.version == 1 and sorted(m.files) == ["adapter_config.json", "adapter_model.safetensors"]
    store.load("packed")
    assert not any(p.suffix == ".bin" for p in store.root.rglob("*"))
    assert list((store.root / ".store" / ".tmp").iterdir()) == []


def _attack(tmp_path: Path, fmt: str, members: dict[str, bytes], **kw) -> Path:
    return (_zip if fmt == "zip" else _tgz)(tmp_path / f"evil.{fmt}", members, **kw)


CFG = {"adapter_config.json": b"{}"}


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
@pytest.mark.parametrize("name,pattern", [
    ("/etc/evil.json", "absolute path"),
    ("C:\\evil.json", "absolute path"),
    ("../evil.json", r"climbs out"),
    ("a/../../evil.json", r"climbs out"),
    ("a\\..\\..\\evil.json", r"climbs out"),
])
def test_path_attacks_refused(tmp_path: Path, fmt: str, name: str, pattern: str) -> None:
    archive = _attack(tmp_path, fmt, CFG | {name: b"{}"})
    with pytest.raises(AdapterInvalid, match=pattern):
        safe_extract(archive, tmp_path / "out", 64 * MiB, 64)
    assert not (tmp_path / "evil.json").exists() and not Path("/etc/evil.json").exists()


def test_zip_symlink_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "l.zip", CFG, symlinks={"adapter_model.safetensors": "/etc/passwd"})
    with pytest.raises(AdapterInvalid, match="is a symlink"):
        safe_extract(archive, tmp_path / "out", 64 * MiB, 64)


@pytest.mark.parametrize("kind,typ", [("symlink", tarfile.SYMTYPE), ("hardlink", tarfile.LNKTYPE),
                                      ("device or fifo", tarfile.CHRTYPE), ("device or fifo", tarfile.FIFOTYPE)])
def test_tar_links_and_devices_refused(tmp_path: Path, kind: str, typ: bytes) -> None:
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.type, info.linkname = typ, "/etc/passwd"
    archive = _tgz(tmp_path / "l.tgz", CFG, special=[info])
    with pytest.raises(AdapterInvalid, match=f"is a {kind}"):
        safe_extract(archive, tmp_path / "out", 64 * MiB, 64)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_bomb_by_ratio_refused(tmp_path: Path, fmt: str) -> None:
    archive = _attack(tmp_path, fmt, CFG | {"adapter_model.safetensors": bytes(8 * MiB)})
    with pytest.raises(AdapterInvalid, match="decompression bomb"):
        safe_extract(archive, tmp_path / "out", 64 * MiB, 64)


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_unpacked_size_cap(tmp_path: Path, fmt: str) -> None:
    archive = _attack(tmp_path, fmt, CFG | {"adapter_model.safetensors": bytes(2 * MiB)})
    with pytest.raises(AdapterTooLarge, match="unpacks to more than"):
        safe_extract(archive, tmp_path / "out", MiB, 64)


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_too_many_members(tmp_path: Path, fmt: str) -> None:
    archive = _attack(tmp_path, fmt, CFG | {f"f{i}.txt": b"x" for i in range(20)})
    with pytest.raises(AdapterInvalid, match="more than 10 members|20|21 members"):
        safe_extract(archive, tmp_path / "out", 64 * MiB, 10)


def test_several_attacks_in_one_message(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "e.zip", CFG | {"/abs.json": b"{}", "../up.json": b"{}"},
                   symlinks={"x.json": "/etc/passwd"})
    with pytest.raises(AdapterInvalid) as e:
        safe_extract(archive, tmp_path / "out", 64 * MiB, 64)
    assert len(e.value.problems) == 3


def test_not_an_archive_and_no_adapter_inside(tmp_path: Path) -> None:
    junk = tmp_path / "x.zip"
    junk.write_bytes(b"hello world")
    with pytest.raises(AdapterInvalid, match="not a .zip or .tar.gz"):
        safe_extract(junk, tmp_path / "o1", MiB, 64)
    empty = _zip(tmp_path / "n.zip", {"a/readme.txt": b"hi", "b/readme.txt": b"hi"})
    with pytest.raises(AdapterInvalid, match="holds no adapter"):
        safe_extract(empty, tmp_path / "o2", MiB, 64)


def test_archive_over_upload_limit_and_bad_name(tmp_path: Path, base_spec, make_adapter) -> None:
    store = AdapterStore(tmp_path / "s", base_spec, max_upload_bytes=4096)
    archive = _zip(tmp_path / "a.zip", _adapter_files(make_adapter()))
    with pytest.raises(AdapterTooLarge) as e:
        store.register_archive("auto", archive)
    assert "reserved" in e.value.message and "over the limit of 4096" in e.value.message


def test_pickle_only_archive_gets_convert_hint(store: AdapterStore, tmp_path: Path) -> None:
    archive = _tgz(tmp_path / "p.tgz", CFG | {"adapter_model.bin": b"\x80\x04pickle"})
    with pytest.raises(AdapterInvalid, match="safe_serialization=True"):
        store.register_archive("pkl", archive)
    assert not any(p.suffix == ".bin" for p in store.root.rglob("*"))
