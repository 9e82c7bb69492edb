"""One cluster replica: a whole adapterserve runtime (its own batcher, slots and tiers) as a Ray Serve
deployment replica, following the cluster registry.

Each replica still mixes every task it is sent into one batch: tasks are not multiplexed by Serve
(which would split batches per model id); the task rides in the call and the affinity router
(router.py) picks the replica.

Contract:
- A call carrying generation G is answered only after this replica has applied every registry
  change up to G (sync first), so once RegisterAdapter(replace)/UnregisterAdapter has returned, no
  later request routed here sees the old state. Requests already running keep the version they
  pinned, as on a single server.
- Between requests the replica follows the registry by itself (a heartbeat every
  FOLLOW_PERIOD_S that also reports its metrics address and resident tasks).
- At start it registers the bundled examples and --adapter directories through the registry (once
  per cluster), then loads every task the registry holds: a restarted replica comes back with all.
- record_routing_stats() tells the router which tasks are in device slots and host memory, and the
  queue depth.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, replace
from typing import Optional

from adapterserve.adapters import EXAMPLE_TASKS, EXAMPLES_DIR
from adapterserve.runtime.cluster.remote import call, forward, returns_errors
from adapterserve.runtime.config import ServerConfig
from adapterserve.runtime.errors import AdapterServeError
from adapterserve.runtime.native.hardware import probe
from adapterserve.runtime.runtime import Runtime
from adapterserve.runtime.server import metrics
from adapterserve.runtime.server.classify import ClassifyService
from adapterserve.runtime.server.model_side import ModelSide, start_model_side
from adapterserve.runtime.types import Prediction

log = logging.getLogger("adapterserve.cluster")

# Each beat is a call to the registry, which costs CPU on both sides; a request carrying a newer
# generation syncs at once, so the period bounds only how soon an idle replica catches up.
FOLLOW_PERIOD_S = 1.0


@dataclass
class Answer:
    """A replica's answer to one classify call (pickled back to the ingress)."""

    replica: str
    task: str
    adapter_version: str
    labels: list[str]
    predictions: list[Prediction]
    queue_ns: int
    tokenize_ns: int
    inference_ns: int
    total_ns: int


class RegistryFiles:
    """The disk tier of a replica: adapter files come from the cluster registry, not a local data dir."""

    def __init__(self, registry, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = registry
        self.loop = loop
        self.current: dict[str, str] = {}  # task -> version, as of the last sync

    def load_files(self, task: str, version: Optional[str] = None) -> dict[str, bytes]:
        # Called on executor threads (registration, host-tier reloads). The handle call itself is made on
        # the replica's event loop: with Serve's router on that loop (SERVE_TUNING), a handle cannot be
        # awaited or waited for from any other thread.
        version = version or self.current[task]
        return self.on_loop(self.registry.load_files, task, version)

    def on_loop(self, method, *args):
        """call(method, *args) made and awaited on the replica's loop, from an executor thread (with
        Serve's router on that loop, handles are used there only)."""
        async def on_the_loop():
            return await call(method, *args)

        return asyncio.run_coroutine_threadsafe(on_the_loop(), self.loop).result()

    def holds(self, task: str, version: str) -> bool:
        return self.current.get(task) == version

    def release(self, task: str, version: str) -> None:
        pass  # the registry keeps only current versions; a retired one is never read back


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class AdapterReplica:
    async def __init__(self, config: ServerConfig, registry) -> None:
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.registry = registry
        # The ingress keeps each client's share of the queue; here every request comes from it.
        self.config = replace(config, max_client_share=1.0)
        self.metrics_registry = metrics.new_registry()
        self.classify_service = ClassifyService(self.config, self.metrics_registry)
        self.files = RegistryFiles(registry, asyncio.get_running_loop())
        self.generation = -1
        self._sync_lock = asyncio.Lock()
        self.side: Optional[ModelSide] = None
        self.side = await start_model_side(self.config, self.metrics_registry, self.files, self._prepare)
        self.classify_service.attach(self.side.runtime, self.side.batcher, self.side.tokenize_pool)
        self.metrics_address = ""
        if config.metrics_port:
            # Every replica serves its own /metrics on a free port; the ingress lists them for Prometheus.
            port = metrics.start_http(self.metrics_registry, config.host, _free_port(config.host),
                                      token=config.admin_token)
            self.metrics_address = f"{config.host}:{port}"
        self._follower = asyncio.get_running_loop().create_task(self._follow())
        import torch

        log.info("replica %s serving at generation %d (pid %d, %d torch threads)", self.replica_id, self.generation,
                 os.getpid(), torch.get_num_threads())

    @property
    def runtime(self) -> Runtime:
        return self.side.runtime

    # -- following the registry -------------------------------------------------------------------
    async def _prepare(self, side: ModelSide) -> None:
        self.side = side
        loop = asyncio.get_running_loop()
        snapshot = await call(self.registry.snapshot)
        seeds = []
        if self.config.register_examples and not snapshot["seeded"]:
            seeds = [(t, os.path.join(EXAMPLES_DIR, t), "seed") for t in EXAMPLE_TASKS
                     if os.path.isdir(os.path.join(EXAMPLES_DIR, t))]
        for task, path, mode in seeds + [(t, p, "preload") for t, p in self.config.preload()]:
            spec = await loop.run_in_executor(side.admin_executor, side.runtime.load_spec, path)
            await forward(self.registry.commit, task, spec.files, spec.version, spec.labels, spec.metadata,
                          spec.summary(), mode, idempotent=False)
        if seeds:
            await call(self.registry.mark_seeded)
        await self.sync(0)

    async def sync(self, at_least: int) -> None:
        """Apply the registry's changes until this replica is at generation at_least or later."""
        async with self._sync_lock:
            if 0 <= at_least <= self.generation:
                return
            snapshot = await call(self.registry.snapshot)
            if snapshot["generation"] != self.generation:
                await asyncio.get_running_loop().run_in_executor(self.side.admin_executor, self._apply, snapshot)

    def _apply(self, snapshot: dict) -> None:
        runtime = self.side.runtime
        tasks = snapshot["tasks"]
        self.files.current = {t: e["version"] for t, e in tasks.items()}
        for task, entry in sorted(tasks.items()):
            if task in runtime.registry and runtime.registry.get(task).version == entry["version"]:
                continue
            try:
                files = self.files.load_files(task, entry["version"])
                runtime.add_adapter(task, files, replace=task in runtime.registry, labels=entry.get("labels"),
                                    metadata=entry.get("metadata"))
            except (AdapterServeError, OSError) as e:
                # One stored task that no longer loads must not keep the healthy ones from serving.
                log.error("replica %s: task %s does not load: %s", self.replica_id, task, e)
                self.files.on_loop(self.registry.quarantine, task, entry["version"], str(e))
        for task in [e.task for e in runtime.registry.entries() if e.task not in tasks]:
            runtime.remove_adapter(task)  # requests holding it finish on the version they pinned
            self.classify_service.forget(task)
        self.generation = snapshot["generation"]

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_PERIOD_S)
            try:
                wanted = await call(self.registry.heartbeat, self.replica_id, self._report())
                if wanted > self.generation:
                    await self.sync(wanted)
            except Exception as e:  # noqa: BLE001 - the registry restarting is not this replica's failure
                log.warning("replica %s: registry unreachable (%s); retrying", self.replica_id, e)

    def _report(self) -> dict:
        stats = self.record_routing_stats()
        return dict(stats, metrics=self.metrics_address, pid=os.getpid())

    # -- called by the ingress and the router -----------------------------------------------------
    @returns_errors
    async def classify(self, task: str, texts: list[str], pairs: Optional[list[str]] = None, truncate: bool = True,
                       version: str = "", generation: int = 0, remaining: Optional[float] = None,
                       replica: Optional[str] = None) -> Answer:
        """replica: a routing hint read by the router (send this call to that replica), unused here."""
        if generation > self.generation:
            await self.sync(generation)
        result = await self.classify_service.classify(task, texts, pairs, truncate, peer="ingress",
                                                      remaining=remaining, version=version)
        return Answer(self.replica_id, task, result.adapter_version, result.labels,
                      [r.prediction for r in result.rows], result.queue_ns, result.tokenize_ns,
                      result.inference_ns, result.total_ns)

    @returns_errors
    async def validate(self, task: str, files: dict[str, bytes], labels: Optional[list[str]], metadata: dict,
                       replica: Optional[str] = None) -> dict:
        """Parse and check an adapter against this base (no slot is touched): what the registry stores."""
        spec = await asyncio.get_running_loop().run_in_executor(
            self.side.admin_executor, lambda: self.runtime.load_spec(files, labels, metadata))
        return {"version": spec.version, "labels": list(spec.labels), "metadata": dict(spec.metadata),
                "info": spec.summary()}

    async def info(self, replica: Optional[str] = None) -> dict:
        runtime, cfg = self.runtime, self.runtime.config
        return {"replica": self.replica_id, "base_model": runtime.base.model_id, "precision": runtime.precision,
                "engine": runtime.engine.name, "device": str(runtime.base.device),
                "max_input_length": runtime.base.max_length, "max_batch_tokens": cfg.max_batch_tokens,
                "slots": cfg.slots, "r_max": cfg.r_max, "paths": runtime.serving_paths(),
                "hardware": probe().summary(), "generation": self.generation}

    def record_routing_stats(self) -> dict:
        residency = self.runtime.residency
        device, host = [], []
        for entry in self.runtime.registry.entries():
            tier = residency.tier_of(entry)
            if tier == "DEVICE":
                device.append(entry.task)
            elif tier == "HOST":
                host.append(entry.task)
        slots = self.runtime.slot_table
        return {"device": device, "host": host, "queue": self.side.batcher.pending_texts,
                "generation": self.generation, "slot_loads": slots.loads, "slot_hits": slots.hits}

    async def check_health(self) -> None:
        if self.side is None or self.side.batcher is None or self.side.batcher.closed:
            raise RuntimeError("the replica's batcher is not running")
