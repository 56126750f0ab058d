"""TGI's and LoRAX's generation API, so their clients work unchanged: ``POST /generate``, ``/generate_stream`` and
``/`` (which streams when the body says so), and ``GET /info``.

``parameters.adapter_id`` names a registered adapter (``auto`` routes on the input; none is the base model, as
there). A stream sends one event per generated token, TGI's shape; the text of a token is sent with it once it is
safe (a possible stop string is held back), and the last event carries the whole text and the details. Errors
are TGI's ``{"error", "error_type"}`` (see errors.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import pipeline
from ..deps import Core
from ..engine.sampling import TokenLogprob
from ..errors import GenerationFailed, NotStreamable
from ..generation import Result
from ..pipeline import Job, route_dict
from ..schemas import MAX_STOP
from ..state import AppState
from ..tgi_schemas import TGIParameters, TGIRequest
from .disconnect import unless_disconnected

router = APIRouter()

DEFAULT_NEW_TOKENS = 100  # TGI's default max_new_tokens


async def _job(body: TGIRequest, core: AppState, stream: bool) -> Job:
    p = body.parameters
    if stream and p.decoder_input_details:
        raise NotStreamable("decoder_input_details is not streamed; set stream=false", param="decoder_input_details")
    decision = await core.routing.decide_async(p.adapter_id or core.model_id, body.inputs, param="adapter_id")
    ids = core.generator.encode(body.inputs)
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    max_tokens = core.generator.budget(len(ids), p.max_new_tokens, DEFAULT_NEW_TOKENS)
    params = core.generator.checked(body.sampling(max_tokens, stream))
    fields = {"endpoint": "tgi", "prompt": body.inputs, "truncate": p.truncate, **params.cache_fields()}
    return Job("tgi", ids, decision, params, fields)


class _Tokens:
    """TGI's token objects, from the engine's log-probabilities."""

    def __init__(self, core: AppState, p: TGIParameters) -> None:
        self.tokenizer, self.p = core.generator.tokenizer, p
        self.special = set(getattr(self.tokenizer, "all_special_ids", ()))

    def one(self, token: int, logprob: float | None, text: str | None = None) -> dict[str, Any]:
        return {"id": token, "text": self.tokenizer.decode([token]) if text is None else text, "logprob": logprob,
                "special": token in self.special}

    def generated(self, t: TokenLogprob, text: str | None = None) -> dict[str, Any]:
        out = self.one(t.token, t.logprob, text)
        if self.p.return_k_alternatives:
            out["alternative_tokens"] = [{"id": i, "text": self.tokenizer.decode([i]), "logprob": lp}
                                         for i, lp in t.top[: self.p.return_k_alternatives]]
        return out

    def top(self, t: TokenLogprob) -> list[dict[str, Any]]:
        return [self.one(i, lp) for i, lp in t.top[: self.p.top_n_tokens or 0]]


def _finish(r: Result) -> str:
    if r.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(r.stop_reason, str) else "eos_token"


def _text(body: TGIRequest, r: Result) -> str:
    return (body.inputs if body.parameters.return_full_text else "") + r.text


def _summary(job: Job, r: Result) -> dict[str, Any]:
    """What TGI's details and its stream's last event both say (LoRAX's ``prompt_tokens``, TGI's ``input_length``)."""
    return {"finish_reason": _finish(r), "prompt_tokens": r.prompt_tokens, "input_length": r.prompt_tokens,
            "generated_tokens": r.completion_tokens, "seed": job.params.seed}


def _details(body: TGIRequest, job: Job, r: Result, tokens: _Tokens) -> dict[str, Any]:
    out_tokens = [*r.logprobs, *([r.end] if r.end is not None else [])]
    prefill = []
    if body.parameters.decoder_input_details:
        prefill = [tokens.one(job.ids[0], None)] + [tokens.one(t.token, t.logprob) for t in r.prompt_logprobs]
    d: dict[str, Any] = {**_summary(job, r), "prefill": prefill, "tokens": [tokens.generated(t) for t in out_tokens],
                         "best_of_sequences": None}
    if body.parameters.top_n_tokens:
        d["top_tokens"] = [tokens.top(t) for t in out_tokens]
    return d


async def _whole(body: TGIRequest, core: AppState, request: Request) -> dict[str, Any]:
    job = await _job(body, core, stream=False)
    found = await pipeline.lookup(core, job)
    out = await unless_disconnected(request, pipeline.run(core, job, found))
    r = out.result
    reply: dict[str, Any] = {"generated_text": _text(body, r)}
    if body.parameters.details:
        reply["details"] = _details(body, job, r, _Tokens(core, body.parameters))
    return {**reply, "route": route_dict(job.decision), "cached": out.cached}


async def _stream(body: TGIRequest, core: AppState) -> StreamingResponse:
    job = await _job(body, core, stream=True)
    found = await pipeline.lookup(core, job)
    tokens = _Tokens(core, body.parameters)
    route = route_dict(job.decision)

    def event(index: int, t: TokenLogprob) -> dict[str, Any]:
        e: dict[str, Any] = {"index": index, "token": tokens.generated(t, ""), "generated_text": None,
                             "details": None, "route": route}
        if body.parameters.top_n_tokens:
            e["top_tokens"] = tokens.top(t)
        return e

    async def events() -> AsyncIterator[str]:
        held: dict[str, Any] | None = None  # the latest token's event: the last one carries text and details
        owed, index = "", 0
        try:
            async for text, lps, result in pipeline.stream(core, job, found):
                owed += text
                for t in lps:
                    if held is not None:
                        yield _sse(held)
                    index += 1
                    held = event(index, t)
                if result is None:
                    if held is not None and owed:  # safe text goes out with the token that completed it
                        held["token"]["text"], owed = held["token"]["text"] + owed, ""
                    continue
                if result.end is not None:
                    if held is not None:
                        yield _sse(held)
                    index += 1
                    held = event(index, result.end)
                if held is None:
                    raise GenerationFailed("the generation ended without a token")
                held["token"]["text"] += owed
                held["generated_text"] = _text(body, result)
                held["details"] = _summary(job, result)
                yield _sse(held)
        except GenerationFailed as e:
            yield _sse({"error": e.message, "error_type": "generation"})

    return StreamingResponse(events(), media_type="text/event-stream")


def _sse(obj: dict[str, Any]) -> str:
    return f"data:{json.dumps(obj)}\n\n"


@router.post("/generate")
async def generate(body: TGIRequest, core: Core, request: Request):
    return JSONResponse(await _whole(body, core, request))


@router.post("/generate_stream")
async def generate_stream(body: TGIRequest, core: Core):
    return await _stream(body, core)


@router.post("/")
async def compat_generate(body: TGIRequest, core: Core, request: Request):
    """TGI's root route: a stream when ``stream`` is true, else a list of one response."""
    if body.stream:
        return await _stream(body, core)
    return JSONResponse([await _whole(body, core, request)])


@router.get("/info")
async def info(core: Core) -> dict[str, Any]:
    s, gen = core.settings, core.generator
    return {"model_id": core.model_id, "model_dtype": str(core.engine.runner.dtype).replace("torch.", ""),
            "model_device_type": core.engine.runner.device.type, "max_total_tokens": gen.max_len,
            "max_input_length": gen.max_len - 1, "max_batch_size": s.max_batch_size, "max_best_of": 1,
            "max_stop_sequences": MAX_STOP, "max_concurrent_requests": s.max_queue,
            "adapters": core.registry.names(), "router": "clora-serve"}
