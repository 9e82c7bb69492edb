"""The cluster's one registry: the single writer of the shared adapter store.

A Ray Serve deployment of one replica (runtime/cluster/app.py). It owns an AdapterStore in the
data-dir format of `adapterserve serve` (adapters/store.py: atomic, fsynced, checked at start), so a
data dir moves between a single server and a cluster unchanged. Every committed change adds one to
the store's generation; replicas and the ingress compare generations to know they are behind.

Contract:
- commit/remove return only once the change is on disk; the generation they return is the one
  every later request must be served at (the ingress carries it; a replica behind it syncs first).
- Replicas fetch adapter files from here (load_files), so only this process needs the data dir.
- If this process restarts, it reads the store back: nothing committed is lost.
- Methods are coroutines without awaits: they run one at a time on the replica's event loop, so a
  check-then-write (register without replace) cannot interleave with another change.
"""
from __future__ import annotations

import logging
import tempfile
import time
from typing import Optional

from adapterserve.adapters.store import AdapterStore
from adapterserve.runtime.cluster.remote import returns_errors
from adapterserve.runtime.errors import TaskExistsError, UnknownTaskError

log = logging.getLogger("adapterserve.cluster")

# A replica that has not reported for this long is left out of listings (metrics targets, residency).
REPLICA_TIMEOUT_S = 10.0
EXAMPLES_FLAG = "examples_registered"
MODES = ("register", "replace", "seed", "preload")


class ClusterRegistry:
    def __init__(self, data_dir: Optional[str]) -> None:
        if not data_dir:
            data_dir = tempfile.mkdtemp(prefix="adapterserve-cluster-")
            log.warning("no --data-dir: registrations live in %s and are lost when this registry restarts", data_dir)
        self.store = AdapterStore(data_dir)
        self.replicas: dict[str, dict] = {}  # replica id -> its last report, with "seen" (monotonic)

    async def generation(self) -> int:
        return self.store.generation

    async def snapshot(self) -> dict:
        """Everything a replica or the ingress needs to catch up: task -> manifest entry, quarantined
        tasks, whether the bundled examples were registered once, and the generation they make up."""
        return {"generation": self.store.generation, "tasks": self.store.tasks(), "damaged": dict(self.store.damaged),
                "seeded": self.store.flag(EXAMPLES_FLAG)}

    async def load_files(self, task: str, version: str) -> dict[str, bytes]:
        return self.store.load_files(task, version)

    @returns_errors
    async def commit(self, task: str, files: dict[str, bytes], version: str, labels: list[str], metadata: dict,
                     info: dict, mode: str) -> int:
        """Persist a validated adapter. mode: register (refused if the task exists), replace, seed (the
        bundled examples: only if absent and never seeded before), preload (--adapter TASK=DIR: only if
        the stored version differs). Returns the generation that holds the change."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        current = self.store.entry(task)
        healthy = current is not None and task not in self.store.damaged
        if mode == "register" and healthy:
            raise TaskExistsError(f"task {task!r} is already registered (version {current['version'][:12]}); "
                                  "set replace=true to swap it")
        if mode == "seed" and (healthy or self.store.flag(EXAMPLES_FLAG)):
            return self.store.generation
        if mode == "preload" and healthy and current["version"] == version:
            return self.store.generation
        self.store.put(task, files, version, labels, metadata, time.time(), info)
        log.info("task %s version %s committed at generation %d (%s)", task, version[:12], self.store.generation, mode)
        return self.store.generation

    async def mark_seeded(self) -> int:
        if not self.store.flag(EXAMPLES_FLAG):
            self.store.set_flag(EXAMPLES_FLAG)
        return self.store.generation

    @returns_errors
    async def remove(self, task: str) -> dict:
        """Returns {"entry": the removed manifest entry, "quarantined": why or None, "generation": N}."""
        entry = self.store.entry(task)
        if entry is None:
            raise UnknownTaskError(f"task {task!r} is not registered; ListAdapters shows the registered tasks")
        why = self.store.damaged.get(task)
        self.store.remove(task)
        return {"entry": entry, "quarantined": why, "generation": self.store.generation}

    async def quarantine(self, task: str, version: str, why: str) -> None:
        """A replica could not load the task's stored version: not served until registered again."""
        entry = self.store.entry(task)
        if entry is not None and entry["version"] == version and task not in self.store.damaged:
            self.store.damaged[task] = f"it no longer loads ({why}); register it again to replace it"
            log.error("task %s quarantined: %s", task, self.store.damaged[task])

    async def heartbeat(self, replica_id: str, report: dict) -> int:
        """A replica's periodic report (metrics address, generation, resident tasks); returns the
        generation it should be at."""
        self.replicas[replica_id] = dict(report, seen=time.monotonic())
        return self.store.generation

    async def status(self) -> tuple[int, dict[str, dict]]:
        """(generation, live replicas): the ingress's periodic poll in one call."""
        return self.store.generation, await self.live_replicas()

    async def live_replicas(self) -> dict[str, dict]:
        now = time.monotonic()
        for replica_id in [r for r, report in self.replicas.items() if now - report["seen"] > REPLICA_TIMEOUT_S]:
            del self.replicas[replica_id]
        return {r: {k: v for k, v in report.items() if k != "seen"} for r, report in self.replicas.items()}
