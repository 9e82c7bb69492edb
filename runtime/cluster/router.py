"""Adapter-affinity request routing for the replica deployment (a Ray Serve RequestRouter).

Order of preference for a request naming a task, among replicas under the load bound:
  1. a replica holding the task in a device slot ("device-hit"),
  2. one holding it in host memory ("host-hit"),
  3. for a task no replica holds, its owner on a consistent-hash ring ("cold"), so a cold task loads
     on one replica rather than on whichever is idle,
  4. otherwise (every holder is over the bound) the least loaded replica ("overflow").
Among several holders the first in the task's ring order wins, so a task converges on its owner
instead of staying on every replica it once overflowed to. The bound: no replica takes a request that
would put its in-flight count above load_factor x the mean (consistent hashing with bounded loads,
Mirrokni et al. 2018), so a hot task spreads once its replica is busy. Residency comes from each
replica's record_routing_stats (refreshed every request_routing_stats_period_s); between refreshes
the router remembers where it sent each task, so the second request of a new task follows the first.
A request may name a replica (kwarg `replica`): it goes there if that replica is live (checks and
operators' probes of one replica).

rank() is the policy as a pure function (tests/unit/test_router.py); AdapterAffinityRouter feeds it.
Ray Serve pickles this module by value into every process holding a handle: it keeps no state of
its own at module level (counters live in routing_stats.py).
"""
from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

from adapterserve.runtime.cluster import routing_stats

VIRTUAL_NODES = 64
MAX_REMEMBERED_TASKS = 65536


@dataclass
class ReplicaView:
    id: str
    load: int  # requests this router has in flight there
    device: frozenset = frozenset()
    host: frozenset = frozenset()


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing over replica ids: a replica joining or leaving moves about 1/n of the tasks."""

    def __init__(self, ids: Iterable[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.ids = frozenset(ids)
        self._ring = sorted((_point(f"{r}#{v}"), r) for r in self.ids for v in range(virtual_nodes))
        self._points = [p for p, _ in self._ring]

    def order(self, task: str) -> list[str]:
        """Replica ids in ring order from the task's point, each once."""
        seen, out = set(), []
        start = bisect.bisect(self._points, _point(task))
        for k in range(len(self._ring)):
            r = self._ring[(start + k) % len(self._ring)][1]
            if r not in seen:
                seen.add(r)
                out.append(r)
                if len(out) == len(self.ids):
                    break
        return out


def rank(task: Optional[str], replicas: list[ReplicaView], ring: HashRing, load_factor: float = 1.25,
         pinned: Optional[str] = None) -> tuple[list[list[ReplicaView]], str]:
    """(replicas in preference ranks, the reason for the first choice). Serve sends the request to the
    first replica of the first rank whose queue has room, then tries the next rank."""
    if not replicas:
        return [], "overflow"
    by_load = sorted(replicas, key=lambda r: (r.load, r.id))
    if pinned is not None:
        chosen = [r for r in replicas if r.id == pinned]
        if chosen:
            return [chosen], "pinned"
    total = sum(r.load for r in replicas)
    bound = max(1, math.ceil(load_factor * (total + 1) / len(replicas)))
    under = [r for r in by_load if r.load + 1 <= bound]
    first, reason = _affine(task, under, replicas, ring)
    if first is None:
        first = (under or by_load)[0]
    elif len(under) < len(replicas) and _affine(task, by_load, replicas, ring)[0] is not first:
        reason = "overflow"  # the bound moved it off the replica affinity alone would pick
    return [[first], [r for r in by_load if r is not first]], reason


def _affine(task: Optional[str], allowed: list[ReplicaView], replicas: list[ReplicaView],
            ring: HashRing) -> tuple[Optional[ReplicaView], str]:
    """The replica affinity picks among `allowed`, and why; (None, "overflow") when it has no choice there."""
    first, reason = None, "overflow"
    if task is not None:
        # Holders in the task's ring order, not least loaded first: a task that overflowed onto a second
        # replica would otherwise stay on both, and replicas that all keep every adapter in host memory
        # would spread each task over all of them, filling every replica's slots with every task.
        by_id = {r.id: r for r in allowed}
        ordered = [by_id[r] for r in ring.order(task) if r in by_id]
        device = [r for r in ordered if task in r.device]
        host = [r for r in ordered if task in r.host]
        if device:
            first, reason = device[0], "device-hit"
        elif host:
            first, reason = host[0], "host-hit"
        elif ordered and not any(task in r.device or task in r.host for r in replicas):
            first, reason = ordered[0], "cold"
    return first, reason


def _request_router_base():
    from ray.serve.request_router import RequestRouter

    return RequestRouter


class AdapterAffinityRouter(_request_router_base()):
    def initialize_state(self, load_factor: float = 1.25, **_ignored) -> None:
        self.load_factor = load_factor
        self.inflight: Counter = Counter()
        self.placed: OrderedDict = OrderedDict()  # task -> replica id it was last sent to
        # internal request id -> (task, chosen replica id, reason), until Serve reports the request
        # routed; bounded: a request that fails before that (its replica lost) leaves its entry
        self.decisions: OrderedDict = OrderedDict()
        self._residency: dict = {}  # replica id -> (its routing stats, device tasks, host tasks)
        self._ring = HashRing(())

    def _views(self, candidates) -> list[ReplicaView]:
        views = []
        for r in candidates:
            stats = r.routing_stats or {}
            rid = r.replica_id.unique_id
            cached = self._residency.get(rid)
            if cached is None or cached[0] is not stats:
                # Sets built once per report (every routing_stats_period), not per request.
                cached = self._residency[rid] = (stats, frozenset(stats.get("device", ())),
                                                 frozenset(stats.get("host", ())))
            views.append(ReplicaView(rid, self.inflight[rid], cached[1], cached[2]))
        return views

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        kwargs = pending_request.kwargs if pending_request is not None else {}
        task, pinned = kwargs.get("task"), kwargs.get("replica")
        ids = {r.replica_id.unique_id for r in candidate_replicas}
        if ids != self._ring.ids:
            self._ring = HashRing(ids)
        views = self._views(candidate_replicas)
        placed = self.placed.get(task) if task is not None else None
        if placed is not None:
            for v in views:  # sent there before the replica's stats could say so
                if v.id == placed and task not in v.device:
                    v.host = v.host | {task}
        ranks, reason = rank(task, views, self._ring, self.load_factor, pinned)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if pending_request is not None and ranks:
            self.decisions[pending_request.metadata.internal_request_id] = (task, ranks[0][0].id, reason)
            if len(self.decisions) > MAX_REMEMBERED_TASKS:
                self.decisions.popitem(last=False)
        if task is not None and ranks and pinned is None:
            # Remembered now, not when Serve reports the request routed (after its answer, over the
            # gRPC transport): the next request of a new task follows this one before any report.
            self._place(task, ranks[0][0].id)
        return [[by_id[v.id] for v in group] for group in ranks]

    # A request's load is counted from its send to its completion (Serve calls these once per send,
    # retries included). on_request_routed only names the reason: over Serve's gRPC transport it comes
    # once the replica has answered (acceptance and answer share one message), often after completion.
    def on_send_request(self, replica_id) -> None:
        super().on_send_request(replica_id)
        rid = replica_id.unique_id
        self.inflight[rid] += 1
        with routing_stats.lock:
            routing_stats.inflight[rid] = self.inflight[rid]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        rid = replica_id.unique_id
        task, chosen, reason = self.decisions.pop(pending_request.metadata.internal_request_id, (None, rid, "overflow"))
        if chosen != rid:
            reason = "overflow"  # the preferred replica's queue was full
        if task is not None:
            self._place(task, rid)  # where it went, if not where it was meant to
        with routing_stats.lock:
            routing_stats.routed[reason] += 1

    def _place(self, task: str, rid: str) -> None:
        self.placed[task] = rid
        self.placed.move_to_end(task)
        if len(self.placed) > MAX_REMEMBERED_TASKS:
            self.placed.popitem(last=False)

    def on_request_completed(self, replica_id, internal_request_id) -> None:
        rid = replica_id.unique_id
        if self.inflight[rid] > 0:
            self.inflight[rid] -= 1
        with routing_stats.lock:
            routing_stats.inflight[rid] = self.inflight[rid]

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        rid = replica_id.unique_id
        self.inflight.pop(rid, None)
        self._residency.pop(rid, None)
        with routing_stats.lock:
            routing_stats.inflight.pop(rid, None)
        for task in [t for t, r in self.placed.items() if r == rid]:
            del self.placed[task]
