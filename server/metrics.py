"""Every Prometheus metric of clora-serve, and the hook methods that update them.

Contract:
- All metric names start with ``clora_`` and are documented in ``docs/metrics.md`` (keep the two in step).
- Each :class:`Metrics` owns its own ``CollectorRegistry``, so several apps in one process never collide.
- Hook methods never raise: a failure is logged (with its traceback) and swallowed, so a metrics bug can never
  fail a request or stall the engine loop.
- Adapter label values come only from an allow-list (:meth:`Metrics.set_known_adapters`, plus the reserved
  ``__base__``); anything else is recorded as ``__other__``, so a client can never mint new time series.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import ParamSpec

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"
OTHER_ADAPTER = "__other__"

# Buckets for a CPU server: a cache hit is a few ms, a long CPU generation tens of seconds.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROWS_BUCKETS = (1, 2, 4, 6, 8, 10, 12, 14, 16, 24, 32, 48, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

P = ParamSpec("P")


def _hook(fn: Callable[P, None]) -> Callable[P, None]:
    """Wrap a hook so that any exception is logged and swallowed (metrics must never fail a request)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - by contract a hook never raises
            log.warning("metrics hook %s failed (ignored)", fn.__name__, exc_info=True)

    return wrapper


class Metrics:
    """The server's metrics on a private registry; update them only through the hook methods."""

    def __init__(self, known_adapters: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._known: frozenset[str] = frozenset()
        self.set_known_adapters(known_adapters)
        reg = self.registry

        self._requests = Counter(
            "clora_requests", "Finished HTTP requests.", ("endpoint", "adapter", "method", "status"), registry=reg
        )
        self._latency = Histogram(
            "clora_request_latency_seconds", "End-to-end request latency (arrival to last byte).",
            ("endpoint", "adapter"), buckets=LATENCY_BUCKETS, registry=reg,
        )
        self._ttft = Histogram(
            "clora_ttft_seconds", "Time from arrival to the first generated token.", ("adapter",),
            buckets=TTFT_BUCKETS, registry=reg,
        )
        self._inter_token = Histogram(
            "clora_inter_token_latency_seconds", "Time between consecutive generated tokens of one request.",
            ("adapter",), buckets=INTER_TOKEN_BUCKETS, registry=reg,
        )
        self._queue_wait = Histogram(
            "clora_queue_wait_seconds", "Time a request waited in the scheduler queue before admission.",
            buckets=QUEUE_WAIT_BUCKETS, registry=reg,
        )
        self._prompt_tokens = Counter("clora_prompt_tokens", "Prompt tokens processed.", ("adapter",), registry=reg)
        self._generated_tokens = Counter(
            "clora_generated_tokens", "Tokens generated.", ("adapter",), registry=reg
        )
        self._running = Gauge("clora_requests_running", "Requests being decoded now.", registry=reg)
        self._waiting = Gauge("clora_requests_waiting", "Requests waiting in the scheduler queue.", registry=reg)
        self._batch_size = Gauge("clora_batch_size", "Rows in the latest engine step.", registry=reg)
        self._decode_rows = Histogram(
            "clora_decode_step_rows", "Rows decoded together per engine step (batch occupancy).",
            buckets=ROWS_BUCKETS, registry=reg,
        )
        self._resident = Gauge(
            "clora_adapters_resident", "Adapters resident per tier (cpu, slot).", ("tier",), registry=reg
        )
        self._slot_rows = Gauge(
            "clora_slot_rank_rows", "Rank rows of the compute slots (CLORA_MAX_LORAS x CLORA_MAX_LORA_RANK), used "
            "by resident adapters or free.", ("state",), registry=reg
        )
        self._loads = Counter(
            "clora_adapter_loads", "Adapter loads into a tier.", ("adapter", "tier"), registry=reg
        )
        self._evictions = Counter(
            "clora_adapter_evictions", "Adapters evicted from a tier.", ("tier",), registry=reg
        )
        self._load_seconds = Histogram(
            "clora_adapter_load_seconds", "Time to load one adapter into a tier.", ("tier",),
            buckets=LOAD_BUCKETS, registry=reg,
        )
        self._routing = Counter(
            "clora_routing_decisions", "Routing decisions by method.", ("method",), registry=reg
        )
        self._confidence = Histogram(
            "clora_routing_confidence", "Router confidence of each decision.", ("method",),
            buckets=CONFIDENCE_BUCKETS, registry=reg,
        )
        self._cache_hits = Counter("clora_cache_hits", "Response cache hits.", registry=reg)
        self._cache_misses = Counter("clora_cache_misses", "Response cache misses.", registry=reg)
        self._cache_errors = Counter(
            "clora_cache_errors", "Response cache operations that failed or were bypassed.", ("kind",),
            registry=reg,
        )
        self._cache_skipped = Counter(
            "clora_cache_skipped", "Responses not stored in the cache.", ("reason",), registry=reg
        )
        self._cache_up = Gauge(
            "clora_cache_backend_up", "1 while the cache backend is usable, 0 while its circuit is open.",
            registry=reg,
        )
        self._cache_up.set(1)

    # -- labels -----------------------------------------------------------------------------------------------
    def set_known_adapters(self, names: Iterable[str]) -> None:
        """Replace the adapter label allow-list (``__base__`` is always allowed)."""
        self._known = frozenset(names) | {BASE_ADAPTER}

    def adapter_label(self, name: str) -> str:
        """The label value recorded for ``name``: itself when registered, else ``__other__``."""
        return name if name in self._known else OTHER_ADAPTER

    # -- exposition -------------------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The text exposition of this registry and its content type (for ``GET /metrics``)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- hooks: requests --------------------------------------------------------------------------------------
    @_hook
    def request_done(self, endpoint: str, adapter: str, method: str, status: int | str, seconds: float) -> None:
        """One finished request: ``method`` is how the adapter was chosen, ``status`` the HTTP status."""
        a = self.adapter_label(adapter)
        self._requests.labels(endpoint, a, method, str(status)).inc()
        self._latency.labels(endpoint, a).observe(seconds)

    @_hook
    def ttft(self, adapter: str, seconds: float) -> None:
        """Time to first token of one request."""
        self._ttft.labels(self.adapter_label(adapter)).observe(seconds)

    @_hook
    def inter_token(self, adapter: str, seconds: float) -> None:
        """Gap between two consecutive tokens of one request."""
        self._inter_token.labels(self.adapter_label(adapter)).observe(seconds)

    @_hook
    def queue_wait(self, seconds: float) -> None:
        """Time one request spent queued before the engine admitted it."""
        self._queue_wait.observe(seconds)

    @_hook
    def tokens(self, adapter: str, prompt_tokens: int, generated_tokens: int) -> None:
        """Token counts of one finished request."""
        a = self.adapter_label(adapter)
        self._prompt_tokens.labels(a).inc(prompt_tokens)
        self._generated_tokens.labels(a).inc(generated_tokens)

    # -- hooks: engine and adapters ---------------------------------------------------------------------------
    @_hook
    def engine_state(self, running: int, waiting: int, batch_size: int) -> None:
        """Scheduler state after one engine step."""
        self._running.set(running)
        self._waiting.set(waiting)
        self._batch_size.set(batch_size)

    @_hook
    def decode_step(self, rows: int) -> None:
        """One decode step ran ``rows`` rows in one forward pass."""
        self._decode_rows.observe(rows)

    @_hook
    def adapters_resident(self, tier: str, n: int) -> None:
        """How many adapters a tier holds now."""
        self._resident.labels(tier).set(n)

    @_hook
    def slot_rows(self, used: int, free: int) -> None:
        """How many of the compute slots' rank rows resident adapters hold, and how many are free."""
        self._slot_rows.labels("used").set(used)
        self._slot_rows.labels("free").set(free)

    @_hook
    def adapter_loaded(self, adapter: str, tier: str, seconds: float) -> None:
        """One adapter loaded into ``tier`` in ``seconds``."""
        self._loads.labels(self.adapter_label(adapter), tier).inc()
        self._load_seconds.labels(tier).observe(seconds)

    @_hook
    def adapter_evicted(self, tier: str) -> None:
        """One adapter evicted from ``tier``."""
        self._evictions.labels(tier).inc()

    @_hook
    def routed(self, method: str, confidence: float | None) -> None:
        """One routing decision; ``confidence`` is None for methods without one (an explicit name)."""
        self._routing.labels(method).inc()
        if confidence is not None:
            self._confidence.labels(method).observe(confidence)

    # -- hooks: response cache --------------------------------------------------------------------------------
    @_hook
    def cache_hit(self) -> None:
        self._cache_hits.inc()

    @_hook
    def cache_miss(self) -> None:
        self._cache_misses.inc()

    @_hook
    def cache_error(self, kind: str) -> None:
        """A cache operation failed (``timeout``, ``connection``, ``other``) or was bypassed (``circuit_open``)."""
        self._cache_errors.labels(kind).inc()

    @_hook
    def cache_skip(self, reason: str) -> None:
        """A response was not stored (``too_large``)."""
        self._cache_skipped.labels(reason).inc()

    @_hook
    def cache_up(self, up: bool) -> None:
        """The cache backend became usable (True) or its circuit opened (False)."""
        self._cache_up.set(1 if up else 0)
