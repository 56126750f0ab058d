"""The registry's CPU tier: a fresh registration is served from the weights decoded to validate it."""

from __future__ import annotations

import pytest
import torch

from adapters_store.registry import AdapterRegistry
from adapters_store.store import AdapterStore


def test_registered_weights_enter_cpu_tier_without_a_disk_read(store: AdapterStore, make_adapter,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reg = AdapterRegistry(store, max_cpu_loras=4)
    reads: list[tuple] = []
    original = store.load
    monkeypatch.setattr(store, "load", lambda *a, **k: reads.append(a) or original(*a, **k))

    m = reg.register_dir("alpha", make_adapter(seed=3))

    assert reg.cpu_keys() == [("alpha", m.version)]
    assert reads == []  # the validated weights were kept, not read back
    kept = reg.weights(("alpha", m.version))
    fresh = original("alpha", m.version)  # what a cold load from disk gives
    assert kept.meta["version"] == m.version and kept.meta["sha256"] == m.sha256
    assert kept.rank == fresh.rank and kept.target_modules == fresh.target_modules
    assert kept.modules.keys() == fresh.modules.keys()
    for path, pair in fresh.modules.items():
        got = kept.modules[path]
        assert torch.equal(got.A, pair.A) and torch.equal(got.B, pair.B) and got.scale == pair.scale


def test_failed_registration_leaves_cpu_tier_untouched(store: AdapterStore, make_adapter) -> None:
    from adapters_store.errors import AdapterError

    reg = AdapterRegistry(store, max_cpu_loras=4)
    good = reg.register_dir("alpha", make_adapter(seed=1))
    with pytest.raises(AdapterError):
        reg.register_dir("alpha", make_adapter(seed=2, fill=float("nan")))
    assert reg.cpu_keys() == [("alpha", good.version)]
    assert reg.resolve("alpha").version == good.version


def test_store_loads_are_prepared_but_a_registration_is_not(store: AdapterStore, make_adapter) -> None:
    """``prepare`` (the server's slot-form conversion) runs on weights read from the store, off the engine
    thread; a version registered here enters the tier unprepared, so the register call does not pay for it."""
    prepared: list[int] = []
    reg = AdapterRegistry(store, max_cpu_loras=4, prepare=lambda w: prepared.append(w.meta["version"]))
    m = reg.register_dir("alpha", make_adapter(seed=3))
    assert reg.cpu_keys() == [("alpha", m.version)] and prepared == []

    cold = AdapterRegistry(store, max_cpu_loras=4, prepare=lambda w: prepared.append(w.meta["version"]))
    cold.weights(("alpha", m.version))  # read from the store: prepared before it enters the tier
    assert prepared == [m.version]
