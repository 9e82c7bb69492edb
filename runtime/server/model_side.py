"""The model side of a server process: the runtime on its executor threads, warmed, behind a batcher.

`adapterserve serve` and each cluster replica (runtime/cluster/replica.py) start the same thing:
executors (model workers, an optional long-input lane, tokenizer pool, one admin thread for
registrations), the Runtime built on a model thread, `prepare` (register what the process starts
with), one warm-up forward per model thread, then the batcher. Ports and front ends are not here.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Awaitable, Callable, Optional

from prometheus_client import Histogram

from adapterserve import __version__
from adapterserve.runtime.config import ServerConfig
from adapterserve.runtime.native.hardware import probe
from adapterserve.runtime.runtime import DiskTier, Runtime
from adapterserve.runtime.server import metrics
from adapterserve.runtime.server.batcher import Batcher, BatcherMetrics

log = logging.getLogger("adapterserve")


@dataclass
class ModelSide:
    runtime: Runtime
    batcher: Batcher
    model_executor: ThreadPoolExecutor
    admin_executor: ThreadPoolExecutor  # registrations: parse, validate, fsync, beside inference
    tokenize_pool: ThreadPoolExecutor

    def shutdown(self) -> None:
        """Whatever still runs (a long forward, a registration's fsync) is not waited for."""
        for executor in (self.model_executor, self.admin_executor, self.tokenize_pool):
            executor.shutdown(wait=False, cancel_futures=True)


async def start_model_side(config: ServerConfig, metrics_registry, disk: Optional[DiskTier],
                           prepare: Callable[["ModelSide"], Awaitable[None]]) -> ModelSide:
    """prepare(side) runs once the runtime exists and before warm-up: it registers the adapters the
    process starts with (side.batcher is not set yet)."""
    import torch

    loop = asyncio.get_running_loop()
    # One executor owns the device; with several workers each thread gets its share of the cores.
    workers = config.model_workers
    threads_total = config.runtime.torch_threads or torch.get_num_threads()
    per_worker = max(1, threads_total // workers)
    model_executor = ThreadPoolExecutor(workers, thread_name_prefix="model", initializer=torch.set_num_threads,
                                        initargs=(per_worker,))
    runtime_config = replace(config.runtime, torch_threads=per_worker) if workers > 1 else config.runtime
    tokenize_pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenize")
    admin_executor = ThreadPoolExecutor(1, thread_name_prefix="admin")
    load_seconds = Histogram(f"{metrics.PREFIX}_adapter_load_duration_seconds",
                             "Time to copy an adapter into a device slot", buckets=metrics.LATENCY_BUCKETS,
                             registry=metrics_registry)
    runtime = await loop.run_in_executor(model_executor, partial(Runtime, runtime_config, disk, load_seconds.observe))
    side = ModelSide(runtime, None, model_executor, admin_executor, tokenize_pool)  # type: ignore[arg-type]
    await prepare(side)
    if config.merged_task:
        await loop.run_in_executor(model_executor, runtime.merge, config.merged_task)
    long_executor, threads = None, per_worker
    if config.long_input_tokens and runtime.base.max_length >= config.long_input_tokens and not config.merged_task:
        long_threads = threads_total
        if runtime.base.device.type == "cpu":
            # The lanes split the cores rather than share them: OpenMP teams that outnumber the cores
            # spin against each other, and a short request behind an 8k-token forward then took ~1 s
            # at p99 instead of ~25 ms (loadtest/long_inputs_bench.py, 2 cores).
            long_threads = max(1, threads_total // 4)
            threads = max(1, (threads_total - long_threads) // workers)
        long_executor = ThreadPoolExecutor(1, thread_name_prefix="model-long", initializer=torch.set_num_threads,
                                           initargs=(long_threads,))
        log.info("requests with a row of %d tokens or more run in a lane of their own (%d threads; others %d per "
                 "worker)", config.long_input_tokens, long_threads, threads)
    # Each worker thread warms once (lazy init, OpenMP team); the barrier puts one warm-up on each.
    barrier = threading.Barrier(workers)
    await asyncio.gather(*[loop.run_in_executor(model_executor, warm_up, runtime, barrier, threads)
                           for _ in range(workers)])
    if long_executor is not None:
        await loop.run_in_executor(long_executor, warm_up, runtime, threading.Barrier(1), None)
    # Everything built so far (model, tokenizer, modules) lives as long as the process: move it out
    # of the cyclic GC's generations so collections while serving only walk request garbage.
    gc.collect()
    gc.freeze()
    side.batcher = Batcher(runtime, model_executor, config.runtime.max_batch_tokens, config.runtime.max_batch_size,
                           config.max_wait_ms, config.max_queue, workers=workers,
                           metrics_factory=lambda b: BatcherMetrics(metrics_registry, b),
                           long_row_tokens=config.long_input_tokens, long_executor=long_executor)
    side.batcher.start()
    register_runtime_metrics(metrics_registry, runtime)
    return side


def register_runtime_metrics(registry, runtime: Runtime) -> None:
    hw = probe()
    hardware = {"cpu": hw.cpu_model or hw.machine, "cpu_flags": ",".join(
        n for n, on in (("avx512f", hw.avx512f), ("avx512_bf16", hw.avx512_bf16), ("amx_bf16", hw.amx_bf16)) if on),
        "native": "off" if hw.native_unavailable else "on", "cuda_device": hw.cuda_device or ""}
    metrics.register_build_info(registry, __version__, runtime.base.model_id, runtime.serving_paths(), hardware)
    registry.register(metrics.MemoryCollector(runtime))
    registry.register(metrics.AdapterCacheCollector([runtime.slot_table, runtime.residency.wide_table],
                                                    runtime.host_tier))


def warm_up(runtime: Runtime, barrier: threading.Barrier, threads: Optional[int]) -> None:
    """One forward per registered task so the first real request does not pay for lazy init. threads:
    this model thread's intra-op threads from now on (None: as its executor set them)."""
    barrier.wait(timeout=600)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    tasks = [a.task for a in runtime.list_adapters()]
    if runtime.merged_task is not None:
        tasks = [runtime.merged_task.task]  # warming others would unmerge
    runtime.engine.encode(runtime.encoder.collate(runtime.encoder.encode(["warm up"]), runtime.base.device), [0])
    if tasks:
        runtime.classify([(t, "warm up") for t in tasks])
