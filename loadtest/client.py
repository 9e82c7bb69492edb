"""One load-generating process: an asyncio client that runs a closed loop (fixed concurrency) or an open
loop (Poisson arrivals at a fixed rate) and records every request after warm-up. It speaks the native
adapterserve.v1 Classify, or the Open Inference Protocol's ModelInfer over gRPC or HTTP (--protocol)."""
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
    protocol: str = "native"  # native | oip-grpc | oip-http (address is then the HTTP host:port)


def _channel(plan: WorkerPlan):
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if plan.tls_ca:
        with open(plan.tls_ca, "rb") as fh:
            creds = grpc.ssl_channel_credentials(fh.read())
        return grpc.aio.secure_channel(plan.address, creds, options=options)
    return grpc.aio.insecure_channel(plan.address, options=options)


async def _run(plan: WorkerPlan, progress) -> dict:
    rng = random.Random(plan.seed)
    records = []  # (start offset s, latency s, code name, texts, server timings or None)
    metadata = (("authorization", f"Bearer {plan.token}"),) if plan.token else None
    timeout = plan.deadline_ms / 1000.0 if plan.deadline_ms else None
    t0 = time.monotonic()
    measure_from = t0 + plan.warmup
    end = measure_from + plan.duration

    async with _channel(plan) as channel, _Caller(plan, channel, metadata, timeout) as call:

        async def one():
            task = rng.choices(plan.tasks, plan.weights)[0]
            texts = [plan.texts[rng.randrange(len(plan.texts))] for _ in range(plan.texts_per_request)]
            start = time.monotonic()
            code, server = await call(task, texts)  # server: its own account of the request (seconds)
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


class _Caller:
    """One request in the plan's protocol -> (status code name, server timings or None)."""

    def __init__(self, plan: WorkerPlan, channel, metadata, timeout) -> None:
        self.plan, self.channel, self.metadata, self.timeout = plan, channel, metadata, timeout
        self.session = None

    async def __aenter__(self):
        if self.plan.protocol == "native":
            from adapterserve.runtime.server.stubs import pb, pb_grpc

            stub = pb_grpc.ClassifierStub(self.channel)

            async def call(task, texts):
                reply = await stub.Classify(pb.ClassifyRequest(task=task, texts=texts, truncate=True),
                                            timeout=self.timeout, metadata=self.metadata)
                return reply.timings.queue_ns, reply.timings.tokenize_ns, reply.timings.inference_ns, reply.timings.total_ns
        elif self.plan.protocol == "oip-grpc":
            from adapterserve.v1 import inference_pb2 as ip
            from adapterserve.v1 import inference_pb2_grpc as ip_grpc

            stub = ip_grpc.GRPCInferenceServiceStub(self.channel)

            async def call(task, texts):
                request = ip.ModelInferRequest(model_name=task)
                request.parameters["truncate"].bool_param = True
                request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)]).contents.bytes_contents.extend(
                    t.encode() for t in texts)
                request.outputs.add(name="LABEL")
                request.outputs.add(name="SCORES")
                reply = await stub.ModelInfer(request, timeout=self.timeout, metadata=self.metadata)
                return tuple(reply.parameters[k].int64_param for k in ("queue_ns", "tokenize_ns", "inference_ns", "total_ns"))
        elif self.plan.protocol == "oip-http":
            import aiohttp

            self.session = aiohttp.ClientSession(
                f"http://{self.plan.address}", headers=dict(self.metadata or ()),
                timeout=aiohttp.ClientTimeout(total=self.timeout), connector=aiohttp.TCPConnector(limit=0))

            async def call(task, texts):
                body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
                        "outputs": [{"name": "LABEL"}, {"name": "SCORES"}], "parameters": {"truncate": True}}
                async with self.session.post(f"/v2/models/{task}/infer", json=body) as response:
                    answer = await response.json()
                    if response.status != 200:
                        raise _HttpStatus(response.status)
                p = answer["parameters"]
                return p["queue_ns"], p["tokenize_ns"], p["inference_ns"], p["total_ns"]
        else:
            raise SystemExit(f"error: --protocol must be native, oip-grpc or oip-http; got {self.plan.protocol!r}")
        self._call = call
        return self

    async def __aexit__(self, *exc):
        if self.session is not None:
            await self.session.close()

    async def __call__(self, task, texts):
        try:
            ns = await self._call(task, texts)
        except grpc.aio.AioRpcError as e:
            return e.code().name, None
        except _HttpStatus as e:
            return f"HTTP_{e.status}", None
        except asyncio.TimeoutError:
            return "DEADLINE_EXCEEDED", None
        return "OK", tuple(n / 1e9 for n in ns)


class _HttpStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def run_worker(plan: WorkerPlan, progress=None) -> dict:
    return asyncio.run(_run(plan, progress))
