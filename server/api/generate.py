"""clora's own endpoint: ``POST /v1/generate`` with an optional ``adapter`` or ``task`` hint."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import pipeline
from ..deps import Core
from ..generation import Result
from ..pipeline import Job, route_dict
from ..schemas import GenerateRequest
from .disconnect import unless_disconnected

router = APIRouter(prefix="/v1")


def _body(text: str, job: Job, r: Result, cached: bool) -> dict:
    d = job.decision
    return {
        "text": text, "adapter": d.adapter, "version": d.version, "route": route_dict(d),
        "finish_reason": r.finish_reason, "stop_reason": r.stop_reason,
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                  "total_tokens": r.prompt_tokens + r.completion_tokens},
        "cached": cached, "timings": {k: round(v, 6) for k, v in r.timings.items()},
    }


@router.post("/generate")
async def generate(body: GenerateRequest, core: Core, request: Request):
    target = body.adapter or body.task
    decision = await core.routing.decide_async(target, body.prompt, param="adapter" if body.adapter else "task")
    ids = core.generator.encode(body.prompt)
    max_tokens = core.generator.budget(len(ids), body.max_tokens, 64)
    fields = {"endpoint": "generate", "prompt": body.prompt, **body.cache_fields()}
    job = Job("generate", ids, decision, core.generator.checked(body.sampling(max_tokens)), fields)
    found = await pipeline.lookup(core, job)
    headers = {"X-Cache": "bypass" if found.key is None else ("hit" if found.hit is not None else "miss")}
    if not body.stream:
        out = await unless_disconnected(request, pipeline.run(core, job, found))
        return JSONResponse(_body(out.result.text, job, out.result, out.cached), headers=headers)

    async def events() -> AsyncIterator[str]:
        async for text, _, result in pipeline.stream(core, job, found):
            if result is None:
                yield f"data: {json.dumps({'text': text})}\n\n"
            else:
                yield f"data: {json.dumps(_body('', job, result, found.hit is not None))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
