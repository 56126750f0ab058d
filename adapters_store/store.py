"""The local adapter store: versioned, validated, atomically written adapters under ``adapters_dir``.

On-disk layout (everything the store writes lives under ``.store/``, which no adapter name can collide with,
since names start with a letter or digit)::

    <adapters_dir>/
      <name>/adapter_config.json ...   plain PEFT (or clora_adapter.json) dirs dropped in by a user; ``scan()``
                                       adopts each as the next version of <name> (1 for a new name) by copying it
      .store/<name>/v<N>/manifest.json one registered version; written last, before the atomic rename
      .store/<name>/v<N>/adapter/      its files: safetensors + json/md/txt only, never pickle
      .store/.meta/<name>.lock         flock that serialises writers of <name> across processes
      .store/.meta/<name>.last         highest version a delete removed: with the versions still stored, it keeps a
                                       deleted version's number from ever being issued again
      .store/.tmp/<id>/, <id>.lock     writes in progress, owned by a live writer's flock; stale ones go at open()
      .store/.trash/<id>/              deletions in progress (renamed away first, so readers never see half a tree)
      .store/.spare/<id>.spare         zero-filled files that copies of large weights overwrite (see spares.py)

A write copies (or unpacks) into ``.tmp``, loads the copy with the kind registry and validates it against the
base model, then, holding the name's lock, picks ``N = max(.last, existing) + 1``, writes the manifest, fsyncs,
and renames the temp version dir to ``v<N>``. A crash at any point leaves earlier versions untouched. Reads need
no lock: a version directory exists completely or not at all. A dropped dir is adopted again only when its
weights differ from every version of its name for this base model; ``delete`` also removes the dropped dir, so
it does not come back at the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .archive import safe_extract
from .errors import AdapterError, AdapterIncompatible, AdapterInvalid, AdapterNotFound
from .files import TreeDigest, TreeSync, copy_plan, digest_tree, fsync_dir, plan_dir, write_synced
from .kinds import KIND_FILE, load_adapter_dir
from .locks import NameLocks, owned_tempdir, remove_abandoned
from .spares import SpareFiles
from .spec import BaseModelSpec, Manifest, utc_now
from .validate import (Problem, adapter_problems, metadata_problems, name_problems, raise_problems,
                       size_problems)
from .weights import AdapterWeights

Loaded = Callable[[Manifest, AdapterWeights], None]  # gets the validated weights of a version just committed

log = logging.getLogger(__name__)

STORE_DIR = ".store"
DEFAULT_MAX_MEMBERS = 256


@dataclass
class ScanReport:
    """What ``scan()`` did with the plain adapter dirs under the root: adopted, or skipped with the reason."""

    adopted: list[Manifest] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class AdapterStore:
    """Versioned adapters for one base model, in a local directory shared safely by threads and processes.

    ``max_upload_bytes`` caps an adapter's files, packed (the archive) and unpacked alike; ``spare_files`` is how
    many spare files copies may overwrite (0: none). Errors are the domain errors of ``errors.py``; nothing here
    knows about HTTP.
    """

    def __init__(self, root: Path, base: BaseModelSpec, max_upload_bytes: int,
                 max_archive_members: int = DEFAULT_MAX_MEMBERS, spare_files: int = 2) -> None:
        self.root = Path(root)
        self.base = base
        self.max_upload_bytes = max_upload_bytes
        self.max_archive_members = max_archive_members
        self._dir = self.root / STORE_DIR
        for sub in (".meta", ".tmp", ".trash"):
            (self._dir / sub).mkdir(parents=True, exist_ok=True)
        self._locks = NameLocks(self._dir / ".meta")
        self._spares = SpareFiles(self._dir / ".spare", spare_files)

    @classmethod
    def open(cls, root: Path, base: BaseModelSpec, max_upload_bytes: int,
             max_archive_members: int = DEFAULT_MAX_MEMBERS, spare_files: int = 2) -> tuple["AdapterStore", ScanReport]:
        """Start-up: remove what dead writers left behind, then adopt the plain adapter dirs under ``root``."""
        store = cls(root, base, max_upload_bytes, max_archive_members, spare_files)
        for name in remove_abandoned(store._dir / ".tmp"):
            log.info("removed an unfinished write %s", name)
        for entry in (store._dir / ".trash").iterdir():
            shutil.rmtree(entry, ignore_errors=True)
        return store, store.scan()

    # ---- writes -------------------------------------------------------------------------------------------
    def register_dir(self, name: str, src_dir: Path, description: str | None = None,
                     examples: Sequence[str] | None = None, loaded: Loaded | None = None) -> Manifest:
        """Copy, validate and store the adapter directory ``src_dir`` as the next version of ``name``.

        ``loaded`` (optional) receives the manifest and the weights decoded for validation, so a caller can keep
        them without reading the files back."""
        return self._register_dir(name, Path(src_dir), description, examples, "register", loaded)[0]

    def register_archive(self, name: str, archive_path: Path, description: str | None = None,
                         examples: Sequence[str] | None = None, loaded: Loaded | None = None) -> Manifest:
        """Unpack (safely), validate and store an uploaded ``.zip``/``.tar.gz`` of an adapter directory
        (``loaded`` as in ``register_dir``)."""
        archive_path = Path(archive_path)
        problems = name_problems(name) + metadata_problems(description, examples)
        problems += size_problems(archive_path.stat().st_size, self.max_upload_bytes)
        if any(p.param == "file" for p in problems):
            raise_problems(problems, f"adapter {name!r}")
        with owned_tempdir(self._dir / ".tmp") as tmp:
            try:
                found = safe_extract(archive_path, tmp / "unpacked", self.max_upload_bytes,
                                     self.max_archive_members)
            except AdapterError as e:
                raise_problems(problems + Problem.from_error(e), f"adapter {name!r}")
            (tmp / "v").mkdir()
            os.rename(found, tmp / "v" / "adapter")
            return self._validate_and_commit(name, tmp, problems, description, examples, "register", loaded)[0]

    def delete(self, name: str) -> None:
        """Remove every version of ``name`` and its dropped dir under the root (its version counter stays)."""
        if name_problems(name):
            raise self._not_found(name)
        with self._locks.hold(name):
            dropped = self.root / name
            found = False
            if (self._dir / name).is_dir():
                self._write_last(name, max([self._last(name), *self.versions(name)]))  # before they go
                self._discard(self._dir / name)
                found = True
            if _is_adapter_dir(dropped):
                dropped.unlink() if dropped.is_symlink() else self._discard(dropped)
                found = True
            if not found:
                raise self._not_found(name)

    # ---- reads --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Names with at least one stored version, sorted."""
        if not self._dir.is_dir():
            return []
        return sorted(p.name for p in self._dir.iterdir()
                      if not name_problems(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Stored versions of ``name``, ascending (empty when there are none)."""
        if name_problems(name):
            return []
        try:
            entries = list((self._dir / name).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(p.name[1:]) for p in entries
                      if p.name[:1] == "v" and p.name[1:].isdigit() and (p / "manifest.json").is_file())

    def get(self, name: str, version: int | None = None) -> Manifest:
        """The manifest of ``name`` at ``version`` (latest by default); ``AdapterNotFound`` names what exists."""
        versions = self.versions(name)
        if not versions:
            raise self._not_found(name)
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise AdapterNotFound(f"adapter {name!r} has no version {version}; versions: {versions}", param="version")
        try:
            return Manifest.from_json((self._dir / name / f"v{version}" / "manifest.json").read_text())
        except FileNotFoundError:  # deleted under our feet
            raise AdapterNotFound(f"adapter {name}@{version} was just deleted", param="name") from None

    def list(self) -> list[Manifest]:
        """The latest version of every stored name, sorted by name."""
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except AdapterNotFound:
                continue
        return out

    def path(self, name: str, version: int | None = None) -> Path:
        """Directory holding the adapter files of ``name`` at ``version`` (latest by default)."""
        m = self.get(name, version)
        return self._dir / m.name / f"v{m.version}" / "adapter"

    def examples(self, name: str) -> list[str]:
        """Router example prompts of the latest version of ``name``."""
        return list(self.get(name).examples)

    def load(self, name: str, version: int | None = None, device: str = "cpu", verify: bool = True) -> AdapterWeights:
        """Read a stored version into slot-ready weights, first checking every file's sha256 against the manifest."""
        m = self.get(name, version)
        if m.base_fingerprint != self.base.fingerprint:
            raise AdapterIncompatible(
                f"adapter {m.key} was registered for base model {m.base_fingerprint} but this server runs "
                f"{self.base.fingerprint}; register it again against this base model", param="model")
        path = self._dir / m.name / f"v{m.version}" / "adapter"
        if verify:
            on_disk = digest_tree(path).files
            bad = sorted(f for f in set(on_disk) | set(m.files) if on_disk.get(f) != m.files.get(f))
            if bad:
                raise AdapterInvalid(f"adapter {m.key} is damaged on disk: {bad} differ from the manifest's sha256; "
                                     "delete it and register it again", param="file")
        return _stamped(load_adapter_dir(path, device), m)

    # ---- start-up adoption --------------------------------------------------------------------------------
    def scan(self) -> ScanReport:
        """Adopt every plain adapter dir directly under the root whose weights are not stored yet."""
        report = ScanReport()
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not _is_adapter_dir(entry):
                continue
            try:
                manifest, created = self._register_dir(entry.name, entry, f"adopted from {entry}", None, "adopt")
            except AdapterError as e:
                log.warning("not serving %s: %s", entry, e.message)
                report.skipped[entry.name] = e.message
                continue
            if created:
                log.info("adopted %s as %s", entry, manifest.key)
                report.adopted.append(manifest)
        return report

    # ---- internals ----------------------------------------------------------------------------------------
    def _register_dir(self, name: str, src: Path, description: str | None, examples: Sequence[str] | None,
                      origin: str, loaded: Loaded | None = None) -> tuple[Manifest, bool]:
        problems = name_problems(name) + metadata_problems(description, examples)
        if not src.is_dir():
            raise_problems(problems + [Problem("path", f"{src} is not a directory", AdapterInvalid)],
                           f"adapter {name!r}")
        plan = plan_dir(src)
        blocking = plan.problems + size_problems(plan.size_bytes, self.max_upload_bytes, "adapter")
        if blocking or (problems and origin == "adopt"):
            raise_problems(problems + blocking, f"adapter {name!r}")
        if origin == "adopt":
            existing = self._same_weights(name, digest_tree(src, only=plan.kept).sha256)
            if existing is not None:
                return existing, False
        with owned_tempdir(self._dir / ".tmp") as tmp:
            (tmp / "v").mkdir()
            spares = self._spares if origin == "register" else None  # a client waits on a registration, not on adoption
            digest = copy_plan(src, tmp / "v" / "adapter", plan, spares)
            with TreeSync(tmp / "v" / "adapter") as syncing:  # written back while the copy is validated
                return self._validate_and_commit(name, tmp, problems, description, examples, origin, loaded,
                                                 digest, syncing)

    def _validate_and_commit(self, name: str, tmp: Path, problems: list[Problem], description: str | None,
                             examples: Sequence[str] | None, origin: str, loaded: Loaded | None = None,
                             digest: TreeDigest | None = None, syncing: TreeSync | None = None
                             ) -> tuple[Manifest, bool]:
        """``digest``: of the files under ``tmp`` (a copy hashes as it writes), with ``syncing`` making them durable
        meanwhile; else both are done here."""
        adapter_dir = tmp / "v" / "adapter"
        try:
            weights = load_adapter_dir(adapter_dir)
        except AdapterError as e:
            raise_problems(problems + Problem.from_error(e), f"adapter {name!r}")
        raise_problems(problems + adapter_problems(weights, self.base), f"adapter {name!r}")
        if syncing is not None:
            syncing.wait()
        digest = digest or digest_tree(adapter_dir, sync=True)
        alpha = weights.meta.get("lora_alpha")
        with self._locks.hold(name):
            if origin == "adopt" and (existing := self._same_weights(name, digest.sha256)) is not None:
                return existing, False  # a concurrent start-up adopted it first
            version = self._next_version(name)
            manifest = Manifest(
                name=name, version=version, kind=weights.kind, base_fingerprint=self.base.fingerprint,
                rank=weights.rank, alpha=None if alpha is None else float(alpha),
                target_modules=tuple(sorted(weights.target_modules)), sha256=digest.sha256,
                size_bytes=digest.size_bytes, created_at=utc_now(), description=description,
                examples=tuple(examples or ()), files=digest.files, origin=origin)
            write_synced(tmp / "v" / "manifest.json", manifest.to_json())
            fsync_dir(tmp / "v")
            if not (self._dir / name).is_dir():
                (self._dir / name).mkdir()
                fsync_dir(self._dir)
            os.rename(tmp / "v", self._dir / name / f"v{version}")
            fsync_dir(self._dir / name)
        if loaded is not None:
            loaded(manifest, _stamped(weights, manifest))
        return manifest, True

    def _next_version(self, name: str) -> int:
        return max([self._last(name), *self.versions(name)]) + 1

    def _last(self, name: str) -> int:
        last = self._dir / ".meta" / f"{name}.last"
        return int(last.read_text()) if last.is_file() else 0

    def _write_last(self, name: str, version: int) -> None:
        last = self._dir / ".meta" / f"{name}.last"
        write_synced(last.with_name(last.name + ".tmp"), str(version))
        os.replace(last.with_name(last.name + ".tmp"), last)
        fsync_dir(last.parent)

    def _same_weights(self, name: str, sha256: str) -> Manifest | None:
        for v in reversed(self.versions(name)):
            m = self.get(name, v)
            if m.sha256 == sha256 and m.base_fingerprint == self.base.fingerprint:
                return m
        return None

    def _not_found(self, name: str) -> AdapterNotFound:
        return AdapterNotFound(f"no adapter named {name!r}; known adapters: {self.names()}", param="name")

    def _discard(self, path: Path) -> None:
        trash = self._dir / ".trash" / uuid.uuid4().hex
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _stamped(weights: AdapterWeights, m: Manifest) -> AdapterWeights:
    """Weights labelled with the version they were read for (name, version, sha256 in ``meta``)."""
    weights.meta.update(name=m.name, version=m.version, sha256=m.sha256)
    return weights


def _is_adapter_dir(d: Path) -> bool:
    return d.is_dir() and ((d / "adapter_config.json").is_file() or (d / KIND_FILE).is_file())

