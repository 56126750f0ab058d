"""Deciding which adapter a request runs on: explicit hint, the base model, or the configured router.

``model`` (OpenAI endpoints) or ``adapter``/``task`` (``/v1/generate``) name the target explicitly; ``auto`` or
no target asks the router. A router answer below the confidence floor falls back to the base model (saying so
in ``route.method = "fallback"``) or is rejected, per settings. An unknown explicit name is a 404, never the base.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from adapters_store.registry import AdapterRegistry
from router.base import BASE_ADAPTER, Decision, Router

from .errors import RouteRejected
from .settings import RouterConfig

log = logging.getLogger(__name__)

AUTO = "auto"


class RoutingService:
    """Resolves targets; keeps the router trained on the registered adapters' examples."""

    def __init__(self, cfg: RouterConfig, registry: AdapterRegistry, base_id: str,
                 router: Router | None = None, hooks: object | None = None, state_dir: Path | None = None) -> None:
        self.cfg, self.registry, self.base_id = cfg, registry, base_id
        self.router = router
        self.state_dir = state_dir  # where the trained router is persisted (JSON/npz, never pickle)
        self.hooks = hooks
        self._refit_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._dirty = False
        self._worker: threading.Thread | None = None

    # ---- training ----------------------------------------------------------------------------------
    def refit(self) -> None:
        """Retrain from the registered examples. The router swaps its model atomically, so serving goes on."""
        if self.router is None:
            return
        with self._refit_lock:
            examples = self.registry.examples()
            try:
                self.router.fit(examples)
                if self.state_dir is not None and hasattr(self.router, "save"):
                    self.router.save(self.state_dir)
            except Exception:
                log.exception("router refit failed; keeping the previous model")

    def on_adapter_change(self, name: str, manifest: object) -> None:
        """Retrain in the background (coalescing bursts); requests keep the current router meanwhile."""
        with self._pending_lock:
            self._dirty = True
            if self._worker is not None and self._worker.is_alive():
                return
            self._worker = threading.Thread(target=self._refit_loop, name="router-refit", daemon=True)
            self._worker.start()

    def _refit_loop(self) -> None:
        while True:
            with self._pending_lock:
                if not self._dirty:
                    self._worker = None
                    return
                self._dirty = False
            self.refit()

    # ---- deciding ----------------------------------------------------------------------------------
    def is_base(self, name: str) -> bool:
        return name in (self.base_id, BASE_ADAPTER)

    def explicit(self, name: str, method: str = "hint") -> Decision:
        if self.is_base(name):
            return Decision(BASE_ADAPTER, method, 1.0, None)
        m = self.registry.resolve(name)
        return Decision(m.name, method, 1.0, m.version)

    def decide(self, target: str | None, text: str, param: str = "model") -> Decision:
        """``target`` is an adapter name, the base id, ``auto`` or None (= auto)."""
        if target and target != AUTO:
            d = self.explicit(target)
        else:
            d = self._auto(text)
        if self.hooks is not None:  # metric hooks log their own failures, never raise
            self.hooks.routed(d.method, d.confidence)
        return d

    async def decide_async(self, target: str | None, text: str, param: str = "model") -> Decision:
        """``decide`` for the HTTP handlers: an automatic decision may wait for an encoder forward on the engine
        thread, so it waits in a worker thread, never on the event loop."""
        if target and target != AUTO:
            return self.decide(target, text, param)
        return await asyncio.to_thread(self.decide, target, text, param)

    def _auto(self, text: str) -> Decision:
        router = self.router
        if router is None or not router.labels():
            return Decision(BASE_ADAPTER, "fallback", 0.0, None)
        d = router.route([text])[0]
        if d.adapter == BASE_ADAPTER:
            return d
        try:
            m = self.registry.resolve(d.adapter)
        except Exception:  # removed since the router was trained
            return Decision(BASE_ADAPTER, "fallback", 0.0, None)
        if d.confidence < self.cfg.min_confidence:
            if self.cfg.on_low_confidence == "reject":
                raise RouteRejected(
                    f"router ({d.method}) is only {d.confidence:.2f} confident that this request belongs to "
                    f"{d.adapter!r} (minimum {self.cfg.min_confidence}); name an adapter in 'model' or 'task'",
                    param="model",
                )
            return Decision(BASE_ADAPTER, "fallback", d.confidence, None)
        return Decision(m.name, d.method, d.confidence, m.version)

