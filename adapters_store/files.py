"""Which files of an adapter directory the store keeps, and how it copies, hashes and syncs them.

Only plain files with a suffix in ``KEPT_SUFFIXES`` (safetensors weights, JSON configs, text) are copied or
unpacked; pickle formats (``PICKLE_SUFFIXES``) are never written, and an adapter that has only pickle weights is
refused with the command that converts it. Symlinks inside an adapter directory are refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .loaders.peft_lora import CONVERT_HINT
from .loaders.peft_lora import PICKLE_SUFFIXES as _PEFT_PICKLES
from .validate import Problem
from .errors import AdapterInvalid

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


def copy_file(src: Path, dst: Path) -> None:
    """Copy one file's bytes (no metadata, never following into anything but a regular file)."""
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        shutil.copyfileobj(fi, fo, _CHUNK)


def copy_plan(src: Path, dst: Path, plan: FilePlan) -> None:
    for rel in plan.kept:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(src / rel, target)


@dataclass(frozen=True)
class TreeDigest:
    """``files``: relative path -> sha256; ``sha256``: the weights' digest (see ``Manifest``); total size."""

    files: dict[str, str]
    sha256: str
    size_bytes: int


def digest_tree(root: Path, sync: bool = False, only: list[str] | None = None) -> TreeDigest:
    """Hash every kept file under ``root`` (or just ``only``); with ``sync`` also fsync files and directories."""
    rels = sorted(only) if only is not None else sorted(
        _rel(root, Path(dp) / f) for dp, _, fs in os.walk(root) for f in fs)
    files: dict[str, str] = {}
    weights = hashlib.sha256()
    weight_files = [rel for rel in rels if rel.endswith(WEIGHT_SUFFIX)]
    combined = len(weight_files) > 1  # one weight file: the weights' digest is that file's own digest
    size = 0
    for rel in rels:
        h = hashlib.sha256()
        with open(root / rel, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
                if combined and rel.endswith(WEIGHT_SUFFIX):
                    weights.update(chunk)
                size += len(chunk)
            if sync:
                os.fsync(fh.fileno())
        files[rel] = h.hexdigest()
    if sync:
        for dirpath, _, _ in os.walk(root):
            fsync_dir(Path(dirpath))
    digest = files[weight_files[0]] if len(weight_files) == 1 else weights.hexdigest()
    return TreeDigest(files, digest, size)


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
