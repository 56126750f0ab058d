"""Adapter versions in compute slots: which one sits where (``SlotTable``, policy) and the writes into the wrapped
layers' slot buffers (mechanism). Runs on the engine thread only.

Load and validate first, evict second: ``acquire`` reads the version's weights (store or CPU tier) before it
touches the slot it will take, so an adapter that fails to load pushes nothing out.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from adapters_store.weights import AdapterWeights

from .lora_layers import SlotLoRALinear
from .slots import AdapterKey, NoSlotFree, SlotTable

log = logging.getLogger(__name__)


class AdapterUnavailable(RuntimeError):
    """A version's weights could not be read (unregistered meanwhile, or unreadable)."""


class AdapterSlots:
    """Compute slots ``0..max_loras-1`` of every wrapped layer, and the gates of gated adapters in them."""

    def __init__(self, lora_layers: dict[str, SlotLoRALinear], weights_for: Callable[[AdapterKey], AdapterWeights],
                 max_loras: int, dtype: torch.dtype, hook: Callable[..., None]) -> None:
        self.layers, self.weights_for, self.dtype, self._hook = lora_layers, weights_for, dtype, hook
        self.table = SlotTable(max_loras)
        self._gates: dict[int, tuple[object, tuple[int, ...]]] = {}  # slot -> (gate, rank segments)

    def acquire(self, key: AdapterKey) -> int | None:
        """A slot holding ``key``, loading it into a free or least-recently-used idle slot; None when every slot
        is in use. Raises ``AdapterUnavailable`` when its weights cannot be read (no slot is touched then)."""
        free = self.table.draining_free()
        if free is not None:
            self.clear(free)
        target = self.table.free_or_victim()
        if target is None:
            return None
        t0 = time.perf_counter()
        try:
            weights = self.weights_for(key)  # load and validate first ...
        except Exception as e:
            raise AdapterUnavailable(str(e)) from e
        return self._load_into(target, key, weights, t0)

    def _load_into(self, target: tuple[int, AdapterKey | None], key: AdapterKey, weights: AdapterWeights,
                   t0: float) -> int:
        """... evict the slot's occupant, if any (second: the weights are loaded), and write ``key`` there."""
        slot, victim = target
        if victim is not None:
            self.clear(slot)
            self._hook("adapter_evicted", "slot")
        self.write(slot, key, weights)
        self._hook("adapter_loaded", key[0], "slot", time.perf_counter() - t0)
        return slot

    def write(self, slot: int, key: AdapterKey, w: AdapterWeights) -> None:
        for path, A, Bs in w.each_slot_form(self.dtype):  # a just-registered version converts here
            self.layers[path].write_slot(slot, A, Bs)
        self.table.assign(slot, key, w.rank)
        if w.gate is not None:
            self._gates[slot] = (w.gate, w.segments)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            if layer.present[slot]:
                layer.clear_slot(slot)
        self._gates.pop(slot, None)
        self.table.release(slot)

    def drop(self, name: str) -> None:
        """Free the slots of every version of ``name`` that no running row uses (others free as rows end)."""
        for slot in self.table.slots_of(name):
            if self.table.pins(slot) == 0:
                self.clear(slot)

    def hold(self, key: AdapterKey, held: bool) -> None:
        """Operator pin: load ``key`` now and keep it (``held=False`` releases it); ``NoSlotFree`` when every
        slot is in use or pinned."""
        slot = self.table.lookup(key)
        if slot is None and held:
            target = self.table.free_or_victim()
            if target is None:
                raise NoSlotFree(f"all {self.table.num_slots} compute slots are in use or pinned; unpin one, "
                                 "or raise CLORA_MAX_LORAS")
            slot = self._load_into(target, key, self.weights_for(key), time.perf_counter())
        if slot is not None:
            self.table.hold(slot, held)

    def stage(self, key: AdapterKey) -> None:
        """Load ``key`` into a free or idle slot (no rows, no operator pin) when it is not in one; a version that
        cannot be read is left for its first request to report."""
        if self.table.lookup(key) is not None:
            return
        target = self.table.free_or_victim()
        if target is None:
            return
        try:
            weights = self.weights_for(key)
        except Exception:  # unregistered meanwhile, or unreadable: its first request will say so
            log.debug("not staging %s", key, exc_info=True)
            return
        self._load_into(target, key, weights, time.perf_counter())

    def rank_weights(self, slot: int, pooled: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """``(rank,)`` per-rank weights of a gated adapter's row (its gate on the prompt's pooled embedding, each
        branch's weight repeated over that branch's ranks); None for a plain adapter."""
        if slot not in self._gates:
            return None
        gate, segments = self._gates[slot]
        g = gate(pooled()).float().flatten()  # (n_branches,)
        return torch.repeat_interleave(g.cpu(), torch.tensor(segments))
