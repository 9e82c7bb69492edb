"""`adapterserve bench host` is a timing harness, not a second implementation: with the forward replaced
by the features it recorded, the runtime's host path gives exactly the real path's predictions."""
import pytest

from adapterserve.loadtest.host_bench import host_timer, main, synthetic_tasks
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime
from tiny_models import SAMPLE_TEXTS


@pytest.mark.parametrize("rows,packing", [(32, "auto"), (256, "auto"), (32, "off")])
def test_recorded_forward_gives_the_real_predictions(tiny_bases, tmp_path, rows, packing):
    base = tiny_bases["bert"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=9, max_batch_size=256, token_packing=packing))
    tasks = []
    for i, path in enumerate(synthetic_tasks(base, str(tmp_path), 8)):
        rt.add_adapter(f"t{i}", path)
        tasks.append(f"t{i}")
    one_batch, real, recorder = host_timer(rt, SAMPLE_TEXTS, tasks, rows)
    assert recorder.recorded and recorder.replaying
    for _ in range(3):  # replayed again and again, always the same answers
        replayed = [r.prediction for r in one_batch()]
        assert [p.logits for p in replayed] == [p.logits for p in real]
        assert [p.top(1)[0].score for p in replayed] == [p.top(1)[0].score for p in real]
        assert [p.task for p in replayed] == [tasks[i % len(tasks)] for i in range(rows)]
    assert len({len(p.logits) for p in real}) > 1  # heads of several sizes in one batch


def test_bench_host_prints_both_sizes(tiny_bases, capsys):
    import json

    assert main(["host", "--base-model", tiny_bases["bert"], "--tasks", "4", "--rounds", "3", "--json",
                 "--token-packing", "off"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_packing"] == "off"
    assert result["us_per_batch_32"] > 0 and result["us_per_batch_256"] > 0
    assert result["us_read_top1_32"] > 0 and result["us_read_top1_256"] > 0
