"""Response cache for deterministic requests: Redis when a URL is set, else an in-process LRU.

Contract:
- Only deterministic requests are cached (:func:`is_cacheable`: temperature 0, or a seed given).
- The key (:func:`cache_key`) covers the base-model fingerprint, the adapter name and version (re-registering
  an adapter bumps its version, so its old entries are never served) and the whole normalised request.
- Values are opaque bytes (the HTTP layer stores the full, non-streamed response body); entries larger than
  ``max_entry_bytes`` are not stored; every entry expires after ``ttl_s``.
- No method ever raises because of the cache: a Redis error or a call slower than ``redis_timeout_s`` makes
  ``get`` return None and ``set`` do nothing, counts the error, and opens a circuit that skips Redis for a
  backoff (doubling per failed probe up to a cap) before one probe request tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .settings import CacheConfig

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

KEY_PREFIX = "clora:rc:1:"  # bump the trailing number when the key layout changes
EXCLUDED_FIELDS = frozenset({"stream", "stream_options"})  # how the answer is delivered, not what it is


def _normalise(value: Any) -> Any:
    """JSON-ready form in which equal requests compare equal: ``1.0 == 1``, tuples are lists, None dropped."""
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        return value
    if hasattr(value, "model_dump"):  # a pydantic model
        return _normalise(value.model_dump())
    raise TypeError(f"cache_key: request value {value!r} of type {type(value).__name__} is not JSON data")


def cache_key(fingerprint: str, adapter: str, version: int | None, request: dict[str, Any]) -> str:
    """Key for one request: sha256 of the fingerprint, adapter name@version and the normalised request.

    ``request`` is the validated request with its defaults filled in (prompt or messages, every sampling
    parameter, seed). Top-level ``stream``/``stream_options`` are excluded, so a stream request and a plain one
    share an entry; ``None`` values are dropped and integral floats equal their ints. Raises ``TypeError`` only
    for values that are not JSON data (a programming error, not a runtime condition).
    """
    body = {k: v for k, v in request.items() if k not in EXCLUDED_FIELDS}
    doc = {"fingerprint": fingerprint, "adapter": adapter, "version": version, "request": _normalise(body)}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return KEY_PREFIX + hashlib.sha256(raw.encode("utf-8")).hexdigest()


def is_cacheable(temperature: float, seed: int | None) -> bool:
    """True when the output is a function of the request: greedy decoding, or sampling with a fixed seed."""
    return temperature == 0 or seed is not None


@runtime_checkable
class ResponseCache(Protocol):
    """What the HTTP layer uses. Implementations never raise from these methods."""

    backend: str

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None: ...


class _Counting:
    """Shared metric plumbing; ``metrics`` may be None (tests, tools)."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    def _hit(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_hit()

    def _miss(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_miss()

    def _error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_error(kind)

    def _skip(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_skip(reason)

    def _up(self, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.cache_up(up)


class MemoryCache(_Counting):
    """In-process LRU with per-entry TTL: at most ``max_entries`` entries of at most ``max_entry_bytes`` each."""

    backend = "memory"

    def __init__(self, max_entries: int, max_entry_bytes: int, ttl_s: float, metrics: Metrics | None = None,
                 clock: Any = time.monotonic) -> None:
        super().__init__(metrics)
        if max_entries < 1 or max_entry_bytes < 1 or ttl_s <= 0:
            raise ValueError("MemoryCache needs max_entries >= 1, max_entry_bytes >= 1 and ttl_s > 0")
        self.max_entries = max_entries
        self.max_entry_bytes = max_entry_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires_at, value)

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None or item[0] <= self._clock():
            if item is not None:
                del self._data[key]
            self._miss()
            return None
        self._data.move_to_end(key)
        self._hit()
        return item[1]

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self.max_entry_bytes:
            self._skip("too_large")
            return
        self._data[key] = (self._clock() + self.ttl_s, bytes(value))
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


class DisabledCache(_Counting):
    """The cache switched off (``cache_enabled=false``): every get misses, nothing is stored or counted."""

    backend = "disabled"

    def __init__(self) -> None:
        super().__init__(None)

    async def get(self, key: str) -> bytes | None:
        return None

    async def set(self, key: str, value: bytes) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisCache(_Counting):
    """Redis-backed cache behind a circuit breaker.

    Closed: every call goes to Redis, bounded by ``timeout_s``. A failure opens the circuit for ``backoff``
    seconds (starting at ``backoff_min_s``); while open, calls skip Redis (counted as ``circuit_open``). After
    the backoff one call probes Redis: success closes the circuit and resets the backoff; failure reopens it
    with the backoff doubled, up to ``backoff_max_s``.
    """

    backend = "redis"

    def __init__(self, url: str, ttl_s: int, max_entry_bytes: int, timeout_s: float,
                 metrics: Metrics | None = None, backoff_min_s: float = 0.25, backoff_max_s: float = 15.0) -> None:
        super().__init__(metrics)
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.timeout_s = timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        # No client-side retries: the circuit below is the retry policy, and each call must stay short.
        self._client = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False, health_check_interval=0,
        )
        self._open_until = 0.0  # monotonic time before which Redis is skipped; 0 = circuit closed
        self._backoff = backoff_min_s
        self._failing = False  # True from the first failure until a call succeeds again
        self._probing = False

    @property
    def available(self) -> bool:
        """False while the circuit is open (Redis is being skipped)."""
        return not self._failing

    def _admit(self) -> tuple[bool, bool]:
        """(may this call use Redis, is it the probe). While failing: one probe at a time, after the backoff."""
        if not self._failing:
            return True, False
        if self._probing or time.monotonic() < self._open_until:
            self._error("circuit_open")
            return False, False
        self._probing = True
        return True, True

    def _succeeded(self, probe: bool) -> None:
        if self._failing:
            log.info("response cache: redis at %s is back; circuit closed", self.url)
            self._up(True)
        self._failing = False
        self._backoff = self.backoff_min_s
        if probe:
            self._probing = False

    def _failed(self, exc: BaseException, probe: bool) -> bool:
        """Count the failure and update the circuit; True when this failure opened it."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if isinstance(exc, (asyncio.TimeoutError, RedisTimeoutError)):
            kind = "timeout"
        elif isinstance(exc, (RedisConnectionError, OSError)):
            kind = "connection"
        else:
            kind = "other"
        self._error(kind)
        if probe:
            self._probing = False
            self._backoff = min(self._backoff * 2, self.backoff_max_s)
            self._open_until = time.monotonic() + self._backoff
        elif not self._failing:  # first failure: open the circuit (later in-flight failures change nothing)
            log.warning("response cache: redis at %s failed (%s: %s: %s); serving without cache, retry in %.2fs",
                        self.url, kind, type(exc).__name__, exc, self._backoff)
            self._up(False)
            self._failing = True
            self._open_until = time.monotonic() + self._backoff
            return True
        return False

    async def _call(self, command: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """Run one Redis command under the circuit and the timeout; (ok, result)."""
        admitted, probe = self._admit()
        if not admitted:
            return False, None
        try:
            # socket timeouts bound each socket op; wait_for bounds the whole call (connect + DNS included).
            result = await asyncio.wait_for(command(), timeout=self.timeout_s * 2)
        except Exception as exc:  # noqa: BLE001 - the cache never fails a request
            if self._failed(exc, probe):  # just opened: idle pooled connections are likely dead too
                await self._drop_idle_connections()
            return False, None
        if probe:  # Redis is back: pooled connections from before the outage are dead sockets, drop them
            await self._drop_idle_connections()
        self._succeeded(probe)
        return True, result

    async def _drop_idle_connections(self) -> None:
        try:
            pool = self._client.connection_pool
            await asyncio.wait_for(pool.disconnect(inuse_connections=False), timeout=self.timeout_s * 2)
        except Exception:  # noqa: BLE001
            log.debug("response cache: dropping pooled redis connections failed", exc_info=True)

    async def get(self, key: str) -> bytes | None:
        ok, value = await self._call(lambda: self._client.get(key))
        if not ok:
            return None
        if value is None:
            self._miss()
            return None
        self._hit()
        return bytes(value)

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self.max_entry_bytes:
            self._skip("too_large")
            return
        data = bytes(value)
        await self._call(lambda: self._client.set(key, data, ex=self.ttl_s))

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._client.aclose(), timeout=max(self.timeout_s * 2, 1.0))
        except Exception:  # noqa: BLE001
            log.debug("response cache: closing redis client failed", exc_info=True)


def make_cache(cfg: CacheConfig, metrics: Metrics | None = None) -> ResponseCache:
    """The cache ``cfg`` asks for: disabled, Redis (``redis_url`` set) or the in-process LRU."""
    if not cfg.enabled:
        return DisabledCache()
    if cfg.redis_url:
        return RedisCache(cfg.redis_url, cfg.ttl_s, cfg.max_entry_bytes, cfg.redis_timeout_s, metrics)
    return MemoryCache(cfg.max_entries, cfg.max_entry_bytes, cfg.ttl_s, metrics)
