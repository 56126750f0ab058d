"""Adapter versions in compute slots: which one sits where (``SlotTable``, policy) and the writes into the wrapped
layers' slot buffers (mechanism). Runs on the engine thread only.

Load and validate first, evict second: ``acquire`` reads the version's weights (store or CPU tier) before it
touches the slot it will take, so an adapter that fails to load pushes nothing out.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from adapters_store.weights import AdapterWeights, Scratch

from .lora_layers import SlotLoRALinear, clear_slots, write_slots
from .slots import AdapterKey, NoSlotFree, SlotTable

log = logging.getLogger(__name__)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's ops on this thread alone for a while. A slot write or clear is a few copies of a few MB: one
    thread does them as fast as two, and never waits at a barrier for a second core that another thread or process
    holds (SmolLM2, r 16 on q/k/v/o, 2 cores: a write took a median of 3.1 ms on one thread against 6.9-7.5 ms on
    two, p90 3.5 against 19-58 ms, with a busy process beside it; 3 ms either way on a quiet machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class AdapterUnavailable(RuntimeError):
    """A version's weights could not be read (unregistered meanwhile, or unreadable)."""


class AdapterSlots:
    """The compute slots of every wrapped layer (a pool of ``capacity`` rank rows), and the gates of gated
    adapters in them."""

    def __init__(self, lora_layers: dict[str, SlotLoRALinear], weights_for: Callable[[AdapterKey], AdapterWeights],
                 capacity: int, dtype: torch.dtype, hook: Callable[..., None]) -> None:
        self.layers, self.weights_for, self.dtype, self._hook = lora_layers, weights_for, dtype, hook
        self.table = SlotTable(capacity)
        self._gates: dict[int, tuple[object, tuple[int, ...]]] = {}  # slot -> (gate, rank segments)
        self._scratch = Scratch()  # where a version the CPU tier holds unconverted is converted as it is written

    def acquire(self, key: AdapterKey) -> int | None:
        """A slot holding ``key``, loading it into free rows or those of least-recently-used idle slots; None when
        they would not make room. Raises ``AdapterUnavailable`` when its weights cannot be read (no slot is
        touched then)."""
        free = self.table.draining_free()
        if free is not None:
            self.clear(free)
        slot = self._resident(key)
        if slot is not None:
            return slot
        if self.table.room_for(1) is None:  # every row is in use: nothing to read yet
            return None
        t0 = time.perf_counter()
        try:
            weights = self.weights_for(key)  # load and validate first ...
        except Exception as e:
            raise AdapterUnavailable(str(e)) from e
        return self._load(key, weights, t0)

    def _resident(self, key: AdapterKey) -> int | None:
        """The slot of ``key``, taken out of draining if it drains (a request wants that very version again)."""
        slot = self.table.lookup(key)
        return slot if slot is not None else self.table.undrain(key)

    def _load(self, key: AdapterKey, weights: AdapterWeights, t0: float) -> int | None:
        """... evict what must go to make room, if anything (second: the weights are loaded), and write ``key``;
        None when there is no room."""
        victims = self.table.room_for(weights.rank)
        if victims is None:
            return None
        for victim in victims:
            self.clear(victim)
            self._hook("adapter_evicted", "slot")
        slot = self.write(key, weights)
        self._hook("adapter_loaded", key[0], "slot", time.perf_counter() - t0)
        return slot

    def write(self, key: AdapterKey, w: AdapterWeights) -> int:
        """Put ``key`` into free rows of every wrapped layer (``room_for`` made them free); returns its slot."""
        slot = self.table.assign(key, w.rank)
        rows = self.table.rows_of(slot)
        with one_torch_thread():
            for paths, A, Bs in w.slot_groups(self.dtype, self._scratch):  # a just-registered one converts here
                write_slots([self.layers[p] for p in paths], slot, rows[:A.shape[1]], A, Bs)
        if w.gate is not None:
            self._gates[slot] = (w.gate, w.segments)
        return slot

    def clear(self, slot: int) -> None:
        with one_torch_thread():
            clear_slots(list(self.layers.values()), slot)
        self._gates.pop(slot, None)
        self.table.release(slot)

    def drop(self, name: str) -> None:
        """Free the slots of every version of ``name`` that no running row uses (others free as rows end)."""
        for slot in self.table.slots_of(name):
            if self.table.pins(slot) == 0:
                self.clear(slot)

    def hold(self, key: AdapterKey, held: bool) -> None:
        """Operator pin: load ``key`` now and keep it (``held=False`` releases it); ``NoSlotFree`` when the slots'
        rows are all in use or pinned."""
        slot = self._resident(key)
        if slot is None and held:
            slot = self._load(key, self.weights_for(key), time.perf_counter())
            if slot is None:
                raise NoSlotFree(f"the {self.table.capacity} rank rows of the compute slots are in use or pinned; "
                                 "unpin an adapter, or raise CLORA_MAX_LORAS")
        if slot is not None:
            self.table.hold(slot, held)

    def stage(self, key: AdapterKey) -> None:
        """Load ``key`` into free or idle rows (no running rows, no operator pin) when it is not resident; a version
        that cannot be read is left for its first request to report."""
        if self._resident(key) is not None or self.table.room_for(1) is None:
            return
        try:
            weights = self.weights_for(key)
        except Exception:  # unregistered meanwhile, or unreadable: its first request will say so
            log.debug("not staging %s", key, exc_info=True)
            return
        self._load(key, weights, time.perf_counter())

    def rank_weights(self, slot: int, pooled: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """``(rank,)`` per-rank weights of a gated adapter's row (its gate on the prompt's pooled embedding, each
        branch's weight repeated over that branch's ranks); None for a plain adapter."""
        if slot not in self._gates:
            return None
        gate, segments = self._gates[slot]
        g = gate(pooled()).float().flatten()  # (n_branches,)
        return torch.repeat_interleave(g.cpu(), torch.tensor(segments))
