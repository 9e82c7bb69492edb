"""Prometheus exposition for adapterserve: the registry, the HTTP endpoint, build info, memory, and
the per-task label cap. Component metrics are defined beside their components (grpc_errors.py,
batcher.py, slots.py) against the registry made here.

Names: prefix adapterserve_, base units (seconds, bytes), _total on counters, HELP on everything.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily

PREFIX = "adapterserve"
OTHER_TASK = "_other"

# Geometric buckets, 0.5 ms .. ~10 s (factor 2): latency is heavy-tailed, linear buckets waste series.
LATENCY_BUCKETS = tuple(0.0005 * 2 ** i for i in range(15))  # 0.0005 .. 8.192
LATENCY_BUCKETS = LATENCY_BUCKETS + (10.0,)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = tuple(2 ** i for i in range(4, 17))  # 16 .. 65536

prometheus_client.disable_created_metrics()  # *_created series only add noise to every scrape


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


class TaskLabels:
    """Per-task label values, capped: past `cap` distinct tasks new ones report as `_other`, so a
    server with thousands of adapters cannot explode the series count. Forgetting a task removes its
    series."""

    def __init__(self, cap: int, metrics: list) -> None:
        self.cap = cap
        self.metrics = metrics  # labelled by task only
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def label(self, task: str) -> str:
        with self._lock:
            if task in self._known:
                return task
            if len(self._known) < self.cap:
                self._known.add(task)
                return task
            return OTHER_TASK

    def forget(self, task: str) -> None:
        with self._lock:
            if task not in self._known:
                return
            self._known.discard(task)
        for metric in self.metrics:
            try:
                metric.remove(task)
            except KeyError:
                pass


class TaskMetrics:
    def __init__(self, registry: CollectorRegistry, cap: int) -> None:
        self.requests = Counter(f"{PREFIX}_task_requests_total", "Classify requests by task (tasks past the label cap count as _other)",
                                ["task"], registry=registry)
        self.texts = Counter(f"{PREFIX}_task_texts_total", "Texts classified by task (tasks past the label cap count as _other)",
                             ["task"], registry=registry)
        self.labels = TaskLabels(cap, [self.requests, self.texts])

    def observe(self, task: str, texts: int) -> None:
        label = self.labels.label(task)
        self.requests.labels(label).inc()
        self.texts.labels(label).inc(texts)


class AdapterCacheCollector:
    """Slot-table counters (the slots and, where adapters above r_max have loaded, the wide slots), read at
    scrape time from the one place that counts them."""

    def __init__(self, slot_tables, host_tier) -> None:
        self.slot_tables = [t for t in slot_tables if t is not None]
        self.host_tier = host_tier

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        def total(counter: str) -> int:
            return sum(getattr(t, counter) for t in self.slot_tables)

        yield CounterMetricFamily(f"{PREFIX}_adapter_loads_total", "Adapters copied into a device slot", value=total("loads"))
        ev = CounterMetricFamily(f"{PREFIX}_adapter_evictions_total", "Adapters evicted from a tier (LRU)", labels=["tier"])
        ev.add_metric(["device"], total("evictions"))
        ev.add_metric(["host"], self.host_tier.evictions)
        yield ev
        yield CounterMetricFamily(f"{PREFIX}_adapter_cache_hits_total", "Batches that found their adapter already in a device slot", value=total("hits"))
        yield CounterMetricFamily(f"{PREFIX}_adapter_cache_misses_total", "Batches that had to load their adapter into a device slot", value=total("misses"))


class QuarantineCollector:
    """Tasks in the data dir that are not served because their files are damaged (adapters/store.py)."""

    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        yield GaugeMetricFamily(f"{PREFIX}_adapters_quarantined", "Tasks in the data dir not served because their "
                                "files are damaged (GetAdapter says why)", value=len(self.store.damaged))


class MemoryCollector:
    """Read at scrape time: process RSS always, CUDA allocated/reserved when on CUDA, adapter bytes per tier."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def collect(self):
        mem = GaugeMetricFamily(f"{PREFIX}_device_memory_bytes",
                                "Memory in use: process resident set (rss), and CUDA allocated/reserved on CUDA", labels=["kind"])
        mem.add_metric(["rss"], _rss_bytes())
        try:
            import torch

            if self.runtime.base.device.type == "cuda":
                mem.add_metric(["cuda_allocated"], torch.cuda.memory_allocated(self.runtime.base.device))
                mem.add_metric(["cuda_reserved"], torch.cuda.memory_reserved(self.runtime.base.device))
        except Exception:  # noqa: BLE001 - a scrape must never fail on this
            pass
        yield mem
        entries = self.runtime.registry.entries()
        wide = self.runtime.residency.wide_table
        resident = set(self.runtime.slot_table.resident()) | set(wide.resident() if wide is not None else ())
        adapters = GaugeMetricFamily(f"{PREFIX}_adapters", "Registered adapters by the tier they sit in", labels=["tier"])
        host = self.runtime.host_tier
        on_device = sum(1 for e in entries if e.key in resident)
        on_disk = sum(1 for e in entries if e.key not in resident and not host.in_memory(e))
        adapters.add_metric(["device"], on_device)
        adapters.add_metric(["host"], len(entries) - on_device - on_disk)
        adapters.add_metric(["disk"], on_disk)
        yield adapters
        amem = GaugeMetricFamily(f"{PREFIX}_adapter_memory_bytes",
                                 "Adapter memory: device = slot buffers (wide ones once made) and the bottleneck adapters and "
                                 "LoKr factors in slots; host = adapter tensors held in memory",
                                 labels=["tier"])
        pool = getattr(self.runtime.engine, "pool", None)
        made_on_use = pool.wide_bytes() + pool.bottleneck_bytes() + pool.kron_bytes() if pool is not None else 0
        amem.add_metric(["device"], self.runtime.engine.slot_bytes() * self.runtime.config.slots + made_on_use)
        amem.add_metric(["host"], self.runtime.host_tier.bytes)
        yield amem


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def register_build_info(registry: CollectorRegistry, version: str, base_model: str, paths: dict[str, str],
                        hardware: dict[str, str]) -> None:
    """paths: Runtime.serving_paths() (engine, precision, device, lora_path, ...); hardware: the probe's
    facts (cpu, its flags, compiler, native switch, CUDA device)."""
    labels = {"version": version, "base_model": base_model, **paths, **hardware}
    g = Gauge(f"{PREFIX}_build_info", "Always 1; labels describe the build, the served base, the paths the engine "
              "took and the hardware they were chosen for", list(labels), registry=registry)
    g.labels(*labels.values()).set(1)


def start_http(registry: CollectorRegistry, host: str, port: int, token: Optional[str] = None) -> Optional[int]:
    """Serve /metrics on `port`; 0 disables it (returns None). With a token (the admin token), a scrape
    needs `Authorization: Bearer <token>` (Prometheus: `authorization: {credentials: ...}`), so task
    names in the per-task series are not shown to whoever can reach the port."""
    if port == 0:
        return None
    if token is None:
        server, _thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
        return server.server_port
    import hmac
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    metrics_app = prometheus_client.make_wsgi_app(registry)
    expected = f"Bearer {token}".encode()

    def app(environ, start_response):
        if not hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(), expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"/metrics needs 'Authorization: Bearer <admin token>'\n"]
        return metrics_app(environ, start_response)

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # scrapes are not worth a log line each
            pass

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server.server_port
