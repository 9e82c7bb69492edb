"""The batch planner (runtime/planning.py): a pure function of lengths, keys and caps."""
import random

from runtime.planning import plan_groups


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
