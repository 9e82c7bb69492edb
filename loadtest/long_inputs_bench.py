"""Long inputs on an 8k-context base: latency of short requests while 8k-token requests arrive, through
the gRPC server with its default batching flags.

    python -m adapterserve.loadtest.long_inputs_bench [--seconds 30] [--short-rate 20] [--long-every 5] [--json FILE]

Base: a random ModernBERT at MiniLM's size (hidden 384, 6 layers, every third layer global, local window
128, 8,192 positions; loadtest/families_bench.py), one LoRA task. Open loop: short requests (one SST-2 dev
sentence each) at --short-rate per second; in the second phase, one request of a single 8,000-token
text every --long-every seconds besides. Prints the short requests' p50/p99/max in both phases and the
long requests' latency; extra server flags go after `--`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_phase(address: str, shorts: list[str], long_text, seconds: float, rate: float, long_every: float) -> dict:
    from adapterserve.client import Client

    short_ms, long_ms, errors = [], [], []
    lock = threading.Lock()
    client = Client(address, timeout=120)

    def call(text: str, into: list) -> None:
        start = time.perf_counter()
        try:
            client.classify("t", [text])
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(str(e)[:120])
            return
        with lock:
            into.append((time.perf_counter() - start) * 1000)

    with ThreadPoolExecutor(max_workers=64) as pool:
        start = time.perf_counter()
        next_long = start + 0.5 if long_text else float("inf")
        i = 0
        while (now := time.perf_counter()) < start + seconds:
            due = start + i / rate
            if now >= next_long:
                pool.submit(call, long_text, long_ms)
                next_long += long_every
            if now >= due:
                pool.submit(call, shorts[i % len(shorts)], short_ms)
                i += 1
            else:
                time.sleep(min(due, next_long) - now if min(due, next_long) > now else 0)
    client.channel.close()
    out = {"short_sent": i, "short_p50_ms": statistics.median(short_ms), "short_p99_ms": percentile(short_ms, 0.99),
           "short_max_ms": max(short_ms), "errors": errors[:5], "error_count": len(errors)}
    if long_ms:
        out.update(long_count=len(long_ms), long_p50_ms=statistics.median(long_ms), long_max_ms=max(long_ms))
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--short-rate", type=float, default=20)
    p.add_argument("--long-every", type=float, default=5)
    p.add_argument("--long-tokens", type=int, default=8000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import transformers

    from adapterserve.loadtest.families_bench import make_adapter, make_base
    from adapterserve.loadtest.runtime_bench import sst2_dev_texts
    from adapterserve.loadtest.server_proc import ServerProcess

    transformers.logging.set_verbosity_error()
    tmp = tempfile.mkdtemp()
    base = make_base("modernbert", os.path.join(tmp, "base"), max_length=8192)
    adapter = make_adapter(base, os.path.join(tmp, "t"), 0)
    shorts = sst2_dev_texts(os.path.join(ROOT, "data", "sst2", "dev.tsv"))
    words = " ".join(shorts).split()
    long_text = " ".join((words * (args.long_tokens // len(words) + 2))[:int(args.long_tokens * 0.75)])
    server = ServerProcess("--base-model", base, "--adapter", f"t={adapter}", "--no-examples", *server_flags)
    try:
        results = {"flags": server_flags}
        run_phase(server.address, shorts, None, 3, args.short_rate, args.long_every)  # warm
        for name, text in (("shorts only", None), ("shorts + 8k requests", long_text)):
            results[name] = run_phase(server.address, shorts, text, args.seconds, args.short_rate, args.long_every)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    finally:
        server.stop()
    a, b = results["shorts only"], results["shorts + 8k requests"]
    print(f"\n{args.short_rate:g} short requests/s, one {args.long_tokens}-token request every {args.long_every:g} s "
          f"in phase 2, {args.seconds:g} s per phase; server flags: {' '.join(server_flags) or '(defaults)'}\n")
    print("| phase | short p50 ms | short p99 ms | short max ms | 8k request p50 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("shorts only", a), ("shorts + 8k requests", b)):
        print(f"| {name} | {r['short_p50_ms']:.1f} | {r['short_p99_ms']:.1f} | {r['short_max_ms']:.1f} | "
              f"{r.get('long_p50_ms', float('nan')):.0f} | {r['error_count']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
