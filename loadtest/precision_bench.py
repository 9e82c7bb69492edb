"""Precision and engine benchmark (quantized/ONNX issue), packaged MiniLM on this machine's CPU.

    python -m adapterserve.loadtest.precision_bench [--ag-news-limit 7600] [--throughput-only] [--workers 2]

1. Base memory per precision: parameter bytes, process RSS growth, and for ONNX the file size.
2. Accuracy of the bundled adapters (SST-2 dev, AG News test) per precision/engine.
3. Throughput on SST-2 dev texts, batches of 32: 32 synthetic tasks mixed through torch fp32 eager,
   the shared-base ONNX engine (fp32 and int8), and a per-task merged int8 ONNX model serving one task;
   every engine runs the forwards the runtime's batch planner cuts, with 1 or N concurrent workers.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from adapterserve.runtime.planning import CPU_OVERHEAD_TOKENS, plan_groups


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def param_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def accuracy(rt, task, texts, gold) -> float:
    preds = rt.classify([(task, t) for t in texts])
    return float(np.mean([p.scores[0].index == g for p, g in zip(preds, gold)]))


def load_eval_sets(ag_limit: int):
    from adapterserve.adapters.tabular import read_examples

    sst = read_examples(os.path.join(ROOT, "data/sst2/dev.tsv"), "sentence", "label")
    ag = read_examples(os.path.join(ROOT, "data/ag_news/test.csv"), "title+description", "class_index", limit=ag_limit)
    return ([e.text for e in sst], [int(e.label) for e in sst]), ([e.text for e in ag], [int(e.label) - 1 for e in ag])


def _timed_workers(workers: int, batches: list, run) -> float:
    """Seconds to run every batch, split round-robin over `workers` threads (each with its own share
    of the cores, as the server's model workers have)."""
    if workers == 1:
        t = time.perf_counter()
        for b in batches:
            run(b)
        return time.perf_counter() - t
    per_worker = max(1, (os.cpu_count() or 1) // workers)

    def part(k):
        torch.set_num_threads(per_worker)
        for b in batches[k::workers]:
            run(b)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda k: torch.set_num_threads(per_worker), range(workers)))  # start the threads
        t = time.perf_counter()
        list(pool.map(part, range(workers)))
        return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ag-news-limit", type=int, default=7600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--throughput-only", action="store_true", help="skip the memory/accuracy table")
    p.add_argument("--workers", type=int, default=1,
                   help="run every engine as N concurrent workers with cores/N threads each (like --model-workers)")
    args = p.parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None

    from adapterserve.loadtest.synthetic import synthetic_adapter
    from adapterserve.runtime.config import RuntimeConfig, packaged_base_model_dir
    from adapterserve.runtime.runtime import Row, Runtime

    cache = tempfile.mkdtemp(prefix="precision-bench-")
    os.environ["ADAPTERSERVE_CACHE"] = cache
    (sst_x, sst_y), (ag_x, ag_y) = load_eval_sets(args.ag_news_limit)
    examples = os.path.join(ROOT, "adapters", "examples")
    rows = {}
    configs = [("torch fp32", dict(precision="fp32")), ("torch bf16", dict(precision="bf16")),
               ("torch int8 (bitsandbytes)", dict(precision="int8")), ("torch nf4 (bitsandbytes)", dict(precision="nf4")),
               ("onnx fp32 shared base", dict(engine="onnx", precision="fp32")),
               ("onnx int8 shared base", dict(engine="onnx", precision="int8"))]
    print("| base | weights (bytes) | RSS growth (bytes) | ONNX file (bytes) | SST-2 dev acc | AG News test acc | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, kw in ([] if args.throughput_only else configs):
        gc.collect()
        before = rss()
        t = time.perf_counter()
        rt = Runtime(RuntimeConfig(slots=40, r_max=16, **kw))
        load_s = time.perf_counter() - t
        grown = rss() - before
        if rt.engine.name == "onnx":
            onnx_file = os.path.getsize(os.path.join(rt.engine.model_dir, "model.onnx"))
            weights = onnx_file
        else:
            onnx_file = None
            weights = param_bytes(rt.base.backbone) - rt.engine.slot_bytes() * rt.config.slots
        rt.add_adapter("sst2", os.path.join(examples, "sst2"))
        rt.add_adapter("ag_news", os.path.join(examples, "ag_news"))
        acc_sst = accuracy(rt, "sst2", sst_x, sst_y)
        acc_ag = accuracy(rt, "ag_news", ag_x, ag_y)
        rows[name] = {"weights_bytes": weights, "rss_growth_bytes": grown, "onnx_file_bytes": onnx_file,
                      "sst2_dev_accuracy": acc_sst, "ag_news_test_accuracy": acc_ag, "load_seconds": load_s,
                      "ag_news_n": len(ag_x)}
        print(f"| {name} | {weights:,} | {grown:,} | {onnx_file or '–'} | {acc_sst * 100:.2f}% | {acc_ag * 100:.2f}% | {load_s:.1f} |",
              flush=True)
        if name == "torch fp32":
            fp32_rt = rt
        elif name == "onnx int8 shared base":
            int8_rt = rt
        else:
            del rt
    print("\nfp16: needs CUDA (refused on CPU with a clear message); no GPU here.\n")
    if args.throughput_only or threads:
        fp32_rt = Runtime(RuntimeConfig(slots=40, r_max=16, torch_threads=threads))
        int8_rt = Runtime(RuntimeConfig(slots=40, r_max=16, engine="onnx", precision="int8", torch_threads=threads))

    # Throughput: 32 synthetic tasks mixed, SST-2 dev texts, batches of 32.
    base = packaged_base_model_dir()
    files = [synthetic_adapter(base, seed=i) for i in range(32)]
    thr = {}
    engines = {"torch fp32 eager, 32 tasks mixed": fp32_rt, "onnx int8 shared base, 32 tasks mixed": int8_rt}
    onnx32 = Runtime(RuntimeConfig(slots=40, r_max=16, engine="onnx", precision="fp32", torch_threads=threads))
    engines["onnx fp32 shared base, 32 tasks mixed"] = onnx32
    # The torch engine before token packing (padded forwards cut by the planner), for the ratio the
    # quantized-bases issue set its target against.
    engines["torch fp32 eager padded (token packing off), 32 tasks mixed"] = Runtime(
        RuntimeConfig(slots=40, r_max=16, torch_threads=threads, token_packing="off"))
    engines["torch bf16 (bf16 matmuls, fp32 activations), 32 tasks mixed"] = Runtime(
        RuntimeConfig(slots=40, r_max=16, torch_threads=threads, precision="bf16"))
    batches = [list(range(i, min(i + 32, len(sst_x)))) for i in range(0, len(sst_x), 32)]
    for name, rt in engines.items():
        for i, f in enumerate(files):
            rt.add_adapter(f"s{i}", dict(f), replace=True)
        entries = [rt.registry.get(f"s{i}") for i in range(32)]
        enc = rt.encoder.encode(sst_x)
        rt.infer([Row(entries[j % 32], enc[i]) for j, i in enumerate(batches[0])])
        times = []
        for _ in range(args.rounds):
            times.append(_timed_workers(args.workers, batches, lambda b, rt=rt, entries=entries, enc=enc: rt.infer(
                [Row(entries[j % 32], enc[i]) for j, i in enumerate(b)])))
        thr[name] = len(sst_x) / statistics.median(times)

    # Per-task merged int8 ONNX (one task, no adapter cost), same texts and batches.
    import onnxruntime as ort

    from adapterserve.exporters.per_task import export_task
    from adapterserve.runtime.engine.onnx.engine import open_session

    task_dir = os.path.join(cache, "sst2-int8")
    export_task(os.path.join(examples, "sst2"), task_dir, quantize="int8")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = open_session(os.path.join(task_dir, "model.onnx"), options)  # as exporters/parity.py and the engine
    tok = fp32_rt.base.tokenizer
    wanted = {i.name for i in session.get_inputs()}

    # The forwards our padded engines make (the batch planner's length bands, runtime/planning.py),
    # tokenized up front like our engines' rows, so the timing is the model alone for every engine.
    feeds = {}
    for n, b in enumerate(batches):
        chunk = [sst_x[i] for i in b]
        lengths = [len(ids) for ids in tok(chunk, truncation=True)["input_ids"]]
        feeds[n] = []
        for g in plan_groups(lengths, [0] * len(chunk), 64, 16384, 1, CPU_OVERHEAD_TOKENS):
            enc = tok([chunk[k] for k in g], padding=True, truncation=True, return_tensors="np")
            feeds[n].append({k: v.astype(np.int64) for k, v in enc.items() if k in wanted})
    batch_no = {id(b): n for n, b in enumerate(batches)}

    def per_task(b):
        for feed in feeds[batch_no[id(b)]]:
            session.run(None, feed)

    times = [_timed_workers(args.workers, batches, per_task) for _ in range(args.rounds + 1)]
    thr["per-task merged int8 ONNX, 1 task"] = len(sst_x) / statistics.median(times[1:])
    rows["per-task int8 onnx file bytes"] = os.path.getsize(os.path.join(task_dir, "model.onnx"))
    ref = thr["torch fp32 eager, 32 tasks mixed"]
    merged = thr["per-task merged int8 ONNX, 1 task"]
    print(f"{args.workers} worker(s) per engine, {threads or torch.get_num_threads()} thread(s) each; every engine "
          f"cuts each batch of 32 with the runtime's batch planner\n")
    padded = thr["torch fp32 eager padded (token packing off), 32 tasks mixed"]
    print("| engine | texts/s | × torch fp32 mixed | × torch fp32 padded | × per-task int8 ONNX |")
    print("|---|---:|---:|---:|---:|")
    for name, v in thr.items():
        print(f"| {name} | {v:.1f} | {v / ref:.2f} | {v / padded:.2f} | {v / merged:.2f} |")
    print(f"\nper-task int8 ONNX file: {rows['per-task int8 onnx file bytes']:,} bytes (a full base copy per task)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"memory_accuracy": rows, "throughput_texts_per_s": thr}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
