"""Merged mode: equals slot mode within 1e-4; unmerge restores the base bit for bit, even after
1,000 merge/unmerge cycles."""
import pytest
import torch

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime
from tiny_models import FAMILY_TARGETS, SAMPLE_TEXTS, make_peft_adapter

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)


def _weights(rt):
    return {n: l.base.weight.detach().clone() for n, l in rt.engine.layers.items()}


def test_merged_equals_unmerged_and_unmerge_is_exact(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=16))
    a = make_peft_adapter(base, str(tmp_path / "a"), num_labels=3, r=8, alpha=16, targets=FAMILY_TARGETS["bert"], seed=5)
    b = make_peft_adapter(base, str(tmp_path / "b"), num_labels=2, r=4, seed=6)
    rt.add_adapter("a", a)
    rt.add_adapter("b", b)
    items = [("a", t) for t in SAMPLE_TEXTS]
    original = _weights(rt)
    slot_logits = torch.tensor([p.logits for p in rt.classify(items)])

    rt.merge("a")
    assert rt.merged_task is not None
    merged_logits = torch.tensor([p.logits for p in rt.classify(items)])
    assert rt.merged_task is not None, "a single-task batch must not unmerge"
    assert (merged_logits - slot_logits).abs().max().item() <= 1e-4
    assert any(not torch.equal(original[n], l.base.weight) for n, l in rt.engine.layers.items())

    # A batch that needs another task unmerges first, and is still right.
    mixed = rt.classify([("b", SAMPLE_TEXTS[0]), ("a", SAMPLE_TEXTS[0])])
    assert rt.merged_task is None
    assert max(abs(x - y) for x, y in zip(mixed[1].logits, slot_logits[0].tolist())) <= 1e-4

    for _ in range(1000):
        rt.merge("a")
        rt.unmerge()
    for n, l in rt.engine.layers.items():
        assert torch.equal(original[n], l.base.weight), n
    after = torch.tensor([p.logits for p in rt.classify(items)])
    assert torch.equal(after, slot_logits)


def test_removing_a_merged_task_unmerges(tiny_bases, tmp_path):
    base = tiny_bases["distilbert"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("a", make_peft_adapter(base, str(tmp_path / "a"), num_labels=2, seed=1))
    original = _weights(rt)
    rt.merge("a")
    rt.remove_adapter("a")
    assert rt.merged_task is None and rt.slot_table.resident() == []
    for n, l in rt.engine.layers.items():
        assert torch.equal(original[n], l.base.weight)


def test_merged_task_is_merged_back_after_a_run_of_its_own_batches(tiny_bases, tmp_path):
    from adapterserve.runtime.residency import REMERGE_AFTER_BATCHES

    base = tiny_bases["bert"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("a", make_peft_adapter(base, str(tmp_path / "a"), num_labels=2, seed=1))
    rt.add_adapter("b", make_peft_adapter(base, str(tmp_path / "b"), num_labels=3, seed=2))
    want = [p.logits for p in rt.classify([("a", t) for t in SAMPLE_TEXTS[:3]])]
    rt.merge("a")
    rt.classify([("a", SAMPLE_TEXTS[0]), ("b", SAMPLE_TEXTS[1])])  # mixed: unmerges
    assert rt.merged_task is None
    for i in range(REMERGE_AFTER_BATCHES - 1):
        rt.classify([("a", SAMPLE_TEXTS[0])])
        assert rt.merged_task is None, f"merged back after only {i + 1} batches"
    rt.classify([("b", SAMPLE_TEXTS[0])])  # another task breaks the run
    for _ in range(REMERGE_AFTER_BATCHES):
        got = [p.logits for p in rt.classify([("a", t) for t in SAMPLE_TEXTS[:3]])]
        assert max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w)) <= 1e-4
    assert rt.merged_task is not None and rt.merged_task.task == "a"
    # An explicit unmerge ends merged mode for good.
    rt.unmerge()
    for _ in range(2 * REMERGE_AFTER_BATCHES):
        rt.classify([("a", SAMPLE_TEXTS[0])])
    assert rt.merged_task is None
