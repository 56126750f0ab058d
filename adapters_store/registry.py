"""What adapters exist right now, and the CPU tier of decoded weights.

Policy on top of the store: registration goes store-first (validated, written atomically) and is only then
announced, so a bad upload never replaces a good version. Decoded weights of recently used versions stay in an
LRU (``max_cpu_loras``); the engine's compute slots pull from it. Listeners (engine, router, metrics) hear about
every change. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from .errors import AdapterNotFound
from .spec import Manifest
from .store import AdapterStore
from .weights import AdapterWeights

log = logging.getLogger(__name__)

Listener = Callable[[str, Manifest | None], None]  # (name, new manifest or None when removed)


class AdapterRegistry:
    """Registered adapters (latest version each) over an ``AdapterStore``, plus the CPU tier."""

    def __init__(self, store: AdapterStore, max_cpu_loras: int, hooks: object | None = None,
                 prepare: Callable[[AdapterWeights], object] | None = None) -> None:
        """``prepare`` runs on weights read from the store as they enter the CPU tier, on the caller's thread
        (the server converts them to slot form there, so the engine thread only copies). A version registered
        here enters unprepared: see ``_keep``."""
        self.store = store
        self.max_cpu = max_cpu_loras
        self.hooks = hooks
        self.prepare = prepare
        self._cpu: OrderedDict[tuple[str, int], AdapterWeights] = OrderedDict()
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._latest: dict[str, Manifest] = {m.name: m for m in store.list()}  # this process's view

    # ---- queries ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._latest)

    def manifests(self) -> list[Manifest]:
        with self._lock:
            return [self._latest[n] for n in sorted(self._latest)]

    def resolve(self, name: str) -> Manifest:
        """The current version of ``name``; ``AdapterNotFound`` naming the known adapters otherwise."""
        with self._lock:
            m = self._latest.get(name)
        if m is not None:
            return m
        try:
            return self.store.get(name)  # registered by another process sharing the store
        except AdapterNotFound:
            known = ", ".join(self.names()) or "none registered"
            raise AdapterNotFound(
                f"adapter {name!r} not found; known adapters: {known} (use the base model's id or 'auto' for "
                "routing)", param="model",
            ) from None

    def examples(self) -> dict[str, list[str]]:
        out = {}
        for m in self.manifests():
            texts = list(m.examples)
            if m.description:
                texts.append(m.description)
            if texts:
                out[m.name] = texts
        return out

    # ---- CPU tier -----------------------------------------------------------------------------------
    def weights(self, key: tuple[str, int]) -> AdapterWeights:
        """Decoded weights of one version, from the CPU tier or the store (files checked against the manifest's
        sha256, then cached). A version registered here is already in the tier (see ``_keep``)."""
        with self._lock:
            w = self._cpu.get(key)
            if w is not None:
                self._cpu.move_to_end(key)
                return w
        t0 = time.perf_counter()
        w = self.store.load(key[0], key[1])
        self._hook("adapter_loaded", key[0], "cpu", time.perf_counter() - t0)
        if self.prepare is not None:
            self.prepare(w)
        self._put(key, w)
        return w

    def _put(self, key: tuple[str, int], w: AdapterWeights) -> None:
        with self._lock:
            self._cpu[key] = w
            self._cpu.move_to_end(key)
            while len(self._cpu) > self.max_cpu:
                self._cpu.popitem(last=False)
                self._hook("adapter_evicted", "cpu")
            self._hook("adapters_resident", "cpu", len(self._cpu))

    def in_cpu_tier(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._cpu

    def cpu_keys(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._cpu)

    # ---- changes --------------------------------------------------------------------------------------
    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def register_dir(self, name: str, src: Path, description: str | None = None,
                     examples: list[str] | None = None) -> Manifest:
        m = self.store.register_dir(name, src, description=description, examples=examples, loaded=self._keep)
        self._announce(name, m)
        return m

    def register_archive(self, name: str, archive: Path, description: str | None = None,
                         examples: list[str] | None = None) -> Manifest:
        m = self.store.register_archive(name, archive, description=description, examples=examples,
                                        loaded=self._keep)
        self._announce(name, m)
        return m

    def _keep(self, manifest: Manifest, weights: AdapterWeights) -> None:
        """The weights the store decoded to validate a new version go straight into the CPU tier, unprepared:
        this runs inside the register call, which a client waits on before its first request. Measured in the
        server (SmolLM2, r 16 on q/k/v/o, 1000 adapters registered): preparing here took 11-32 ms of that call,
        while the engine converts the pairs (by groups of same-shaped modules) as it writes them into a slot."""
        self._put((manifest.name, manifest.version), weights)

    def prefetch(self, key: tuple[str, int]) -> None:
        """Warm the CPU tier off the engine thread (called before a request is queued)."""
        try:
            self.weights(key)
        except Exception:  # the engine reports load errors to the request itself
            log.debug("prefetch of %s failed", key, exc_info=True)

    def unregister(self, name: str) -> None:
        self.resolve(name)
        self.store.delete(name)
        with self._lock:
            for key in [k for k in self._cpu if k[0] == name]:
                del self._cpu[key]
            self._hook("adapters_resident", "cpu", len(self._cpu))
        self._announce(name, None)

    def _announce(self, name: str, manifest: Manifest | None) -> None:
        with self._lock:
            if manifest is None:
                self._latest.pop(name, None)
            elif name not in self._latest or self._latest[name].version < manifest.version:
                self._latest[name] = manifest
        for fn in self._listeners:
            try:
                fn(name, manifest)
            except Exception:
                log.exception("adapter listener failed for %s", name)

    def _hook(self, name: str, *args: object) -> None:
        if self.hooks is not None:
            try:
                getattr(self.hooks, name)(*args)
            except Exception:
                log.debug("hook %s failed", name, exc_info=True)
