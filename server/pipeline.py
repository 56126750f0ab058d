"""One request's way after parsing: cache lookup, generation (whole or streamed), cache store, metrics.

Shared by the OpenAI endpoints and ``/v1/generate``; they only differ in how they parse and format.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from router.base import BASE_ADAPTER, Decision

from .engine.requests import Delta, Done
from .engine.sampling import SamplingParams, TokenLogprob
from .errors import status_of
from .generation import Result
from .response_cache import cache_key, is_cacheable
from .state import AppState

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A routed, tokenized request ready to run."""

    endpoint: str
    ids: list[int]
    decision: Decision
    params: SamplingParams
    request_fields: dict[str, Any]  # the normalised request, for the cache key
    started: float = field(default_factory=time.perf_counter)

    @property
    def adapter_label(self) -> str:
        return self.decision.adapter


@dataclass
class Outcome:
    result: Result
    cached: bool


def route_dict(d: Decision) -> dict[str, Any]:
    return {"adapter": d.adapter, "version": d.version, "method": d.method, "confidence": round(d.confidence, 4)}


def _key(core: AppState, job: Job) -> str | None:
    p = job.params
    if not core.settings.cache.enabled or not is_cacheable(p.temperature, p.seed):
        return None
    version = job.decision.version if job.decision.adapter != BASE_ADAPTER else None
    fields = dict(job.request_fields, max_tokens=p.max_tokens)
    return cache_key(core.loaded.fingerprint, job.decision.adapter, version, fields)


async def _lookup(core: AppState, key: str | None) -> dict | None:
    if key is None:
        return None
    raw = await core.cache.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


async def _store(core: AppState, key: str | None, deltas: list[str], result: Result) -> None:
    if key is None or result.finish_reason == "cancelled":
        return
    body = {"deltas": deltas, "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "logprobs": _stored(result.logprobs),
            "prompt_logprobs": _stored(result.prompt_logprobs), "stop_reason": result.stop_reason,
            "end": _stored((result.end,) if result.end else ())}
    await core.cache.set(key, json.dumps(body).encode())


def _stored(lps: tuple[TokenLogprob, ...]) -> list:
    return [[t.token, t.logprob, [list(p) for p in t.top], t.rank] for t in lps]


def _loaded(stored: list) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(t, lp, tuple((i, v) for i, v in top), *rank) for t, lp, top, *rank in stored)


def _from_cache(hit: dict) -> Result:
    return Result("".join(hit["deltas"]), hit["finish_reason"], hit["prompt_tokens"], hit["completion_tokens"],
                  {"cached": 1.0}, _loaded(hit.get("logprobs", [])), _loaded(hit.get("prompt_logprobs", [])),
                  hit.get("stop_reason"), next(iter(_loaded(hit.get("end", []))), None))


def _observe(core: AppState, job: Job, result: Result | None, status: int) -> None:
    m = core.metrics
    m.request_done(job.endpoint, job.adapter_label, job.decision.method, status, time.perf_counter() - job.started)
    if result is not None:
        m.tokens(job.adapter_label, result.prompt_tokens, result.completion_tokens)


@dataclass
class Lookup:
    key: str | None
    hit: dict | None


async def lookup(core: AppState, job: Job) -> Lookup:
    """Cache lookup first, so a handler knows (and can say in headers) whether this is a hit."""
    key = _key(core, job)
    return Lookup(key, await _lookup(core, key))


async def run(core: AppState, job: Job, found: Lookup) -> Outcome:
    """Generate the whole answer (or serve it from the cache)."""
    key, hit = found.key, found.hit
    if hit is not None:
        result = _from_cache(hit)
        _observe(core, job, result, 200)
        return Outcome(result, True)
    try:
        result = None
        async for ev in core.generator.stream(job.ids, job.decision, job.params, deltas=False):
            if isinstance(ev, Done):
                result = Result.of(ev)
    except Exception as e:
        _observe(core, job, None, status_of(e))
        raise
    assert result is not None
    await _store(core, key, [result.text] if result.text else [], result)
    _observe(core, job, result, 200)
    return Outcome(result, False)


Piece = tuple[str, tuple[TokenLogprob, ...], Result | None]


async def stream(core: AppState, job: Job, found: Lookup) -> AsyncIterator[Piece]:
    """Yield ``(delta, its tokens' logprobs, None)`` pieces, then ``("", logprobs not sent yet, result)`` once (the
    logprobs of all pieces make ``result.logprobs``). A cache hit replays its stored pieces."""
    key, hit = found.key, found.hit
    if hit is not None:
        for d in hit["deltas"]:
            yield d, (), None
        result = _from_cache(hit)
        _observe(core, job, result, 200)
        yield "", result.logprobs, result
        return
    deltas: list[str] = []
    sent = 0
    try:
        async for ev in core.generator.stream(job.ids, job.decision, job.params):
            if isinstance(ev, Delta):
                if ev.text:
                    deltas.append(ev.text)
                    sent += len(ev.logprobs)
                    yield ev.text, ev.logprobs, None
            elif isinstance(ev, Done):
                result = Result.of(ev)
                await _store(core, key, deltas, result)
                _observe(core, job, result, 200)
                yield "", result.logprobs[sent:], result
                return
    except BaseException as e:
        _observe(core, job, None, status_of(e))
        raise


def samples(job: Job, n: int) -> list[Job]:
    """The ``n`` jobs of a request asking for ``n`` choices: choice i samples with ``seed + i`` when a seed is
    given (so choice 0 is what ``n=1`` gives), greedy ones are alike."""
    if n == 1:
        return [job]
    p = job.params
    seeds = [None if p.seed is None else p.seed + i for i in range(n)]
    return [replace(job, params=replace(p, seed=s), request_fields={**job.request_fields, "seed": s}) for s in seeds]


async def _merged(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """The pieces of several streams as they come, each with its stream's index; closing this closes them all."""
    if len(streams) == 1:
        async for piece in streams[0]:
            yield 0, piece
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                await q.put((i, piece))
            await q.put((i, end))
        except Exception as e:  # noqa: BLE001 (re-raised by the consumer)
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def run_all(core: AppState, jobs: list[Job], founds: list[Lookup]) -> list[Outcome]:
    """``run`` for every choice of a request, side by side; one failing (or this being cancelled) stops the rest."""
    tasks = [asyncio.ensure_future(run(core, j, f)) for j, f in zip(jobs, founds)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


def stream_all(core: AppState, jobs: list[Job], founds: list[Lookup]) -> AsyncIterator[tuple[int, Piece]]:
    """``stream`` for every choice of a request, pieces merged as they come, each with its choice's index."""
    return _merged([stream(core, j, f) for j, f in zip(jobs, founds)])
