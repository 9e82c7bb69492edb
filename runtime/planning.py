"""Batch planning: which rows share one forward.

Rows are sorted by length and cut into contiguous groups, each padded to its own longest row. Where
to cut is a small dynamic program over the sorted rows that minimises padded tokens plus a fixed cost
per forward (`overhead_tokens`, in units of one padded token), under the row, token and distinct-
adapter caps. On a CPU a forward's fixed cost is small (MiniLM-L6 on 2 cores: ~3 ms, against
~90 us per token), so a 64-row pool of SST-2 texts splits into a few length bands and computes far
fewer padded positions; on a GPU the fixed cost dominates and the same rule keeps rows together.
"""
from __future__ import annotations

from typing import Hashable, Sequence

# Measured on the project machine (MiniLM-L6, 2 cores): a forward costs ~3 ms + ~90 us per padded
# token, so one more forward is worth ~32 padded tokens. GPUs: a forward's fixed cost is worth
# thousands of tokens (not measured here), which makes the planner keep a pool together.
CPU_OVERHEAD_TOKENS = 32
GPU_OVERHEAD_TOKENS = 4096
# Token-packed engines (the packed ONNX graph, the torch engine's packed forward) compute no padded
# position: one forward per pool.
PACKED_OVERHEAD_TOKENS = 1 << 30


def plan_groups(lengths: Sequence[int], keys: Sequence[Hashable], max_rows: int, max_tokens: int,
                max_adapters: int, overhead_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, grouped into forwards. Each group is a run of the rows sorted by length
    with at most `max_rows` rows, `max_tokens` padded tokens (rows x longest) and `max_adapters`
    distinct keys; a single row always forms a valid group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[j]: cost of planning the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]  # sorted: the group's last row is its longest
        seen: set = set()
        for i in range(j - 1, max(-1, j - 1 - max_rows), -1):
            seen.add(keys[order[i]])
            size = j - i
            if size > 1 and (size * width > max_tokens or len(seen) > max_adapters):
                break  # both only grow as the group extends further left
            cost = best[i] + size * width + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    groups.reverse()
    return groups
