"""Build the router named by ``CLORA_ROUTER`` with what it needs from the resident base model."""

from __future__ import annotations

import logging

from base_model.loader import LoadedModel

from .engine.engine import Engine
from .settings import RouterConfig

log = logging.getLogger(__name__)


def make_configured_router(cfg: RouterConfig, loaded: LoadedModel, engine: Engine) -> object | None:
    """``hint`` means no automatic routing (auto serves the base model and says so)."""
    if cfg.kind == "hint":
        return None
    from router.registry import make_router

    deps: dict[str, object] = {}
    if cfg.kind == "base-hidden":
        from router.base_hidden import hidden_state_embedder

        deps["embed"] = hidden_state_embedder(loaded.model, loaded.tokenizer, lock=engine.model_lock)
    return make_router(cfg.kind, **deps)
