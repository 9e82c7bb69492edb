"""`adapterserve loadtest run`: load an adapterserve server and report throughput and latency.

Several client processes (--processes) share the load so the client is never the bottleneck; their
own CPU use is reported beside the results. Closed loop with --concurrency, or open loop (Poisson
arrivals) with --rate. Writes JSON (--out) and a Markdown summary (--md).
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from typing import Optional

import numpy as np

from adapterserve.loadtest.client import WorkerPlan, run_worker

DEFAULT_TEXTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sst2", "dev.tsv")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="gRPC host:port (the HTTP one with --protocol oip-http)")
    p.add_argument("--protocol", default="native", choices=["native", "oip-grpc", "oip-http"],
                   help="adapterserve.v1 Classify, or the Open Inference Protocol's ModelInfer over gRPC or HTTP")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight (default 8)")
    mode.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds sent but not measured")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task ListAdapters returns)")
    p.add_argument("--mix", default="uniform", help="task popularity: uniform or zipf:S (S > 0)")
    p.add_argument("--texts", default=DEFAULT_TEXTS, help="CSV/TSV with the texts to send (real length mix)")
    p.add_argument("--text-col", default="sentence")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--deadline-ms", type=float, default=None)
    p.add_argument("--processes", type=int, default=None, help="client processes (default: 2, or 1 for concurrency 1)")
    p.add_argument("--token", default=None, help="admin token (only needed to list tasks when the server has one)")
    p.add_argument("--tls-ca", default=None, help="PEM CA to verify a TLS server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="name of this run in reports")
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--md", default=None, help="Markdown summary file")
    p.add_argument("--quiet", action="store_true", help="no live progress line")


def read_texts(path: str, column: str) -> list[str]:
    if not os.path.exists(path):
        raise SystemExit(f"error: no texts file {path} (the default, SST-2 dev, ships with the repository's data/, "
                         "not the wheel); pass --texts FILE --text-col COLUMN")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if path.endswith(".tsv") else csv.DictReader(fh)
        if column not in (reader.fieldnames or []):
            raise SystemExit(f"error: column {column!r} not in {path} (has {reader.fieldnames})")
        texts = [row[column] for row in reader if row[column]]
    if not texts:
        raise SystemExit(f"error: no texts in {path}")
    return texts


def task_weights(tasks: list[str], mix: str) -> list[float]:
    if mix == "uniform":
        return [1.0] * len(tasks)
    if mix.startswith("zipf:"):
        s = float(mix.split(":", 1)[1])
        return [1.0 / (rank ** s) for rank in range(1, len(tasks) + 1)]
    raise SystemExit(f"error: --mix must be uniform or zipf:S, got {mix!r}")


def list_tasks(address: str, token: Optional[str], tls_ca: Optional[str]) -> list[str]:
    import grpc

    from adapterserve.runtime.server.stubs import pb, pb_grpc

    if tls_ca:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(open(tls_ca, "rb").read()))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        md = (("authorization", f"Bearer {token}"),) if token else None
        return [a.task for a in pb_grpc.AdapterRegistryStub(channel).ListAdapters(pb.ListAdaptersRequest(), metadata=md).adapters]


def _worker_main(plan: WorkerPlan, progress, results) -> None:
    results.put(run_worker(plan, progress))


def server_breakdown(ok: list) -> dict:
    """Where the time went, from the server's own Timings on each answer (like Triton's perf_analyzer
    server-side split): waiting for a batch, tokenizing, the model, the whole handler, and what lies
    outside the handler (transport, gRPC, both event loops). Percentiles of each part over the
    requests, in ms; the parts' percentiles do not add up to the latency's."""
    timed = [r for r in ok if r[4] is not None]
    if not timed:
        return {}
    parts = np.array([r[4] for r in timed]) * 1000.0  # queue, tokenize, inference, total
    outside = np.array([r[1] for r in timed]) * 1000.0 - parts[:, 3]
    cols = {"queue": parts[:, 0], "tokenize": parts[:, 1], "inference": parts[:, 2], "handler": parts[:, 3],
            "outside_handler": outside}
    return {name: {q: float(np.percentile(v, int(q[1:]))) for q in ("p50", "p90", "p99")} | {"mean": float(v.mean())}
            for name, v in cols.items()}


def summarize(records: list, duration: float, cpu_seconds: float, wall_seconds: float, processes: int) -> dict:
    ok = [r for r in records if r[2] == "OK"]
    errors: dict[str, int] = {}
    for r in records:
        if r[2] != "OK":
            errors[r[2]] = errors.get(r[2], 0) + 1
    lat = np.array([r[1] for r in ok]) * 1000.0
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: None)
    texts = sum(r[3] for r in ok)
    return {
        "sent": len(records), "ok": len(ok), "errors": sum(errors.values()), "errors_by_code": errors,
        "texts_ok": texts,
        "throughput_texts_per_s": texts / duration, "throughput_requests_per_s": len(ok) / duration,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p95": pct(95), "p99": pct(99),
                       "max": float(lat.max()) if len(lat) else None, "mean": float(lat.mean()) if len(lat) else None},
        "server_ms": server_breakdown(ok),
        "latency_sample_ms": sorted(lat.tolist())[:: max(1, len(lat) // 5000)],
        "client": {"processes": processes, "cpu_seconds": cpu_seconds, "wall_seconds": wall_seconds,
                   "cpu_cores_used": cpu_seconds / wall_seconds if wall_seconds else None},
    }


def run(args) -> dict:
    if not args.tasks and args.protocol == "oip-http":
        raise SystemExit("error: with --protocol oip-http pass --tasks (tasks are listed over gRPC)")
    tasks = args.tasks.split(",") if args.tasks else list_tasks(args.address, args.token, args.tls_ca)
    if not tasks:
        raise SystemExit("error: the server has no tasks; register one or pass --tasks")
    texts = read_texts(args.texts, args.text_col)
    weights = task_weights(tasks, args.mix)
    concurrency = args.concurrency if args.concurrency is not None else (None if args.rate else 8)
    processes = args.processes or (1 if (concurrency == 1) else 2)
    plans = []
    for i in range(processes):
        share_c = (concurrency // processes + (1 if i < concurrency % processes else 0)) if concurrency else 0
        plans.append(WorkerPlan(address=args.address, tasks=tasks, weights=weights, texts=texts,
                                texts_per_request=args.texts_per_request, duration=args.duration, warmup=args.warmup,
                                concurrency=share_c, rate=(args.rate / processes) if args.rate else 0.0,
                                deadline_ms=args.deadline_ms, token=args.token, tls_ca=args.tls_ca, seed=args.seed + i,
                                protocol=args.protocol))
    plans = [p for p in plans if p.concurrency > 0 or p.rate > 0]
    ctx = mp.get_context("spawn")
    progress, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(p, progress, results), daemon=True) for p in plans]
    for p in procs:
        p.start()
    outs, start, last, window = [], time.monotonic(), time.monotonic(), []
    total = errors = 0
    while len(outs) < len(procs):
        try:
            outs.append(results.get(timeout=0.2))
        except queue.Empty:
            pass
        while True:
            try:
                lat, code, _ = progress.get_nowait()
            except queue.Empty:
                break
            total += 1
            errors += code != "OK"
            window.append(lat)
        now = time.monotonic()
        if not args.quiet and now - last >= 1.0 and window:
            w = np.array(window) * 1000
            print(f"\r[{now - start:5.1f}s] {len(window) / (now - last):7.1f} req/s  p50 {np.percentile(w, 50):7.1f} ms  "
                  f"p99 {np.percentile(w, 99):7.1f} ms  errors {errors}/{total}", end="", file=sys.stderr, flush=True)
            window, last = [], now
        if any(p.exitcode not in (None, 0) for p in procs):
            raise SystemExit("error: a client process failed")
    for p in procs:
        p.join()
    if not args.quiet:
        print(file=sys.stderr)
    records = [r for o in outs for r in o["records"]]
    result = summarize(records, args.duration, sum(o["cpu_seconds"] for o in outs),
                       max(o["wall_seconds"] for o in outs), len(procs))
    result["config"] = {"label": args.label, "address": args.address, "mode": "open" if args.rate else "closed",
                        "concurrency": concurrency, "rate": args.rate, "duration": args.duration, "warmup": args.warmup,
                        "tasks": len(tasks), "mix": args.mix, "texts_per_request": args.texts_per_request,
                        "texts_file": os.path.basename(args.texts), "deadline_ms": args.deadline_ms,
                        "protocol": args.protocol}
    return result


def markdown(result: dict) -> str:
    c, lat = result["config"], result["latency_ms"]
    f = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    mode = f"concurrency {c['concurrency']}" if c["mode"] == "closed" else f"rate {c['rate']}/s (Poisson)"
    lines = [
        f"### {c.get('label') or 'loadtest'}: {mode}, {c['tasks']} tasks ({c['mix']}), {c['texts_per_request']} text(s)/request, {c['duration']} s",
        "",
        "| texts/s | requests/s | p50 ms | p90 ms | p95 ms | p99 ms | max ms | sent | ok | errors | client CPU (cores) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['throughput_texts_per_s']:.1f} | {result['throughput_requests_per_s']:.1f} | {f(lat['p50'])} | {f(lat['p90'])} | "
        f"{f(lat['p95'])} | {f(lat['p99'])} | {f(lat['max'])} | {result['sent']} | {result['ok']} | {result['errors']} | "
        f"{result['client']['cpu_cores_used']:.2f} |",
    ]
    srv = result.get("server_ms")
    if srv:
        lines += ["", "Server side (from each answer's timings), ms:", "",
                  "| part | p50 | p90 | p99 | mean |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name.replace('_', ' ')} | {v['p50']:.1f} | {v['p90']:.1f} | {v['p99']:.1f} | {v['mean']:.1f} |"
                  for name, v in srv.items()]
    if result["errors_by_code"]:
        lines += ["", "errors: " + ", ".join(f"{k} {v}" for k, v in sorted(result["errors_by_code"].items()))]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    result = run(args)
    md = markdown(result)
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md)
    return 0
