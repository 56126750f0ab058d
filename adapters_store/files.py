"""Which files of an adapter directory the store keeps, and how it copies, hashes and syncs them.

Only plain files with a suffix in ``KEPT_SUFFIXES`` (safetensors weights, JSON configs, text) are copied or
unpacked; pickle formats (``PICKLE_SUFFIXES``) are never written, and an adapter that has only pickle weights is
refused with the command that converts it. Symlinks inside an adapter directory are refused.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .loaders.peft_lora import CONVERT_HINT
from .loaders.peft_lora import PICKLE_SUFFIXES as _PEFT_PICKLES
from .errors import AdapterInvalid
from .spares import SpareFiles
from .validate import Problem

KEPT_SUFFIXES = frozenset({".safetensors", ".json", ".md", ".txt"})
PICKLE_SUFFIXES = frozenset(_PEFT_PICKLES) | {".pickle", ".joblib", ".npy", ".npz"}
WEIGHT_SUFFIX = ".safetensors"
_CHUNK = 1 << 20


def classify(relpath: str) -> str:
    """``keep``, ``pickle`` (refused) or ``skip`` (ignored: other files, macOS/VCS clutter) for a relative path."""
    p = PurePosixPath(relpath)
    if any(part.startswith(".") or part == "__MACOSX" for part in p.parts):
        return "skip"
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    return "keep" if suffix in KEPT_SUFFIXES else "skip"


def pickle_only_problems(kept: list[str], pickles: list[str]) -> list[Problem]:
    if pickles and not any(k.endswith(WEIGHT_SUFFIX) for k in kept):
        return [Problem("file", f"found pickle weights {sorted(pickles)} but no .safetensors file; {CONVERT_HINT}",
                        AdapterInvalid)]
    return []


@dataclass
class FilePlan:
    """The files of a source directory that would be stored (relative POSIX paths), and what is wrong."""

    kept: list[str] = field(default_factory=list)
    size_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)


def plan_dir(src: Path) -> FilePlan:
    plan = FilePlan()
    pickles: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                plan.problems.append(Problem("file", f"{_rel(src, Path(dirpath) / d)} is a symlink; adapter "
                                                     "directories must hold plain files", AdapterInvalid))
        for f in sorted(filenames):
            path = Path(dirpath) / f
            rel = _rel(src, path)
            kind = classify(rel)
            if kind == "skip":
                continue
            if path.is_symlink() or not path.is_file():
                plan.problems.append(Problem("file", f"{rel} is a symlink or special file; adapter directories "
                                                     "must hold plain files", AdapterInvalid))
            elif kind == "pickle":
                pickles.append(rel)
            else:
                plan.kept.append(rel)
                plan.size_bytes += path.stat().st_size
    plan.kept.sort()
    plan.problems += pickle_only_problems(plan.kept, pickles)
    return plan


@dataclass(frozen=True)
class TreeDigest:
    """``files``: relative path -> sha256; ``sha256``: the weights' digest (see ``Manifest``); total size."""

    files: dict[str, str]
    sha256: str
    size_bytes: int


class _TreeHash:
    """Per-file digests of a tree, and the weights' digest: a single weights file's own digest, else the digest of
    every weights file's bytes in path order."""

    def __init__(self, rels: list[str]) -> None:
        self.weight_files = [rel for rel in rels if rel.endswith(WEIGHT_SUFFIX)]
        self.weights = hashlib.sha256()
        self.files: dict[str, str] = {}
        self.size = 0

    def stream(self, rel: str, fi: BinaryIO, fo: BinaryIO | None = None) -> None:
        """Hash ``rel``'s bytes as read from ``fi`` (writing them to ``fo`` too, when given)."""
        h = hashlib.sha256()
        combined = len(self.weight_files) > 1 and rel.endswith(WEIGHT_SUFFIX)
        while chunk := fi.read(_CHUNK):
            h.update(chunk)
            if combined:
                self.weights.update(chunk)
            if fo is not None:
                fo.write(chunk)
            self.size += len(chunk)
        self.files[rel] = h.hexdigest()

    def result(self) -> TreeDigest:
        one = len(self.weight_files) == 1
        return TreeDigest(self.files, self.files[self.weight_files[0]] if one else self.weights.hexdigest(), self.size)


def copy_file(src: Path, dst: Path, tree: _TreeHash, rel: str, spares: SpareFiles | None = None) -> None:
    """Copy one file's bytes (no metadata, never following into anything but a regular file), hashing them on
    the way; over a spare file when one is ready (see spares.py). Not synced: see ``TreeSync``."""
    with open(src, "rb") as fi:
        reuse = spares is not None and spares.take(dst, os.fstat(fi.fileno()).st_size)
        with open(dst, "r+b" if reuse else "xb") as fo:
            tree.stream(rel, fi, fo)
            fo.truncate()  # a spare may be longer than what was written


def copy_plan(src: Path, dst: Path, plan: FilePlan, spares: SpareFiles | None = None) -> TreeDigest:
    """Copy the planned files with their digests taken from the bytes copied (no second read). The copy is not
    yet durable: sync it with ``TreeSync(dst)`` before it is committed."""
    rels = sorted(plan.kept)
    tree = _TreeHash(rels)
    for rel in rels:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(src / rel, target, tree, rel, spares)
    return tree.result()


class TreeSync:
    """fsync every file and directory under ``root`` in a thread of its own, so the kernel writes a fresh copy
    back while the caller decodes and validates it (fsync releases the GIL; no torch runs here).

    ``wait()`` returns once everything is durable, or raises the first error; leaving the ``with`` block joins
    the thread, so a failed validation never removes files the thread still syncs."""

    def __init__(self, root: Path) -> None:
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(root,), name="clora-fsync", daemon=True)
        self._thread.start()

    def _run(self, root: Path) -> None:
        try:
            for dirpath, _, files in os.walk(root):
                for f in files:
                    fd = os.open(Path(dirpath) / f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                fsync_dir(Path(dirpath))
        except OSError as e:
            self._error = e

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "TreeSync":
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()


def digest_tree(root: Path, sync: bool = False, only: list[str] | None = None) -> TreeDigest:
    """Hash every kept file under ``root`` (or just ``only``); with ``sync`` also fsync files and directories."""
    rels = sorted(only) if only is not None else sorted(
        _rel(root, Path(dp) / f) for dp, _, fs in os.walk(root) for f in fs)
    tree = _TreeHash(rels)
    for rel in rels:
        with open(root / rel, "rb") as fh:
            tree.stream(rel, fh)
    if sync:
        TreeSync(root).wait()
    return tree.result()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    """Write a small text file and fsync it (the caller renames or fsyncs the directory)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()
