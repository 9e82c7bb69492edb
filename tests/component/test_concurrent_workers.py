"""Several model workers on one Runtime: forwards run at once on different threads, slot loads and
evictions happen between them, and a merge waits for running forwards. Every answer must equal the
single-threaded answer for the same rows (tiny BERT, fp32)."""
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime
from tiny_models import FAMILY_TARGETS, SAMPLE_TEXTS, make_peft_adapter

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

TOL = 1e-5


def _setup(base, tmp_path, slots, engine="torch"):
    extra = dict(engine="onnx", onnx_dir=str(tmp_path / "onnx")) if engine == "onnx" else {}
    rt = Runtime(RuntimeConfig(base_model=base, slots=slots, r_max=8, max_batch_size=4, **extra))
    tasks = []
    for i in range(6):
        path = make_peft_adapter(base, str(tmp_path / f"t{i}"), num_labels=2 + i % 3, r=2 + 2 * (i % 3),
                                 targets=FAMILY_TARGETS["bert"], seed=40 + i)
        rt.add_adapter(f"t{i}", path)
        tasks.append(f"t{i}")
    return rt, tasks


def _requests(tasks, n, seed):
    rng = random.Random(seed)
    return [[(rng.choice(tasks), rng.choice(SAMPLE_TEXTS)) for _ in range(rng.randint(1, 6))] for _ in range(n)]


# The ONNX engine too: `--engine onnx --model-workers 2` runs two session.run calls at once, each
# fed from the slot buffers that the other worker's batches keep reloading.
@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_concurrent_forwards_with_slot_churn_equal_sequential(tiny_bases, tmp_path, engine):
    # 4 usable slots for 6 tasks: batches on the two threads keep loading and evicting slots.
    rt, tasks = _setup(tiny_bases["bert"], tmp_path, slots=5, engine=engine)
    requests = _requests(tasks, 60, seed=1)
    expected = [[p.logits for p in rt.classify(r)] for r in requests]
    loads_before = rt.slot_table.loads

    errors = []

    def worker(part):
        torch.set_num_threads(1)
        for i in part:
            got = [p.logits for p in rt.classify(requests[i])]
            worst = max(abs(a - b) for g, e in zip(got, expected[i]) for a, b in zip(g, e))
            if worst > TOL:
                errors.append((i, worst))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(worker, [range(0, 60, 2), range(1, 60, 2)]))
    assert not errors, f"requests answered differently under concurrency: {errors[:5]}"
    assert rt.slot_table.loads > loads_before, "the test must exercise slot loads between concurrent forwards"
    assert rt.residency.running_forwards == 0


def test_merge_waits_for_running_forwards(tiny_bases, tmp_path):
    rt, tasks = _setup(tiny_bases["bert"], tmp_path, slots=8)
    requests = _requests(tasks, 40, seed=2)
    expected = [[p.logits for p in rt.classify(r)] for r in requests]
    stop = threading.Event()
    errors = []

    def traffic():
        torch.set_num_threads(1)
        while not stop.is_set():
            for i, r in enumerate(requests):
                got = [p.logits for p in rt.classify(r)]
                worst = max(abs(a - b) for g, e in zip(got, expected[i]) for a, b in zip(g, e))
                if worst > 1e-4:
                    errors.append((i, worst))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for _ in range(60):  # merged weights must never be seen by a forward that expects slots
            rt.merge("t0")
            rt.classify([("t0", SAMPLE_TEXTS[0])])
            rt.unmerge()
    finally:
        stop.set()
        thread.join()
    assert not errors, f"a forward saw weights changing under it: {errors[:5]}"
