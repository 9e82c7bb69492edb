"""`adapterserve cluster`: the Ray Serve application (ingress -> replicas, one registry) and its launcher.

    ingress   1 replica   runtime/cluster/ingress.py   our gRPC / HTTP / metrics ports, Serve's proxies off
    replica   N replicas  runtime/cluster/replica.py   a whole runtime each; routed by router.py
    registry  1 replica   runtime/cluster/registry.py  the shared store's single writer

build_app() makes the application from the same settings as `serve`; app_builder() is the same for
Ray's own tooling (`serve run` / `serve deploy` of deploy/ray-serve.yaml); run() starts a local Ray
head (or joins --ray-address), deploys, prints the address and serves until SIGTERM.
"""
from __future__ import annotations

import logging
import signal
from dataclasses import replace
import sys
import threading
from typing import Optional

from adapterserve.runtime.config import ClusterConfig, ServerConfig
from adapterserve.runtime.errors import AdapterServeError, ConfigError

log = logging.getLogger("adapterserve.cluster")

INGRESS, REPLICA, REGISTRY = "ingress", "replica", "registry"

# Ray Serve's throughput settings for our deployments' processes (the driver keeps Serve's defaults, so
# its handles can still be waited on synchronously). By default Serve runs user code and the handle's
# router each on an event loop of its own thread, and every request crosses three loops; ours never
# block their loop (model work runs on the batcher's threads), so one loop does. The message limit is
# for the ingress's classify calls over Serve's gRPC transport (4 MiB by default), as the front end's.
SERVE_TUNING = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(64 << 20)}


def require_ray():
    try:
        import ray
        import ray.serve  # noqa: F401
    except ImportError:
        raise ConfigError("adapterserve cluster needs Ray Serve: pip install 'adapterserve[ray]'") from None
    return ray


def build_app(config: ServerConfig, cluster: ClusterConfig):
    require_ray()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from adapterserve.runtime.cluster.ingress import ClusterIngress
    from adapterserve.runtime.cluster.registry import ClusterRegistry
    from adapterserve.runtime.cluster.replica import AdapterReplica
    from adapterserve.runtime.cluster.router import AdapterAffinityRouter

    quiet = {"enable_access_log": False}
    registry = serve.deployment(ClusterRegistry, name=REGISTRY, num_replicas=1, logging_config=quiet,
                                ray_actor_options=_actor_options(num_cpus=0)).bind(config.data_dir)
    if cluster.autoscale:
        low, high = cluster.autoscale_bounds()
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                          "target_ongoing_requests": cluster.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": cluster.replicas}
    actor_options = _actor_options(num_cpus=cluster.replica_cpus, num_gpus=cluster.replica_gpus)
    if config.runtime.torch_threads is None:
        # A replica's intra-op threads match the CPUs Ray reserved for it, not the machine's cores: two
        # 1-CPU replicas with 2 threads each would oversubscribe a 2-core machine.
        config = replace(config, runtime=replace(config.runtime, torch_threads=max(1, int(cluster.replica_cpus))))
    if cluster.router == "affinity":
        router = RequestRouterConfig(request_router_class=f"{AdapterAffinityRouter.__module__}.AdapterAffinityRouter",
                                     request_router_kwargs={"load_factor": cluster.load_factor},
                                     request_routing_stats_period_s=cluster.routing_stats_period)
    else:
        router = RequestRouterConfig(request_routing_stats_period_s=cluster.routing_stats_period)
    replicas = serve.deployment(AdapterReplica, name=REPLICA, ray_actor_options=actor_options, logging_config=quiet,
                                max_ongoing_requests=cluster.max_ongoing_requests, request_router_config=router,
                                health_check_period_s=2.0, health_check_timeout_s=30.0,
                                graceful_shutdown_timeout_s=config.grace, **scaling).bind(config, registry)
    return serve.deployment(ClusterIngress, name=INGRESS, num_replicas=1, logging_config=quiet,
                            max_ongoing_requests=1000, ray_actor_options=_actor_options(num_cpus=0)).bind(config, replicas, registry)


def _actor_options(**resources) -> dict:
    return dict(resources, runtime_env={"env_vars": dict(SERVE_TUNING)})


def app_builder(args: dict):
    """For `serve run adapterserve.runtime.cluster.app:app_builder key=value ...` and Serve config files:
    args are settings by name, as in a --config file."""
    import argparse

    from adapterserve.runtime.server.settings import add_serve_args, cluster_config_from_args
    import json
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({k.replace("-", "_"): v for k, v in (args or {}).items()}, fh)
    try:
        p = argparse.ArgumentParser()
        add_serve_args(p, cluster=True)
        config, cluster = cluster_config_from_args(p.parse_args(["--config", fh.name]))
    finally:
        os.unlink(fh.name)
    return build_app(config, cluster)


def run(config: ServerConfig, cluster: ClusterConfig) -> int:
    try:
        ray = require_ray()
        from ray import serve

        started_head = cluster.ray_address is None
        head = {"num_cpus": cluster.ray_cpus,
                # Ray runs workers at nice 15 by default: on a shared machine our replicas would then lose
                # the CPU to any client process beside them (2 cores: 263 vs 416 texts/s for one server).
                "_system_config": {"worker_niceness": 0}} if started_head else {}
        ray.init(address=cluster.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, **head)
        try:
            serve.start(proxy_location="Disabled")
            handle = serve.run(build_app(config, cluster), name=cluster.app_name, route_prefix=None)
            address = handle.address.remote().result()
            print(f"adapterserve cluster: {cluster.replicas if not cluster.autoscale else cluster.autoscale} replicas "
                  f"on Ray Serve (application {cluster.app_name!r})", flush=True)
            if address.metrics_port:
                print(f"adapterserve metrics on http://{address.host}:{address.metrics_port}/metrics "
                      f"(replicas: {', '.join(address.replica_metrics) or 'starting'})", flush=True)
            if address.http_port:
                print(f"adapterserve http on http://{address.host}:{address.http_port}/v2", flush=True)
            print(f"adapterserve listening on {address.host}:{address.port}", flush=True)
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
            log.info("draining: in-flight requests get %.1fs", config.grace)
            try:
                handle.drain.remote(config.grace).result(timeout_s=config.grace + 5)
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.warning("drain did not finish: %s", e)
            if not started_head:
                serve.delete(cluster.app_name, _blocking=False)
        finally:
            if started_head:
                # The whole local cluster goes with this command: its processes are stopped, not waited for.
                ray.shutdown()
    except AdapterServeError as e:
        print(f"adapterserve: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from adapterserve.runtime.server.settings import add_serve_args, cluster_config_from_args

    p = argparse.ArgumentParser(prog="adapterserve cluster", allow_abbrev=False,
                                description="serve on a Ray Serve cluster: replicas with adapter-affinity routing "
                                            "and one registry, behind the same gRPC/HTTP API")
    add_serve_args(p, cluster=True)
    args = p.parse_args(argv)
    try:
        config, cluster = cluster_config_from_args(args)
    except AdapterServeError as e:
        print(f"adapterserve cluster: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(config, cluster)
