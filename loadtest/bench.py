"""`adapterserve loadtest bench`: the benchmark matrix of DESIGN.md in one run.

Starts the servers itself on loopback ports, registers N synthetic adapters (random LoRA weights,
ranks 4/8/16, 2..6 labels) by upload, runs every scenario with the same load generator, stops
everything, and writes JSON, a Markdown report and PNG plots. Peers in the same run: the bare base
model forward in-process (the ceiling), a naive PEFT gRPC server, and our merged single-task mode.

    adapterserve loadtest bench --quick          # < 5 minutes on a 2-core machine
    adapterserve loadtest bench                  # N up to 1,024, longer runs
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import grpc

from adapterserve.loadtest import run as lt
from adapterserve.loadtest.server_proc import ROOT, ServerProcess


# The open-loop runs last this many times a closed-loop run: at half saturation the default server
# answers ~33 requests/s, so a 20 s run puts its p99 on ~7 requests and single readings of p99 / p50
# spread from 2.74 to 3.67 on a 2-core VM (11 runs of 25 s); 60 s puts it on ~20.
OPEN_LOOP_LENGTH = 3


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short runs, N up to 128 (PEFT peer with 16 adapters)")
    p.add_argument("--out-dir", default="out/bench")
    p.add_argument("--report", default=None, help="Markdown report path (default: OUT_DIR/report.md)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--texts-per-request", type=int, default=4)
    p.add_argument("--duration", type=float, default=None)


def _register(address: str, n: int, start: int = 0) -> list[float]:
    from adapterserve.loadtest.synthetic import synthetic_adapter
    from adapterserve.runtime.config import packaged_base_model_dir
    from adapterserve.runtime.server.stubs import pb, pb_grpc

    base = packaged_base_model_dir()
    seconds = []
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        reg = pb_grpc.AdapterRegistryStub(ch)
        for i in range(start, n):
            files = synthetic_adapter(base, seed=i)
            t = time.perf_counter()
            reg.RegisterAdapter(pb.RegisterAdapterRequest(task=f"t{i}", files=pb.AdapterFiles(
                adapter_config=files["adapter_config.json"], adapter_weights=files["adapter_model.safetensors"],
                labels_json=files["labels.json"])))
            seconds.append(time.perf_counter() - t)
    return seconds


def _load(address: str, label: str, tasks: list[str], mix: str, args, duration: float, rate=None, out_dir=None) -> dict:
    parser = argparse.ArgumentParser()
    lt.add_args(parser)
    argv = ["--address", address, "--tasks", ",".join(tasks), "--mix", mix, "--duration", str(duration),
            "--warmup", "2", "--texts-per-request", str(args.texts_per_request), "--label", label, "--quiet"]
    argv += ["--rate", str(rate)] if rate else ["--concurrency", str(args.concurrency)]
    result = lt.run(parser.parse_args(argv))
    result["config"]["group"] = label.split("@")[0]
    if out_dir:
        with open(os.path.join(out_dir, re.sub(r"[^\w.@-]", "_", label) + ".json"), "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"  {label:<28} {result['throughput_texts_per_s']:8.1f} texts/s  p50 {result['latency_ms']['p50'] or 0:7.1f} ms  "
          f"p99 {result['latency_ms']['p99'] or 0:7.1f} ms  errors {result['errors']}", flush=True)
    return result


def _ceiling(texts: list[str], batch: int, seconds: float, planned: bool) -> float:
    """Bare base model forward in-process, same texts, pools of `batch` rows sorted by length. planned:
    each pool cut into forwards by the server's own batch planner (runtime/planning.py, CPU cost
    model), so the ceiling batches exactly like our server; otherwise one padded forward per pool."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from adapterserve.runtime.config import packaged_base_model_dir
    from adapterserve.runtime.planning import CPU_OVERHEAD_TOKENS, plan_groups

    path = packaged_base_model_dir()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    done, start, i = 0, time.perf_counter(), 0
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            chunk = sorted((texts[(i + k) % len(texts)] for k in range(batch)), key=len)
            if planned:
                lengths = [len(ids) for ids in tok(chunk, truncation=True)["input_ids"]]
                groups = plan_groups(lengths, [0] * len(chunk), batch, 16384, 1, CPU_OVERHEAD_TOKENS)
            else:
                groups = [list(range(len(chunk)))]
            for g in groups:
                model(**tok([chunk[k] for k in g], padding=True, truncation=True, return_tensors="pt"))
            done += batch
            i += batch
    return done / (time.perf_counter() - start)


def main(args) -> int:
    quick = args.quick
    duration = args.duration or (8.0 if quick else 20.0)
    ns = [1, 16, 128] if quick else [1, 16, 128, 1024]
    peft_n = 16 if quick else 128
    out_dir = args.out_dir
    runs_dir = os.path.join(out_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    texts = lt.read_texts(lt.DEFAULT_TEXTS, "sentence")
    results: dict[str, dict] = {}
    t_start = time.time()

    print("ceiling: bare model forward in-process", flush=True)
    # Pools as large as the server's batches (64 rows by default), cut by the server's planner.
    ceiling = _ceiling(texts, 64, min(duration, 10.0), planned=True)
    padded = _ceiling(texts, args.concurrency * args.texts_per_request // 4 or 32, min(duration, 10.0), planned=False)
    print(f"  bare model {ceiling:.1f} texts/s (planned like the server); one padded forward per 32 texts: "
          f"{padded:.1f} texts/s", flush=True)

    print("adapterserve (torch fp32, 64 slots)", flush=True)
    ours = ServerProcess("--data-dir", "", "--no-examples", "--slots", "64", "--max-queue", "8192")
    try:
        register_s = _register(ours.address, max(ns))
        for n in ns:
            mixes = ["uniform"] if n == 1 else (["zipf:1.0", "uniform"] if n >= 128 else ["uniform"])
            for mix in mixes:
                label = f"ours N={n} {mix}@{n}"
                results[label] = _load(ours.address, label, [f"t{i}" for i in range(n)], mix, args, duration, out_dir=runs_dir)
            if n == 128:  # open loop right after its own saturation run, before the 1,024-adapter churn
                sat = results["ours N=128 zipf:1.0@128"]["throughput_texts_per_s"] / args.texts_per_request
                label = "ours N=128 zipf:1.0 open loop at half saturation"
                results[label] = _load(ours.address, label, [f"t{i}" for i in range(128)], "zipf:1.0", args,
                                       OPEN_LOOP_LENGTH * duration, rate=round(sat / 2, 1), out_dir=runs_dir)
    finally:
        ours.stop()

    if not quick:
        # The same matrix points on our other CPU configurations: two model workers (1 thread each), the
        # shared-base ONNX int8 engine (exported once into the cache on first use), and both together.
        configs = (("2 workers", ["--model-workers", "2"]),
                   ("bf16", ["--precision", "bf16"]),
                   ("bf16 2 workers", ["--precision", "bf16", "--model-workers", "2"]),
                   ("onnx int8", ["--engine", "onnx", "--precision", "int8"]),
                   ("onnx int8 2 workers", ["--engine", "onnx", "--precision", "int8", "--model-workers", "2"]))
        for name, flags in configs:
            print(f"adapterserve ({name}, 64 slots)", flush=True)
            server = ServerProcess("--data-dir", "", "--no-examples", "--slots", "64", "--max-queue", "8192", *flags,
                                   ready_timeout=900)
            # The fastest configurations of each engine also run the 1,024-adapter churn point, so they
            # are measured against every target in one run.
            churn = name in ("bf16 2 workers", "onnx int8 2 workers")
            try:
                _register(server.address, 1024 if churn else 128)
                for n, mix in ((1, "uniform"), (128, "zipf:1.0")):
                    label = f"ours {name} N={n} {mix}@{n}"
                    results[label] = _load(server.address, label, [f"t{i}" for i in range(n)], mix, args, duration,
                                           out_dir=runs_dir)
                if name != "onnx int8":
                    sat = results[f"ours {name} N=128 zipf:1.0@128"]["throughput_texts_per_s"] / args.texts_per_request
                    label = f"ours {name} N=128 zipf:1.0 open loop at half saturation"
                    results[label] = _load(server.address, label, [f"t{i}" for i in range(128)], "zipf:1.0", args,
                                           OPEN_LOOP_LENGTH * duration, rate=round(sat / 2, 1), out_dir=runs_dir)
                if churn:
                    label = f"ours {name} N=1024 zipf:1.0@1024"
                    results[label] = _load(server.address, label, [f"t{i}" for i in range(1024)], "zipf:1.0", args,
                                           duration, out_dir=runs_dir)
            finally:
                server.stop()

    print("adapterserve merged single task (bundled sst2)", flush=True)
    merged = ServerProcess("--data-dir", "", "--merged-task", "sst2")
    try:
        results["merged sst2"] = _load(merged.address, "merged sst2", ["sst2"], "uniform", args, duration, out_dir=runs_dir)
    finally:
        merged.stop()
    unmerged = ServerProcess("--data-dir", "")
    try:
        results["ours sst2 (slots)"] = _load(unmerged.address, "ours sst2 (slots)", ["sst2"], "uniform", args, duration,
                                             out_dir=runs_dir)
    finally:
        unmerged.stop()

    print(f"naive PEFT server ({peft_n} adapters, set_adapter per request)", flush=True)
    from adapterserve.loadtest.synthetic import synthetic_adapter, write_adapter
    from adapterserve.runtime.config import packaged_base_model_dir

    peft_dir = tempfile.mkdtemp(prefix="peft-adapters-")
    for i in range(peft_n):
        write_adapter(synthetic_adapter(packaged_base_model_dir(), seed=i), os.path.join(peft_dir, f"t{i}"))
    # The peer on the base our bf16 rows serve (bf16 linears, fp32 activations), for a like-for-like ratio.
    for precision in (["fp32"] if quick else ["fp32", "bf16"]):
        peft_addr, proc = _start_peft(peft_dir, precision)
        try:
            for mix in (["zipf:1.0"] if quick or precision == "bf16" else ["zipf:1.0", "uniform"]):
                label = f"peft{' bf16' if precision == 'bf16' else ''} N={peft_n} {mix}@{peft_n}"
                results[label] = _load(peft_addr, label, [f"t{i}" for i in range(peft_n)], mix, args, duration,
                                       out_dir=runs_dir)
        finally:
            proc.terminate()
            proc.wait(30)

    report = _report(results, ceiling, padded, register_s, args, duration, time.time() - t_start, ns, peft_n)
    from adapterserve.loadtest import compare

    runs = compare.load([os.path.join(runs_dir, f) for f in sorted(os.listdir(runs_dir))])
    plots = compare.plots(runs, out_dir)
    report += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots) + "\n"
    path = args.report or os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write(report)
    with open(os.path.join(out_dir, "bench.json"), "w") as fh:
        json.dump({"ceiling_texts_per_s": ceiling, "padded_bare_texts_per_s": padded, "register_seconds": register_s,
                   "results": {k: {kk: vv for kk, vv in v.items() if kk != "latency_sample_ms"} for k, v in results.items()}},
                  fh, indent=1)
    print(report)
    return 0


def _start_peft(adapter_dir: str, precision: str):
    proc = subprocess.Popen([sys.executable, "-m", "adapterserve.loadtest.baselines.peft_server", "--port", "0", "--adapters",
                             adapter_dir, "--precision", precision],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    for line in proc.stdout:
        m = re.search(r"listening on 127.0.0.1:(\d+)", line)
        if m:
            return f"127.0.0.1:{m.group(1)}", proc
    proc.wait(30)
    raise RuntimeError(f"PEFT baseline ({precision}) did not start")


def _report(results, ceiling, padded, register_s, args, duration, elapsed, ns, peft_n) -> str:
    import statistics

    one = results["ours N=1 uniform@1"]["throughput_texts_per_s"]
    peft = results[f"peft N={peft_n} zipf:1.0@{peft_n}"]["throughput_texts_per_s"]
    lines = [f"Closed loop, concurrency {args.concurrency} × {args.texts_per_request} SST-2 dev texts per request, "
             f"{duration:.0f} s per run after 2 s warm-up (open loops: Poisson arrivals at half the closed-loop "
             f"saturation, {OPEN_LOOP_LENGTH * duration:.0f} s); load generator on the same machine. Wall time {elapsed:.0f} s.",
             "", f"Ceiling (bare MiniLM forward in-process, no server, 64-text pools cut into forwards by the "
             f"server's batch planner): **{ceiling:.1f} texts/s**. The same bare model with one padded forward per "
             f"32 texts (plain HF batching): {padded:.1f} texts/s, so the planner alone is worth "
             f"{ceiling / padded:.2f} × on these texts.", "",
             "| scenario | texts/s | × bare | × ours N=1 | × PEFT | p50 ms | p95 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        tps, lat = r["throughput_texts_per_s"], r["latency_ms"]
        lines.append(f"| {label.split('@')[0]} | {tps:.1f} | {tps / ceiling:.2f} | {tps / one:.2f} | {tps / peft:.2f} | "
                     f"{lat['p50'] or 0:.1f} | {lat['p95'] or 0:.1f} | {lat['p99'] or 0:.1f} | {r['errors']} |")
    z128 = results["ours N=128 zipf:1.0@128"]["throughput_texts_per_s"]
    open_loop = results["ours N=128 zipf:1.0 open loop at half saturation"]["latency_ms"]
    lines += ["", "Targets:",
              f"- 128 adapters, Zipf(1.0): {z128 / one:.2f} × one adapter (target ≥ 0.90), {z128 / peft:.2f} × naive PEFT "
              f"(target ≥ 5; the bare-model ceiling itself is {ceiling / peft:.2f} × PEFT in this run)",
              f"- open loop at half saturation: p99 / p50 = {open_loop['p99'] / open_loop['p50']:.2f} (target ≤ 3; "
              f"an ideal single server with a fixed service time and no batching gain, M/D/1 at ρ = 0.5, "
              f"has {mdc_tail_ratio(0.5):.2f}); {server_split(results['ours N=128 zipf:1.0 open loop at half saturation'])}"]
    peft_bf16 = results.get(f"peft bf16 N={peft_n} zipf:1.0@{peft_n}", {}).get("throughput_texts_per_s")
    for engine in ("2 workers", "bf16", "bf16 2 workers", "onnx int8", "onnx int8 2 workers"):
        key = f"ours {engine} N=128 zipf:1.0@128"
        if key in results:
            e1 = results[f"ours {engine} N=1 uniform@1"]["throughput_texts_per_s"]
            ez = results[key]["throughput_texts_per_s"]
            like = (f" ({ez / peft_bf16:.2f} × PEFT on the same bf16 base)"
                    if engine.startswith("bf16") and peft_bf16 else "")
            lines.append(f"- {engine}: 128 Zipf = {ez / e1:.2f} × its own N=1, {ez / peft:.2f} × naive PEFT{like}, "
                         f"{ez / z128:.2f} × the default server")
    for engine in ("2 workers", "bf16", "bf16 2 workers", "onnx int8 2 workers"):
        key = f"ours {engine} N=128 zipf:1.0 open loop at half saturation"
        if key in results:
            lat = results[key]["latency_ms"]
            servers = 2 if "2 workers" in engine else 1
            lines.append(f"- {engine}, open loop at half saturation: p99 / p50 = {lat['p99'] / lat['p50']:.2f} "
                         f"(M/D/{servers} at ρ = 0.5: {mdc_tail_ratio(0.5, servers=servers):.2f}); "
                         f"{server_split(results[key])}")
    if 1024 in ns:
        z1024 = results["ours N=1024 zipf:1.0@1024"]
        lines.append(f"- 1,024 adapters on 64 slots: {z1024['throughput_texts_per_s'] / one:.2f} × one adapter "
                     f"(target ≥ 0.80), errors {z1024['errors']}")
    for engine in ("bf16 2 workers", "onnx int8 2 workers"):
        key = f"ours {engine} N=1024 zipf:1.0@1024"
        if key in results:
            e1 = results[f"ours {engine} N=1 uniform@1"]["throughput_texts_per_s"]
            lines.append(f"- {engine}, 1,024 adapters on 64 slots: {results[key]['throughput_texts_per_s'] / e1:.2f} "
                         f"× its own N=1 (target ≥ 0.80), errors {results[key]['errors']}")
    lines += ["", f"Register latency (upload, {len(register_s)} adapters): median {statistics.median(register_s) * 1000:.1f} ms, "
                  f"max {max(register_s) * 1000:.1f} ms"]
    return "\n".join(lines) + "\n"


def server_split(result: dict) -> str:
    """The server's own account of an open-loop run's latency (loadtest.run.server_breakdown), p50 / p99."""
    srv = result.get("server_ms") or {}
    parts = [f"{name.replace('_', ' ')} {srv[name]['p50']:.1f} / {srv[name]['p99']:.1f}"
             for name in ("queue", "tokenize", "inference", "outside_handler") if name in srv]
    return "server side p50 / p99 ms: " + ", ".join(parts) if parts else "no server timings"


def mdc_tail_ratio(rho: float, servers: int = 1, n: int = 200_000, seed: int = 1) -> float:
    """p99 / p50 of the response time of an M/D/c queue (Poisson arrivals, fixed service time) by
    simulation: the tail an open loop shows on a server whose batches bring no throughput gain."""
    import heapq
    import random

    rng = random.Random(seed)
    lam, t = rho * servers, 0.0  # service time 1
    free = [0.0] * servers
    resp = []
    for _ in range(n):
        t += rng.expovariate(lam)
        start = max(t, heapq.heappop(free))
        heapq.heappush(free, start + 1.0)
        resp.append(start + 1.0 - t)
    resp.sort()
    return resp[int(n * 0.99)] / resp[n // 2]
