"""Scale-out on Ray Serve (docs/benchmarks.md "Cluster"), in one run on this machine:

1. Same load against one server (2 torch threads) and `adapterserve cluster` with 2 replicas of 1 CPU
   (1 thread each): the cluster's throughput as a ratio of the single server's, beside the bare
   model in-process (the ceiling, same texts and batch planner).
2. N adapters (default 1,024) over 2 replicas with S device slots each (default 64), Zipf(1.0)
   popularity, and a working set that fits both replicas' slots but not one's (1.5 x S tasks,
   uniform): the adapter-affinity router against Ray Serve's default (power of two choices): device
   hit rate (batches that found their adapter in a slot), slot loads per second, throughput, p50 /
   p99. The adapters are registered once; the second cluster restores them from the same data dir.

    python -m adapterserve.loadtest.cluster_bench [--adapters 1024] [--slots 64] [--duration 30]
        [--skip-scale | --skip-routing]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import urllib.request

from adapterserve.loadtest import bench
from adapterserve.loadtest.server_proc import ServerProcess, free_port


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("adapterserve_adapter_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def routed(metrics_url: str) -> dict[str, float]:
    """The ingress router's decisions so far, by reason."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("adapterserve_routed_requests_total{")}


def replica_counters(data_dir: str) -> dict[str, float]:
    """Slot hits, misses and loads summed over the replicas (their /metrics, listed in the file_sd file)."""
    with open(os.path.join(data_dir, "prometheus_targets.json")) as fh:
        groups = json.load(fh)
    totals: dict[str, float] = {}
    for group in groups:
        if group["labels"]["job"] != "adapterserve-replica":
            continue
        for target in group["targets"]:
            for k, v in scrape(f"http://{target}/metrics").items():
                totals[k] = totals.get(k, 0.0) + v
    return totals


def start_cluster(data_dir: str, router: str, slots: int, extra=()) -> ServerProcess:
    """`adapterserve cluster` with 2 replicas of 1 CPU on a local head; metrics_url is the ingress's."""
    try:  # a previous cluster's list: its replicas are gone, and it would pass the wait below at once
        os.remove(os.path.join(data_dir, "prometheus_targets.json"))
    except FileNotFoundError:
        pass
    proc = ServerProcess("--data-dir", data_dir, "--replicas", "2", "--replica-cpus", "1", "--ray-cpus", "2",
                         "--router", router, "--slots", str(slots), "--grace", "1", *extra,
                         metrics_port=free_port(), ready_timeout=600,
                         command=[sys.executable, "-m", "adapterserve", "cluster"])
    end = time.time() + 60
    while time.time() < end:  # both replicas listed for scraping
        try:
            with open(os.path.join(data_dir, "prometheus_targets.json")) as fh:
                if sum(len(g["targets"]) for g in json.load(fh) if g["labels"]["job"] == "adapterserve-replica") == 2:
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    return proc


def cpu_by_role() -> dict[str, int]:
    """CPU ticks (user + system) so far of this machine's server processes, by role: the cluster's
    ingress, replicas and registry, Ray's own processes, and a plain `serve`. Linux /proc; empty elsewhere."""
    ticks: dict[str, int] = {}
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        role = next((r for r, key in ROLES if key in cmd), None)
        if role is not None:
            fields = stat.rsplit(")", 1)[1].split()
            ticks[role] = ticks.get(role, 0) + int(fields[11]) + int(fields[12])
    return ticks


ROLES = (("ingress", ":ingress"), ("replicas", ":replica"), ("registry", ":registry"), ("ray", "ray"),
         ("serve", "adapterserve serve"))


def _loaded(address: str, label: str, tasks: list[str], args) -> dict:
    """One closed-loop run, with the cores each server role used meanwhile."""
    before, t0 = cpu_by_role(), time.perf_counter()
    run = bench._load(address, label, tasks, "uniform", args, args.duration)
    after, elapsed = cpu_by_role(), time.perf_counter() - t0
    hz = os.sysconf("SC_CLK_TCK")
    run["cores"] = {r: round((after[r] - before.get(r, 0)) / hz / elapsed, 3) for r in after}
    print(f"   cores used meanwhile: {run['cores']}", flush=True)
    return run


def _scale_out(args, tasks: list[str]) -> dict:
    """Rounds of (one server, cluster) back to back, the order alternating so drift in the machine's
    speed during the run falls on both sides; each round's ratio is of its own pair."""
    print("1. one server x 2 threads against 2 replicas x 1 thread, 32 tasks uniform", flush=True)
    rounds, extra = [], shlex.split(args.server_args)
    with tempfile.TemporaryDirectory() as data_dir:
        for i in range(args.rounds):
            pair = {}
            for side in ("single", "cluster") if i % 2 == 0 else ("cluster", "single"):
                if side == "single":
                    server = ServerProcess("--data-dir", data_dir, "--torch-threads", "2", "--no-examples", *extra,
                                           ready_timeout=900)
                    if i == 0:
                        bench._register(server.address, len(tasks))
                else:  # the cluster restores the same adapters from the data dir
                    server = start_cluster(data_dir, "affinity", 64, ["--no-examples", *extra])
                try:
                    pair[side] = _loaded(server.address, f"{side} round {i + 1}", tasks, args)
                finally:
                    server.stop(timeout=60)
            pair["ratio"] = pair["cluster"]["throughput_texts_per_s"] / pair["single"]["throughput_texts_per_s"]
            print(f"   round {i + 1}: cluster / single = {pair['ratio']:.3f}", flush=True)
            rounds.append(pair)
    # The bare model in this process on all cores, same texts, pools cut by the server's planner.
    ceiling = bench._ceiling(bench.lt.read_texts(bench.lt.DEFAULT_TEXTS, "sentence"), 64,
                             min(args.duration, 15.0), planned=True)
    single = sum(r["single"]["throughput_texts_per_s"] for r in rounds) / len(rounds)
    cluster = sum(r["cluster"]["throughput_texts_per_s"] for r in rounds) / len(rounds)
    ratio = sum(r["ratio"] for r in rounds) / len(rounds)
    each = ", ".join(f"{r['ratio']:.3f}" for r in rounds)
    print(f"   bare model {ceiling:.1f} texts/s; single {single:.1f} ({single / ceiling:.2f} x bare); cluster "
          f"{cluster:.1f} ({cluster / ceiling:.2f} x bare); cluster / single = {ratio:.3f} (mean of the rounds' "
          f"ratios: {each})", flush=True)
    return {"rounds": rounds, "ceiling_texts_per_s": ceiling, "single_texts_per_s": single,
            "cluster_texts_per_s": cluster, "ratio": ratio}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapterserve.loadtest.cluster_bench")
    p.add_argument("--adapters", type=int, default=1024)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--texts-per-request", type=int, default=4)
    p.add_argument("--skip-scale", action="store_true", help="only the routing comparison")
    p.add_argument("--skip-routing", action="store_true", help="only the scale-out comparison")
    p.add_argument("--rounds", type=int, default=2, help="scale-out: (single, cluster) pairs, order alternating")
    p.add_argument("--server-args", default="", help="scale-out: more `serve` flags for both sides, e.g. "
                   "'--engine onnx --precision int8'")
    p.add_argument("--routers", default="affinity,pow2,affinity:2.0",
                   help="routers to compare, each ROUTER[:LOAD_FACTOR] (--router, --load-factor)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    results: dict = {"adapters": args.adapters, "slots": args.slots, "duration_s": args.duration,
                     "concurrency": args.concurrency, "texts_per_request": args.texts_per_request}
    tasks32 = [f"t{i}" for i in range(32)]

    if not args.skip_scale:
        results["scale"] = _scale_out(args, tasks32)

    if args.skip_routing:
        return _write(args, results)
    print(f"2. {args.adapters} adapters, 2 replicas x {args.slots} slots, Zipf(1.0): affinity vs pow2", flush=True)
    tasks = [f"t{i}" for i in range(args.adapters)]
    fits = min(args.adapters, args.slots * 3 // 2)
    with tempfile.TemporaryDirectory() as data_dir:
        routing = {}
        for router in args.routers.split(","):
            name, _, factor = router.partition(":")
            extra = ["--no-examples"] + (["--load-factor", factor] if factor else [])
            cluster = start_cluster(data_dir, name, args.slots, extra)
            try:
                if "register_total_s" not in results:
                    t0 = time.perf_counter()
                    seconds = bench._register(cluster.address, args.adapters)
                    results["register_s_per_adapter_p50"] = sorted(seconds)[len(seconds) // 2]
                    results["register_total_s"] = time.perf_counter() - t0
                for scenario, names, mix in ((f"{args.adapters} zipf:1.0", tasks, "zipf:1.0"),
                                             (f"{fits} uniform", tasks[:fits], "uniform")):
                    before, reasons0 = replica_counters(data_dir), routed(cluster.metrics_url)
                    t0 = time.perf_counter()
                    run = bench._load(cluster.address, f"{router} {scenario}", names, mix, args, args.duration)
                    elapsed = time.perf_counter() - t0
                    after, reasons1 = replica_counters(data_dir), routed(cluster.metrics_url)
                    delta = {k: after[k] - before.get(k, 0.0) for k in after}
                    hits, misses = delta["adapterserve_adapter_cache_hits_total"], delta["adapterserve_adapter_cache_misses_total"]
                    r = routing.setdefault(scenario, {})[router] = {
                        "hit_rate": hits / max(1.0, hits + misses),
                        "loads_per_s": delta["adapterserve_adapter_loads_total"] / elapsed,
                        "texts_per_s": run["throughput_texts_per_s"], "p50_ms": run["latency_ms"]["p50"],
                        "p99_ms": run["latency_ms"]["p99"], "errors": run["errors"],
                        "routed": {k: reasons1[k] - reasons0.get(k, 0.0) for k in reasons1 if reasons1[k] > reasons0.get(k, 0.0)}}
                    print(f"   {router:<9} {scenario:<14} hit rate {r['hit_rate']:.3f}  loads/s {r['loads_per_s']:6.1f}  "
                          f"{r['texts_per_s']:7.1f} texts/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                          f"routed {r['routed']}", flush=True)
            finally:
                cluster.stop(timeout=60)
        results["routing"] = routing
    return _write(args, results)


def _write(args, results: dict) -> int:
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
