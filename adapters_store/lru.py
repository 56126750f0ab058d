"""A small generic LRU with pin counts and an on-evict hook (no torch): the policy of the adapter tiers.

Contract: ``put`` of a new key into a full cache evicts the least-recently-used entry whose pin count is zero;
when every entry is pinned it raises ``LRUFull`` and changes nothing (the caller waits for a pin to go, or uses
``can_admit`` first). Pins are counts, so two running batches can pin one adapter and it stays until both unpin.
``on_evict(key, value)`` runs for entries pushed out by ``put`` and for a value replaced by ``put`` on an existing
key; ``pop`` hands the value back to the caller and runs the hook only with ``run_hook=True``. Hooks run after
the internal lock is released (they may call back into the LRU); an exception from a hook propagates to the
caller, with the LRU already consistent. All methods are thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


class LRUFull(RuntimeError):
    """``put`` needed room but every entry is pinned."""


class LRUPinned(RuntimeError):
    """``pop`` of an entry that is still pinned."""


class LRU(Generic[K, V]):
    """Least-recently-used map of at most ``capacity`` entries; ``keys()`` lists least recent first."""

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.on_evict = on_evict
        self._data: OrderedDict[K, V] = OrderedDict()
        self._pins: dict[K, int] = {}
        self._lock = threading.RLock()

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` (marked most recently used), or ``default``."""
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def peek(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` without changing its recency."""
        with self._lock:
            return self._data.get(key, default)

    def put(self, key: K, value: V, pin: bool = False) -> K | None:
        """Insert or replace ``key`` as most recently used (and pin it atomically when ``pin``).

        Returns the evicted key, if one was. Raises ``LRUFull`` (nothing changed) when room is needed and
        every entry is pinned.
        """
        evicted: list[tuple[K, V]] = []
        with self._lock:
            if key in self._data:
                old = self._data[key]
                if old is not value:
                    evicted.append((key, old))
                self._data[key] = value
                self._data.move_to_end(key)
            else:
                if len(self._data) >= self.capacity:
                    victim = next((k for k in self._data if not self._pins.get(k)), _MISSING)
                    if victim is _MISSING:
                        raise LRUFull(f"all {self.capacity} entries are pinned; unpin one before adding {key!r}")
                    evicted.append((victim, self._data.pop(victim)))  # type: ignore[arg-type]
                self._data[key] = value
            if pin:
                self._pins[key] = self._pins.get(key, 0) + 1
        self._run_hooks(evicted)
        return evicted[0][0] if evicted and evicted[0][0] != key else None

    def touch(self, key: K) -> None:
        """Mark ``key`` most recently used; ``KeyError`` if absent."""
        with self._lock:
            self._data.move_to_end(key)

    def pin(self, key: K) -> int:
        """Add one pin to ``key`` (present, else ``KeyError``); returns the new pin count."""
        with self._lock:
            if key not in self._data:
                raise KeyError(key)
            self._pins[key] = self._pins.get(key, 0) + 1
            return self._pins[key]

    def unpin(self, key: K) -> int:
        """Remove one pin; ``ValueError`` if ``key`` is not pinned. Returns the remaining count."""
        with self._lock:
            count = self._pins.get(key, 0)
            if count == 0:
                raise ValueError(f"{key!r} is not pinned")
            if count == 1:
                del self._pins[key]
            else:
                self._pins[key] = count - 1
            return count - 1

    def pin_count(self, key: K) -> int:
        with self._lock:
            return self._pins.get(key, 0)

    def pop(self, key: K, default: object = _MISSING, run_hook: bool = False) -> V:
        """Remove ``key`` and return its value (``default`` or ``KeyError`` if absent); ``LRUPinned`` if pinned."""
        with self._lock:
            if key not in self._data:
                if default is _MISSING:
                    raise KeyError(key)
                return default  # type: ignore[return-value]
            if self._pins.get(key):
                raise LRUPinned(f"{key!r} is pinned {self._pins[key]} time(s); unpin it before removing it")
            value = self._data.pop(key)
        if run_hook:
            self._run_hooks([(key, value)])
        return value

    def can_admit(self, key: K) -> bool:
        """Whether ``put(key, ...)`` would succeed now."""
        with self._lock:
            return (key in self._data or len(self._data) < self.capacity
                    or any(not self._pins.get(k) for k in self._data))

    def keys(self) -> list[K]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._data)

    def items(self) -> list[tuple[K, V]]:
        with self._lock:
            return list(self._data.items())

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def _run_hooks(self, evicted: list[tuple[K, V]]) -> None:
        if self.on_evict is not None:
            for k, v in evicted:
                self.on_evict(k, v)
