"""The host-memory tier between device slots and disk: bounded bytes, LRU.

An adapter evicted from host memory keeps what a request needs to be admitted (name, version, labels,
head) and drops its LoRA tensors and vectors; the next batch that needs it in a device slot reads
it back from the data dir (content-addressed, sha256-checked). Adapters pinned by a request, and those
that cannot be re-read (no data dir, or another version on disk), are never evicted.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable, Optional

from adapterserve.adapters.registry import AdapterEntry
from adapterserve.adapters.spec import AdapterSpec

log = logging.getLogger(__name__)


class HostTier:
    def __init__(self, max_bytes: Optional[int], reload: Optional[Callable[[AdapterEntry], AdapterSpec]] = None,
                 can_reload: Optional[Callable[[AdapterEntry], bool]] = None) -> None:
        """reload(entry) -> its AdapterSpec read back from disk; can_reload(entry): whether the disk holds
        that version. Without them (no disk) nothing is evicted."""
        self.max_bytes = max_bytes
        self.reload = reload
        self.can_reload = can_reload or (lambda e: False)
        self._lru: "OrderedDict[int, AdapterEntry]" = OrderedDict()  # in host memory, oldest first
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0
        self.reloads = 0

    @staticmethod
    def _cost(entry: AdapterEntry) -> int:
        return entry.spec.tensor_bytes()

    def in_memory(self, entry: AdapterEntry) -> bool:
        return entry.key in self._lru

    def admit(self, entry: AdapterEntry) -> None:
        with self._lock:
            self._lru[entry.key] = entry
            self.bytes += self._cost(entry)
            self._shrink(keep=entry.key)

    def forget(self, entry: AdapterEntry) -> None:
        with self._lock:
            if self._lru.pop(entry.key, None) is not None:
                self.bytes -= self._cost(entry)

    def ensure_loaded(self, entry: AdapterEntry) -> None:
        """Before a slot load: bring the adapter's tensors back from disk if they were evicted."""
        with self._lock:
            if entry.key in self._lru:
                self._lru.move_to_end(entry.key)
                return
        spec = self.reload(entry)
        if spec.version != entry.version:
            raise RuntimeError(f"disk holds version {spec.version[:12]} of task {entry.task}, not {entry.version[:12]}")
        entry.spec.take_tensors(spec)  # the file bytes stay on disk
        with self._lock:
            self.reloads += 1
            self._lru[entry.key] = entry
            self.bytes += self._cost(entry)
            self._shrink(keep=entry.key)

    def shrink(self) -> None:
        """Called when a request lets go of an adapter: it may now be evictable."""
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            with self._lock:
                self._shrink(keep=-1)

    def _shrink(self, keep: int) -> None:
        if self.max_bytes is None or self.reload is None:
            return
        for key in list(self._lru):
            if self.bytes <= self.max_bytes:
                return
            entry = self._lru[key]
            if key == keep or entry.refs > 0 or not self.can_reload(entry):
                continue
            self.bytes -= self._cost(entry)
            del self._lru[key]
            entry.spec.drop_tensors()
            self.evictions += 1
            log.debug("adapter %s (%s) moved to the disk tier", entry.task, entry.version[:12])
