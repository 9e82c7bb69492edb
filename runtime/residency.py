"""Residency: which adapters sit in device slots, in host memory or on disk, and which one is merged
into the base weights.

It owns the slot table (LRU, pins), the host tier, the pins of running forwards and the merge policy.
Slot writes, merges and the slot table change under one lock; forwards run outside it (several model
workers may run at once) with their slots pinned, so no slot they read is rewritten; merge and unmerge
change the base weights every forward reads, so they wait for running forwards.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from adapterserve.adapters.registry import AdapterEntry, Registry
from adapterserve.runtime.engine.base import Engine
from adapterserve.runtime.errors import NotSupportedError
from adapterserve.runtime.host_tier import HostTier
from adapterserve.runtime.slots import SlotTable

log = logging.getLogger(__name__)

REMERGE_AFTER_BATCHES = 8  # batches in a row that need only the merge goal before it is merged back


class Residency:
    def __init__(self, engine: Engine, registry: Registry, host_tier: HostTier, slots: int, precision: str,
                 on_slot_load: Optional[Callable[[float], None]] = None, r_max: Optional[int] = None,
                 wide_slots: int = 0) -> None:
        self.engine = engine
        self.registry = registry  # merge pins the merged task's entry for as long as it is merged
        self.host_tier = host_tier
        self.precision = precision
        self._entries_by_key: dict[int, AdapterEntry] = {}
        self.slot_table = SlotTable(
            slots,
            on_load=lambda slot, key: engine.load_slot(slot, self._entries_by_key[key].spec),
            on_evict=lambda slot, key: engine.clear_slot(slot),
            load_observer=on_slot_load,
        )
        # Adapters above r_max take wide slots (slot_pool.SlotPool), numbered from `slots` on, with a
        # table of their own: they are evicted among themselves.
        self.r_max = r_max
        self._wide_offset = slots - 1  # wide table slot k (from 1) is engine slot k + this
        self.wide_table: Optional[SlotTable] = None
        if wide_slots and r_max is not None:
            self.wide_table = SlotTable(
                wide_slots + 1,
                on_load=lambda slot, key: engine.load_slot(self._wide_offset + slot, self._entries_by_key[key].spec),
                on_evict=lambda slot, key: engine.clear_slot(self._wide_offset + slot),
                load_observer=on_slot_load,
            )
        self._device_lock = threading.RLock()
        self._released = threading.Condition(self._device_lock)  # a forward finished and unpinned its slots
        self._forwards = 0
        self.merged_task: Optional[AdapterEntry] = None
        self._merge_goal: Optional[str] = None  # the task merge() was asked for; merged back after mixed traffic
        self._solo_batches = 0

    @property
    def running_forwards(self) -> int:
        return self._forwards

    # -- adapters entering and leaving -----------------------------------------------------------
    def track(self, entry: AdapterEntry) -> None:
        """A new entry, about to be registered: its spec is what a slot load copies."""
        self._entries_by_key[entry.key] = entry

    def untrack(self, entry: AdapterEntry) -> None:
        """The entry never made it into the registry."""
        self._entries_by_key.pop(entry.key, None)

    def admit(self, entry: AdapterEntry) -> None:
        self.host_tier.admit(entry)

    def is_wide(self, entry: AdapterEntry) -> bool:
        return self.r_max is not None and entry.spec.rank > self.r_max

    def _table(self, entry: AdapterEntry) -> SlotTable:
        if self.is_wide(entry):
            assert self.wide_table is not None, "a wide adapter was registered on a server without wide slots"
            return self.wide_table
        return self.slot_table

    def tier_of(self, entry: AdapterEntry) -> str:
        if self._table(entry).slot_of(entry.key) is not None:
            return "DEVICE"
        return "HOST" if self.host_tier.in_memory(entry) else "DISK"

    def forget(self, entry: AdapterEntry) -> None:
        """A retired entry has no users left: free its slot, host memory and merge."""
        with self._device_lock:
            if self.merged_task is entry:
                self.unmerge()
            self._table(entry).drop(entry.key)
            self.host_tier.forget(entry)
            self._entries_by_key.pop(entry.key, None)

    # -- merged mode -----------------------------------------------------------------------------
    def merge(self, task: str) -> None:
        """Fold one task's LoRA into the base weights: its rows then run at bare-model cost."""
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise NotSupportedError(
                f"cannot merge into a {self.precision} base: quantized weights cannot absorb the LoRA delta "
                "and be restored exactly; serve it through slots instead"
            )
        entry = self.registry.acquire(task)
        if self.is_wide(entry):
            self.registry.release(entry)
            raise NotSupportedError(f"task {task!r} has rank {entry.spec.rank}, above r_max {self.r_max}: merged mode "
                                    "takes adapters of up to r_max; it is served through a wide slot")
        if entry.spec.eager_only:
            self.registry.release(entry)
            raise NotSupportedError(f"task {task!r} is a {entry.spec.kind()} adapter: its per-feature vectors, bottlenecks, "
                                    "Kronecker factors (LoKr above r_max), virtual tokens or prefixes are not folded into "
                                    "the base weights; it is served through slots")
        with self._device_lock:
            self._wait_for_forwards()
            if self.merged_task is not None:
                self._unmerge()
            try:
                if self.slot_table.slot_of(entry.key) is None:
                    self.host_tier.ensure_loaded(entry)
                slot = self.slot_table.acquire(entry.key)  # stays pinned while merged
                try:
                    self.engine.merge(slot)
                except BaseException:
                    self.slot_table.release(entry.key)
                    raise
            except BaseException:
                self.registry.release(entry)
                raise
            self.merged_task = entry
            self._merge_goal, self._solo_batches = task, 0

    def unmerge(self) -> None:
        """Back to slot mode until merge() is called again."""
        self._merge_goal = None
        self._unmerge()

    def _unmerge(self) -> None:
        """Unmerge, keeping the goal: a run of batches that need only that task merges it back."""
        with self._device_lock:
            entry = self.merged_task
            if entry is None:
                return
            self._wait_for_forwards()
            self.engine.unmerge()
            self.merged_task = None
            self.slot_table.release(entry.key)
        self.registry.release(entry)

    def _maybe_remerge(self, entries: list[AdapterEntry]) -> None:
        """Caller holds the device lock. Hysteresis: a few batches in a row of only the merged task
        before merging it back, so mixed traffic does not make every batch pay a merge."""
        if any(e.task != self._merge_goal for e in entries):
            self._solo_batches = 0
            return
        self._solo_batches += 1
        if self._solo_batches >= REMERGE_AFTER_BATCHES:
            log.info("merging task %s back: %d batches in a row needed only it", self._merge_goal, self._solo_batches)
            try:
                self.merge(self._merge_goal)
            except Exception as e:  # noqa: BLE001 - e.g. the task was unregistered meanwhile: stay in slot mode
                log.warning("could not merge task %s back (%s); serving it through slots", self._merge_goal, e)
                self._merge_goal = None

    def _wait_for_forwards(self) -> None:
        """Caller holds the device lock; returns once no forward is running (new ones need the lock)."""
        while self._forwards:
            self._released.wait()

    # -- a batch's pins ---------------------------------------------------------------------------
    def pin(self, entries: list[AdapterEntry]) -> tuple[list[int], list]:
        """Make a batch's adapters resident and pin them for its forward: (each entry's slot, in order;
        the pins to hand to unpin). The merged task's rows read slot 0 (its delta is in the base
        weights). A batch that needs another task unmerges; a run of batches that need only the merge
        goal merges it back."""
        wide = [self.is_wide(e) for e in entries] if self.wide_table is not None else [False] * len(entries)
        counted = False  # a batch counts once towards merging back, however long it waits for slots
        with self._device_lock:
            while True:
                if self.merged_task is not None and any(e is not self.merged_task for e in entries):
                    log.info("unmerging task %s: a batch needs other tasks", self.merged_task.task)
                    self._unmerge()
                    self._solo_batches = 0
                elif self.merged_task is None and self._merge_goal is not None and not counted:
                    counted = True
                    self._maybe_remerge(entries)
                merged = self.merged_task
                if not self._forwards:
                    break
                # Batches running on other workers may hold so many slots that this one does not fit
                # yet: wait for them to unpin (one batch alone always fits: the planner caps its
                # adapters), then look again, merged state included, since both may have changed.
                wanted = {e.key for e, w in zip(entries, wide) if e is not merged and not w}
                wide_wanted = {e.key for e, w in zip(entries, wide) if w}
                if self.slot_table.can_fit(wanted) and (not wide_wanted or self.wide_table.can_fit(wide_wanted)):
                    break
                self._released.wait()
            if merged is None and not any(wide):  # the usual batch: every adapter resident already
                keys = [e.key for e in entries]
                slots = self.slot_table.acquire_all_resident(keys)
                if slots is not None:
                    self._forwards += 1
                    return slots, [(self.slot_table, keys)]
            narrow_keys: list = []
            wide_keys: list = []
            pinned = [(self.slot_table, narrow_keys)] + ([(self.wide_table, wide_keys)] if any(wide) else [])
            slots = []
            try:
                for e, w in zip(entries, wide):
                    if e is merged:
                        slots.append(0)  # its delta lives in the base weights
                        continue
                    table = self.wide_table if w else self.slot_table
                    slot = table.acquire_resident(e.key)
                    if slot is None:
                        self.host_tier.ensure_loaded(e)  # disk -> host before host -> device
                        slot = table.acquire(e.key)
                    slots.append(slot + self._wide_offset if w else slot)
                    (wide_keys if w else narrow_keys).append(e.key)
            except BaseException:
                self._release(pinned, forward=False)
                raise
            self._forwards += 1
        return slots, pinned

    def unpin(self, pinned: list) -> None:
        """The batch's forward is done."""
        self._release(pinned, forward=True)

    def _release(self, pinned: list, forward: bool) -> None:
        with self._device_lock:
            for table, keys in pinned:
                table.release_all(keys)
            if forward:
                self._forwards -= 1
                self._released.notify_all()
