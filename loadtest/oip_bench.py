"""Open Inference Protocol overhead: the same server answering adapterserve.v1 Classify, OIP ModelInfer
over gRPC and OIP ModelInfer over HTTP/REST.

    python -m adapterserve.loadtest.oip_bench [--duration 30] [--json FILE]

1. Concurrency 1, one short text: p50 of each protocol in interleaved rounds (this VM's speed drifts by
   more than the difference measured, so the rounds alternate); OIP gRPC p50 − native p50.
2. Saturation on SST-2 dev texts (concurrency 16 × 8 texts), interleaved rounds: the median texts/s of
   each protocol, as a ratio to native, beside the ceiling: the same runtime in-process, batched (loadtest/server_bench.py's).
The load generator shares the machine's cores with the server; its CPU use is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOLS = ("native", "oip-grpc", "oip-http")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=30, help="seconds per protocol, split over the rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved concurrency-1 rounds")
    p.add_argument("--saturation-rounds", type=int, default=4, help="interleaved saturation rounds")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--texts-per-request", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from adapterserve.loadtest import run as lt
    from adapterserve.loadtest.server_bench import SHORT, InProcess
    from adapterserve.loadtest.server_proc import ServerProcess, free_port
    from adapterserve.loadtest.runtime_bench import sst2_dev_texts

    texts = sst2_dev_texts(os.path.join(ROOT, "data", "sst2", "dev.tsv"))
    tmp = tempfile.mkdtemp()
    short_file = os.path.join(tmp, "short.tsv")
    with open(short_file, "w") as fh:
        fh.write("sentence\n" + SHORT + "\n")
    parser = argparse.ArgumentParser()
    lt.add_args(parser)
    server = ServerProcess("--data-dir", "", "--max-batch-size", str(args.batch), "--max-queue", "4096",
                           http_port=free_port())
    address = {"native": server.address, "oip-grpc": server.address,
               "oip-http": server.http_url.removeprefix("http://")}

    def load(protocol, extra):
        return lt.run(parser.parse_args(["--address", address[protocol], "--protocol", protocol, "--tasks", "sst2",
                                         "--quiet", *extra]))

    c1 = {proto: [] for proto in PROTOCOLS}
    saturation = {proto: [] for proto in PROTOCOLS}
    try:
        per_round = args.duration / args.rounds
        for _ in range(args.rounds):
            for proto in PROTOCOLS:
                one = load(proto, ["--concurrency", "1", "--duration", str(per_round), "--warmup", "1",
                                   "--texts", short_file])
                c1[proto].append(one["latency_ms"]["p50"])
            print("  c=1 round: " + ", ".join(f"{proto} {c1[proto][-1]:.2f} ms" for proto in PROTOCOLS), flush=True)
        for _ in range(args.saturation_rounds):
            for proto in PROTOCOLS:
                sat = load(proto, ["--concurrency", str(args.concurrency), "--texts-per-request",
                                   str(args.texts_per_request), "--duration", str(args.duration / args.saturation_rounds),
                                   "--warmup", "2"])
                saturation[proto].append(sat)
            print("  saturation round: " + ", ".join(
                f"{proto} {saturation[proto][-1]['throughput_texts_per_s']:.0f} texts/s" for proto in PROTOCOLS), flush=True)
    finally:
        server.stop()
    ceiling = InProcess(os.path.join(ROOT, "adapters", "examples", "sst2"), args.batch).batched_texts_per_s(texts)

    p50 = {proto: statistics.median(v) for proto, v in c1.items()}
    diffs = sorted(g - n for g, n in zip(c1["oip-grpc"], c1["native"]))
    tput = {proto: statistics.median(r["throughput_texts_per_s"] for r in runs) for proto, runs in saturation.items()}
    print("\n| measurement | native gRPC | OIP gRPC | OIP HTTP | OIP gRPC vs native | target |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| p50, 1 short text, concurrency 1 | {p50['native']:.2f} ms | {p50['oip-grpc']:.2f} ms | "
          f"{p50['oip-http']:.2f} ms | {statistics.median(diffs):+.2f} ms (rounds: "
          f"{', '.join(f'{d:+.2f}' for d in diffs)}) | ≤ +0.3 ms |")
    print(f"| texts/s, concurrency {args.concurrency} × {args.texts_per_request} SST-2 dev texts | {tput['native']:.0f} | "
          f"{tput['oip-grpc']:.0f} | {tput['oip-http']:.0f} | × {tput['oip-grpc'] / tput['native']:.3f} | ≥ 0.95 |")
    print(f"| the same, ÷ in-process batched ceiling ({ceiling:.0f} texts/s, batch {args.batch}) | "
          f"× {tput['native'] / ceiling:.2f} | × {tput['oip-grpc'] / ceiling:.2f} | × {tput['oip-http'] / ceiling:.2f} | | |")
    cpu = {proto: statistics.median(r["client"]["cpu_cores_used"] for r in runs) for proto, runs in saturation.items()}
    print("\nclient CPU at saturation (cores, of %d shared with the server): %s" % (
        os.cpu_count(), ", ".join(f"{proto} {v:.2f}" for proto, v in cpu.items())))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"c1_p50_ms": c1, "saturation_texts_per_s": {k: [r["throughput_texts_per_s"] for r in v]
                                                                   for k, v in saturation.items()},
                       "in_process_batched_texts_per_s": ceiling}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
