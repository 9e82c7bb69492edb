"""The cluster's front door: the same gRPC services (adapterserve.v1, OIP, health, reflection), OIP
HTTP app and /metrics as `adapterserve serve`, in front of the replica deployment.

Clients change only the address. The front ends (runtime/server) are reused as they are; what they
call is replaced:
- ClusterClassify: validation, deadlines and per-client shares here, then one call to a replica
  chosen by the affinity router, carrying the registry generation this ingress has seen;
- ClusterAdapters: register = read the source here, validate on a replica, commit to the registry
  (the store's single writer), then advance this ingress's generation before answering, so every
  request sent after the answer is served at or after the change (replica.py's contract);
- RegistryMirror: listings and model metadata from the registry's snapshot, refreshed on every
  change made here and every FOLLOW_PERIOD_S for changes made elsewhere.
One ingress replica per application: the generation it hands out is what orders requests after
registry changes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from adapterserve import __version__
from adapterserve.adapters.peft_lora import read_adapter_dir
from adapterserve.runtime.cluster.remote import call, forward
from adapterserve.runtime.cluster import routing_stats
from adapterserve.runtime.config import ServerConfig
from adapterserve.runtime.errors import (DeadlineExceededError, InvalidInputError, TaskExistsError, UnavailableError,
                                         UnknownTaskError)
from adapterserve.runtime.server import metrics
from adapterserve.runtime.server.app import FrontEnd
from adapterserve.runtime.server.classify import Classified, ClassifyService, TaskStatistics, check_version
from adapterserve.runtime.server.grpc_service import ClassifierServicer, request_path, uploaded_files
from adapterserve.runtime.server.stubs import pb
from adapterserve.runtime.types import AdapterInfo, check_task_name

log = logging.getLogger("adapterserve.cluster")

# Only replicas' reports (metrics targets, residency in listings) and changes made elsewhere come
# through this poll: requests are ordered by the generation each call carries, not by it.
FOLLOW_PERIOD_S = 1.0
TARGETS_FILE = "prometheus_targets.json"


@dataclass
class MirrorSpec:
    labels: list[str]
    peft_type: str
    rank: int
    target_modules: list[str]
    size_bytes: int
    metadata: dict


@dataclass
class MirrorEntry:
    task: str
    version: str
    spec: MirrorSpec
    registered_at: float


@dataclass
class PredictionRow:
    prediction: object


class RegistryMirror:
    """What the registry holds, as the front ends read a runtime's registry (get, entries, in, len)."""

    def __init__(self) -> None:
        self.generation = -1
        self.entries_by_task: dict[str, MirrorEntry] = {}
        self.damaged: dict[str, str] = {}
        self.replicas: dict[str, dict] = {}  # replica id -> its last report

    @property
    def registry(self) -> "RegistryMirror":
        return self

    def load(self, snapshot: dict, replicas: dict[str, dict]) -> None:
        if snapshot["generation"] < self.generation:
            return  # an older snapshot that arrived late
        entries = {}
        for task, e in snapshot["tasks"].items():
            info = e.get("info") or {}
            entries[task] = MirrorEntry(task, e["version"], MirrorSpec(
                list(e.get("labels") or []), info.get("peft_type", ""), int(info.get("rank", 0)),
                list(info.get("target_modules", [])), int(info.get("size_bytes", 0)), dict(e.get("metadata") or {})),
                float(e.get("registered_at") or 0.0))
        self.entries_by_task, self.damaged = entries, dict(snapshot["damaged"])
        self.generation, self.replicas = snapshot["generation"], replicas

    # the runtime registry's reading side
    def get(self, task: str) -> MirrorEntry:
        entry = self.entries_by_task.get(task)
        if entry is None:
            raise UnknownTaskError(f"task {task!r} is not registered; ListAdapters shows the registered tasks")
        return entry

    def entries(self) -> list[MirrorEntry]:
        return list(self.entries_by_task.values())

    def __contains__(self, task: str) -> bool:
        return task in self.entries_by_task

    def __len__(self) -> int:
        return len(self.entries_by_task)

    def metrics_targets(self) -> list[str]:
        """host:port of every reporting replica's /metrics."""
        return sorted(r["metrics"] for r in self.replicas.values() if r.get("metrics"))

    # the runtime's listing side
    def residency(self, task: str) -> str:
        """The best tier any replica holds the task in."""
        tiers = [("DEVICE", "device"), ("HOST", "host")]
        for name, key in tiers:
            if any(task in report.get(key, ()) for report in self.replicas.values()):
                return name
        return "DISK"

    def info(self, entry: MirrorEntry) -> AdapterInfo:
        s = entry.spec
        return AdapterInfo(task=entry.task, version=entry.version, peft_type=s.peft_type, rank=s.rank,
                           target_modules=s.target_modules, labels=s.labels, size_bytes=s.size_bytes,
                           residency=self.residency(entry.task), registered_at=entry.registered_at,
                           metadata=s.metadata)

    def list_adapters(self) -> list[AdapterInfo]:
        return [self.info(e) for e in self.entries()]

    def get_adapter(self, task: str) -> AdapterInfo:
        return self.info(self.get(task))


class ClusterClassify(ClassifyService):
    """The shared classify path with its model side replaced by a call to a replica."""

    def __init__(self, config: ServerConfig, metrics_registry, replicas, mirror: RegistryMirror) -> None:
        super().__init__(config, metrics_registry)
        # Classify calls take Serve's gRPC transport to the replicas (a direct channel to each replica's
        # inter-deployment server) rather than Ray actor calls: its arguments and answers are small and
        # never ObjectRefs, and a unary gRPC call skips the actor task and Serve's streamed acceptance.
        # Registration keeps the actor path (uploads can exceed a gRPC message).
        self.replicas = replicas.options(_by_reference=False)
        self.mirror = mirror
        self.retries = 0  # calls sent again after their replica was lost (RouterCollector exports it)
        self.inflight = 0
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def set_ready(self, ready: bool) -> None:
        """False: new requests are refused with UNAVAILABLE (start-up, drain)."""
        self._ready = ready

    def check_ready(self) -> None:
        if not self._ready:
            raise UnavailableError("the cluster's replicas are still starting; retry when health reports SERVING")

    async def _admitted(self, task, texts, pairs, truncate, deadline, version, start) -> Classified:
        if task not in self.mirror and task in self.mirror.damaged:
            raise UnknownTaskError(f"task {task!r} is not served: {self.mirror.damaged[task]}")
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.inflight += 1
        try:
            answer = await forward(self.replicas.classify, task=task, texts=texts, pairs=pairs, truncate=truncate,
                                   version=version, generation=self.mirror.generation, remaining=remaining,
                                   on_retry=self._count_retry)
        except BaseException:
            if task in self.mirror:
                stats = self.statistics.setdefault(task, TaskStatistics())
                stats.fail_count += 1
                stats.fail_ns += time.perf_counter_ns() - start
            raise
        finally:
            self.inflight -= 1
        check_version(task, answer.adapter_version, version)
        total = time.perf_counter_ns() - start
        if self.tokenize_seconds is not None:
            self.tokenize_seconds.observe(answer.tokenize_ns / 1e9)
        if self.task_metrics is not None:
            self.task_metrics.observe(task, len(texts))
        stats = self.statistics.setdefault(task, TaskStatistics())
        stats.requests += 1
        stats.texts += len(texts)
        stats.success_count += 1
        stats.success_ns += total
        stats.queue_ns += answer.queue_ns
        stats.tokenize_ns += answer.tokenize_ns
        stats.inference_ns += answer.inference_ns
        stats.last_inference_ms = int(time.time() * 1000)
        return Classified(task=task, adapter_version=answer.adapter_version, labels=answer.labels,
                          rows=[PredictionRow(p) for p in answer.predictions], queue_ns=answer.queue_ns,
                          tokenize_ns=answer.tokenize_ns, inference_ns=answer.inference_ns, total_ns=total)

    def _count_retry(self) -> None:
        self.retries += 1


class ClusterAdapters:
    """Registration for the cluster, with AdapterService's interface (what the front ends call)."""

    def __init__(self, config: ServerConfig, replicas, registry, mirror: RegistryMirror,
                 on_unregistered=None) -> None:
        self.config = config
        self.replicas = replicas
        self.registry = registry
        self.mirror = mirror
        self.runtime = mirror  # listings: the front ends read runtime.registry / list_adapters / get_adapter
        self.on_unregistered = on_unregistered
        self._lock = asyncio.Lock()

    @property
    def store(self) -> RegistryMirror:
        return self.mirror  # quarantined tasks: store.damaged

    async def refresh(self) -> None:
        """The replicas' reports always; the task table only when the registry's generation moved."""
        generation, replicas = await call(self.registry.status)
        self.mirror.replicas = replicas
        if generation != self.mirror.generation:
            self.mirror.load(await call(self.registry.snapshot), replicas)

    def quarantined(self, task: str) -> Optional[str]:
        return self.mirror.damaged.get(task)

    async def _read_source(self, request: pb.RegisterAdapterRequest, deadline: Optional[float]) -> dict[str, bytes]:
        source = request.WhichOneof("source")
        if source == "path":
            path = request_path(request, self.config)
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: read_adapter_dir(path, self.config.adapter_root, self.config.max_adapter_bytes, deadline))
        if source == "files":
            return uploaded_files(request, self.config)
        raise InvalidInputError("RegisterAdapter needs a source: set path or files")

    async def register(self, request: pb.RegisterAdapterRequest, deadline: Optional[float] = None) -> AdapterInfo:
        files = await self._read_source(request, deadline)
        check_task_name(request.task)
        if request.task in self.mirror and not request.replace:
            old = self.mirror.get(request.task)
            raise TaskExistsError(f"task {request.task!r} is already registered (version {old.version[:12]}); "
                                  "set replace=true to swap it")
        checked = await forward(self.replicas.validate, task=request.task, files=files,
                                labels=list(request.labels) or None, metadata=dict(request.metadata))
        async with self._lock:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceededError("the request's deadline passed while the adapter was validated; nothing "
                                            "was registered (the caller has stopped waiting)")
            await forward(self.registry.commit, request.task, files, checked["version"], checked["labels"],
                          checked["metadata"], checked["info"], "replace" if request.replace else "register",
                          idempotent=False)
            await self.refresh()
        return self.mirror.get_adapter(request.task)

    async def unregister(self, task: str) -> AdapterInfo:
        async with self._lock:
            before = self.mirror.get_adapter(task) if task in self.mirror else None
            removed = await forward(self.registry.remove, task, idempotent=False)
            await self.refresh()
        if self.on_unregistered is not None:
            self.on_unregistered(task)
        if before is not None:
            return before
        entry = removed["entry"]
        return AdapterInfo(task=task, version=str(entry.get("version", "")), peft_type="", rank=0, target_modules=[],
                           labels=list(entry.get("labels") or []), size_bytes=0, residency="DISK",
                           registered_at=float(entry.get("registered_at") or 0.0),
                           metadata={"quarantined": removed["quarantined"] or ""})


class ClusterClassifierServicer(ClassifierServicer):
    def __init__(self, classify: ClusterClassify, replica_info: dict) -> None:
        super().__init__(classify)
        self.replica_info = replica_info

    async def GetInfo(self, request, context):
        self.service.check_ready()
        info, mirror = self.replica_info, self.service.mirror
        paths = dict(info["paths"], cluster="ray-serve", replicas=",".join(sorted(mirror.replicas)))
        return pb.ServerInfo(
            base_model=info["base_model"], precision=info["precision"], engine=info["engine"], device=info["device"],
            max_input_length=info["max_input_length"], max_texts_per_request=self.config.max_texts_per_request,
            max_batch_tokens=info["max_batch_tokens"], slots=info["slots"], r_max=info["r_max"],
            max_adapter_bytes=self.config.max_adapter_bytes, version=__version__,
            registered_adapters=len(mirror), paths=paths, hardware=info["hardware"])


class RouterCollector:
    """Routing decisions of this process's affinity router and the replicas' queue depths."""

    def __init__(self, mirror: RegistryMirror, classify: "ClusterClassify") -> None:
        self.mirror = mirror
        self.classify = classify

    def collect(self):
        routed = CounterMetricFamily(f"{metrics.PREFIX}_routed_requests", "Requests the affinity router sent, by why "
                                     "it chose the replica", labels=["reason"])
        with routing_stats.lock:
            counts = dict(routing_stats.routed)
            inflight = dict(routing_stats.inflight)
        for reason in routing_stats.REASONS:
            routed.add_metric([reason], counts.get(reason, 0))
        yield routed
        flight = GaugeMetricFamily(f"{metrics.PREFIX}_replica_inflight_requests",
                                   "Requests sent to a replica and not yet answered", labels=["replica"])
        for rid, n in sorted(inflight.items()):
            flight.add_metric([rid], n)
        yield flight
        depth = GaugeMetricFamily(f"{metrics.PREFIX}_replica_queue_depth",
                                  "Texts waiting in a replica's batcher, as it last reported", labels=["replica"])
        for rid, report in sorted(self.mirror.replicas.items()):
            depth.add_metric([rid], report.get("queue", 0))
        yield depth
        replicas = GaugeMetricFamily(f"{metrics.PREFIX}_replicas", "Replicas reporting to the registry")
        replicas.add_metric([], len(self.mirror.replicas))
        yield replicas
        yield CounterMetricFamily(f"{metrics.PREFIX}_replica_call_retries", "Classify calls sent again after the "
                                  "replica serving them was lost", value=self.classify.retries)


@dataclass
class IngressAddress:
    host: str
    port: int
    http_port: int
    metrics_port: int
    replica_metrics: list[str] = field(default_factory=list)


class ClusterIngress:
    async def __init__(self, config: ServerConfig, replicas, registry) -> None:
        self.config = config
        self.mirror = RegistryMirror()
        self.metrics_registry = metrics.new_registry()
        self.classify = ClusterClassify(config, self.metrics_registry, replicas, self.mirror)
        self.metrics_registry.register(RouterCollector(self.mirror, self.classify))
        self.adapters = ClusterAdapters(config, replicas, registry, self.mirror, on_unregistered=self.classify.forget)
        replica_info: dict = {}
        self.front = FrontEnd(config, self.classify, self.metrics_registry,
                              classifier=ClusterClassifierServicer(self.classify, replica_info))
        await self.front.start()
        try:
            # A replica answers once it has started, seeded the registry and loaded every task.
            replica_info.update(await forward(replicas.info))
            await self.adapters.refresh()
        except BaseException:
            await self.front.stop(0)
            raise
        self.classify.set_ready(True)
        await self.front.attach(self.adapters)
        self._follower = asyncio.get_running_loop().create_task(self._follow())
        log.info("cluster ingress on %s:%d; tasks: %s", config.host, self.front.port,
                 ", ".join(sorted(self.mirror.entries_by_task)) or "none")

    async def _follow(self) -> None:
        written = None
        while True:
            await asyncio.sleep(FOLLOW_PERIOD_S)
            try:
                await self.adapters.refresh()
            except Exception as e:  # noqa: BLE001 - the registry restarting: keep serving with what we know
                log.warning("registry unreachable (%s); retrying", e)
                continue
            targets = self.mirror.metrics_targets()
            if targets != written and self.config.data_dir:
                written = targets
                self._write_targets(targets)

    def _write_targets(self, targets: list[str]) -> None:
        """Prometheus file_sd: every replica's /metrics (point file_sd_configs at this file)."""
        path = os.path.join(self.config.data_dir, TARGETS_FILE)
        groups = [{"targets": targets, "labels": {"job": "adapterserve-replica"}}]
        if self.front.metrics_port:
            groups.append({"targets": [f"{self.config.host}:{self.front.metrics_port}"],
                           "labels": {"job": "adapterserve-ingress"}})
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(groups, fh)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)

    async def drain(self, grace: float) -> None:
        """Before the application is deleted: as `serve` on SIGTERM (health NOT_SERVING, new work refused,
        in-flight requests get the grace)."""
        classify = self.classify

        async def finish() -> None:
            while classify.inflight:
                await asyncio.sleep(0.02)

        await self.front.drain(grace, lambda: classify.set_ready(False), finish, lambda: classify.inflight)

    async def address(self) -> IngressAddress:
        return IngressAddress(self.config.host, self.front.port, self.front.http_port, self.front.metrics_port,
                              self.mirror.metrics_targets())

    async def check_health(self) -> None:
        if not self.classify.ready:
            raise RuntimeError("the ingress is not serving")
