"""OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` (the official client works unchanged).

Each response carries the extra field ``route: {adapter, version, method, confidence}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import pipeline
from ..deps import Core
from ..generation import Result
from ..pipeline import Job, route_dict
from ..schemas import ChatCompletionRequest, CompletionRequest, chat_messages
from ..state import AppState
from .disconnect import unless_disconnected
from .logprobs import LogprobFormatter, vllm_prompt_logprobs

router = APIRouter(prefix="/v1")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # chat default, capped by the room left in the context


def _usage(results: list[Result], prompts: int) -> dict[str, int]:
    """``results``: the choices of ``prompts`` prompts, each prompt's first; a prompt's tokens count once."""
    n = len(results) // prompts
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _headers(founds: list[pipeline.Lookup]) -> dict[str, str]:
    if founds[0].key is None:
        return {"X-Cache": "bypass"}
    return {"X-Cache": "hit" if all(f.hit is not None for f in founds) else "miss"}


def _choice(i: int, r: Result, fmt: LogprobFormatter | None, prompt_ids: list[int], chat: bool,
            echo: str, k: int | None) -> dict[str, Any]:
    """``k``: the alternatives the request asked for with each output token (and, with echo, prompt token)."""
    logprobs = None
    if fmt is not None:
        prompt = fmt.prompt(prompt_ids, r.prompt_logprobs, k or 0) if echo else None  # first: offsets run on
        logprobs = fmt(r.logprobs)
        if prompt is not None:
            logprobs = {k: prompt[k] + logprobs[k] for k in logprobs}
    choice: dict[str, Any] = {"index": i, "finish_reason": r.finish_reason, "stop_reason": r.stop_reason,
                              "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": r.text}
    else:
        choice["text"] = echo + r.text
    return choice


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request, ready to run: its job, and the text its choices start with (``echo``)."""

    job: Job
    echo: str = ""


async def _respond(request: Request, core: AppState, prompts: list[Prompt], model: str, chat: bool,
                   include_usage: bool, stream: bool, n: int = 1,
                   prompt_logprobs: int | None = None) -> JSONResponse | StreamingResponse:
    """``n`` choices of every prompt, prompt p's choice i at index ``p·n + i`` (OpenAI's order); each says where
    it was routed. With ``echo``, a completion starts with its prompt (and, with logprobs, has its tokens').
    ``prompt_logprobs``: vLLM's, with this many alternatives (not streamed): in each choice, or for chat in the
    response."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    jobs = [j for p in prompts for j in pipeline.samples(p.job, n)]
    of = [p for p in prompts for _ in range(n)]  # each choice's prompt
    founds = [await pipeline.lookup(core, j) for j in jobs]
    route = route_dict(prompts[0].job.decision)
    routes = [route_dict(p.job.decision) for p in of]

    def formatter() -> LogprobFormatter | None:
        return LogprobFormatter(core.generator.tokenizer, chat) if jobs[0].params.logprobs is not None else None

    if not stream:
        outs = await unless_disconnected(request, pipeline.run_all(core, jobs, founds))
        k = jobs[0].params.logprobs
        choices = [{**_choice(i, out.result, formatter(), of[i].job.ids, chat, of[i].echo, k), "route": routes[i]}
                   for i, out in enumerate(outs)]
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
                "usage": _usage([o.result for o in outs], len(prompts)), "route": route,
                "cached": all(o.cached for o in outs)}
        if prompt_logprobs is not None:
            scores = [vllm_prompt_logprobs(core.generator.tokenizer, o.result.prompt_logprobs, prompt_logprobs)
                      for o in outs]
            if chat:
                body["prompt_logprobs"] = scores[0]
            else:
                for c, s in zip(choices, scores):
                    c["prompt_logprobs"] = s
        return JSONResponse(body, headers=_headers(founds))

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    fmts = [formatter() for _ in jobs]
    cached = all(f.hit is not None for f in founds)

    def chunk(i: int, text: str | None, done: Result | None = None, first: bool = False,
              lps: tuple = ()) -> dict[str, Any]:
        fmt = fmts[i]
        c: dict[str, Any] = {"index": i, "finish_reason": done and done.finish_reason,
                             "stop_reason": done and done.stop_reason, "logprobs": fmt(lps) if fmt and lps else None}
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text:
                delta["content"] = text
            c["delta"] = delta
        else:
            c["text"] = text or ""
        c["route"] = routes[i]
        return {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [c],
                "route": route, "cached": cached}

    async def events() -> AsyncIterator[str]:
        for i in range(len(jobs)):
            if chat:
                yield _sse(chunk(i, None, first=True))
            if of[i].echo:
                yield _sse(chunk(i, of[i].echo))
        results: list[Result | None] = [None] * len(jobs)
        async for i, (text, lps, result) in pipeline.stream_all(core, jobs, founds):
            if result is None:
                yield _sse(chunk(i, text, lps=lps))
                continue
            yield _sse(chunk(i, None, result, lps=lps))
            results[i] = result
        if include_usage:
            yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [],
                        "usage": _usage([r for r in results if r is not None], len(prompts)), "route": route})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(founds))


@router.post("/completions")
async def completions(body: CompletionRequest, core: Core, request: Request):
    prompts = []
    for prompt in body.prompt:  # a list once parsed; each prompt is routed on its own text
        text = core.generator.prompt_text(prompt)
        decision = await core.routing.decide_async(body.task or body.model, text)
        ids = core.generator.prompt_ids(prompt)
        max_tokens = core.generator.budget(len(ids), body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        fields = {"endpoint": "completions", "prompt": prompt, **body.cache_fields()}
        job = Job("completions", ids, decision, core.generator.checked(body.sampling(max_tokens)), fields)
        prompts.append(Prompt(job, text if body.echo else ""))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, core, prompts, body.model, False, include_usage, body.stream, body.n,
                          body.prompt_logprobs)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, core: Core, request: Request):
    messages = chat_messages(body.messages)
    prompt = core.generator.chat_prompt(messages, body.add_generation_prompt, body.continue_final_message)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), prompt)
    decision = await core.routing.decide_async(body.task or body.model, last_user)
    ids = core.generator.encode_chat(prompt)
    max_tokens = core.generator.budget(len(ids), body.max_tokens, DEFAULT_CHAT_TOKENS)
    fields = {"endpoint": "chat", "prompt": prompt, **body.cache_fields()}  # the rendered turn: keys every option
    job = Job("chat", ids, decision, core.generator.checked(body.sampling(max_tokens)), fields)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, core, [Prompt(job)], body.model, True, include_usage, body.stream, body.n,
                          body.prompt_logprobs)
