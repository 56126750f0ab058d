"""Which adapter version sits in which compute slot. Policy only; the layers do the copying.

Slots are pinned by the rows that use them (a pin count), so an adapter in use by a running batch is never
evicted under it. Unpinned slots are evicted least-recently-used first. A slot can be put in *draining* state:
no new rows may take it, so it frees up for a request that has waited for a slot the longest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

AdapterKey = tuple[str, int]  # (name, version)


class NoSlotFree(RuntimeError):
    """Every compute slot is in use by running rows or pinned by an operator."""


@dataclass
class SlotInfo:
    key: AdapterKey
    rank: int
    pins: int = 0
    draining: bool = False
    held: bool = False  # pinned by an operator: never evicted until unpinned


class SlotTable:
    """Maps adapter versions to slot indices ``0..num_slots-1``."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._by_key: dict[AdapterKey, int] = {}
        self._info: dict[int, SlotInfo] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # slot -> None, least recent first

    def __len__(self) -> int:
        return len(self._info)

    def lookup(self, key: AdapterKey) -> int | None:
        slot = self._by_key.get(key)
        if slot is None or self._info[slot].draining:
            return None
        return slot

    def rank(self, slot: int) -> int:
        return self._info[slot].rank

    def ranks(self) -> dict[int, int]:
        return {s: i.rank for s, i in self._info.items()}

    def keys(self) -> list[AdapterKey]:
        return list(self._by_key)

    def free_or_victim(self) -> tuple[int, AdapterKey | None] | None:
        """A slot a new adapter can take now: a free one, else the LRU unpinned one (with the key it evicts)."""
        for s in range(self.num_slots):
            if s not in self._info:
                return s, None
        for s in self._lru:
            if self._info[s].pins == 0 and not self._info[s].held:
                return s, self._info[s].key
        return None

    def hold(self, slot: int, held: bool) -> None:
        self._info[slot].held = held

    def assign(self, slot: int, key: AdapterKey, rank: int) -> None:
        old = self._info.get(slot)
        assert old is None or old.pins == 0, "cannot reassign a pinned slot"
        if old is not None:
            del self._by_key[old.key]
        self._info[slot] = SlotInfo(key, rank)
        self._by_key[key] = slot
        self._lru[slot] = None
        self._lru.move_to_end(slot)

    def release(self, slot: int) -> AdapterKey:
        info = self._info.pop(slot)
        assert info.pins == 0, "cannot release a pinned slot"
        del self._by_key[info.key]
        self._lru.pop(slot, None)
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
