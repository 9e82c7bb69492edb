"""The packaged MiniLM: a mixed batch over 8 tasks equals PEFT per task (max |dlogit| <= 1e-4)."""
import random

import pytest
import torch

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime
from tiny_models import SAMPLE_TEXTS, make_peft_adapter, peft_logits

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

T = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense"]
TASKS = [
    dict(num_labels=2, r=4, alpha=8, targets=T[:2]),
    dict(num_labels=4, r=8, alpha=16, targets=T),
    dict(num_labels=50, r=2, alpha=1, targets=T[2:4]),
    dict(num_labels=3, r=16, alpha=32, targets=T[:3], use_rslora=True),
    dict(num_labels=2, r=1, alpha=4, targets=T[-2:]),
    dict(num_labels=6, r=8, alpha=8, targets=T[:4], rank_pattern={"key": 2}, alpha_pattern={"value": 3}),
    dict(num_labels=5, r=4, alpha=12, targets=[T[4]]),
    dict(num_labels=2, r=12, alpha=6, targets=T[1:], use_rslora=True),
]


@pytest.fixture(scope="module")
def minilm_runtime(minilm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm_adapters")
    adapters = {f"task{i}": make_peft_adapter(minilm_dir, str(root / f"t{i}"), seed=i, scale=0.05, **kw)
                for i, kw in enumerate(TASKS)}
    rt = Runtime(RuntimeConfig(slots=16, r_max=16))
    for task, path in adapters.items():
        rt.add_adapter(task, path)
    return rt, adapters


def test_minilm_mixed_batch_matches_peft(minilm_runtime, minilm_dir):
    rt, adapters = minilm_runtime
    rng = random.Random(0)
    items = [(rng.choice(sorted(adapters)), rng.choice(SAMPLE_TEXTS)) for _ in range(48)]
    preds = rt.classify(items)
    worst = 0.0
    for task, path in adapters.items():
        idx = [i for i, (t, _) in enumerate(items) if t == task]
        got = torch.tensor([preds[i].logits for i in idx])
        want = peft_logits(minilm_dir, path, [items[i][1] for i in idx])
        worst = max(worst, (got - want).abs().max().item())
    assert worst <= 1e-4, worst


def test_minilm_truncation_policy(minilm_runtime):
    from adapterserve.runtime.errors import InvalidInputError

    rt, _ = minilm_runtime
    long_text = "word " * 2000
    with pytest.raises(InvalidInputError, match="truncate"):
        rt.classify([("task0", long_text)], truncate=False)
    pred = rt.classify([("task0", long_text)], truncate=True)[0]
    assert pred.truncated and pred.input_tokens == rt.base.max_length
