"""Server overhead benchmark (gRPC issue): the same runtime in-process vs behind gRPC.

    python -m loadtest.server_bench [--duration 15]

1. Concurrency 1, one short text: server p50 - in-process p50 (target <= 2 ms).
2. Saturation on SST-2 dev texts: server texts/s vs in-process batched texts/s with the same batch
   settings (target >= 0.85). The load generator runs on the same 2 cores as the server here; its own
   CPU use is printed beside the result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = "a charming film ."


def in_process(task_dir: str, texts: list[str], batch: int, iterations: int) -> dict:
    from runtime.config import RuntimeConfig
    from runtime.runtime import Runtime

    rt = Runtime(RuntimeConfig(max_batch_size=batch))
    rt.add_adapter("sst2", task_dir)
    for _ in range(20):
        rt.classify([("sst2", SHORT)])
    lat = []
    for _ in range(iterations):
        t = time.perf_counter()
        rt.classify([("sst2", SHORT)])
        lat.append(time.perf_counter() - t)
    rt.classify([("sst2", t) for t in texts[:batch]])
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        # Batches of `batch` texts in data order, as a server batch holds whatever requests arrived
        # (a global sort of all 872 texts by length would pad less than any server could).
        for i in range(0, len(texts), batch):
            rt.classify([("sst2", t) for t in texts[i:i + batch]])
        rounds.append(len(texts) / (time.perf_counter() - start))
    return {"p50_ms": statistics.median(lat) * 1000, "batched_texts_per_s": statistics.median(rounds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=15)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--texts-per-request", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from loadtest.server_proc import ServerProcess

    from loadtest import run as lt
    from loadtest.runtime_bench import sst2_dev_texts

    texts = sst2_dev_texts(os.path.join(ROOT, "data", "sst2", "dev.tsv"))
    task_dir = os.path.join(ROOT, "adapters", "examples", "sst2")
    local = in_process(task_dir, texts, args.batch, 300)
    tmp = tempfile.mkdtemp()
    short_file = os.path.join(tmp, "short.tsv")
    with open(short_file, "w") as fh:
        fh.write("sentence\n" + SHORT + "\n")
    server = ServerProcess("--data-dir", "", "--max-batch-size", str(args.batch), "--max-queue", "4096")
    try:
        parser = lt.argparse.ArgumentParser()
        lt.add_args(parser)
        one = lt.run(parser.parse_args(["--address", server.address, "--concurrency", "1", "--duration", str(args.duration),
                                        "--warmup", "2", "--tasks", "sst2", "--texts", short_file, "--quiet"]))
        sat = lt.run(parser.parse_args(["--address", server.address, "--concurrency", str(args.concurrency),
                                        "--texts-per-request", str(args.texts_per_request), "--duration", str(args.duration),
                                        "--warmup", "3", "--tasks", "sst2", "--quiet"]))
    finally:
        server.stop()
    overhead = one["latency_ms"]["p50"] - local["p50_ms"]
    ratio = sat["throughput_texts_per_s"] / local["batched_texts_per_s"]
    print("\n| measurement | in-process | server | server − / ÷ in-process | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| p50 latency, 1 short text, concurrency 1 | {local['p50_ms']:.2f} ms | {one['latency_ms']['p50']:.2f} ms | "
          f"+{overhead:.2f} ms | ≤ +2 ms |")
    print(f"| throughput, SST-2 dev, batch {args.batch} | {local['batched_texts_per_s']:.1f} texts/s | "
          f"{sat['throughput_texts_per_s']:.1f} texts/s | × {ratio:.2f} | ≥ 0.85 |")
    print(f"\nsaturation run: concurrency {args.concurrency} × {args.texts_per_request} texts, p50 {sat['latency_ms']['p50']:.1f} ms, "
          f"p99 {sat['latency_ms']['p99']:.1f} ms, errors {sat['errors']}, client CPU {sat['client']['cpu_cores_used']:.2f} cores "
          f"(of {os.cpu_count()} shared with the server)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"in_process": local, "server_c1": one, "server_saturation": sat}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
