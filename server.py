"""adapterserve entry point: parse config, build the runtime, serve gRPC, drain on SIGTERM.

    python server.py                     # packaged MiniLM + bundled sst2 / ag_news adapters on 127.0.0.1:50051
    python server.py --help              # every flag; each also reads ADAPTERSERVE_<FLAG> from the environment
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime.config import RuntimeConfig, ServerConfig
from runtime.errors import AdapterServeError

log = logging.getLogger("adapterserve")

# (flag, config object, field, type, help)
_FLAGS = [
    ("host", "server", "host", str, "address to bind"),
    ("port", "server", "port", int, "gRPC port (0 = pick a free one, printed at start)"),
    ("metrics-port", "server", "metrics_port", int, "Prometheus /metrics port (0 disables)"),
    ("metrics-max-task-labels", "server", "metrics_max_task_labels", int, "per-task series before _other"),
    ("base-model", "runtime", "base_model", str, "HF encoder directory (default: packaged MiniLM-L6)"),
    ("device", "runtime", "device", str, "auto | cpu | cuda"),
    ("precision", "runtime", "precision", str, "fp32 | fp16 | bf16 | int8 | nf4 (onnx engine: fp32 | int8; bf16 on a CPU: bf16 weights, fp32 activations)"),
    ("engine", "runtime", "engine", str, "torch | onnx (shared-base ONNX graph on ONNX Runtime)"),
    ("onnx-dir", "runtime", "onnx_dir", str, "exported shared-base directory (default: export once into the cache)"),
    ("slots", "runtime", "slots", int, "device adapter slots, slot 0 reserved"),
    ("r-max", "runtime", "r_max", int, "largest LoRA rank a slot holds"),
    ("max-host-adapter-bytes", "runtime", "max_host_adapter_bytes", int,
     "host memory for adapters; past it LRU adapters go to the disk tier (needs --data-dir)"),
    ("max-batch-tokens", "runtime", "max_batch_tokens", int, "padded tokens per forward"),
    ("max-batch-size", "runtime", "max_batch_size", int, "rows per forward"),
    ("max-wait-ms", "server", "max_wait_ms", float, "how long a batch waits for more requests"),
    ("max-queue", "server", "max_queue", int, "texts waiting for the model before RESOURCE_EXHAUSTED"),
    ("max-texts-per-request", "server", "max_texts_per_request", int, "texts in one Classify"),
    ("max-adapter-bytes", "server", "max_adapter_bytes", int, "largest adapter upload"),
    ("data-dir", "server", "data_dir", str, "where registered adapters persist ('' = memory only)"),
    ("adapter-root", "server", "adapter_root", str, "directory RegisterAdapter(path) may read from"),
    ("admin-token", "server", "admin_token", str, "bearer token registry calls need"),
    ("tls-cert", "server", "tls_cert", str, "PEM certificate (with --tls-key)"),
    ("tls-key", "server", "tls_key", str, "PEM private key"),
    ("grace", "server", "grace", float, "seconds to finish in-flight work on SIGTERM"),
    ("inline-tokenize-chars", "server", "inline_tokenize_chars", int,
     "requests up to this many characters are tokenized on the event loop (0 = always in the pool)"),
    ("model-workers", "server", "model_workers", int, "forwards run at once, intra-op threads split between them"),
    ("torch-threads", "runtime", "torch_threads", int, "intra-op threads"),
    ("lora-kernel", "runtime", "lora_kernel", str, "auto | fused | torch: CPU fp32 LoRA branch (fused C kernel or gather+bmm)"),
    ("token-packing", "runtime", "token_packing", str,
     "auto | off: CPU fp32/bf16 BERT/RoBERTa forwards over token-packed rows (no padding, one forward per batch)"),
    ("cuda-graphs", "runtime", "cuda_graphs", str,
     "auto | off: replay CUDA fp32/fp16/bf16 forwards as captured CUDA graphs (one per rows x width bucket)"),
    ("forward-overhead-tokens", "runtime", "forward_overhead_tokens", int,
     "batch planner: one more forward costs this many padded tokens (default: CPU 32, CUDA 4096)"),
]


def parse_config(argv=None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="server.py", description="adapterserve gRPC server")
    for flag, _, name, typ, help_ in _FLAGS:
        p.add_argument(f"--{flag}", type=typ, default=None, help=f"{help_} [env ADAPTERSERVE_{name.upper()}]")
    p.add_argument("--no-examples", action="store_true", help="do not register the bundled sst2 / ag_news adapters")
    p.add_argument("--merged-task", default=os.environ.get("ADAPTERSERVE_MERGED_TASK"),
                   help="merge this task into the base weights at start (single-task fast path; other tasks still work, "
                        "the first batch that needs one unmerges)")
    p.add_argument("--log-level", default=os.environ.get("ADAPTERSERVE_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    values = {"server": {}, "runtime": {}}
    for flag, owner, name, typ, _ in _FLAGS:
        value = getattr(args, name)
        if value is None and f"ADAPTERSERVE_{name.upper()}" in os.environ:
            value = typ(os.environ[f"ADAPTERSERVE_{name.upper()}"])
        if value is not None:
            values[owner][name] = value
    if values["server"].get("data_dir") == "":
        values["server"]["data_dir"] = None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime_config = RuntimeConfig(**values["runtime"])
    return ServerConfig(runtime=runtime_config, register_examples=not args.no_examples, merged_task=args.merged_task,
                        **values["server"])


async def serve(config: ServerConfig) -> int:
    import torch

    from runtime.batcher import Batcher, BatcherMetrics
    from runtime.grpc_errors import ErrorMappingInterceptor, RequestMetrics
    from runtime import metrics
    from runtime.grpc_service import AdapterService, ClassifierServicer, RegistryServicer
    from runtime.rpc_stubs import pb, pb_grpc
    from runtime.runtime import Runtime

    # Room above the adapter limit so an oversize upload gets our message (which names the limit)
    # rather than gRPC's generic one; far larger messages are still cut off by gRPC itself.
    message_limit = 2 * config.max_adapter_bytes + (1 << 20)
    metrics_registry = metrics.new_registry()
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(RequestMetrics(metrics_registry))],
        options=[("grpc.max_receive_message_length", message_limit),
                 ("grpc.max_send_message_length", 64 << 20),
                 ("grpc.so_reuseport", 0)],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", "adapterserve.v1.Classifier", "adapterserve.v1.AdapterRegistry"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # grpc.aio takes handlers only before start; they answer UNAVAILABLE until the model is warm.
    classifier = ClassifierServicer(config, metrics_registry)
    registry_servicer = RegistryServicer(config.admin_token)
    pb_grpc.add_ClassifierServicer_to_server(classifier, server)
    pb_grpc.add_AdapterRegistryServicer_to_server(registry_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Classifier"].full_name,
         pb.DESCRIPTOR.services_by_name["AdapterRegistry"].full_name,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(k.read(), c.read())]))
    else:
        port = server.add_insecure_port(address)
    await server.start()

    try:
        loop = asyncio.get_running_loop()
        # One executor owns the device; with several workers each thread gets its share of the cores.
        workers = config.model_workers
        per_worker = max(1, (config.runtime.torch_threads or torch.get_num_threads()) // workers)
        model_executor = ThreadPoolExecutor(workers, thread_name_prefix="model", initializer=torch.set_num_threads,
                                            initargs=(per_worker,))
        runtime_config = replace(config.runtime, torch_threads=per_worker) if workers > 1 else config.runtime
        tokenize_pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenize")
        runtime = await loop.run_in_executor(model_executor, Runtime, runtime_config)
        # Registration (parse, validate, fsync) runs beside inference, not queued behind it: it touches no
        # slot; a new adapter is copied into a slot by the model executor on its first batch.
        admin_executor = ThreadPoolExecutor(1, thread_name_prefix="admin")
        service = AdapterService(runtime, config, admin_executor)
        await loop.run_in_executor(model_executor, service.restore)
        if config.merged_task:
            await loop.run_in_executor(model_executor, runtime.merge, config.merged_task)
        # Each worker thread warms once (lazy init, OpenMP team); the barrier puts one warm-up on each.
        barrier = threading.Barrier(workers)
        await asyncio.gather(*[loop.run_in_executor(model_executor, _warm_up, runtime, barrier) for _ in range(workers)])
        # Everything built so far (model, tokenizer, modules) lives as long as the process: move it out
        # of the cyclic GC's generations so collections while serving only walk request garbage.
        gc.collect()
        gc.freeze()

        batcher = Batcher(runtime, model_executor, config.runtime.max_batch_tokens, config.runtime.max_batch_size,
                          config.max_wait_ms, config.max_queue, workers=workers)
        batcher.metrics = BatcherMetrics(metrics_registry, batcher)
        batcher.start()
        _register_runtime_metrics(metrics_registry, runtime)
        service.on_unregistered = classifier.task_metrics.labels.forget
        metrics_port = metrics.start_http(metrics_registry, config.host, config.metrics_port)
        if metrics_port:
            print(f"adapterserve metrics on http://{config.host}:{metrics_port}/metrics", flush=True)
        classifier.attach(runtime, batcher, tokenize_pool)
        registry_servicer.attach(service)
        for name in ("", "adapterserve.v1.Classifier", "adapterserve.v1.AdapterRegistry"):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await server.stop(0)  # a failed start must not leave a half-open port behind
        raise
    tasks = ", ".join(a.task for a in runtime.list_adapters()) or "none"
    log.info("serving on %s:%d (base %s, %s, %s); tasks: %s", config.host, port, runtime.base.model_id,
             runtime.base.precision, runtime.base.device, tasks)
    print(f"adapterserve listening on {config.host}:{port}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("draining: finishing in-flight work within %.1fs", config.grace)
    await health_servicer.enter_graceful_shutdown()  # every service reports NOT_SERVING
    stopping = asyncio.ensure_future(server.stop(config.grace))  # refuse new RPCs, let running ones finish
    await stopping
    await batcher.close()
    model_executor.shutdown(wait=True)
    admin_executor.shutdown(wait=True)
    tokenize_pool.shutdown(wait=True)
    log.info("stopped")
    return 0


def _register_runtime_metrics(registry, runtime) -> None:
    from prometheus_client import Histogram

    from runtime import metrics
    from runtime.grpc_service import VERSION

    # How adapter deltas are computed: the fused CPU kernel, torch gather + bmm, or inside the ONNX graph.
    lora_path = runtime.engine.kernel_name
    metrics.register_build_info(registry, VERSION, runtime.base.model_id, runtime.base.precision,
                                runtime.engine.name, str(runtime.base.device), lora_path)
    registry.register(metrics.MemoryCollector(runtime))
    registry.register(metrics.AdapterCacheCollector(runtime.slot_table, runtime.host_tier))
    load_seconds = Histogram(f"{metrics.PREFIX}_adapter_load_duration_seconds", "Time to copy an adapter into a device slot",
                             buckets=metrics.LATENCY_BUCKETS, registry=registry)
    runtime.slot_table.load_observer = load_seconds.observe


def _warm_up(runtime, barrier: threading.Barrier) -> None:
    """One forward per registered task so the first real request does not pay for lazy init."""
    barrier.wait(timeout=600)
    tasks = [a.task for a in runtime.list_adapters()]
    if runtime.merged_task is not None:
        tasks = [runtime.merged_task.task]  # warming others would unmerge
    runtime.engine.encode(runtime.encoder.collate(runtime.encoder.encode(["warm up"]), runtime.base.device), [0])
    if tasks:
        runtime.classify([(t, "warm up") for t in tasks])


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
        return asyncio.run(serve(config))
    except AdapterServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
