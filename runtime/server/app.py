"""`adapterserve serve`: bind the ports, build the runtime, register adapters, serve gRPC, drain on SIGTERM.

Start-up order is chosen so that a mistake costs seconds, not a model load: ports are bound (gRPC
and /metrics) before the base loads, and every start error is one ConfigError line (exit 2).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from typing import Awaitable, Callable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapterserve.adapters.store import AdapterStore
from adapterserve.runtime.config import ServerConfig
from adapterserve.runtime.errors import AdapterServeError, ConfigError
from adapterserve.runtime.server import metrics
from adapterserve.runtime.server.auth import AuthInterceptor
from adapterserve.runtime.server.grpc_errors import ErrorMappingInterceptor, RequestMetrics
from adapterserve.runtime.server.classify import ClassifyService
from adapterserve.runtime.server.grpc_service import AdapterService, ClassifierServicer, RegistryServicer
from adapterserve.runtime.server.http_api import HttpFrontEnd
from adapterserve.runtime.server.model_side import ModelSide, start_model_side
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


class FrontEnd:
    """Every port of a serving process: gRPC (adapterserve.v1, OIP, health, reflection), the OIP HTTP
    app and /metrics, over one ClassifyService. Ports are bound before the model loads; the registry
    and inference calls answer UNAVAILABLE until attach()."""

    def __init__(self, config: ServerConfig, classify: ClassifyService, metrics_registry,
                 classifier: Optional[ClassifierServicer] = None) -> None:
        self.config = config
        # Room above the adapter limit so an oversize upload gets our message (which names the limit)
        # rather than gRPC's generic one; far larger messages are still cut off by gRPC itself.
        message_limit = 2 * config.max_adapter_bytes + (1 << 20)
        self.request_metrics = RequestMetrics(metrics_registry)
        self.metrics_registry = metrics_registry
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(config.admin_token, config.classify_token, self.request_metrics),
                          ErrorMappingInterceptor(self.request_metrics)],
            options=[("grpc.max_receive_message_length", message_limit),
                     ("grpc.max_send_message_length", 64 << 20),
                     ("grpc.so_reuseport", 0)],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # grpc.aio takes handlers only before start; they answer UNAVAILABLE until the model is warm.
        self.registry_servicer = RegistryServicer(config.admin_token)
        self.inference_servicer = InferenceServicer(classify, config.admin_token)
        pb_grpc.add_ClassifierServicer_to_server(classifier or ClassifierServicer(classify), self.server)
        pb_grpc.add_AdapterRegistryServicer_to_server(self.registry_servicer, self.server)
        ip_grpc.add_GRPCInferenceServiceServicer_to_server(self.inference_servicer, self.server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["Classifier"].full_name,
             pb.DESCRIPTOR.services_by_name["AdapterRegistry"].full_name, OIP_SERVICE,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.http = HttpFrontEnd(classify, config.admin_token, config.classify_token, message_limit,
                                 self.request_metrics)
        self.port = self.http_port = self.metrics_port = 0

    async def start(self) -> None:
        for name in SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = _bind(self.server, self.config)
        self.http_port = _bind_http(self.http, self.config)
        self.metrics_port = _start_metrics(self.metrics_registry, self.config)
        await self.server.start()
        if self.http_port:
            # Serving before the model loads: liveness answers at once, readiness says 503 until warm.
            await self.http.start()

    async def attach(self, service) -> None:
        """service: the registration logic (AdapterService or the cluster's); health turns SERVING."""
        if self.metrics_port:
            print(f"adapterserve metrics on http://{self.config.host}:{self.metrics_port}/metrics", flush=True)
        self.registry_servicer.attach(service)
        self.inference_servicer.attach(service)
        self.http.attach(service)
        if self.http_port:
            print(f"adapterserve http on http://{self.config.host}:{self.http_port}/v2", flush=True)
        for name in SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        await asyncio.gather(self.server.stop(grace), self.http.stop(grace))

    async def drain(self, grace: float, refuse_new: Callable[[], None], finish: Callable[[], Awaitable[None]],
                    unfinished: Callable[[], int]) -> None:
        """SIGTERM: health says NOT_SERVING first (probes and load balancers see it while the ports are
        still open; /v2/health/ready answers 503), new work is refused with UNAVAILABLE (HTTP 503),
        in-flight work gets the rest of `grace`, then RPCs and HTTP requests still running are cancelled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        log.info("draining: health NOT_SERVING, new work refused, in-flight work finishes within %.1fs", grace)
        await self.health.enter_graceful_shutdown()
        refuse_new()
        await asyncio.sleep(min(1.0, grace / 4))  # long enough for a health probe to read NOT_SERVING
        await self.stop(max(0.0, deadline - loop.time()))
        try:
            await asyncio.wait_for(finish(), timeout=max(0.05, deadline - loop.time()))
        except asyncio.TimeoutError:
            log.warning("grace of %.1fs is over with %d texts unfinished; exiting", grace, unfinished())


async def serve(config: ServerConfig) -> int:
    metrics_registry = metrics.new_registry()
    classify = ClassifyService(config, metrics_registry)
    front = FrontEnd(config, classify, metrics_registry)
    await front.start()
    try:
        loop = asyncio.get_running_loop()
        store = AdapterStore(config.data_dir) if config.data_dir else None  # also the disk tier
        services: list[AdapterService] = []

        async def prepare(side: ModelSide) -> None:
            services.append(AdapterService(side.runtime, config, side.admin_executor, store,
                                           on_unregistered=classify.forget))
            await loop.run_in_executor(side.model_executor, services[0].restore)

        side = await start_model_side(config, metrics_registry, store, prepare)
        runtime, batcher = side.runtime, side.batcher
        if store is not None:
            metrics_registry.register(metrics.QuarantineCollector(store))
        classify.attach(runtime, batcher, side.tokenize_pool)
        await front.attach(services[0])
    except BaseException:
        await front.stop(0)  # a failed start must not leave a half-open port behind
        raise
    tasks = ", ".join(a.task for a in runtime.list_adapters()) or "none"
    log.info("serving on %s:%d (base %s, %s, %s); tasks: %s", config.host, front.port, runtime.base.model_id,
             runtime.precision, runtime.base.device, tasks)
    print(f"adapterserve listening on {config.host}:{front.port}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    await front.drain(config.grace, batcher.refuse_new, batcher.close, lambda: batcher.pending_texts)
    # Whatever still runs after the grace (a long forward, a registration's fsync) is not waited for:
    # run() exits the process without joining these threads.
    side.shutdown()
    log.info("stopped")
    return 0


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

