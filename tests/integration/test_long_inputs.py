"""A long-context base (tiny ModernBERT, 256 positions) behind the real gRPC server with the long-input
lane on (--long-input-tokens 64): long and short requests sent together are each answered with the
in-process runtime's logits, and the server says at start which rows take the lane. Its latency effect
is a benchmark (loadtest/long_inputs_bench.py, docs/benchmarks.md), not a timed test."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapterserve.client import Client
from adapterserve.loadtest.server_proc import ServerProcess
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime
from tiny_models import SAMPLE_TEXTS, make_peft_adapter

TOL = 1e-4


@pytest.fixture(scope="module")
def long_base(new_family_bases, tmp_path_factory):
    base = new_family_bases["modernbert"]
    adapter = make_peft_adapter(base, str(tmp_path_factory.mktemp("long") / "t"), num_labels=3, r=4,
                                targets=["Wqkv", "Wi"], seed=7)
    return base, adapter


def test_long_and_short_requests_answered_by_their_lanes(long_base):
    base, adapter = long_base
    long_text = " ".join(SAMPLE_TEXTS * 6)  # ~250 tokens: above the lane's 64, truncated to the base's 256
    texts = [long_text, *SAMPLE_TEXTS[:6], long_text[: len(long_text) // 2]]
    server = ServerProcess("--base-model", base, "--adapter", f"t={adapter}", "--no-examples", "--data-dir", "",
                           "--long-input-tokens", "64")
    try:
        assert "run in a lane of their own" in server.log()
        with Client(server.address) as client, ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(lambda t: client.classify("t", [t]).predictions[0], texts))
    finally:
        server.stop()
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("t", adapter)
    want = torch.tensor([p.probabilities() for p in rt.classify([("t", t) for t in texts])])
    got = torch.zeros_like(want)
    for i, answer in enumerate(answers):
        for score in answer.scores:
            got[i, score.index] = score.score
    # Probabilities move by at most a quarter of a logit change (softmax's slope): 1e-4 on logits bounds them.
    assert (got - want).abs().max().item() <= TOL
    assert answers[0].truncated and not answers[1].truncated
