"""The one classify path every front end shares (adapterserve.v1 gRPC, OIP gRPC, OIP HTTP).

validate -> admit (the client's share of the queue) -> pin the task's current adapter version ->
tokenize (inline or in the pool) -> batcher -> model executor -> predictions. The pin is held until
the batch holding the request's rows is done, so a replace or unregister never pulls weights from
under a request: it is served wholly by one version. Front ends only translate their wire format to
a `classify` call and its `Classified` result back.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional

from adapterserve.runtime.config import ServerConfig
from adapterserve.runtime.errors import DeadlineExceededError, InvalidInputError, UnavailableError, UnknownTaskError
from adapterserve.runtime.runtime import Runtime
from adapterserve.runtime.server.admission import ClientShares
from adapterserve.runtime.server.batcher import Batcher
from adapterserve.runtime.types import Row

# A version named in a request matches the served one by its first characters, as listings show it.
MIN_VERSION_PREFIX = 12


@dataclass
class Classified:
    task: str
    adapter_version: str
    labels: list[str]
    rows: list[Row]  # in request order, each with its prediction
    queue_ns: int
    tokenize_ns: int
    inference_ns: int
    total_ns: int


@dataclass
class TaskStatistics:
    """Triton's per-model statistics (ModelStatistics), kept per task since it was registered."""

    requests: int = 0
    texts: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    tokenize_ns: int = 0
    inference_ns: int = 0
    last_inference_ms: int = 0


def check_version(task: str, served: str, requested: str) -> None:
    """A request that names a version is served only by that version (NOT_FOUND otherwise)."""
    if not requested or requested == served:
        return
    if len(requested) >= MIN_VERSION_PREFIX and served.startswith(requested):
        return
    raise UnknownTaskError(f"version {requested[:64]!r} of task {task!r} is not served; the current version is "
                           f"{served[:MIN_VERSION_PREFIX]} (name it, or no version for the current one)",
                           reason="stale_version")


class ClassifyService:
    def __init__(self, config: ServerConfig, registry=None) -> None:
        """registry: the Prometheus registry for the tokenize histogram and per-task counters (None: none)."""
        self.config = config
        self.shares = ClientShares(max(config.max_texts_per_request, int(config.max_client_share * config.max_queue)))
        self.runtime: Optional[Runtime] = None
        self.batcher: Optional[Batcher] = None
        self.tokenize_pool: Optional[ThreadPoolExecutor] = None
        self.tokenize_seconds = None
        self.task_metrics = None
        self.statistics: dict[str, TaskStatistics] = {}
        if registry is not None:
            from prometheus_client import Histogram

            from adapterserve.runtime.server.metrics import LATENCY_BUCKETS, PREFIX, TaskMetrics

            self.tokenize_seconds = Histogram(f"{PREFIX}_tokenize_duration_seconds", "Tokenization time per request",
                                              buckets=LATENCY_BUCKETS, registry=registry)
            self.task_metrics = TaskMetrics(registry, config.metrics_max_task_labels)

    def attach(self, runtime: Runtime, batcher: Batcher, tokenize_pool: ThreadPoolExecutor) -> None:
        self.runtime, self.batcher, self.tokenize_pool = runtime, batcher, tokenize_pool

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.batcher is not None and not self.batcher.closed

    def check_ready(self) -> None:
        if self.runtime is None:
            raise UnavailableError("the base model is still loading; retry when health reports SERVING")

    def forget(self, task: str) -> None:
        """An unregistered task's statistics and metric series go with it."""
        self.statistics.pop(task, None)
        if self.task_metrics is not None:
            self.task_metrics.labels.forget(task)

    def validate(self, task: str, texts: list, pairs: Optional[list]) -> None:
        n = len(texts)
        if not task:
            raise InvalidInputError("task is empty; name a registered task (ListAdapters shows them)")
        if n == 0:
            raise InvalidInputError("texts is empty; send 1 or more texts")
        if n > self.config.max_texts_per_request:
            raise InvalidInputError(f"{n} texts in one request; the limit is {self.config.max_texts_per_request}, split the request")
        if pairs and len(pairs) != n:
            raise InvalidInputError(f"text_pairs has {len(pairs)} entries but texts has {n}; send none or one per text")

    async def classify(self, task: str, texts: list[str], pairs: Optional[list[str]], truncate: bool, peer: str,
                       remaining: Optional[float], stream: bool = False, version: str = "") -> Classified:
        """remaining: seconds the caller still waits (None: no deadline). stream: wait for the
        connection's share instead of refusing (back-pressure on a stream)."""
        start = time.perf_counter_ns()
        self.check_ready()
        self.validate(task, texts, pairs)
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("the request's deadline had already passed on arrival")
        deadline = time.monotonic() + remaining if remaining is not None else None
        n = len(texts)
        if stream:
            await self.shares.wait_and_take(peer, n)
        else:
            self.shares.take(peer, n)
        try:
            return await self._admitted(task, texts, pairs or None, truncate, deadline, version, start)
        finally:
            await self.shares.give_back(peer, n)

    async def _admitted(self, task, texts, pairs, truncate, deadline, version, start) -> Classified:
        entry = self.runtime.registry.acquire(task)
        stats = None
        try:
            check_version(task, entry.version, version)
            stats = self.statistics.setdefault(task, TaskStatistics())
            t0 = time.perf_counter_ns()
            chars = sum(map(len, texts)) + (sum(map(len, pairs)) if pairs else 0)
            if chars <= self.config.inline_tokenize_chars:
                rows = self.runtime.encode_rows([entry] * len(texts), texts, pairs, truncate)
            else:
                rows = await asyncio.get_running_loop().run_in_executor(
                    self.tokenize_pool, self.runtime.encode_rows, [entry] * len(texts), texts, pairs, truncate)
            tokenize_ns = time.perf_counter_ns() - t0
            work = await self.batcher.submit(rows, deadline)
            await work.future
        except BaseException:
            if stats is not None:
                stats.fail_count += 1
                stats.fail_ns += time.perf_counter_ns() - start
            raise
        finally:
            self.runtime.registry.release(entry)
        total = time.perf_counter_ns() - start
        if self.tokenize_seconds is not None:
            self.tokenize_seconds.observe(tokenize_ns / 1e9)
        if self.task_metrics is not None:
            self.task_metrics.observe(task, len(texts))
        stats.requests += 1
        stats.texts += len(texts)
        stats.success_count += 1
        stats.success_ns += total
        stats.queue_ns += work.queue_ns
        stats.tokenize_ns += tokenize_ns
        stats.inference_ns += work.inference_ns
        stats.last_inference_ms = int(time.time() * 1000)
        return Classified(task=task, adapter_version=entry.version, labels=list(entry.spec.labels), rows=rows,
                          queue_ns=work.queue_ns, tokenize_ns=tokenize_ns, inference_ns=work.inference_ns,
                          total_ns=total)


async def answer_in_order(requests: AsyncIterator, handle: Callable[[object], Awaitable], limit: int) -> AsyncIterator:
    """A stream's requests handled concurrently (they batch together) and answered in request order; at
    most `limit` at once, so the client's writes wait (gRPC flow control) rather than pile up here."""
    pending: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(limit)

    async def reader():
        async for request in requests:
            await slots.acquire()
            pending.put_nowait(asyncio.ensure_future(handle(request)))
        pending.put_nowait(None)

    reader_task = asyncio.ensure_future(reader())
    try:
        while True:
            fut = await pending.get()
            if fut is None:
                break
            try:
                response = await fut
            finally:
                slots.release()
            yield response
    finally:
        reader_task.cancel()
        while not pending.empty():
            fut = pending.get_nowait()
            if fut is not None:
                fut.cancel()
