"""Adapters above r_max in wide slots (slot_pool.SlotPool): PEFT's default LoHa (r 8: rank 64 once
converted) and default VeRA (r 256) register on a server with default slot flags and answer as PEFT does
(max |Δlogit| <= 1e-4, fp32) mixed in one batch with LoRA tasks, on the fused/packed and torch paths (LoKr
above r_max keeps its Kronecker factors instead: test_lokr_kronecker.py);
more wide tasks than wide slots in one call are split by the planner and evicted among themselves;
what wide slots cannot hold is refused with the reason."""
import pytest
import torch

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import InvalidAdapterError, NotSupportedError
from adapterserve.runtime.planning import plan_groups
from adapterserve.runtime.runtime import Runtime
from tiny_models import FAMILY_TARGETS, SAMPLE_TEXTS, make_peft_adapter, make_peft_kind_adapter, peft_logits

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

TOL = 1e-4
T = FAMILY_TARGETS["bert"]


@pytest.fixture(scope="module")
def adapters(tiny_bases, tmp_path_factory):
    base = tiny_bases["bert"]
    root = tmp_path_factory.mktemp("wide")
    return base, {
        "lora": make_peft_adapter(base, str(root / "lora"), num_labels=2, r=8, targets=T[:4], seed=1),
        # PEFT's defaults: LoHa r 8 (rank 64 in a slot), VeRA r 256.
        "loha": make_peft_kind_adapter(base, str(root / "loha"), "loha", num_labels=3, r=8, alpha=8, targets=T[:3],
                                       seed=2, scale=0.3),
        "vera": make_peft_kind_adapter(base, str(root / "vera"), "vera", num_labels=4, r=256, targets=T[:2],
                                       seed=3, scale=0.3),
        "loha_b": make_peft_kind_adapter(base, str(root / "loha_b"), "loha", num_labels=5, r=6, alpha=6,
                                         targets=T[2:5], seed=4, scale=0.3),
        "lora_b": make_peft_adapter(base, str(root / "lora_b"), num_labels=50, r=4, targets=T[1:], seed=5),
    }


def check(rt, base, paths, rounds=1):
    items = [(task, text) for _ in range(rounds) for task in paths for text in SAMPLE_TEXTS[:4]]
    preds = rt.classify(items)
    for task, path in paths.items():
        got = torch.tensor([p.logits for (t, _), p in zip(items, preds) if t == task])
        want = peft_logits(base, path, SAMPLE_TEXTS[:4]).repeat(rounds, 1)
        assert (got - want).abs().max().item() <= TOL, task


@pytest.mark.parametrize("lora_kernel,token_packing", [("auto", "auto"), ("torch", "auto"), ("auto", "off")])
def test_default_loha_and_vera_serve_on_default_slot_flags(adapters, lora_kernel, token_packing):
    base, paths = adapters
    # Default slots, r_max 16 and wide slots.
    rt = Runtime(RuntimeConfig(base_model=base, lora_kernel=lora_kernel, token_packing=token_packing))
    assert rt.engine.pool.wide_bytes() == 0
    for task, path in paths.items():
        rt.add_adapter(task, path)
    assert {a.task: a.rank for a in rt.list_adapters()} == {"lora": 8, "loha": 64, "vera": 256, "loha_b": 36,
                                                            "lora_b": 4}
    check(rt, base, paths)
    # Wide buffers exist now, as wide as the widest adapter: 256 ranks x every wrapped layer's (d_in + d_out).
    per_rank = sum(l.d_in + l.d_out for l in rt.engine.layers.values()) * 4
    assert rt.engine.pool.wide_bytes() == rt.config.wide_slots * 256 * per_rank
    # Prometheus sees them: every task on the device tier, one load each, the wide buffers in device memory.
    from adapterserve.runtime.server.metrics import AdapterCacheCollector, MemoryCollector

    samples = {(s.name, tuple(s.labels.items())): s.value
               for collector in (AdapterCacheCollector([rt.slot_table, rt.residency.wide_table], rt.host_tier),
                                 MemoryCollector(rt))
               for m in collector.collect() for s in m.samples}
    assert samples[("adapterserve_adapters", (("tier", "device"),))] == len(paths)
    assert samples[("adapterserve_adapter_loads_total", ())] == len(paths)
    assert samples[("adapterserve_adapter_memory_bytes", (("tier", "device"),))] == (
        rt.engine.slot_bytes() * rt.config.slots + rt.engine.pool.wide_bytes())


def test_more_wide_tasks_than_wide_slots_in_one_call(adapters):
    base, paths = adapters
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, wide_slots=2))
    for task, path in paths.items():
        rt.add_adapter(task, path)
    check(rt, base, paths, rounds=2)  # three wide tasks, two wide slots: split and evicted, every answer right
    assert rt.residency.wide_table.evictions >= 1


def test_what_wide_slots_cannot_hold_is_refused(adapters, tiny_bases, tmp_path):
    base, paths = adapters
    rt = Runtime(RuntimeConfig(base_model=base, slots=4))
    rt.add_adapter("loha", paths["loha"])
    with pytest.raises(NotSupportedError, match="merged mode takes adapters of up to r_max"):
        rt.merge("loha")
    dora = make_peft_kind_adapter(base, str(tmp_path / "dora"), "dora", num_labels=2, r=32, targets=T[:2])
    with pytest.raises(NotSupportedError, match="would need a wide slot, which holds LoRA factors only"):
        rt.add_adapter("dora", dora)
    narrow = Runtime(RuntimeConfig(base_model=base, slots=4, wide_slots=0))
    with pytest.raises(InvalidAdapterError, match="rank 64, above this server's r_max 16; LoHa of rank r"):
        narrow.add_adapter("loha", paths["loha"])
    small = Runtime(RuntimeConfig(base_model=base, slots=4, wide_r_max=64))
    with pytest.raises(InvalidAdapterError, match=r"rank 256, above this server's r_max 16 and its wide slots' 64; "
                                                   r".*--wide-r-max"):
        small.add_adapter("vera", paths["vera"])


def test_planner_caps_wide_adapters_per_forward():
    lengths = [8] * 6
    keys = ["a", "b", "c", "x", "y", "z"]
    wide = [True, True, True, False, False, False]
    groups = plan_groups(lengths, keys, max_rows=64, max_tokens=10_000, max_adapters=8, overhead_tokens=0,
                         wide={"a", "b", "c"}, max_wide=2)
    for group in groups:
        assert sum(wide[i] for i in group) <= 2 and len({keys[i] for i in group if not wide[i]}) <= 8
    assert sorted(i for g in groups for i in g) == list(range(6))


@pytest.mark.parametrize("name", ["deberta-v2", "modernbert"])
def test_wide_adapters_on_other_families(new_family_bases, tmp_path, name):
    """DeBERTa's shared positional input and ModernBERT's token-packed rows take wide deltas too."""
    from tiny_models import model_type

    base = new_family_bases[name]
    t = FAMILY_TARGETS[model_type(base)]
    paths = {"loha": make_peft_kind_adapter(base, str(tmp_path / "loha"), "loha", num_labels=3, r=8, alpha=8,
                                            targets=t[:3], seed=7, scale=0.3),
             "lora": make_peft_adapter(base, str(tmp_path / "lora"), num_labels=2, r=4, targets=t[:2], seed=8)}
    rt = Runtime(RuntimeConfig(base_model=base, slots=4))
    for task, path in paths.items():
        rt.add_adapter(task, path)
    assert rt.get_adapter("loha").rank == 64
    check(rt, base, paths)


@pytest.mark.parametrize("token_packing,wide_slots", [("auto", 2), ("off", 2), ("auto", 3)])
def test_wide_adapters_on_the_pooler_and_together(tiny_bases, tmp_path, token_packing, wide_slots):
    """Wide adapters that target BERT's pooler (its [rows, hidden] input is by row even when the encoder
    runs token-packed), several in one forward (run together at the widest rank), one reusing a wide slot
    a higher-rank adapter held before (the ranks past its own must read as zeros); with 3 wide slots a
    forward reads some of them (gathered), with 2 all of them (read in place)."""
    base = tiny_bases["bert"]
    paths = {f"w{i}": make_peft_adapter(base, str(tmp_path / f"w{i}"), num_labels=2 + i, r=r,
                                        targets=["query", "pooler.dense"] if i % 2 else ["value", "pooler.dense"],
                                        seed=20 + i, scale=0.3)
             for i, r in enumerate((40, 24, 20))}
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, wide_slots=wide_slots, token_packing=token_packing))
    for task, path in paths.items():
        rt.add_adapter(task, path)
    check(rt, base, {"w0": paths["w0"], "w1": paths["w1"]})  # both wide slots, one forward
    check(rt, base, {"w2": paths["w2"], "w1": paths["w1"]})  # w2 (rank 20) takes w0's slot (rank 40)
    check(rt, base, paths, rounds=2)
