"""Which adapter version sits where in the compute slots' memory. Policy only; the layers do the copying.

The slots are one pool of rank rows: ``max_loras × max_lora_rank`` of them in every wrapped layer. An adapter
of rank r takes r rows, any r (S-LoRA's unified paging, one row a page), so the pool always holds ``max_loras``
adapters of the largest rank and more of smaller ones: 8 slots of rank 64 hold 32 adapters of rank 16, and a
decode step can mix that many. A resident version is named by a *slot* id, never reused, so anything keyed
on slot ids (a batch's gathered copies) cannot mistake a later occupant of the same rows for an earlier one.

Slots are pinned by the rows that use them (a pin count), so an adapter in use by a running batch is never
evicted under it. Unpinned slots are evicted least-recently-used first. A slot can be put in *draining* state:
no new rows may take it, so it frees up for a request that has waited for room the longest.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from itertools import count
from types import MappingProxyType
from typing import Mapping

AdapterKey = tuple[str, int]  # (name, version)


class NoSlotFree(RuntimeError):
    """Every compute slot is in use by running rows or pinned by an operator."""


@dataclass
class SlotInfo:
    key: AdapterKey
    pins: int = 0
    draining: bool = False
    held: bool = False  # pinned by an operator: never evicted until unpinned


class SlotTable:
    """Maps adapter versions to slot ids, and each slot to its rows of a pool of ``capacity`` rank rows."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = list(range(capacity))  # sorted: an adapter takes the lowest free rows
        self._ids = count()
        self._by_key: dict[AdapterKey, int] = {}
        self._info: dict[int, SlotInfo] = {}
        self._rows: dict[int, list[int]] = {}  # slot -> the pool rows it holds, one per rank
        self._rows_view = MappingProxyType(self._rows)
        self._lru: OrderedDict[int, None] = OrderedDict()  # slot -> None, least recent first

    def __len__(self) -> int:
        return len(self._info)

    def lookup(self, key: AdapterKey) -> int | None:
        slot = self._by_key.get(key)
        if slot is None or self._info[slot].draining:
            return None
        return slot

    def undrain(self, key: AdapterKey) -> int | None:
        """The slot of ``key`` taken out of draining (a request wants that very version again), if it drains."""
        slot = self._by_key.get(key)
        if slot is None or not self._info[slot].draining:
            return None
        self._info[slot].draining = False
        return slot

    def rows(self) -> Mapping[int, list[int]]:
        """Every resident slot's pool rows: a live read-only view (every engine step reads it; nothing is copied)."""
        return self._rows_view

    def rows_of(self, slot: int) -> list[int]:
        return self._rows[slot]

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def keys(self) -> list[AdapterKey]:
        return list(self._by_key)

    def room_for(self, rank: int) -> list[int] | None:
        """The slots to evict (least recently used first; none when enough rows are free) so that an adapter of
        ``rank`` fits; None when even evicting every idle slot would not make room. Changes nothing."""
        need, victims = rank - len(self._free), []
        for s in self._lru:
            if need <= 0:
                break
            info = self._info[s]
            if info.pins == 0 and not info.held:
                victims.append(s)
                need -= len(self._rows[s])
        return victims if need <= 0 else None

    def hold(self, slot: int, held: bool) -> None:
        self._info[slot].held = held

    def assign(self, key: AdapterKey, rank: int) -> int:
        """Give ``key`` the lowest ``rank`` free rows under a new slot id (``room_for`` said they are free)."""
        assert 0 < rank <= len(self._free), f"rank {rank}, {len(self._free)} rows free"
        assert key not in self._by_key, f"{key} is resident already"
        rows, self._free = self._free[:rank], self._free[rank:]
        slot = next(self._ids)
        self._info[slot] = SlotInfo(key)
        self._rows[slot] = rows
        self._by_key[key] = slot
        self._lru[slot] = None
        return slot

    def release(self, slot: int) -> AdapterKey:
        info = self._info.pop(slot)
        assert info.pins == 0, "cannot release a pinned slot"
        del self._by_key[info.key]
        self._lru.pop(slot, None)
        for r in self._rows.pop(slot):
            bisect.insort(self._free, r)
        return info.key

    def pin(self, slot: int) -> None:
        self._info[slot].pins += 1
        self._lru.move_to_end(slot)

    def unpin(self, slot: int) -> None:
        info = self._info[slot]
        assert info.pins > 0, "unbalanced unpin"
        info.pins -= 1

    def drain_one(self, exclude: set[int] = frozenset()) -> int | None:
        """Mark the least-pinned slot draining (no new rows); returns it, or None when one already drains."""
        if any(i.draining for i in self._info.values()):
            return None
        candidates = [s for s in self._lru if s not in exclude and not self._info[s].held]
        if not candidates:
            return None
        slot = min(candidates, key=lambda s: self._info[s].pins)
        self._info[slot].draining = True
        return slot

    def draining_free(self) -> int | None:
        for s, i in self._info.items():
            if i.draining and i.pins == 0:
                return s
        return None

    def slots_of(self, name: str) -> list[int]:
        return [s for (n, _), s in self._by_key.items() if n == name]

    def pins(self, slot: int) -> int:
        return self._info[slot].pins
