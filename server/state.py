"""The heavy state of one app, built once in the lifespan (off the event loop) and kept on ``app.state``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from adapters_store.registry import AdapterRegistry
from adapters_store.spec import BaseModelSpec
from adapters_store.store import AdapterStore
from base_model.loader import LoadedModel, load_base_model

from .engine.build import build_engine, context_length
from .engine.engine import Engine
from .generation import Generator
from .metrics import Metrics
from .response_cache import ResponseCache, make_cache
from .routing import RoutingService
from .router_factory import make_configured_router
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    loaded: LoadedModel
    model_id: str
    registry: AdapterRegistry
    engine: Engine
    generator: Generator
    routing: RoutingService
    cache: ResponseCache
    metrics: Metrics
    started: float

    def close(self) -> None:
        self.engine.stop()


def build_state(settings: Settings, metrics: Metrics) -> AppState:
    """Load the model, open the store, wrap the layers, start the engine thread. Blocking (seconds)."""
    t0 = time.perf_counter()
    mc = settings.model
    loaded = load_base_model(mc.base_model, mc.model_cache_dir, mc.device, mc.dtype, mc.num_threads)
    ec = settings.engine
    spec = BaseModelSpec.from_model(loaded.model, ec.target_modules, ec.max_lora_rank)
    store, scan = AdapterStore.open(settings.adapters_dir, spec, settings.max_upload_bytes,
                                    spare_files=settings.store_spare_files)
    for name, why in scan.skipped.items():
        log.warning("adapter dir %s not served: %s", name, why)
    registry = AdapterRegistry(store, ec.max_cpu_loras, hooks=metrics,
                               prepare=lambda w: w.slot_ready(loaded.dtype))  # the engine's slots store this dtype
    engine = build_engine(loaded, ec, registry.weights, mc.max_model_len, hooks=metrics)
    model_id = mc.served_model_name or loaded.name
    router = make_configured_router(settings.routing, loaded, engine, registry)
    routing = RoutingService(settings.routing, registry, model_id, router, hooks=metrics,
                             state_dir=settings.adapters_dir / ".router")
    registry.add_listener(lambda name, m: engine.stage_adapter((m.name, m.version)) if m is not None else None)
    registry.add_listener(routing.on_adapter_change)
    registry.add_listener(lambda name, m: engine.drop_adapter(name) if m is None else None)
    registry.add_listener(lambda name, m: metrics.set_known_adapters(registry.names()))
    metrics.set_known_adapters(registry.names())
    routing.refit()
    engine.start()
    generator = Generator(engine, loaded.tokenizer, context_length(loaded, mc.max_model_len),
                          loaded.model.get_input_embeddings().num_embeddings,
                          prefetch=registry.prefetch, is_warm=registry.in_cpu_tier)
    cache = make_cache(settings.cache, metrics)
    log.info("ready: %s on %s/%s with %d adapters in %.1f s", model_id, loaded.device, loaded.dtype,
             len(registry.names()), time.perf_counter() - t0)
    return AppState(settings, loaded, model_id, registry, engine, generator, routing, cache, metrics, time.time())
