"""Task names -> adapter versions, with reference counts.

A request pins the entry it was admitted with; replacing a task swaps the name to a new entry at once
(new requests see the new version) while pinned requests finish on the old one, whose slot is freed
when its last user lets go.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from adapterserve.adapters.spec import AdapterSpec
from adapterserve.runtime.errors import TaskExistsError, UnknownTaskError

_ids = itertools.count(1)


@dataclass(eq=False)
class AdapterEntry:
    task: str
    spec: AdapterSpec
    head: dict  # head tensors on the model's device and dtype
    # Single-linear heads (Family.linear_head, e.g. BERT), for heads._stacked_logits: on a GPU (weight
    # [P, H], bias [P]) zero-padded to P = a power of two >= 8 labels, so a batch's heads run as one
    # batched matmul; on the CPU (weight [n, H], bias [n], their addresses) numpy float32, unpadded. None for other heads.
    stacked_head: Optional[tuple] = None
    registered_at: float = field(default_factory=time.time)
    key: int = field(default_factory=lambda: next(_ids))  # unique per (task, version) registration
    refs: int = 0
    retired: bool = False  # replaced or unregistered; freed when refs reaches 0

    @property
    def version(self) -> str:
        return self.spec.version


class Registry:
    def __init__(self, on_retired: Callable[[AdapterEntry], None],
                 on_idle: Optional[Callable[[], None]] = None) -> None:
        self._lock = threading.Lock()
        self._by_task: dict[str, AdapterEntry] = {}
        self._on_retired = on_retired  # called (outside the lock) once a retired entry has no users
        self.on_idle = on_idle  # called when any entry loses its last user

    def add(self, entry: AdapterEntry, replace: bool = False) -> Optional[AdapterEntry]:
        with self._lock:
            old = self._by_task.get(entry.task)
            if old is not None and not replace:
                raise TaskExistsError(f"task {entry.task!r} is already registered (version {old.version[:12]}); pass replace=true to swap it")
            self._by_task[entry.task] = entry
            free_now = old is not None and self._retire(old)
        if free_now:
            self._on_retired(old)
        return old

    def remove(self, task: str) -> AdapterEntry:
        with self._lock:
            entry = self._by_task.pop(task, None)
            if entry is None:
                raise UnknownTaskError(f"task {task[:64]!r} is not registered")
            free_now = self._retire(entry)
        if free_now:
            self._on_retired(entry)
        return entry

    def acquire(self, task: str) -> AdapterEntry:
        with self._lock:
            entry = self._by_task.get(task)
            if entry is None:
                # Other tasks' names are not disclosed here: ListAdapters (behind the admin token) lists them.
                raise UnknownTaskError(f"unknown task {task[:64]!r}; register it first (ListAdapters shows the "
                                       "registered tasks)")
            entry.refs += 1
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.refs -= 1
            idle = entry.refs == 0
            free_now = entry.retired and idle
        if free_now:
            self._on_retired(entry)
        elif idle and self.on_idle is not None:
            self.on_idle()

    def get(self, task: str) -> AdapterEntry:
        with self._lock:
            entry = self._by_task.get(task)
        if entry is None:
            raise UnknownTaskError(f"task {task[:64]!r} is not registered")
        return entry

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._by_task.values(), key=lambda e: e.task)

    def __contains__(self, task: str) -> bool:
        return task in self._by_task

    def __len__(self) -> int:
        return len(self._by_task)

    @staticmethod
    def _retire(entry: AdapterEntry) -> bool:
        entry.retired = True
        return entry.refs == 0


def device_head(spec: AdapterSpec, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype) for k, v in spec.head.items()}
