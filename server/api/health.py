"""Liveness, readiness, the model list and the metrics endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..deps import Core, MetricsDep
from ..errors import error_body

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


@router.get("/v1/models")
async def models(core: Core) -> dict:
    created, most = int(core.started), core.generator.max_len
    data = [{"id": core.model_id, "object": "model", "created": created, "owned_by": "clora-serve",
             "root": core.model_id, "parent": None, "max_model_len": most, "kind": "base"}]
    for m in core.registry.manifests():
        data.append({"id": m.name, "object": "model", "created": created, "owned_by": "clora-serve",
                     "root": core.model_id, "parent": core.model_id, "max_model_len": most, "kind": m.kind,
                     "version": m.version})
    return {"object": "list", "data": data}


@router.get("/metrics")
async def metrics(request: Request, m: MetricsDep) -> Response:
    core = request.app.state.core
    if core is not None:
        m.engine_state(core.engine.running, core.engine.waiting, core.engine.running)
    payload, content_type = m.render()
    return Response(payload, media_type=content_type)
