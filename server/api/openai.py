"""OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` (the official client works unchanged).

Each response carries the extra field ``route: {adapter, version, method, confidence}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import pipeline
from ..deps import Core
from ..generation import Result
from ..pipeline import Job, route_dict
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..state import AppState
from .disconnect import unless_disconnected
from .logprobs import LogprobFormatter

router = APIRouter(prefix="/v1")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # chat default, capped by the room left in the context


def _usage(results: list[Result]) -> dict[str, int]:
    """One prompt, however many choices: its tokens count once."""
    prompt, completion = results[0].prompt_tokens, sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _headers(founds: list[pipeline.Lookup]) -> dict[str, str]:
    if founds[0].key is None:
        return {"X-Cache": "bypass"}
    return {"X-Cache": "hit" if all(f.hit is not None for f in founds) else "miss"}


def _choice(i: int, r: Result, fmt: LogprobFormatter | None, prompt_ids: list[int], chat: bool,
            echo: str) -> dict[str, Any]:
    logprobs = None
    if fmt is not None:
        prompt = fmt.prompt(prompt_ids, r.prompt_logprobs) if echo else None  # first: text offsets run on
        logprobs = fmt(r.logprobs)
        if prompt is not None:
            logprobs = {k: prompt[k] + logprobs[k] for k in logprobs}
    choice: dict[str, Any] = {"index": i, "finish_reason": r.finish_reason, "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": r.text}
    else:
        choice["text"] = echo + r.text
    return choice


async def _respond(request: Request, core: AppState, job: Job, model: str, chat: bool, include_usage: bool,
                   stream: bool, n: int = 1, echo: str = "") -> JSONResponse | StreamingResponse:
    """``n`` choices; ``echo``: the prompt, which a completion then starts with (and, with logprobs, its tokens'
    logprobs)."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    jobs = pipeline.samples(job, n)
    founds = [await pipeline.lookup(core, j) for j in jobs]
    route = route_dict(job.decision)

    def formatter() -> LogprobFormatter | None:
        return LogprobFormatter(core.generator.tokenizer, chat) if job.params.logprobs is not None else None

    if not stream:
        outs = await unless_disconnected(request, pipeline.run_all(core, jobs, founds))
        choices = [_choice(i, out.result, formatter(), job.ids, chat, echo) for i, out in enumerate(outs)]
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
                "usage": _usage([o.result for o in outs]), "route": route, "cached": all(o.cached for o in outs)}
        return JSONResponse(body, headers=_headers(founds))

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    fmts = [formatter() for _ in jobs]
    cached = all(f.hit is not None for f in founds)

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False, lps: tuple = ()) -> dict[str, Any]:
        fmt = fmts[i]
        c: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": fmt(lps) if fmt and lps else None}
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text:
                delta["content"] = text
            c["delta"] = delta
        else:
            c["text"] = text or ""
        return {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [c],
                "route": route, "cached": cached}

    async def events() -> AsyncIterator[str]:
        for i in range(len(jobs)):
            if chat:
                yield _sse(chunk(i, None, None, first=True))
            if echo:
                yield _sse(chunk(i, echo, None))
        results = []
        async for i, (text, lps, result) in pipeline.stream_all(core, jobs, founds):
            if result is None:
                yield _sse(chunk(i, text, None, lps=lps))
                continue
            yield _sse(chunk(i, None, result.finish_reason, lps=lps))
            results.append(result)
        if include_usage:
            yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [],
                        "usage": _usage(results), "route": route})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(founds))


@router.post("/completions")
async def completions(body: CompletionRequest, core: Core, request: Request):
    text = core.generator.prompt_text(body.prompt)
    decision = await core.routing.decide_async(body.task or body.model, text)
    ids = core.generator.prompt_ids(body.prompt)
    max_tokens = core.generator.budget(len(ids), body.max_tokens, DEFAULT_COMPLETION_TOKENS)
    fields = {"endpoint": "completions", "prompt": body.prompt, **body.cache_fields()}
    job = Job("completions", ids, decision, core.generator.checked(body.sampling(max_tokens)), fields)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, core, job, body.model, False, include_usage, body.stream, body.n,
                          text if body.echo else "")


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, core: Core, request: Request):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    prompt = core.generator.chat_prompt(messages)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), prompt)
    decision = await core.routing.decide_async(body.task or body.model, last_user)
    ids = core.generator.encode_chat(prompt)
    max_tokens = core.generator.budget(len(ids), body.max_tokens, DEFAULT_CHAT_TOKENS)
    fields = {"endpoint": "chat", "messages": messages, **body.cache_fields()}
    job = Job("chat", ids, decision, core.generator.checked(body.sampling(max_tokens)), fields)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, core, job, body.model, True, include_usage, body.stream, body.n)
