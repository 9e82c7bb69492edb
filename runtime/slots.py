"""Device slot table: which adapter sits in which slot, LRU order, and pins.

Slot 0 is never handed out (it means "no adapter"). An adapter is pinned while a batch that uses it
runs; pinned slots are never evicted. When every slot is pinned, acquiring another raises
ResourceExhaustedError instead of evicting weights from under a running batch.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Hashable, Optional

from adapterserve.runtime.errors import ResourceExhaustedError


class SlotTable:
    def __init__(self, slots: int, on_load: Callable[[int, Hashable], None],
                 on_evict: Callable[[int, Hashable], None],
                 load_observer: Optional[Callable[[float], None]] = None) -> None:
        self.capacity = slots - 1
        self._free = list(range(slots - 1, 0, -1))
        self._lru: "OrderedDict[Hashable, int]" = OrderedDict()  # key -> slot, oldest first
        self._pins: dict[Hashable, int] = {}
        self._on_load = on_load
        self._on_evict = on_evict
        self.loads = 0
        self.evictions = 0
        self.hits = 0
        self.misses = 0
        self.load_observer = load_observer  # hears the seconds of each slot load (metrics)

    def slot_of(self, key: Hashable) -> int | None:
        return self._lru.get(key)

    def resident(self) -> list[Hashable]:
        return list(self._lru)

    def can_fit(self, keys: set) -> bool:
        """Whether every key in `keys` could be made resident now without evicting a pinned one."""
        missing = sum(1 for k in keys if k not in self._lru)
        evictable = sum(1 for k in self._lru if not self._pins.get(k) and k not in keys)
        return missing <= len(self._free) + evictable

    def acquire_resident(self, key: Hashable) -> Optional[int]:
        """acquire() where `key` is resident already (its slot, pinned); None, changing nothing, where not."""
        slot = self._lru.get(key)
        if slot is not None:
            self.hits += 1
            self._lru.move_to_end(key)
            self._pins[key] = self._pins.get(key, 0) + 1
        return slot

    def acquire_all_resident(self, keys: list) -> Optional[list[int]]:
        """acquire_resident() of every key in one pass (a batch's adapters, usually all resident), or
        None, changing nothing, where one is not."""
        lru = self._lru
        slots = [lru.get(k) for k in keys]
        if None in slots:
            return None
        move, pins = lru.move_to_end, self._pins
        for k in keys:
            move(k)
            pins[k] = pins.get(k, 0) + 1
        self.hits += len(keys)
        return slots

    def acquire(self, key: Hashable) -> int:
        """Make `key` resident, pin it, and return its slot."""
        slot = self.acquire_resident(key)
        if slot is not None:
            return slot
        self.misses += 1
        slot = self._take_free_slot()
        start = time.perf_counter()
        self._on_load(slot, key)
        if self.load_observer is not None:
            self.load_observer(time.perf_counter() - start)
        self.loads += 1
        self._lru[key] = slot
        self._pins[key] = self._pins.get(key, 0) + 1
        return slot

    def release(self, key: Hashable) -> None:
        self.release_all((key,))

    def release_all(self, keys) -> None:
        pins = self._pins
        for k in keys:
            n = pins.get(k, 0) - 1
            if n <= 0:
                pins.pop(k, None)
            else:
                pins[k] = n

    def drop(self, key: Hashable) -> None:
        """Free the slot of an adapter that is gone (unregistered or replaced and drained)."""
        if self._pins.get(key):
            raise RuntimeError(f"adapter {key} is still pinned; drop it after its batches finish")
        slot = self._lru.pop(key, None)
        if slot is not None:
            self._on_evict(slot, key)
            self._free.append(slot)

    def _take_free_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for key in self._lru:  # oldest first
            if not self._pins.get(key):
                slot = self._lru.pop(key)
                self._on_evict(slot, key)
                self.evictions += 1
                return slot
        raise ResourceExhaustedError(
            reason="slots_exhausted", message=f"all {self.capacity} adapter slots are pinned by running batches; retry shortly or start the "
            "server with more slots")
