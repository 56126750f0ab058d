"""The generic LRU: recency order, touch, pin counts, eviction hook, full-and-pinned behaviour (no torch)."""

from __future__ import annotations

import threading

import pytest

from adapters_store.lru import LRU, LRUFull, LRUPinned


def _lru(cap: int = 3) -> tuple[LRU[str, int], list[tuple[str, int]]]:
    evicted: list[tuple[str, int]] = []
    return LRU(cap, on_evict=lambda k, v: evicted.append((k, v))), evicted


def test_evicts_least_recently_used_and_calls_hook() -> None:
    lru, evicted = _lru()
    for i, k in enumerate("abc"):
        lru.put(k, i)
    assert lru.get("a") == 0  # a becomes most recent
    assert lru.put("d", 3) == "b"
    assert evicted == [("b", 1)] and lru.keys() == ["c", "a", "d"]


def test_touch_and_peek() -> None:
    lru, evicted = _lru()
    for i, k in enumerate("abc"):
        lru.put(k, i)
    lru.touch("a")
    assert lru.peek("b") == 1 and lru.keys() == ["b", "c", "a"]  # peek does not refresh
    lru.put("d", 3)
    assert evicted == [("b", 1)]
    with pytest.raises(KeyError):
        lru.touch("zzz")


def test_pinned_entries_are_skipped_and_pins_count() -> None:
    lru, evicted = _lru(2)
    lru.put("a", 0, pin=True)
    lru.pin("a")  # two batches
    lru.put("b", 1)
    lru.put("c", 2)  # a is oldest but pinned: b goes
    assert evicted == [("b", 1)] and lru.pin_count("a") == 2
    assert lru.unpin("a") == 1
    lru.put("d", 3)  # still pinned once: c goes
    assert evicted[-1] == ("c", 2)
    assert lru.unpin("a") == 0
    lru.put("e", 4)
    assert evicted[-1] == ("a", 0)
    with pytest.raises(ValueError):
        lru.unpin("e")
    with pytest.raises(KeyError):
        lru.pin("nope")


def test_full_and_all_pinned_raises_and_changes_nothing() -> None:
    lru, evicted = _lru(2)
    lru.put("a", 0, pin=True)
    lru.put("b", 1, pin=True)
    assert not lru.can_admit("c") and lru.can_admit("a")
    with pytest.raises(LRUFull):
        lru.put("c", 2)
    assert lru.keys() == ["a", "b"] and evicted == [] and "c" not in lru


def test_replace_value_runs_hook_for_old_value_and_keeps_pins() -> None:
    lru, evicted = _lru()
    lru.put("a", 0, pin=True)
    assert lru.put("a", 10) is None
    assert evicted == [("a", 0)] and lru.peek("a") == 10 and lru.pin_count("a") == 1 and len(lru) == 1


def test_pop() -> None:
    lru, evicted = _lru()
    lru.put("a", 0, pin=True)
    lru.put("b", 1)
    with pytest.raises(LRUPinned):
        lru.pop("a")
    assert lru.pop("b") == 1 and evicted == []
    lru.unpin("a")
    assert lru.pop("a", run_hook=True) == 0 and evicted == [("a", 0)]
    assert lru.pop("zz", None) is None
    with pytest.raises(KeyError):
        lru.pop("zz")


def test_hook_may_call_back_into_the_lru() -> None:
    seen: list[int] = []
    lru: LRU[str, int] = LRU(1, on_evict=lambda k, v: seen.append(len(lru)))
    lru.put("a", 0)
    lru.put("b", 1)
    assert seen == [1]


def test_threads_keep_capacity_and_pins() -> None:
    lru: LRU[int, int] = LRU(8)
    errors: list[Exception] = []

    def work(t: int) -> None:
        try:
            for i in range(300):
                key = t * 1000 + i
                lru.put(key, i, pin=(i % 50 == 0))
                if i % 50 == 0:
                    lru.unpin(key)
                lru.get(key - 1)
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(lru) == 8 and all(lru.pin_count(k) == 0 for k in lru.keys())


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LRU(0)
