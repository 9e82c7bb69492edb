"""The batch planner (runtime/planning.py): a pure function of lengths, keys and caps."""
import random

from adapterserve.runtime.planning import plan_groups


def padded(groups, lengths):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def brute_force_best(lengths, overhead):
    """Every way to cut the sorted rows into contiguous groups (small n only)."""
    s = sorted(lengths)
    n, best = len(s), float("inf")
    for mask in range(1 << (n - 1)):
        cost, start = 0, 0
        for k in range(1, n + 1):
            if k == n or mask >> (k - 1) & 1:
                cost += (k - start) * s[k - 1] + overhead
                start = k
        best = min(best, cost)
    return best


def test_every_row_is_planned_once_and_groups_are_length_bands():
    rng = random.Random(0)
    lengths = [rng.randint(3, 120) for _ in range(200)]
    groups = plan_groups(lengths, [i % 7 for i in range(200)], 64, 16384, 63, 32)
    assert sorted(i for g in groups for i in g) == list(range(200))
    spans = [(min(lengths[i] for i in g), max(lengths[i] for i in g)) for g in groups]
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))  # sorted, no overlap


def test_cuts_are_optimal_for_the_cost_model():
    rng = random.Random(1)
    for _ in range(30):
        lengths = [rng.randint(2, 60) for _ in range(rng.randint(1, 11))]
        overhead = rng.choice([0, 8, 32, 500])
        groups = plan_groups(lengths, list(range(len(lengths))), 64, 10**6, 64, overhead)
        assert padded(groups, lengths) + overhead * len(groups) == brute_force_best(lengths, overhead)


def test_overhead_trades_forwards_for_padding():
    lengths = [5] * 30 + [60] * 2
    assert len(plan_groups(lengths, [0] * 32, 64, 16384, 63, 32)) == 2  # 30 short rows need not pad to 60
    assert len(plan_groups(lengths, [0] * 32, 64, 16384, 63, 10_000)) == 1  # a costly forward keeps them together


def test_caps_are_respected():
    rng = random.Random(2)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    keys = [rng.randint(0, 99) for _ in range(300)]
    for g in plan_groups(lengths, keys, 16, 400, 5, 10_000):
        assert len(g) <= 16
        assert len(g) * max(lengths[i] for i in g) <= 400 or len(g) == 1
        assert len({keys[i] for i in g}) <= 5
    assert plan_groups([600], ["a"], 4, 100, 1, 32) == [[0]]  # one over-long row still gets a forward


def reference_plan(lengths, keys, max_rows, max_tokens, max_adapters, overhead):
    """The planner's dynamic program written as the plain double loop (it was, until the GPU pools of
    256 rows made the loop cost ~4 ms): same cuts, same tie-breaking (the shortest last group)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        width, seen = lengths[order[j - 1]], set()
        for i in range(j - 1, max(-1, j - 1 - max_rows), -1):
            seen.add(keys[order[i]])
            size = j - i
            if size > 1 and (size * width > max_tokens or len(seen) > max_adapters):
                break
            if best[i] + size * width + overhead < best[j]:
                best[j], cut[j] = best[i] + size * width + overhead, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def test_vectorised_planner_equals_the_plain_dynamic_program():
    rng = random.Random(3)
    for _ in range(500):
        n = rng.randint(0, 90)
        lengths = [rng.randint(1, rng.choice([10, 60, 300])) for _ in range(n)]
        keys = [rng.randint(0, rng.choice([1, 3, 10, 50])) for _ in range(n)]
        args = (lengths, keys, rng.choice([1, 4, 16, 64, 256]), rng.choice([100, 400, 16384]),
                rng.choice([1, 2, 5, 39]), rng.choice([0, 8, 32, 4096]))
        assert plan_groups(*args) == reference_plan(*args)


def test_one_forward_when_all_its_padding_costs_less_than_another_forward():
    """The planner's shortcut (no program run) must give the program's own answer, and only when the
    whole pool's padding is below one forward's overhead."""
    lengths, keys = [30, 5, 12, 9], [0, 1, 2, 3]
    waste = 4 * 30 - sum(lengths)  # 66 padded tokens
    for overhead in (waste + 1, 4096):
        got = plan_groups(lengths, keys, 256, 16384, 39, overhead)
        assert got == [[1, 3, 2, 0]] == reference_plan(lengths, keys, 256, 16384, 39, overhead)
    assert plan_groups(lengths, keys, 256, 16384, 39, 8) == reference_plan(lengths, keys, 256, 16384, 39, 8)
    assert len(plan_groups(lengths, keys, 256, 16384, 39, 8)) > 1  # cheap forwards: it still splits
