"""One load-generating process: an asyncio gRPC client that runs a closed loop (fixed concurrency)
or an open loop (Poisson arrivals at a fixed rate) and records every request after warm-up."""
from __future__ import annotations

import asyncio
import random
import resource
import time
from dataclasses import dataclass
from typing import Optional

import grpc


@dataclass
class WorkerPlan:
    address: str
    tasks: list[str]
    weights: list[float]
    texts: list[str]
    texts_per_request: int
    duration: float
    warmup: float
    concurrency: int = 0  # closed loop when > 0
    rate: float = 0.0  # open loop (requests/s) when > 0
    deadline_ms: Optional[float] = None
    token: Optional[str] = None
    tls_ca: Optional[str] = None
    seed: int = 0


def _channel(plan: WorkerPlan):
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if plan.tls_ca:
        with open(plan.tls_ca, "rb") as fh:
            creds = grpc.ssl_channel_credentials(fh.read())
        return grpc.aio.secure_channel(plan.address, creds, options=options)
    return grpc.aio.insecure_channel(plan.address, options=options)


async def _run(plan: WorkerPlan, progress) -> dict:
    from adapterserve.runtime.server.stubs import pb, pb_grpc

    rng = random.Random(plan.seed)
    records = []  # (start offset s, latency s, code name, texts, server timings or None)
    metadata = (("authorization", f"Bearer {plan.token}"),) if plan.token else None
    timeout = plan.deadline_ms / 1000.0 if plan.deadline_ms else None
    t0 = time.monotonic()
    measure_from = t0 + plan.warmup
    end = measure_from + plan.duration

    async with _channel(plan) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def one():
            task = rng.choices(plan.tasks, plan.weights)[0]
            texts = [plan.texts[rng.randrange(len(plan.texts))] for _ in range(plan.texts_per_request)]
            start = time.monotonic()
            server = None  # the server's own account of this request (Timings), seconds
            try:
                reply = await stub.Classify(pb.ClassifyRequest(task=task, texts=texts, truncate=True), timeout=timeout,
                                            metadata=metadata)
                code = "OK"
                t = reply.timings
                server = (t.queue_ns / 1e9, t.tokenize_ns / 1e9, t.inference_ns / 1e9, t.total_ns / 1e9)
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            done = time.monotonic()
            if start >= measure_from and done <= end + 30:
                records.append((start - measure_from, done - start, code, len(texts), server))
                if progress is not None:
                    progress.put((done - start, code, len(texts)))

        if plan.concurrency > 0:
            async def loop():
                while time.monotonic() < end:
                    await one()
            await asyncio.gather(*[loop() for _ in range(plan.concurrency)])
        else:
            pending = set()
            next_at = time.monotonic()
            while next_at < end:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.ensure_future(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += rng.expovariate(plan.rate)
            if pending:
                await asyncio.gather(*pending)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"records": records, "cpu_seconds": usage.ru_utime + usage.ru_stime, "wall_seconds": time.monotonic() - t0}


def run_worker(plan: WorkerPlan, progress=None) -> dict:
    return asyncio.run(_run(plan, progress))
