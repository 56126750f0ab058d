"""Liveness, readiness, the model list and the metrics endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from adapters_store.spec import Manifest

from .. import __version__
from ..deps import Core, MetricsDep
from ..errors import error_body
from ..state import AppState

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    core = request.app.state.core
    if core is None:
        err = request.app.state.load_error
        msg = f"model failed to load: {err}" if err else "model is loading"
        return JSONResponse(error_body("service_unavailable", msg, None, 503), 503, {"Retry-After": "1"})
    return JSONResponse({"status": "ready", "model": core.model_id, "adapters": len(core.registry.names())})


def _card(core: AppState, m: Manifest | None) -> dict:
    """OpenAI's model object (and vLLM's ``root``, ``parent``, ``max_model_len``); ``m`` None: the base model."""
    card = {"object": "model", "created": int(core.started), "owned_by": "clora-serve", "root": core.model_id,
            "max_model_len": core.generator.max_len}
    if m is None:
        return {"id": core.model_id, **card, "parent": None, "kind": "base"}
    return {"id": m.name, **card, "parent": core.model_id, "kind": m.kind, "version": m.version}


@router.get("/v1/models")
async def models(core: Core) -> dict:
    return {"object": "list", "data": [_card(core, None)] + [_card(core, m) for m in core.registry.manifests()]}


@router.get("/v1/models/{model:path}")
async def model(model: str, core: Core) -> dict:
    """One model (the ``openai`` client's ``models.retrieve``); an unknown one is a 404 naming the known."""
    return _card(core, None if core.routing.is_base(model) else core.registry.resolve(model))


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request, m: MetricsDep) -> Response:
    core = request.app.state.core
    if core is not None:
        m.engine_state(core.engine.running, core.engine.waiting, core.engine.running)
    payload, content_type = m.render()
    return Response(payload, media_type=content_type)
