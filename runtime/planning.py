"""Batch planning: which rows share one forward.

Rows are sorted by length and cut into contiguous groups, each padded to its own longest row. Where
to cut is a small dynamic program over the sorted rows that minimises padded tokens plus a fixed cost
per forward (`overhead_tokens`, in units of one padded token), under the row, token and distinct-
adapter caps. On a CPU a forward's fixed cost is small (MiniLM-L6 on 2 cores: ~3 ms, against
~90 us per token), so a 64-row pool of SST-2 texts splits into a few length bands and computes far
fewer padded positions; on a GPU the fixed cost dominates and the same rule keeps rows together.
"""
from __future__ import annotations

from typing import Collection, Hashable, Optional, Sequence

import numpy as np

# Measured on the project machine (MiniLM-L6, 2 cores): a forward costs ~3 ms + ~90 us per padded
# token, so one more forward is worth ~32 padded tokens. GPUs: a forward's fixed cost is worth
# thousands of tokens (not measured here), which makes the planner keep a pool together.
CPU_OVERHEAD_TOKENS = 32
GPU_OVERHEAD_TOKENS = 4096
# Token-packed engines (the packed ONNX graph, the torch engine's packed forward) compute no padded
# position: one forward per pool.
PACKED_OVERHEAD_TOKENS = 1 << 30


def plan_groups(lengths: Sequence[int], keys: Sequence[Hashable], max_rows: int, max_tokens: int,
                max_adapters: int, overhead_tokens: int, wide: Optional[Collection[Hashable]] = None,
                max_wide: int = 0) -> list[list[int]]:
    """Indices into `lengths`, grouped into forwards. Each group is a run of the rows sorted by length
    with at most `max_rows` rows, `max_tokens` padded tokens (rows x longest) and `max_adapters`
    distinct keys, of which the keys in `wide` (adapters in wide slots) count against `max_wide`
    instead; a single row always forms a valid group."""
    n = len(lengths)
    lengths = np.asarray(lengths, dtype=np.int64)
    by_length = np.argsort(lengths, kind="stable")
    wide = wide or ()
    if n and n <= max_rows:
        # The whole pool in one forward when every cap allows it and its padding costs less than one
        # more forward: no split can win (any split still pays every real token plus a second
        # overhead), so this is the program's own answer without running it. Always so for a
        # token-packed engine; usual on a GPU (overhead 4096 tokens) for pools of a few dozen rows.
        longest_row, total = int(lengths.max()), int(lengths.sum())
        distinct = set(keys)
        distinct_wide = len(distinct.intersection(wide)) if wide else 0
        if (n * longest_row <= max(max_tokens, longest_row) and len(distinct) - distinct_wide <= max(1, max_adapters)
                and distinct_wide <= max(1, max_wide) and n * longest_row - total < overhead_tokens):
            return [by_length.tolist()]
    order = by_length.tolist()
    lengths = lengths.tolist()
    # Every cap only tightens as a group grows to the left, so the groups that may end at sorted row
    # j are exactly those of 1..longest[j] rows. The distinct-key cap, by two pointers over the rows.
    longest = [0] * (n + 1)
    counts: dict = {}  # narrow keys of the window
    wide_counts: dict = {}
    left = 0
    for j in range(1, n + 1):
        row = order[j - 1]
        into = wide_counts if keys[row] in wide else counts
        into[keys[row]] = into.get(keys[row], 0) + 1
        while len(counts) > max(1, max_adapters) or len(wide_counts) > max(1, max_wide):
            first = order[left]
            table = wide_counts if keys[first] in wide else counts
            table[keys[first]] -= 1
            if not table[keys[first]]:
                del table[keys[first]]
            left += 1
        width = lengths[order[j - 1]]  # sorted: the group's last row is its longest
        longest[j] = max(1, min(max_rows, j - left, max_tokens // max(1, width)))
    # best[j]: cost of planning the first j sorted rows; a group of rows i..j-1 costs its padded
    # tokens plus the forward's overhead. One vector op per j (the Python double loop this replaced
    # cost ~4 ms for a 256-row GPU pool). Costs are integers, exact in float64.
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    starts = np.arange(n + 1, dtype=np.float64)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        lo = j - longest[j]
        width = lengths[order[j - 1]]
        cost = best[lo:j] + (j - starts[lo:j]) * width
        k = int(np.argmin(cost[::-1]))  # ties: the shortest group, as before
        best[j] = cost[-1 - k] + overhead_tokens
        cut[j] = j - 1 - k
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    groups.reverse()
    return groups
