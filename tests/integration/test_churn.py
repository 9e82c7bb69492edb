"""Churn: 32 concurrent clients over mixed tasks for 20 s while adapters are registered, replaced and
removed. Zero INTERNAL errors and zero wrong answers (every OK response equals the offline scores of
the version it names)."""
import asyncio
import random
import time

import grpc

from conftest import AUTH
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.server.stubs import pb, pb_grpc
from adapterserve.runtime.runtime import Runtime

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés",
         "Oil prices rise as OPEC cuts output", "The Yankees beat the Red Sox 5-3 in extra innings",
         "an utterly charming and hilarious film that never lets up", "dull", "Intel unveils a faster chip"]
DURATION = 20.0
CLIENTS = 32


def test_churn(server, minilm_adapters):
    _, paths = minilm_adapters
    rt = Runtime(RuntimeConfig(slots=8))
    expected = {}  # version -> [ {label: score} per text ]
    for name, path in paths.items():
        info = rt.add_adapter(name, path)
        expected[info.version] = [{s.label: s.score for s in p.scores} for p in rt.classify([(name, t) for t in TEXTS])]
    stable = ["c_alpha", "c_beta"]
    churn = ["c_x", "c_y", "c_z"]
    stats = {"ok": 0, "not_found": 0, "other": [], "wrong": []}

    async def client(i, stub, end):
        rng = random.Random(i)
        while time.monotonic() < end:
            task = rng.choice(stable + churn)
            idx = rng.sample(range(len(TEXTS)), rng.randint(1, 4))
            try:
                r = await stub.Classify(pb.ClassifyRequest(task=task, texts=[TEXTS[j] for j in idx]), timeout=30)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND and task in churn:
                    stats["not_found"] += 1
                else:
                    stats["other"].append((e.code(), e.details()))
                continue
            stats["ok"] += 1
            want = expected.get(r.adapter_version)
            if want is None:
                stats["wrong"].append(("unknown version", r.adapter_version))
                continue
            for pred, j in zip(r.predictions, idx):
                got = {s.label: s.score for s in pred.scores}
                if got.keys() != want[j].keys() or max(abs(got[k] - want[j][k]) for k in got) > 1e-4:
                    stats["wrong"].append((task, j, got, want[j]))

    async def operator(reg, end):
        rng = random.Random(99)
        ops = 0
        while time.monotonic() < end:
            task = rng.choice(churn)
            source = rng.choice(list(paths))
            try:
                if rng.random() < 0.3:
                    await reg.UnregisterAdapter(pb.UnregisterAdapterRequest(task=task), metadata=AUTH)
                else:
                    await reg.RegisterAdapter(pb.RegisterAdapterRequest(task=task, path=source, replace=True), metadata=AUTH)
                ops += 1
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    stats["other"].append(("operator", e.code(), e.details()))
            await asyncio.sleep(0.1)
        return ops

    async def main():
        async with grpc.aio.insecure_channel(server.address) as ch:
            reg = pb_grpc.AdapterRegistryStub(ch)
            await reg.RegisterAdapter(pb.RegisterAdapterRequest(task="c_alpha", path="alpha", replace=True), metadata=AUTH)
            await reg.RegisterAdapter(pb.RegisterAdapterRequest(task="c_beta", path="beta", replace=True), metadata=AUTH)
            stub = pb_grpc.ClassifierStub(ch)
            end = time.monotonic() + DURATION
            results = await asyncio.gather(operator(reg, end), *[client(i, stub, end) for i in range(CLIENTS)])
            return results[0]

    ops = asyncio.run(main())
    assert not stats["other"], stats["other"][:5]
    assert not stats["wrong"], stats["wrong"][:3]
    assert ops >= 10 and stats["ok"] > 100, (ops, stats["ok"])
    assert "INTERNAL" not in server.log() and "Traceback" not in server.log()
