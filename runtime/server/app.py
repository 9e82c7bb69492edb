"""`adapterserve serve`: bind the ports, build the runtime, register adapters, serve gRPC, drain on SIGTERM.

Start-up order is chosen so that a mistake costs seconds, not a model load: ports are bound (gRPC
and /metrics) before the base loads, and every start error is one ConfigError line (exit 2).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Optional

import grpc
from prometheus_client import Histogram
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapterserve import __version__
from adapterserve.adapters.store import AdapterStore
from adapterserve.runtime.config import ServerConfig
from adapterserve.runtime.errors import AdapterServeError, ConfigError
from adapterserve.runtime.native.hardware import probe
from adapterserve.runtime.runtime import Runtime
from adapterserve.runtime.server import metrics
from adapterserve.runtime.server.auth import AuthInterceptor
from adapterserve.runtime.server.batcher import Batcher, BatcherMetrics
from adapterserve.runtime.server.grpc_errors import ErrorMappingInterceptor, RequestMetrics
from adapterserve.runtime.server.classify import ClassifyService
from adapterserve.runtime.server.grpc_service import AdapterService, ClassifierServicer, RegistryServicer
from adapterserve.runtime.server.http_api import HttpFrontEnd
from adapterserve.runtime.server.oip_grpc import SERVICE as OIP_SERVICE
from adapterserve.runtime.server.oip_grpc import InferenceServicer, ip_grpc
from adapterserve.runtime.server.stubs import pb, pb_grpc

log = logging.getLogger("adapterserve")

SERVICES = ("", "adapterserve.v1.Classifier", "adapterserve.v1.AdapterRegistry", OIP_SERVICE)


def _check_free(host: str, port: int, what: str, flag: str) -> None:
    """Refuse a port in use with our one line before gRPC or the HTTP server try it (gRPC's own failure
    is a C-core log line and a RuntimeError)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({what}): {e.strerror}; check --host") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe_socket:
        # As the servers themselves bind: a listener is refused, connections left in TIME_WAIT are not.
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe_socket.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({what}): {e.strerror}; pick another with {flag} "
                              f"(0 = {'any free port' if flag == '--port' else 'off'})") from None


def _bind(server, config: ServerConfig) -> int:
    address = f"{config.host}:{config.port}"
    _check_free(config.host, config.port, "gRPC", "--port")
    _check_free(config.host, config.metrics_port, "/metrics", "--metrics-port")
    _check_free(config.host, config.http_port, "HTTP", "--http-port")
    try:
        if config.tls_cert:
            try:
                with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
                    credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
            except OSError as e:
                raise ConfigError(f"cannot read the TLS key/certificate: {e.filename}: {e.strerror}") from None
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as e:  # grpc: "Failed to bind to address ..."
        raise ConfigError(f"cannot listen on {address} (gRPC): the port is in use or the address is not this "
                          f"machine's; pick another with --port (0 = any free port)") from e


def _bind_http(http: HttpFrontEnd, config: ServerConfig) -> int:
    if not config.http_port:
        return 0
    try:
        return http.bind(config.host, config.http_port, config.tls_cert, config.tls_key)
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.host}:{config.http_port} (HTTP): {e.strerror}; "
                          "pick another with --http-port (0 disables it)") from None


def _start_metrics(registry, config: ServerConfig):
    try:
        return metrics.start_http(registry, config.host, config.metrics_port, token=config.admin_token)
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.host}:{config.metrics_port} (/metrics): {e.strerror}; "
                          "pick another with --metrics-port (0 disables it)") from None


async def serve(config: ServerConfig) -> int:
    import torch

    # Room above the adapter limit so an oversize upload gets our message (which names the limit)
    # rather than gRPC's generic one; far larger messages are still cut off by gRPC itself.
    message_limit = 2 * config.max_adapter_bytes + (1 << 20)
    metrics_registry = metrics.new_registry()
    request_metrics = RequestMetrics(metrics_registry)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(config.admin_token, config.classify_token, request_metrics),
                      ErrorMappingInterceptor(request_metrics)],
        options=[("grpc.max_receive_message_length", message_limit),
                 ("grpc.max_send_message_length", 64 << 20),
                 ("grpc.so_reuseport", 0)],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # grpc.aio takes handlers only before start; they answer UNAVAILABLE until the model is warm.
    classify = ClassifyService(config, metrics_registry)
    classifier = ClassifierServicer(classify)
    registry_servicer = RegistryServicer(config.admin_token)
    inference_servicer = InferenceServicer(classify, config.admin_token)
    pb_grpc.add_ClassifierServicer_to_server(classifier, server)
    pb_grpc.add_AdapterRegistryServicer_to_server(registry_servicer, server)
    ip_grpc.add_GRPCInferenceServiceServicer_to_server(inference_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Classifier"].full_name,
         pb.DESCRIPTOR.services_by_name["AdapterRegistry"].full_name, OIP_SERVICE,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = _bind(server, config)
    http = HttpFrontEnd(classify, config.admin_token, config.classify_token, message_limit, request_metrics)
    http_port = _bind_http(http, config)
    metrics_port = _start_metrics(metrics_registry, config)
    await server.start()
    if http_port:
        # Serving before the model loads: liveness answers at once, readiness says 503 until warm.
        await http.start()

    try:
        loop = asyncio.get_running_loop()
        # One executor owns the device; with several workers each thread gets its share of the cores.
        workers = config.model_workers
        threads_total = config.runtime.torch_threads or torch.get_num_threads()
        per_worker = max(1, threads_total // workers)
        model_executor = ThreadPoolExecutor(workers, thread_name_prefix="model", initializer=torch.set_num_threads,
                                            initargs=(per_worker,))
        runtime_config = replace(config.runtime, torch_threads=per_worker) if workers > 1 else config.runtime
        tokenize_pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenize")
        store = AdapterStore(config.data_dir) if config.data_dir else None  # also the disk tier
        load_seconds = Histogram(f"{metrics.PREFIX}_adapter_load_duration_seconds",
                                 "Time to copy an adapter into a device slot", buckets=metrics.LATENCY_BUCKETS,
                                 registry=metrics_registry)
        runtime = await loop.run_in_executor(model_executor, partial(Runtime, runtime_config, store, load_seconds.observe))
        # Registration (parse, validate, fsync) runs beside inference, not queued behind it: it touches no
        # slot; a new adapter is copied into a slot by the model executor on its first batch.
        admin_executor = ThreadPoolExecutor(1, thread_name_prefix="admin")
        service = AdapterService(runtime, config, admin_executor, store, on_unregistered=classify.forget)
        await loop.run_in_executor(model_executor, service.restore)
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
        await asyncio.gather(*[loop.run_in_executor(model_executor, _warm_up, runtime, barrier, threads)
                               for _ in range(workers)])
        if long_executor is not None:
            await loop.run_in_executor(long_executor, _warm_up, runtime, threading.Barrier(1), None)
        # Everything built so far (model, tokenizer, modules) lives as long as the process: move it out
        # of the cyclic GC's generations so collections while serving only walk request garbage.
        gc.collect()
        gc.freeze()

        batcher = Batcher(runtime, model_executor, config.runtime.max_batch_tokens, config.runtime.max_batch_size,
                          config.max_wait_ms, config.max_queue, workers=workers,
                          metrics_factory=lambda b: BatcherMetrics(metrics_registry, b),
                          long_row_tokens=config.long_input_tokens, long_executor=long_executor)
        batcher.start()
        _register_runtime_metrics(metrics_registry, runtime)
        if store is not None:
            metrics_registry.register(metrics.QuarantineCollector(store))
        if metrics_port:
            print(f"adapterserve metrics on http://{config.host}:{metrics_port}/metrics", flush=True)
        classify.attach(runtime, batcher, tokenize_pool)
        registry_servicer.attach(service)
        inference_servicer.attach(service)
        http.attach(service)
        if http_port:
            print(f"adapterserve http on http://{config.host}:{http_port}/v2", flush=True)
        for name in SERVICES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await server.stop(0)  # a failed start must not leave a half-open port behind
        await http.stop(0)
        raise
    tasks = ", ".join(a.task for a in runtime.list_adapters()) or "none"
    log.info("serving on %s:%d (base %s, %s, %s); tasks: %s", config.host, port, runtime.base.model_id,
             runtime.precision, runtime.base.device, tasks)
    print(f"adapterserve listening on {config.host}:{port}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    await _drain(config.grace, loop, server, http, health_servicer, batcher)
    # Whatever still runs after the grace (a long forward, a registration's fsync) is not waited for:
    # run() exits the process without joining these threads.
    for executor in (model_executor, admin_executor, tokenize_pool):
        executor.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")
    return 0


async def _drain(grace: float, loop, server, http: HttpFrontEnd, health_servicer, batcher: Batcher) -> None:
    """SIGTERM: health says NOT_SERVING first (probes and load balancers see it while the ports are
    still open; /v2/health/ready answers 503), new work is refused with UNAVAILABLE (HTTP 503),
    in-flight work gets the rest of `grace`, then RPCs and HTTP requests still running are cancelled."""
    deadline = loop.time() + grace
    log.info("draining: health NOT_SERVING, new work refused, in-flight work finishes within %.1fs", grace)
    await health_servicer.enter_graceful_shutdown()
    batcher.refuse_new()
    await asyncio.sleep(min(1.0, grace / 4))  # long enough for a health probe to read NOT_SERVING
    await asyncio.gather(server.stop(max(0.0, deadline - loop.time())), http.stop(max(0.0, deadline - loop.time())))
    try:
        await asyncio.wait_for(batcher.close(), timeout=max(0.05, deadline - loop.time()))
    except asyncio.TimeoutError:
        log.warning("grace of %.1fs is over with %d texts unfinished; exiting", grace, batcher.pending_texts)


def _register_runtime_metrics(registry, runtime: Runtime) -> None:
    hw = probe()
    hardware = {"cpu": hw.cpu_model or hw.machine, "cpu_flags": ",".join(
        n for n, on in (("avx512f", hw.avx512f), ("avx512_bf16", hw.avx512_bf16), ("amx_bf16", hw.amx_bf16)) if on),
        "native": "off" if hw.native_unavailable else "on", "cuda_device": hw.cuda_device or ""}
    metrics.register_build_info(registry, __version__, runtime.base.model_id, runtime.serving_paths(), hardware)
    registry.register(metrics.MemoryCollector(runtime))
    registry.register(metrics.AdapterCacheCollector([runtime.slot_table, runtime.residency.wide_table],
                                                    runtime.host_tier))


def _warm_up(runtime: Runtime, barrier: threading.Barrier, threads: Optional[int]) -> None:
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


def run(config: ServerConfig) -> int:
    try:
        code = asyncio.run(serve(config))
    except AdapterServeError as e:
        print(f"adapterserve: error: {e}", file=sys.stderr)
        return 2
    if any(t.name.startswith(("model", "admin", "tokenize")) for t in threading.enumerate()):
        # A forward or a write still running after the grace would hold the interpreter's exit (it joins
        # executor threads): leave now, as the grace promised. The store's writes are atomic.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

