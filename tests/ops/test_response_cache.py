"""Response cache: key normalisation, the in-process LRU, and Redis (real redis-server) including outages."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from server.metrics import Metrics
from server.response_cache import (
    DisabledCache,
    MemoryCache,
    RedisCache,
    ResponseCache,
    cache_key,
    is_cacheable,
    make_cache,
)
from server.settings import Settings

from .services import RedisProcess, free_port

FP = "sha256:base-fingerprint"
REQUEST: dict[str, Any] = {
    "model": "adapter-a",
    "messages": [{"role": "user", "content": "What is LoRA?"}],
    "max_tokens": 32,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "seed": None,
    "stop": ["\n\n"],
    "stream": False,
}


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# ---------------------------------------------------------------------------------------------- keys
def test_key_is_stable_and_ignores_order_stream_and_number_spelling() -> None:
    base = cache_key(FP, "adapter-a", 3, REQUEST)
    assert base == cache_key(FP, "adapter-a", 3, dict(reversed(list(REQUEST.items()))))
    assert base == cache_key(FP, "adapter-a", 3, {**REQUEST, "stream": True, "stream_options": {"include_usage": True}})
    assert base == cache_key(FP, "adapter-a", 3, {**REQUEST, "temperature": 0, "max_tokens": 32.0})
    assert base == cache_key(FP, "adapter-a", 3, {k: v for k, v in REQUEST.items() if k != "seed"})  # None = absent


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 40}, {"max_tokens": 33}, {"seed": 1}, {"seed": 2},
        {"stop": ["\n"]}, {"stop": None}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.1},
        {"repetition_penalty": 1.1}, {"logit_bias": {"42": -100}}, {"n": 2}, {"model": "auto"},
        {"messages": [{"role": "user", "content": "What is LoRA? "}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is LoRA?"}]},
        {"prompt": "What is LoRA?"},
    ],
    ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_key_changes_with_every_request_field(change: dict[str, Any]) -> None:
    assert cache_key(FP, "adapter-a", 3, {**REQUEST, **change}) != cache_key(FP, "adapter-a", 3, REQUEST)


@pytest.mark.parametrize(
    "other",
    [("sha256:other-base", "adapter-a", 3), (FP, "adapter-b", 3), (FP, "adapter-a", 4), (FP, "adapter-a", None),
     (FP, "__base__", None)],
)
def test_key_changes_with_fingerprint_adapter_and_version(other: tuple[str, str, int | None]) -> None:
    assert cache_key(*other, REQUEST) != cache_key(FP, "adapter-a", 3, REQUEST)


def test_key_rejects_non_json_values() -> None:
    with pytest.raises(TypeError, match="not JSON data"):
        cache_key(FP, "a", 1, {"prompt": object()})


@pytest.mark.parametrize(
    ("temperature", "seed", "expected"),
    [(0.0, None, True), (0, None, True), (0.0, 7, True), (0.7, 7, True), (0.7, 0, True), (0.7, None, False),
     (1e-6, None, False)],
)
def test_is_cacheable(temperature: float, seed: int | None, expected: bool) -> None:
    assert is_cacheable(temperature, seed) is expected


# ------------------------------------------------------------------------------------------- factory
@pytest.mark.parametrize(
    ("overrides", "backend", "cls"),
    [({}, "memory", MemoryCache), ({"redis_url": "redis://127.0.0.1:1/0"}, "redis", RedisCache),
     ({"redis_url": ""}, "memory", MemoryCache), ({"cache_enabled": False}, "disabled", DisabledCache)],
)
async def test_make_cache_picks_backend(overrides: dict[str, Any], backend: str, cls: type) -> None:
    cache = make_cache(Settings(**overrides).cache, Metrics())
    try:
        assert isinstance(cache, cls) and isinstance(cache, ResponseCache)
        assert cache.backend == backend
    finally:
        await cache.close()


# --------------------------------------------------------------------------------------- memory LRU
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_lru_evicts_least_recently_used() -> None:
    metrics = Metrics()
    cache = MemoryCache(max_entries=3, max_entry_bytes=100, ttl_s=60, metrics=metrics)
    for k in "abc":
        await cache.set(k, k.encode())
    assert await cache.get("a") == b"a"  # a is now the most recently used
    await cache.set("d", b"d")  # evicts b
    assert len(cache) == 3
    assert await cache.get("b") is None
    assert [await cache.get(k) for k in "acd"] == [b"a", b"c", b"d"]
    await cache.set("c", b"c2")  # overwrite refreshes recency, does not grow
    await cache.set("e", b"e")  # evicts a (order now: d, c, e)
    assert await cache.get("a") is None
    assert await cache.get("c") == b"c2"
    assert sample(metrics, "clora_cache_hits_total") == 5
    assert sample(metrics, "clora_cache_misses_total") == 2


async def test_memory_ttl_and_max_entry_size() -> None:
    metrics, clock = Metrics(), FakeClock()
    cache = MemoryCache(max_entries=10, max_entry_bytes=8, ttl_s=5, metrics=metrics, clock=clock)
    await cache.set("k", b"12345678")
    await cache.set("big", b"123456789")
    assert await cache.get("big") is None
    assert sample(metrics, "clora_cache_skipped_total", {"reason": "too_large"}) == 1
    clock.now += 4.9
    assert await cache.get("k") == b"12345678"
    clock.now += 0.2
    assert await cache.get("k") is None
    assert len(cache) == 0


async def test_disabled_cache_never_stores() -> None:
    cache = DisabledCache()
    await cache.set("k", b"v")
    assert await cache.get("k") is None


# -------------------------------------------------------------------------------------------- redis
async def test_redis_roundtrip_ttl_and_max_entry_size(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_s=1, max_entry_bytes=64, timeout_s=1.0, metrics=metrics)
    raw = Redis.from_url(redis_server.url)
    try:
        key = cache_key(FP, "adapter-a", 1, REQUEST)
        assert await cache.get(key) is None
        await cache.set(key, b'{"text": "hi"}')
        assert await cache.get(key) == b'{"text": "hi"}'
        assert 0 < await raw.pttl(key) <= 1000  # stored with the configured TTL
        await cache.set("big", b"x" * 65)
        assert await raw.exists("big") == 0
        assert sample(metrics, "clora_cache_skipped_total", {"reason": "too_large"}) == 1
        assert sample(metrics, "clora_cache_hits_total") == 1
        assert sample(metrics, "clora_cache_misses_total") == 1
        deadline = time.monotonic() + 5
        while await cache.get(key) is not None:  # expires after ~1 s
            assert time.monotonic() < deadline, "entry did not expire"
            await asyncio.sleep(0.1)
        assert sample(metrics, "clora_cache_errors_total", {"kind": "connection"}) == 0
    finally:
        await raw.aclose()
        await cache.close()


async def test_redis_killed_mid_use_then_reconnects(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_s=60, max_entry_bytes=1024, timeout_s=0.5, metrics=metrics,
                       backoff_min_s=0.05, backoff_max_s=0.4)
    try:
        await cache.set("k", b"v1")
        assert await cache.get("k") == b"v1"

        redis_server.kill()
        assert await cache.get("k") is None  # no exception, served without cache
        await cache.set("k", b"v2")  # no-op, no exception
        assert not cache.available
        failed = sum(sample(metrics, "clora_cache_errors_total", {"kind": k}) for k in ("connection", "timeout"))
        assert failed >= 1
        assert sample(metrics, "clora_cache_backend_up") == 0
        # While the circuit is open, calls skip Redis and are counted as bypassed.
        for _ in range(5):
            assert await cache.get("k") is None
        assert sample(metrics, "clora_cache_errors_total", {"kind": "circuit_open"}) >= 1

        redis_server.start()  # same port, empty data set
        deadline = time.monotonic() + 10
        while True:
            await cache.set("k", b"v3")
            if await cache.get("k") == b"v3":
                break
            assert time.monotonic() < deadline, "cache did not reconnect to redis within 10 s"
            await asyncio.sleep(0.05)
        assert cache.available
        assert sample(metrics, "clora_cache_backend_up") == 1
    finally:
        await cache.close()


async def test_redis_slow_call_times_out_without_raising(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_s=60, max_entry_bytes=1024, timeout_s=0.1, metrics=metrics,
                       backoff_min_s=0.05, backoff_max_s=0.2)
    admin = Redis.from_url(redis_server.url)
    try:
        await cache.set("k", b"v")
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # the server stalls every other client
        assert await cache.get("k") is None
        assert sample(metrics, "clora_cache_errors_total", {"kind": "timeout"}) >= 1
        deadline = time.monotonic() + 10
        while await cache.get("k") != b"v":  # after the pause, the circuit closes again
            assert time.monotonic() < deadline, "cache did not recover after the pause"
            await asyncio.sleep(0.05)
    finally:
        await admin.aclose()
        await cache.close()


async def test_redis_unreachable_from_the_start() -> None:
    metrics = Metrics()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    cache = make_cache(Settings(redis_url=url, redis_timeout_s=0.2).cache, metrics)
    try:
        for _ in range(3):
            assert await cache.get("k") is None
            await cache.set("k", b"v")
        assert sample(metrics, "clora_cache_errors_total", {"kind": "connection"}) >= 1
        assert sample(metrics, "clora_cache_hits_total") == 0
    finally:
        await cache.close()


async def test_redis_concurrent_requests_survive_a_kill(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_s=60, max_entry_bytes=1024, timeout_s=0.2, metrics=metrics,
                       backoff_min_s=0.05, backoff_max_s=0.2)

    async def client(i: int) -> int:
        served = 0
        for j in range(40):
            key = f"k{i}:{j % 5}"
            if await cache.get(key) is None:
                await cache.set(key, b"x")
            served += 1
            await asyncio.sleep(0.005)
        return served

    try:
        tasks = [asyncio.create_task(client(i)) for i in range(16)]
        await asyncio.sleep(0.05)
        redis_server.kill()
        results = await asyncio.gather(*tasks)  # any exception would propagate here
        assert results == [40] * 16

        redis_server.start()
        deadline = time.monotonic() + 10
        while not (await cache.set("probe", b"1") is None and await cache.get("probe") == b"1"):
            assert time.monotonic() < deadline, "cache did not reconnect to redis within 10 s"
            await asyncio.sleep(0.05)
        # After recovery no stale pooled connection fails a call: the circuit stays closed under load.
        errors_before = sample(metrics, "clora_cache_errors_total", {"kind": "connection"})
        assert await asyncio.gather(*(client(i) for i in range(16))) == [40] * 16
        assert sample(metrics, "clora_cache_errors_total", {"kind": "connection"}) == errors_before
        assert cache.available
    finally:
        await cache.close()


async def test_redis_recovery_drops_connections_pooled_before_the_outage(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_s=60, max_entry_bytes=1024, timeout_s=0.5, metrics=metrics,
                       backoff_min_s=0.05, backoff_max_s=0.1)
    try:
        await asyncio.gather(*(cache.set(f"k{i}", b"v") for i in range(16)))  # fills the pool with connections
        redis_server.kill()
        assert await cache.get("k0") is None  # one failure opens the circuit; the other connections stay idle
        redis_server.start()
        deadline = time.monotonic() + 10
        while await cache.set("probe", b"1") is None and await cache.get("probe") != b"1":
            assert time.monotonic() < deadline, "cache did not reconnect to redis within 10 s"
            await asyncio.sleep(0.05)
        errors_before = sample(metrics, "clora_cache_errors_total", {"kind": "connection"})
        for _ in range(3):
            assert await asyncio.gather(*(cache.get(f"k{i}") for i in range(16))) == [None] * 16
        assert sample(metrics, "clora_cache_errors_total", {"kind": "connection"}) == errors_before
        assert sample(metrics, "clora_cache_misses_total") >= 48
    finally:
        await cache.close()
