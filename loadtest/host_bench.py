"""`adapterserve bench host`: the runtime's whole per-batch host work, timed with the forward replaced by
recorded features, so the host path is measured on any machine (the GPU profile says it, not the
device, bounds throughput there).

    adapterserve bench host [--base-model DIR] [--rounds 200] [--token-packing auto|off] [--json]

For batches of 32 and 256 rows over 32 tasks with heads of 2-50 labels: each pool goes once through
the real engine while its features are recorded; then `Runtime.infer` runs it again and again with
the engine's forward answering the recorded features: planning, collate, slot pinning, heads and
softmax, each row's scores, and answering one future per request of 8 texts, exactly as the model
thread does when serving (it is a timing harness, not a second implementation:
tests/component/test_host_bench.py holds its predictions to the real path's). Prints µs per batch;
--json prints one object with us_per_batch_32 and us_per_batch_256.

On the CPU the torch engine runs token-packed rows, so collate builds the packed run and no padded
array; --token-packing off times the padded collate a GPU forward (or an unpacked family) takes.

Not in that figure: what the server does per request once its future is answered, on the event loop
(reading each row's Prediction and building the reply). The first of those, reading every row's top
label, is timed apart (us_read_top1_32, us_read_top1_256) so the per-row cost it leaves is on record.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Optional

TEXTS_PER_REQUEST = 8


class RecordedForward:
    """An engine whose forward first records the real one's features, then answers them in order."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.recorded: list = []
        self.replaying = False
        self._next = 0

    def __getattr__(self, name):  # everything but encode is the real engine's
        return getattr(self.engine, name)

    def encode(self, inputs, slots, lengths=None):
        if not self.replaying:
            features = self.engine.encode(inputs, slots, lengths)
            self.recorded.append(features.clone())
            return features
        features = self.recorded[self._next % len(self.recorded)]
        self._next += 1
        return features

    def replay(self) -> None:
        self.replaying, self._next = True, 0


def synthetic_tasks(base_dir: str, out_dir: str, n: int, seed: int = 0) -> list[str]:
    """n LoRA adapters with heads of 2..50 labels (the bench's spread of head sizes)."""
    from adapterserve.loadtest.synthetic import synthetic_adapter, write_adapter

    rng = random.Random(seed)
    return [write_adapter(synthetic_adapter(base_dir, seed=i, labels=rng.randint(2, 50)), os.path.join(out_dir, f"t{i}"))
            for i in range(n)]


def host_timer(runtime, texts: list[str], tasks: list[str], rows_per_batch: int):
    """A function that runs one batch of rows_per_batch rows through infer with the recorded forward and
    answers its requests' futures; returns (that function, the real predictions, the recorded engine)."""
    entries = {t: runtime.registry.acquire(t) for t in tasks}
    row_tasks = [tasks[i % len(tasks)] for i in range(rows_per_batch)]
    batch_texts = [texts[i % len(texts)] for i in range(rows_per_batch)]
    rows = runtime.encode_rows([entries[t] for t in row_tasks], batch_texts, None, True)
    recorder = RecordedForward(runtime.engine)
    runtime.engine = recorder
    runtime.infer(rows)
    real = [r.prediction for r in rows]
    recorder.replay()
    loop = asyncio.new_event_loop()

    def one_batch():
        futures = [loop.create_future() for _ in range(0, rows_per_batch, TEXTS_PER_REQUEST)]
        runtime.infer(rows)
        for future in futures:
            future.set_result(None)
        return rows

    return one_batch, real, recorder


def median_us(fn, rounds: int, warm: int = 5) -> tuple[float, float]:
    """(median, p90) of fn's wall time in µs over `rounds` calls, after `warm` untimed ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.9 * len(times))] * 1e6


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="adapterserve bench", description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=["host"], help="host: the per-batch host work with a recorded forward")
    p.add_argument("--base-model", default=None, help="encoder directory (default: the packaged MiniLM)")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--rounds", type=int, default=200, help="timed batches per size")
    p.add_argument("--token-packing", choices=["auto", "off"], default="auto",
                   help="off: padded batches, as a GPU forward takes them")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    import torch

    from adapterserve.runtime.config import RuntimeConfig, packaged_base_model_dir
    from adapterserve.runtime.runtime import Runtime

    base = args.base_model or packaged_base_model_dir()
    texts = [f"sample text number {i} about a film , a match or a market" for i in range(64)]
    runtime = Runtime(RuntimeConfig(base_model=base, slots=args.tasks + 1, max_batch_size=256,
                                    token_packing=args.token_packing))
    tasks = []
    for i, path in enumerate(synthetic_tasks(base, tempfile.mkdtemp(), args.tasks)):
        runtime.add_adapter(f"t{i}", path)
        tasks.append(f"t{i}")
    result = {"engine": runtime.engine.name, "device": str(runtime.base.device), "tasks": args.tasks,
              "texts_per_request": TEXTS_PER_REQUEST, "token_packing": "on" if runtime.engine.packed else "off"}
    with torch.inference_mode():
        for size in (32, 256):
            real_engine = runtime.engine
            one_batch, _, _ = host_timer(runtime, texts, tasks, size)
            median, p90 = median_us(one_batch, args.rounds)
            result[f"us_per_batch_{size}"], result[f"us_per_batch_{size}_p90"] = round(median, 1), round(p90, 1)

            def read_top1(rows=one_batch()):
                one_batch()  # fresh scores, so each row's Prediction is made anew
                start = time.perf_counter()
                for r in rows:
                    r.prediction.top(1)
                return time.perf_counter() - start

            reads = sorted(read_top1() for _ in range(max(5, args.rounds // 4)))
            result[f"us_read_top1_{size}"] = round(statistics.median(reads) * 1e6, 1)
            runtime.engine = real_engine
    if args.json:
        print(json.dumps(result))
    else:
        print(f"host work per batch ({result['engine']}, {result['device']}, token packing {result['token_packing']}, "
              f"{args.tasks} tasks, heads of 2-50 labels, forward replaced by recorded features; median of {args.rounds}):")
        for size, target in ((32, 150), (256, 600)):
            print(f"  {size:3d} rows: {result[f'us_per_batch_{size}']:8.1f} µs (p90 {result[f'us_per_batch_{size}_p90']:.1f}; "
                  f"target ≤ {target} µs); then reading every row's top label: {result[f'us_read_top1_{size}']:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
