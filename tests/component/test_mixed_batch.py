"""A mixed batch over 8 tasks (different ranks, alphas, targets, label counts) equals each task's own
PeftModel and the pure-PyTorch reference: max |dlogit| <= 1e-4 in fp32."""
import random

import pytest
import torch

from adapterserve.adapters.peft_lora import read_adapter_dir
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.engine.reference import reference_logits
from adapterserve.runtime.runtime import Runtime
from tiny_models import FAMILY_TARGETS, SAMPLE_TEXTS, make_peft_adapter, peft_logits

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

TOL = 1e-4


def task_matrix(family):
    t = FAMILY_TARGETS[family]
    return [
        # (num_labels, r, alpha, targets, extra LoraConfig options)
        dict(num_labels=2, r=4, alpha=8, targets=t[:2]),
        dict(num_labels=4, r=8, alpha=16, targets=t),
        dict(num_labels=50, r=2, alpha=1, targets=t[2:4]),
        dict(num_labels=3, r=16, alpha=32, targets=t[:3], use_rslora=True),
        dict(num_labels=2, r=1, alpha=4, targets=t[-2:]),
        dict(num_labels=6, r=8, alpha=8, targets=t[:4], rank_pattern={t[0]: 2}, alpha_pattern={t[1]: 3}),
        dict(num_labels=5, r=4, alpha=12, targets=[t[4]]),
        dict(num_labels=2, r=12, alpha=6, targets=t[1:], use_rslora=True),
    ]


@pytest.fixture(scope="module", params=["bert", "distilbert", "roberta"])
def family_adapters(request, tiny_bases, tmp_path_factory):
    family = request.param
    base = tiny_bases[family]
    root = tmp_path_factory.mktemp(f"adapters_{family}")
    adapters = {}
    for i, kw in enumerate(task_matrix(family)):
        adapters[f"task{i}"] = make_peft_adapter(base, str(root / f"task{i}"), seed=100 + i, **kw)
    return family, base, adapters


# Both CPU LoRA paths: the fused kernel (auto picks it on AVX-512 machines) and torch gather + bmm.
@pytest.fixture(scope="module", params=["auto", "torch"])
def family_setup(request, family_adapters):
    family, base, adapters = family_adapters
    rt = Runtime(RuntimeConfig(base_model=base, slots=16, r_max=16, lora_kernel=request.param))
    for task, path in adapters.items():
        rt.add_adapter(task, path)
    return f"{family}/{rt.engine.kernel_name}", base, adapters, rt


def mixed_items(tasks, n=40, seed=0):
    rng = random.Random(seed)
    return [(rng.choice(tasks), rng.choice(SAMPLE_TEXTS)) for _ in range(n)]


def test_mixed_batch_matches_peft_and_reference(family_setup):
    family, base, adapters, rt = family_setup
    items = mixed_items(sorted(adapters))
    preds = rt.classify(items)
    assert [p.task for p in preds] == [t for t, _ in items]
    worst_peft = worst_ref = 0.0
    for task, path in adapters.items():
        idx = [i for i, (t, _) in enumerate(items) if t == task]
        if not idx:
            continue
        texts = [items[i][1] for i in idx]
        got = torch.tensor([preds[i].logits for i in idx])
        want_peft = peft_logits(base, path, texts)
        spec = rt.load_spec(path)
        want_ref = reference_logits(base, spec, texts)
        assert got.shape == want_peft.shape == (len(idx), spec.num_labels)
        worst_peft = max(worst_peft, (got - want_peft).abs().max().item())
        worst_ref = max(worst_ref, (got - want_ref).abs().max().item())
    assert worst_peft <= TOL, f"{family}: max |dlogit| vs PEFT {worst_peft}"
    assert worst_ref <= TOL, f"{family}: max |dlogit| vs reference {worst_ref}"


def test_token_packed_forward_where_it_applies(family_setup):
    """token_packing=auto packs rows on BERT/RoBERTa with the fused kernel, so the PEFT comparison
    above runs the packed forward there; DistilBERT and the torch path stay padded. Packed equals
    padded (token_packing=off) on mixed tasks and lengths within 1e-5."""
    family, base, adapters, rt = family_setup
    name, kernel = family.split("/")
    assert rt.engine.packed == (kernel == "fused" and name != "distilbert")
    padded = Runtime(RuntimeConfig(base_model=base, slots=16, r_max=16, lora_kernel=rt.config.lora_kernel,
                                   token_packing="off"))
    assert not padded.engine.packed
    for task, path in adapters.items():
        padded.add_adapter(task, path)
    items = mixed_items(sorted(adapters), n=40, seed=3)
    assert len({len(t) for _, t in items}) > 3  # rows of several lengths in one pool
    for a, b in zip(rt.classify(items), padded.classify(items)):
        assert max(abs(x - y) for x, y in zip(a.logits, b.logits)) <= 1e-5


def test_whole_batch_goes_through_one_forward(family_setup):
    """Tasks never split a batch: 32 rows of 8 tasks with texts of one length are one forward (the
    planner cuts only by length, row/token caps and free slots)."""
    _, _, adapters, rt = family_setup
    items = [(t, SAMPLE_TEXTS[0]) for t, _ in mixed_items(sorted(adapters), n=32, seed=1)]
    rows = rt.encode_rows([rt.registry.get(t) for t, _ in items], [x for _, x in items], None, True)
    batches = rt.plan_batches(rows)
    assert len(batches) == 1 and len(batches[0]) == 32
    assert len({r.entry.key for r in batches[0]}) == len({t for t, _ in items}) > 1


def test_single_task_batch_equals_mixed(family_setup):
    _, _, adapters, rt = family_setup
    items = mixed_items(sorted(adapters), n=24, seed=2)
    mixed = rt.classify(items)
    for i, (task, text) in enumerate(items[:8]):
        alone = rt.classify([(task, text)])[0]
        assert max(abs(a - b) for a, b in zip(alone.logits, mixed[i].logits)) <= TOL


def test_scores_are_sorted_softmax_with_label_names(family_setup):
    _, _, adapters, rt = family_setup
    pred = rt.classify([("task2", SAMPLE_TEXTS[0])])[0]
    assert len(pred.scores) == 50
    scores = [s.score for s in pred.scores]
    assert scores == sorted(scores, reverse=True)
    assert abs(sum(scores) - 1.0) < 1e-5
    assert pred.scores[0].label == f"LABEL_{pred.scores[0].index}"
    assert pred.scores[0].index == max(range(50), key=lambda k: pred.logits[k])


def test_more_tasks_than_slots_are_served_by_eviction(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=3, r_max=8))  # 2 usable slots
    paths = {}
    for i in range(5):
        paths[f"t{i}"] = make_peft_adapter(base, str(tmp_path / f"t{i}"), num_labels=2 + i, r=4, seed=i)
        rt.add_adapter(f"t{i}", paths[f"t{i}"])
    items = [(f"t{i % 5}", SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]) for i in range(15)]
    preds = rt.classify(items)
    for task, path in paths.items():
        idx = [i for i, (t, _) in enumerate(items) if t == task]
        want = peft_logits(base, path, [items[i][1] for i in idx])
        got = torch.tensor([preds[i].logits for i in idx])
        assert (got - want).abs().max().item() <= TOL
    assert rt.slot_table.evictions > 0


def test_slots_reused_by_adapters_of_other_ranks_and_targets(family_setup):
    """Two slots, every batch mixing two tasks that evict the previous two: whatever an earlier
    occupant left in a slot (rows past the new rank, layers the new adapter does not target) must not
    leak into the next one, on the fused kernel and the torch path alike (the torch path gathers a
    slot in every layer any row of the batch needs)."""
    family, base, adapters, rt = family_setup
    two_slots = Runtime(RuntimeConfig(base_model=base, slots=3, r_max=16, lora_kernel=rt.config.lora_kernel))
    for task, path in adapters.items():
        two_slots.add_adapter(task, path)
    pairs = [("task3", "task1"), ("task4", "task7"), ("task2", "task5"), ("task6", "task0"), ("task1", "task4"),
             ("task7", "task3"), ("task5", "task6"), ("task0", "task2")]
    for pair in pairs:
        items = [(pair[i % 2], t) for i, t in enumerate(SAMPLE_TEXTS[:4])]
        got = [p.logits for p in two_slots.classify(items)]
        for task in pair:
            idx = [i for i, (t, _) in enumerate(items) if t == task]
            want = reference_logits(base, two_slots.load_spec(adapters[task]), [items[i][1] for i in idx])
            err = (torch.tensor([got[i] for i in idx]) - want).abs().max().item()
            assert err <= TOL, f"{family}: {task} (batch {pair}) read what an earlier occupant left: {err}"
    assert two_slots.slot_table.evictions >= 2 * (len(pairs) - 1)


def test_text_pairs_match_peft(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    path = make_peft_adapter(base, str(tmp_path / "nli"), num_labels=3, r=4, seed=7)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("nli", path)
    texts, pairs = SAMPLE_TEXTS[:4], SAMPLE_TEXTS[4:8]
    preds = rt.classify([("nli", a, b) for a, b in zip(texts, pairs)])
    want = peft_logits(base, path, texts, pairs)
    got = torch.tensor([p.logits for p in preds])
    assert (got - want).abs().max().item() <= TOL


def test_remove_and_replace(tiny_bases, tmp_path):
    base = tiny_bases["distilbert"]
    a = make_peft_adapter(base, str(tmp_path / "a"), num_labels=2, seed=1, labels=["neg", "pos"])
    b = make_peft_adapter(base, str(tmp_path / "b"), num_labels=3, seed=2, labels=["x", "y", "z"])
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    info_a = rt.add_adapter("t", a)
    assert info_a.labels == ["neg", "pos"]
    assert rt.classify([("t", "hello")])[0].adapter_version == info_a.version
    info_b = rt.add_adapter("t", b, replace=True)
    assert info_b.version != info_a.version
    pred = rt.classify([("t", "hello")])[0]
    assert pred.adapter_version == info_b.version and {s.label for s in pred.scores} == {"x", "y", "z"}
    rt.remove_adapter("t")
    assert rt.list_adapters() == []
    assert len(rt.slot_table.resident()) == 0  # the slot was freed, not leaked
    from adapterserve.runtime.errors import UnknownTaskError

    with pytest.raises(UnknownTaskError):
        rt.classify([("t", "hello")])


def test_adapter_files_read_as_bytes_equal_directory(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    path = make_peft_adapter(base, str(tmp_path / "a"), num_labels=2, seed=3)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    by_dir = rt.add_adapter("dir", path)
    by_bytes = rt.add_adapter("bytes", read_adapter_dir(path))
    assert by_dir.version == by_bytes.version
    p = rt.classify([("dir", "x y z"), ("bytes", "x y z")])
    assert p[0].logits == p[1].logits
