"""Safe unpacking of uploaded adapter archives: ``.zip``, ``.tar.gz`` (and plain ``.tar``), told apart by magic.

``safe_extract`` refuses, collecting every unsafe member into one message: absolute paths (``/x``, ``C:\\x``),
``..`` components (``/`` and ``\\`` both count as separators), symlinks, hardlinks, devices and fifos, encrypted
or duplicate members, more than ``max_members`` members, and decompression bombs: a total uncompressed size over
``max_bytes`` (``AdapterTooLarge``) or, past ``RATIO_FLOOR`` bytes, more than ``MAX_RATIO`` times the packed
size. Sizes are counted while writing too, so a member that lies about its size is caught. Only files the store
keeps (``files.classify``) are written; pickle files never are.
"""

from __future__ import annotations

import gzip
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO

from .errors import AdapterError, AdapterInvalid, AdapterTooLarge
from .files import classify, pickle_only_problems
from .kinds import KIND_FILE
from .validate import Problem, raise_problems

MAX_RATIO = 100  # uncompressed / packed; safetensors of trained weights packs about 1.1:1, zero-init B about 2:1
RATIO_FLOOR = 1 << 20  # below this many unpacked bytes the ratio is harmless (JSON packs 10:1 and more)
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class _Abort(Exception):
    """Stop unpacking: the archive is over a hard limit (the problem is already recorded)."""


def safe_extract(archive_path: Path, dest: Path, max_bytes: int, max_members: int) -> Path:
    """Unpack ``archive_path`` into ``dest`` (created) and return the adapter directory inside it.

    The adapter directory is ``dest`` itself when ``adapter_config.json`` (or ``clora_adapter.json``) is at the top
    of the archive, else the archive's single top-level folder. Raises ``AdapterInvalid`` or
    ``AdapterTooLarge`` listing every problem; ``dest`` may then hold partial output for the caller to remove.
    """
    archive_path, dest = Path(archive_path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    job = _Extraction(dest, archive_path.stat().st_size, max_bytes, max_members)
    unpack = {"zip": _unpack_zip, "tar": _unpack_tar}[_detect(archive_path)]
    try:
        unpack(archive_path, job)
    except _Abort:
        pass
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error, NotImplementedError) as e:
        job.problem(f"the archive is corrupt or truncated ({type(e).__name__}: {e})")
    job.problems += pickle_only_problems(job.kept, job.pickles)
    raise_problems(job.problems, "archive")
    return _adapter_root(dest)


def _detect(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        return "tar"
    raise AdapterInvalid("the upload is not a .zip or .tar.gz archive; pack the adapter directory with "
                         "`zip -r adapter.zip DIR` or `tar czf adapter.tar.gz DIR`", param="file")


class _Extraction:
    """Limits, bookkeeping and writing shared by the zip and tar paths."""

    def __init__(self, dest: Path, packed: int, max_bytes: int, max_members: int) -> None:
        self.dest, self.packed, self.max_bytes, self.max_members = dest, max(packed, 1), max_bytes, max_members
        self.problems: list[Problem] = []
        self.members = 0
        self.total = 0
        self.seen: set[str] = set()
        self.kept: list[str] = []
        self.pickles: list[str] = []

    def problem(self, message: str, error: type[AdapterError] = AdapterInvalid) -> None:
        self.problems.append(Problem("file", message, error))

    def admit(self, name: str, kind: str, size: int, packed: int | None = None) -> str | None:
        """Check one member; return its safe relative path if it should be written, else ``None``."""
        self.members += 1
        if self.members > self.max_members:
            self.problem(f"the archive has more than {self.max_members} members; an adapter needs only a few files")
            raise _Abort
        rel = self._relpath(name)
        if rel is None:
            return None
        if kind != "file" and kind != "dir":
            self.problem(f"{name!r} is a {kind}; archives may hold only plain files and folders")
            return None
        if rel in self.seen:
            self.problem(f"{name!r} appears more than once in the archive")
            return None
        self.seen.add(rel)
        self.count(size, name, packed)
        if kind == "dir":
            return None
        verdict = classify(rel)
        if verdict == "pickle":
            self.pickles.append(rel)
        elif verdict == "keep":
            self.kept.append(rel)
            return rel
        return None

    def count(self, size: int, name: str, packed: int | None = None) -> None:
        self.total += size
        if self.total > self.max_bytes:
            self.problem(f"the archive unpacks to more than {self.max_bytes} bytes; shrink the adapter or raise "
                         "CLORA_MAX_UPLOAD_BYTES", AdapterTooLarge)
            raise _Abort
        if packed is not None and size > RATIO_FLOOR and size > MAX_RATIO * max(packed, 1):
            self.problem(f"{name!r} unpacks {size // max(packed, 1)}x its packed size (limit {MAX_RATIO}x); "
                         "refusing a possible decompression bomb")
            raise _Abort
        if self.total > RATIO_FLOOR and self.total > MAX_RATIO * self.packed:
            self.problem(f"the archive unpacks to over {MAX_RATIO}x its packed size; refusing a possible "
                         "decompression bomb")
            raise _Abort

    def _relpath(self, name: str) -> str | None:
        posix = name.replace("\\", "/")
        if "\x00" in name or posix.startswith("/") or _DRIVE.match(posix):
            self.problem(f"{name!r} is an absolute path; archive members must be relative")
            return None
        parts = [p for p in posix.split("/") if p not in ("", ".")]
        if ".." in parts:
            self.problem(f"{name!r} climbs out of the archive with '..'")
            return None
        return "/".join(parts) or None

    def write(self, rel: str, src: IO[bytes], declared: int) -> None:
        target = self.dest / rel
        if not target.resolve().is_relative_to(self.dest.resolve()):
            raise AssertionError(f"{rel} escaped {self.dest}")  # unreachable after _relpath; defence in depth
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(target, "xb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > declared:
                    self.problem(f"{rel!r} holds more bytes than its header declares; the archive is forged")
                    raise _Abort
                out.write(chunk)


def _unpack_zip(path: Path, job: _Extraction) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > job.max_members:
            job.problem(f"the archive has {len(infos)} members (limit {job.max_members}); an adapter needs only a "
                        "few files")
            raise _Abort
        todo = []
        for info in infos:
            rel = job.admit(info.filename, _zip_kind(info), info.file_size, info.compress_size)
            if info.flag_bits & 0x1:
                job.problem(f"{info.filename!r} is encrypted; upload an unencrypted archive")
            elif rel is not None:
                todo.append((rel, info))
        if job.problems:
            return
        for rel, info in todo:
            with zf.open(info) as src:
                job.write(rel, src, info.file_size)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_IFMT(mode):  # unix file-type bits are present
        if stat.S_ISLNK(mode):
            return "symlink"
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "device or fifo"
    return "dir" if info.is_dir() else "file"


def _unpack_tar(path: Path, job: _Extraction) -> None:
    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
        for member in tf:  # stream: headers are read one by one, so limits stop a bomb early
            rel = job.admit(member.name, _tar_kind(member), member.size if member.isfile() else 0)
            if rel is not None and not job.problems:
                src = tf.extractfile(member)
                assert src is not None
                job.write(rel, src, member.size)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isfile():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "device or fifo"


def _is_adapter_dir(d: Path) -> bool:
    return (d / "adapter_config.json").is_file() or (d / KIND_FILE).is_file()


def _adapter_root(dest: Path) -> Path:
    if _is_adapter_dir(dest):
        return dest
    folders = [p for p in dest.iterdir() if p.is_dir()]
    if len(folders) == 1 and _is_adapter_dir(folders[0]):
        return folders[0]
    raise AdapterInvalid("the archive holds no adapter: put adapter_config.json (or clora_adapter.json) at its top "
                         "level or inside a single top-level folder", param="file")
