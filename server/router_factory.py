"""Build the router named by ``CLORA_ROUTER`` with what it needs from the resident base model and registry."""

from __future__ import annotations

import logging

import numpy as np
import torch

from adapters_store.registry import AdapterRegistry
from base_model.loader import LoadedModel

from .engine.engine import Engine
from .settings import RouterConfig

log = logging.getLogger(__name__)

GATED_KINDS = ("gainlora",)


def gated_adapters(registry: AdapterRegistry) -> list[str]:
    return [m.name for m in registry.manifests() if m.kind in GATED_KINDS]


def gate_scorer(registry: AdapterRegistry, loaded: LoadedModel, engine: Engine):
    """``scores(texts) -> (N, n_gated)``: for each gated adapter, its strongest branch gate on the text.

    The gate input is the mean input embedding of the prompt's tokens, exactly what the engine computes (and it
    is computed on the engine thread, like all model work).
    """
    embed = loaded.model.get_input_embeddings()

    def scores(texts: list[str]) -> np.ndarray:
        return engine.run_on_engine(lambda: _scores(texts))

    def _scores(texts: list[str]) -> np.ndarray:
        gates = []
        for n in gated_adapters(registry):
            m = registry.resolve(n)
            gates.append(registry.weights((m.name, m.version)).gate)
        out = np.zeros((len(texts), len(gates)))
        with torch.inference_mode():
            for i, t in enumerate(texts):
                ids = torch.tensor(loaded.tokenizer(t)["input_ids"], device=loaded.device)
                pooled = embed(ids).float().mean(0)
                for j, g in enumerate(gates):
                    out[i, j] = float(g(pooled).max())
        return out

    return scores


def make_configured_router(cfg: RouterConfig, loaded: LoadedModel, engine: Engine,
                           registry: AdapterRegistry) -> object | None:
    """``hint`` means no automatic routing (``auto`` serves the base model and says so)."""
    if cfg.kind == "hint":
        return None
    from router.registry import make_router

    if cfg.kind in ("base-hidden", "cascade"):  # both read the resident model's hidden states
        from router.base_hidden import hidden_state_embedder

        embed = hidden_state_embedder(loaded.model, loaded.tokenizer, run=engine.run_on_engine)
        return make_router(cfg.kind, embed=embed)
    if cfg.kind == "embedding":  # its own encoder, run on the engine thread as well (see Engine.run_on_engine)
        return make_router(cfg.kind, run=engine.run_on_engine, device=str(loaded.device),
                           dtype=str(loaded.dtype).removeprefix("torch."))
    if cfg.kind == "gates":
        from router.gates import GateRouter

        class AllGated(GateRouter):
            """Every registered gated adapter may be chosen, with or without router examples."""

            def fit(self, examples: dict[str, list[str]]) -> None:
                super().fit({n: examples.get(n) or [n] for n in gated_adapters(registry)})

        return AllGated(gate_scorer(registry, loaded, engine), lambda: gated_adapters(registry))
    return make_router(cfg.kind)
