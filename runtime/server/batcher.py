"""Dynamic batcher: an asyncio queue in front of the model executor, one batch loop per model worker.

A batch is formed from whatever requests are waiting (and, after the first, up to max_wait_ms for
more) until the token budget or row cap is reached; tasks mix freely. With several model workers, each
takes at most its share (1/workers) of what is queued, and the rest waits for whichever worker frees
first. Requests whose deadline has
passed are dropped before they reach the model. The queue is bounded in texts: past max_queue a
request is refused with RESOURCE_EXHAUSTED instead of growing latency without limit.

Long inputs have a lane of their own: a request holding a row of at least long_row_tokens tokens (an
8k-token text on an 8k-context base takes seconds on a CPU) queues for a batch loop and model thread of
its own, so short requests keep being served beside it instead of waiting out its forward
(loadtest/long_inputs_bench.py measures both).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Optional

from adapterserve.runtime.errors import (DeadlineExceededError, InvalidInputError, ResourceExhaustedError,
                                         UnavailableError)
from adapterserve.runtime.runtime import Row, Runtime

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Work:
    rows: list[Row]
    deadline: Optional[float]  # time.monotonic() seconds, None = no deadline
    future: asyncio.Future
    tokens: int
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    queue_ns: int = 0
    inference_ns: int = 0


class BatcherMetrics:
    def __init__(self, registry, batcher: "Batcher") -> None:
        from prometheus_client import Gauge, Histogram

        from adapterserve.runtime.server.metrics import LATENCY_BUCKETS, PREFIX, SIZE_BUCKETS, TOKEN_BUCKETS

        self.queue_seconds = Histogram(f"{PREFIX}_queue_duration_seconds", "Time a request waited for its batch",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_seconds = Histogram(f"{PREFIX}_inference_duration_seconds",
                                           "Model time from its pool's first forward until the request's last row was done", buckets=LATENCY_BUCKETS,
                                           registry=registry)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Texts per model batch", buckets=SIZE_BUCKETS, registry=registry)
        self.batch_tokens = Histogram(f"{PREFIX}_batch_tokens", "Real (unpadded) tokens per model batch",
                                      buckets=TOKEN_BUCKETS, registry=registry)
        self.batch_adapters = Histogram(f"{PREFIX}_batch_adapters", "Distinct adapters in one model batch",
                                        buckets=SIZE_BUCKETS, registry=registry)
        depth = Gauge(f"{PREFIX}_queue_depth", "Texts waiting for the model", registry=registry)
        depth.set_function(lambda: batcher.pending_texts)

    def observe_batch(self, works: list, rows: list) -> None:
        self.batch_size.observe(len(rows))
        self.batch_tokens.observe(sum(r.encoded.length for r in rows))
        self.batch_adapters.observe(len({r.entry.key for r in rows}))
        for w in works:
            self.queue_seconds.observe(w.queue_ns / 1e9)
            self.inference_seconds.observe(w.inference_ns / 1e9)


def _resolve(works: list) -> None:
    for w in works:
        if not w.future.done():
            w.future.set_result(w)


class Batcher:
    def __init__(self, runtime: Runtime, executor: Executor, max_batch_tokens: int, max_batch_size: int,
                 max_wait_ms: float, max_queue: int, workers: int = 1,
                 metrics_factory: Optional[Callable[["Batcher"], BatcherMetrics]] = None,
                 long_row_tokens: int = 0, long_executor: Optional[Executor] = None) -> None:
        self.runtime = runtime
        self.executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.queue: "asyncio.Queue[Optional[Work]]" = asyncio.Queue()
        # The long-input lane (module docstring); off without its executor or threshold.
        self.long_row_tokens = long_row_tokens if long_executor is not None else 0
        self.long_executor = long_executor
        self.long_queue: "asyncio.Queue[Optional[Work]]" = asyncio.Queue()
        self.pending_texts = 0
        self.closed = False
        self.workers = workers  # batch loops, one per model worker: each forms a batch and waits for its forward
        self._tasks: list[asyncio.Task] = []
        self.metrics: Optional[BatcherMetrics] = metrics_factory(self) if metrics_factory is not None else None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(self.queue, self.executor, self.workers), name=f"batcher-{i}")
                       for i in range(self.workers)]
        if self.long_row_tokens:
            self._tasks.append(loop.create_task(self._loop(self.long_queue, self.long_executor, 1),
                                                name="batcher-long"))

    async def submit(self, rows: list[Row], deadline: Optional[float]) -> Work:
        if self.closed:
            raise UnavailableError("server is draining; retry on another replica", reason="draining")
        if len(rows) > self.max_queue:
            raise InvalidInputError(f"{len(rows)} texts in one request can never fit the queue of {self.max_queue} "
                                    "texts (--max-queue); split the request", reason="request_above_queue")
        if self.pending_texts + len(rows) > self.max_queue:
            raise ResourceExhaustedError(
                f"queue is full ({self.pending_texts} texts waiting, limit {self.max_queue}); back off and retry",
                reason="queue_full")
        work = Work(rows, deadline, asyncio.get_running_loop().create_future(),
                    tokens=sum(r.encoded.length for r in rows))
        self.pending_texts += len(rows)
        long = self.long_row_tokens and any(r.encoded.length >= self.long_row_tokens for r in rows)
        (self.long_queue if long else self.queue).put_nowait(work)
        return work

    def refuse_new(self) -> None:
        """Draining: new work is UNAVAILABLE from now on; what is queued still runs."""
        self.closed = True

    async def close(self) -> None:
        """Stop taking work; everything already queued still runs."""
        self.closed = True
        self.queue.put_nowait(None)
        self.long_queue.put_nowait(None)
        await asyncio.gather(*self._tasks)

    async def _next_batch(self, queue: asyncio.Queue, workers: int) -> Optional[list[Work]]:
        first = await queue.get()
        if first is None:
            queue.put_nowait(None)  # the other batch loops stop too
            return None
        batch, rows, tokens = [first], len(first.rows), first.tokens
        max_rows = self.max_batch_size
        if workers > 1:
            # Take only one worker's share of what is queued, whether the other workers are idle or
            # busy: a worker's forward runs on its own share of the cores, so one worker taking a whole
            # burst runs it at a fraction of the machine while the others, once free, find nothing
            # queued. What is left waits for whichever worker frees first. (Taking everything while
            # the others were busy put ONNX int8 + 2 workers' open-loop p99 at 60-65 ms, p99/p50
            # 3.4-3.7; with shares 47-55 ms, 2.65-3.04: docs/benchmarks.md.) A loop whose share is
            # already taken does not wait --max-wait-ms for more: the other workers serve what comes.
            max_rows = min(max_rows, -(-self.pending_texts // workers))
        wait_until = time.monotonic() + self.max_wait
        while rows < max_rows and tokens < self.max_batch_tokens:
            try:
                nxt = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if nxt is None:  # close(): finish this batch, then stop
                queue.put_nowait(None)
                break
            batch.append(nxt)
            rows += len(nxt.rows)
            tokens += nxt.tokens
        return batch

    async def _loop(self, queue: asyncio.Queue, executor: Executor, workers: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(queue, workers)
            if batch is None:
                return
            now_ns = time.perf_counter_ns()
            now = time.monotonic()
            live = []
            for w in batch:
                self.pending_texts -= len(w.rows)
                w.queue_ns = now_ns - w.enqueued_ns
                if w.future.done():  # the caller went away (cancelled)
                    continue
                if w.deadline is not None and now >= w.deadline:
                    w.future.set_exception(DeadlineExceededError(
                        "deadline passed while the request waited in the queue; raise the deadline or reduce load",
                        reason="deadline_in_queue"))
                    continue
                live.append(w)
            if not live:
                continue
            rows = [r for w in live for r in w.rows]
            start = time.perf_counter_ns()
            # The runtime cuts the pool into several forwards (length bands); answer each request as
            # soon as the forwards holding its rows are done instead of after the whole pool.
            work_of = {id(r): w for w in live for r in w.rows}
            rows_left = {id(w): len(w.rows) for w in live}

            def forward_done(batch_rows, start=start, work_of=work_of, rows_left=rows_left):
                # Runs on the model thread: count down here, resolve futures on the event loop.
                finished = []
                for r in batch_rows:
                    w = work_of[id(r)]
                    rows_left[id(w)] -= 1
                    if rows_left[id(w)] == 0:
                        w.inference_ns = time.perf_counter_ns() - start
                        finished.append(w)
                if finished:
                    loop.call_soon_threadsafe(_resolve, finished)

            try:
                await loop.run_in_executor(executor, self.runtime.infer, rows, forward_done)
            except Exception as e:  # noqa: BLE001 - every waiter must hear about it
                log.exception("inference failed for a batch of %d texts", len(rows))
                for w in live:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            elapsed = time.perf_counter_ns() - start
            for w in live:
                w.inference_ns = w.inference_ns or elapsed
            _resolve(live)  # the last forward's requests (earlier ones were answered by forward_done)
            if self.metrics is not None:
                self.metrics.observe_batch(live, rows)
