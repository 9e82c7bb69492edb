"""The adapter-affinity routing policy (runtime/cluster/router.py rank()) as a pure function."""
import random
from collections import Counter

import pytest

from adapterserve.runtime.cluster.router import HashRing, ReplicaView, rank
from adapterserve.runtime.config import ClusterConfig
from adapterserve.runtime.errors import ConfigError


def views(loads, device=None, host=None):
    device, host = device or {}, host or {}
    return [ReplicaView(r, load, frozenset(device.get(r, ())), frozenset(host.get(r, ()))) for r, load in loads.items()]


RING = HashRing(["a", "b", "c"])


def test_prefers_device_then_host_then_the_ring_owner():
    replicas = views({"a": 0, "b": 0, "c": 0}, device={"b": {"t"}}, host={"c": {"t", "u"}})
    ranks, reason = rank("t", replicas, RING)
    assert ranks[0][0].id == "b" and reason == "device-hit"
    ranks, reason = rank("u", replicas, RING)
    assert ranks[0][0].id == "c" and reason == "host-hit"
    ranks, reason = rank("cold-task", replicas, RING)
    assert reason == "cold" and ranks[0][0].id == RING.order("cold-task")[0]
    # every other replica follows, least loaded first, so Serve can fall back when the first is full
    assert sorted(r.id for r in ranks[1]) == sorted({"a", "b", "c"} - {ranks[0][0].id})


def test_bounded_load_moves_a_hot_task_off_a_busy_replica():
    # b holds the task but has 6 in flight; mean with this request (6+0+0+1)/3: bound ceil(1.25*7/3) = 3
    replicas = views({"a": 0, "b": 6, "c": 0}, device={"b": {"t"}}, host={"c": {"t"}})
    ranks, reason = rank("t", replicas, RING)
    assert ranks[0][0].id == "c" and reason == "overflow"  # c holds it in host, but only the bound sent it there
    replicas = views({"a": 0, "b": 6, "c": 0}, device={"b": {"t"}})
    ranks, reason = rank("t", replicas, RING)
    assert ranks[0][0].id in ("a", "c") and reason == "overflow"
    # under the bound the holder keeps it
    ranks, reason = rank("t", views({"a": 1, "b": 2, "c": 1}, device={"b": {"t"}}), RING)
    assert ranks[0][0].id == "b" and reason == "device-hit"


def test_cold_tasks_spread_over_the_ring_and_move_little_when_a_replica_joins():
    tasks = [f"task{i}" for i in range(3000)]
    owners = Counter(RING.order(t)[0] for t in tasks)
    assert min(owners.values()) > 600, owners  # about 1000 each
    grown = HashRing(["a", "b", "c", "d"])
    moved = sum(RING.order(t)[0] != grown.order(t)[0] for t in tasks)
    assert moved < 0.4 * len(tasks)  # about a quarter move to the new replica, the rest stay
    assert all(grown.order(t)[0] in ("d", RING.order(t)[0]) for t in tasks)


def test_holders_in_ring_order_so_a_task_converges_on_its_owner():
    owner, other = RING.order("t")[:2]
    # the task overflowed onto `other` once and is now in both replicas' slots: it goes back to its owner
    replicas = views({"a": 0, "b": 0, "c": 0}, device={owner: {"t"}, other: {"t"}})
    assert rank("t", replicas, RING)[0][0][0].id == owner
    # every replica keeps every adapter in host memory: still its owner, not the least loaded
    replicas = views({r: (1 if r != owner else 2) for r in "abc"}, host={r: {"t"} for r in "abc"})
    ranks, reason = rank("t", replicas, RING)
    assert ranks[0][0].id == owner and reason == "host-hit"


def test_pinned_request_goes_to_its_replica_if_live():
    replicas = views({"a": 9, "b": 0})
    assert rank("t", replicas, HashRing(["a", "b"]), pinned="a")[0] == [[replicas[0]]]
    ranks, reason = rank("t", replicas, HashRing(["a", "b"]), pinned="gone")
    assert ranks[0][0].id == "b"  # as if unpinned: a is over the load bound


def test_random_loads_never_exceed_the_bound_while_another_has_room():
    rng = random.Random(1)
    for _ in range(500):
        loads = {r: rng.randrange(0, 10) for r in "abcd"}
        replicas = views(loads, device={r: {"t"} for r in "abcd" if rng.random() < 0.5})
        first = rank("t", replicas, HashRing("abcd"), load_factor=1.25)[0][0][0]
        bound = -(-1.25 * (sum(loads.values()) + 1) // 4)
        if any(load + 1 <= bound for load in loads.values()):
            assert first.load + 1 <= bound


def test_cluster_config_checks_its_values():
    assert ClusterConfig(autoscale="1:4").autoscale_bounds() == (1, 4)
    for bad in ("4:1", "x", "2", "1:0"):
        with pytest.raises(ConfigError, match="MIN:MAX"):
            ClusterConfig(autoscale=bad)
    with pytest.raises(ConfigError, match="router"):
        ClusterConfig(router="random")
    with pytest.raises(ConfigError, match="load_factor"):
        ClusterConfig(load_factor=0.5)


def test_serve_config_file_builds_the_application():
    """deploy/ray-serve.yaml's args go through the same settings as the flags."""
    import pathlib

    import yaml

    from adapterserve.runtime.cluster.app import app_builder

    spec = yaml.safe_load((pathlib.Path(__file__).resolve().parents[2] / "deploy" / "ray-serve.yaml").read_text())
    app = spec["applications"][0]
    assert app["import_path"] == "adapterserve.runtime.cluster.app:app_builder"
    built = app_builder(app["args"])
    assert type(built).__name__ == "Application"
    with pytest.raises(ConfigError, match="router"):
        app_builder(dict(app["args"], router="nearest"))


def test_cluster_flags_reach_the_replica_deployment():
    from adapterserve.runtime.cluster.app import SERVE_TUNING, build_app
    from adapterserve.runtime.config import RuntimeConfig, ServerConfig

    app = build_app(ServerConfig(runtime=RuntimeConfig(slots=32)),
                    ClusterConfig(autoscale="1:3", target_ongoing_requests=4, replica_cpus=2, replica_gpus=0.5))
    replica = app._bound_deployment.init_args[1]._bound_deployment
    scaling = replica._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 4.0)
    assert {k: replica.ray_actor_options[k] for k in ("num_cpus", "num_gpus")} == {"num_cpus": 2.0, "num_gpus": 0.5}
    # Every deployment's processes take Serve's one-loop settings and the gRPC message limit.
    ingress = app._bound_deployment
    registry = ingress.init_args[2]._bound_deployment
    for deployment in (ingress, registry, replica):
        assert deployment.ray_actor_options["runtime_env"]["env_vars"] == SERVE_TUNING
    config = replica.init_args[0]
    assert config.runtime.torch_threads == 2 and config.runtime.slots == 32
    router = replica._deployment_config.request_router_config.request_router_class
    assert router.endswith("router.AdapterAffinityRouter")
    fixed = build_app(ServerConfig(), ClusterConfig(replicas=3, router="pow2"))._bound_deployment.init_args[1]
    assert fixed._bound_deployment._deployment_config.num_replicas == 3
    assert "PowerOfTwo" in fixed._bound_deployment._deployment_config.request_router_config.request_router_class


@pytest.mark.parametrize("code, lost", [("UNAVAILABLE", True), ("INTERNAL", True), ("UNKNOWN", True),
                                        ("ABORTED", True), ("RESOURCE_EXHAUSTED", False), ("CANCELLED", False)])
def test_a_broken_grpc_transport_call_is_a_lost_replica(code, lost):
    """Serve's gRPC transport to a replica fails with the channel's status; a lost replica's (or a reset
    connection's) becomes UNAVAILABLE, which forward() retries for calls safe to repeat."""
    import grpc

    from adapterserve.runtime.cluster.remote import unwrap
    from adapterserve.runtime.errors import UnavailableError

    error = grpc.aio.AioRpcError(getattr(grpc.StatusCode, code), grpc.aio.Metadata(), grpc.aio.Metadata(), "reset")
    assert isinstance(unwrap(error), UnavailableError) is lost
    if not lost:
        assert unwrap(error) is error


def test_a_domain_error_crosses_deployments_as_itself():
    from ray.exceptions import RayTaskError

    from adapterserve.runtime.cluster.remote import unwrap
    from adapterserve.runtime.errors import UnknownTaskError

    cause = UnknownTaskError("task 'x' is not registered")
    wrapped = RayTaskError("classify", "traceback", cause)
    assert unwrap(wrapped) is cause


def test_each_deployment_call_gets_its_own_request_id_whatever_context_it_runs_in():
    """A task inheriting a Serve request context (our front ends' tasks, with user code on Serve's
    loop) would otherwise stamp every call with that request's internal id."""
    from ray.serve import context

    from adapterserve.runtime.cluster.remote import call

    class Method:
        def remote(self):
            return context._get_serve_request_context()._internal_request_id

    context._serve_request_context.set(context._RequestContext(_internal_request_id="the-constructor-call"))
    try:
        assert call(Method()) != "the-constructor-call"
    finally:
        context._serve_request_context.set(None)
