"""What the affinity routers in this process decided, for the ingress's /metrics.

A module of its own because Ray Serve ships the router's module by value to the processes that hold
a handle: state kept there would be a copy. The router reaches this one through its module, which
is imported by reference, so the ingress reads the same counters the router writes.
"""
from __future__ import annotations

import threading
from collections import Counter

REASONS = ("device-hit", "host-hit", "cold", "overflow", "pinned")

lock = threading.Lock()
routed: Counter = Counter()  # reason -> requests
inflight: dict = {}  # replica id -> requests in flight
