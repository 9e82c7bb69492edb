"""GPU figures for the quantized-bases issue: the torch engine on CUDA at every precision, and ONNX Runtime's CUDA provider.

    python -m adapterserve.loadtest.gpu_bench [--precisions fp32,fp16,bf16,int8,nf4] [--batches 32,256] [--cuda-graphs auto|off]
                                 [--lora-kernel auto|triton|torch] [--ort] [--json F]

Per precision, in one process on one GPU: base weight bytes and CUDA memory after load; accuracy of
the bundled adapters (SST-2 dev, AG News test); throughput on SST-2 dev texts with 32 synthetic tasks
mixed in every batch, beside the same-run ceiling (the bare base at the same precision, same
forwards, no adapters) and the naive peer (PEFT at the same precision: one forward per task present
in the batch, `set_adapter` before each); peak CUDA memory while serving. `--cuda-graphs off` serves
eagerly (the A/B for runtime/engine/cuda_graphs.py). `--ort` adds ONNX Runtime's CUDA provider (needs
onnxruntime-gpu): the shared-base graph with 32 tasks mixed, and per-task merged fp32/fp16 exports.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import traceback

import torch

from adapterserve.loadtest.precision_bench import ROOT, accuracy, load_eval_sets, param_bytes
from adapterserve.runtime.planning import plan_groups

TASKS = 32


def _sync_time(fn, rounds: int) -> float:
    """Median seconds of `fn()` over `rounds`, after one warm-up, with the device drained each time."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _forwards(rt, texts: list[str], batch: int) -> list[dict]:
    """The padded forwards `rt`'s planner cuts each batch into (its row, token and overhead settings),
    tokenized up front onto pinned host memory, so the ceiling times the model and the copies alone."""
    tok, config = rt.base.tokenizer, rt.config
    out = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        lengths = [len(ids) for ids in tok(chunk, truncation=True)["input_ids"]]
        for g in plan_groups(lengths, [0] * len(chunk), config.max_batch_size, config.max_batch_tokens, 1,
                             rt.forward_overhead_tokens):
            enc = tok([chunk[k] for k in g], padding=True, truncation=True, return_tensors="pt")
            out.append({k: v.pin_memory() for k, v in enc.items()})
    return out


def _graphed_ceiling(backbone, forwards: list[dict]):
    """The bare base's forwards replayed as CUDA graphs, one per exact forward shape (no bucket padding:
    the best case for the bare model). The mask goes in as [rows, 1, width] for the reason
    runtime/engine/cuda_graphs.py gives. Returns run(), or None where capture fails (bitsandbytes)."""
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    try:
        for f in forwards:
            key = tuple(f["input_ids"].shape)
            if key in graphs:
                continue
            static = {k: v.to("cuda") for k, v in f.items()}
            static["attention_mask"] = static["attention_mask"][:, None, :].contiguous()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), torch.cuda.stream(side):
                for _ in range(2):
                    backbone(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                backbone(**static)
            graphs[key] = (graph, static)
    except Exception as e:  # noqa: BLE001 - reported as a missing column, the eager ceiling stands
        print(f"  graphed ceiling not available: {type(e).__name__}: {e}")
        torch.cuda.synchronize()
        return None

    def run():
        for f in forwards:
            graph, static = graphs[tuple(f["input_ids"].shape)]
            for k, v in f.items():
                dst = static[k][:, 0] if k == "attention_mask" else static[k]
                dst.copy_(v, non_blocking=True)
            graph.replay()
    return run


def peft_base_kwargs(precision: str) -> dict:
    """from_pretrained arguments for PEFT's base on CUDA at `precision`: the same dtype and the same
    bitsandbytes settings as our own CUDA base (runtime/engine/base_model.py), so the two compare like for like."""
    from adapterserve.runtime.engine.base_model import _DTYPES, _bnb_config

    kwargs = {"dtype": _DTYPES.get(precision, torch.float16), "device_map": {"": 0}}  # int8/NF4: fp16 activations
    if precision in ("int8", "nf4"):
        kwargs["quantization_config"] = _bnb_config(precision, torch.float16)
    return kwargs


def _peft_models(base_dir: str, precision: str, adapter_dirs: list[str]):
    """PEFT the way a user would serve these tasks: one PeftModel per head size, every adapter loaded."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    kwargs = peft_base_kwargs(precision)
    models, model_of = {}, {}
    for k, path in enumerate(adapter_dirs):
        with open(os.path.join(path, "labels.json")) as fh:
            n = len(json.load(fh))
        if n not in models:
            base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=n, **kwargs)
            models[n] = PeftModel.from_pretrained(base, path, adapter_name=f"s{k}").eval()
        else:
            models[n].load_adapter(path, adapter_name=f"s{k}")
        model_of[k] = models[n]
    return model_of


def _mixed_workload(rt, files, texts: list[str]):
    """Register the synthetic tasks on `rt` and encode `texts` once; returns workload(batch) ->
    (infer calls, run): every call holds `batch` texts, row j of a call going to task j % TASKS."""
    from adapterserve.runtime.runtime import Row

    for i, f in enumerate(files):
        rt.add_adapter(f"s{i}", dict(f), replace=True)
    entries = [rt.registry.get(f"s{i}") for i in range(TASKS)]
    enc = rt.encoder.encode(texts)

    def workload(batch: int):
        calls = [[Row(entries[j % TASKS], e) for j, e in enumerate(enc[lo:lo + batch])]
                 for lo in range(0, len(enc), batch)]

        def run():
            for rows in calls:
                rt.infer(rows)
        return calls, run
    return workload


def bench_precision(precision: str, args, evals, files, adapter_dirs) -> dict:
    from adapterserve.runtime.engine.base_model import load_base_model
    from adapterserve.runtime.config import RuntimeConfig, packaged_base_model_dir
    from adapterserve.runtime.runtime import Runtime

    (sst_x, sst_y), (ag_x, ag_y) = evals
    row: dict = {"precision": precision}
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    config = RuntimeConfig(device="cuda", precision=precision, slots=40, r_max=16, max_batch_size=args.max_rows,
                           cuda_graphs=args.cuda_graphs, lora_kernel=args.lora_kernel)
    rt = Runtime(config)
    row["load_seconds"] = time.perf_counter() - t
    slot_bytes = rt.engine.slot_bytes() * config.slots
    row["weights_bytes"] = param_bytes(rt.base.backbone) - slot_bytes
    row["cuda_allocated_after_load_bytes"] = torch.cuda.memory_allocated() - before
    row["slot_bytes"] = slot_bytes
    examples = os.path.join(ROOT, "adapters", "examples")
    rt.add_adapter("sst2", os.path.join(examples, "sst2"))
    rt.add_adapter("ag_news", os.path.join(examples, "ag_news"))
    if args.accuracy:
        row["sst2_dev_accuracy"] = accuracy(rt, "sst2", sst_x, sst_y)
        row["ag_news_test_accuracy"] = accuracy(rt, "ag_news", ag_x, ag_y)

    texts = sst_x * args.repeat
    workload = _mixed_workload(rt, files, texts)
    bare = load_base_model(RuntimeConfig(device="cuda", precision=precision))
    peft = _peft_models(packaged_base_model_dir(), precision, adapter_dirs) if args.peft else None
    tok = rt.base.tokenizer
    for batch in args.batches:
        _, ours = workload(batch)
        forwards = _forwards(rt, texts, batch)

        def ceiling(forwards=forwards):
            with torch.inference_mode():
                for f in forwards:
                    bare.backbone(**{k: v.to("cuda", non_blocking=True) for k, v in f.items()})

        torch.cuda.reset_peak_memory_stats()
        s = _sync_time(ours, args.rounds)
        row[f"peak_cuda_bytes_b{batch}"] = torch.cuda.max_memory_allocated() - before
        row[f"ours_texts_per_s_b{batch}"] = len(texts) / s
        row[f"ceiling_texts_per_s_b{batch}"] = len(texts) / _sync_time(ceiling, args.rounds)
        graphed = _graphed_ceiling(bare.backbone, forwards) if args.cuda_graphs == "auto" else None
        if graphed is not None:
            row[f"graphed_ceiling_texts_per_s_b{batch}"] = len(texts) / _sync_time(graphed, args.rounds)
        if peft is not None:
            # Per batch: one forward per task present (its rows padded together), set_adapter first.
            # Over the first 256 texts (the peer is slow: with 32 tasks in a batch of 32 that is one
            # forward per text).
            per_task = []
            for lo in range(0, 256, batch):
                by_task: dict[int, list[str]] = {}
                for j, text in enumerate(texts[lo:lo + batch]):
                    by_task.setdefault(j % TASKS, []).append(text)
                for k, group in by_task.items():
                    enc_k = tok(group, padding=True, truncation=True, return_tensors="pt")
                    per_task.append((k, {n: v.pin_memory() for n, v in enc_k.items()}))

            def naive(per_task=per_task):
                with torch.inference_mode():
                    for k, f in per_task:
                        peft[k].set_adapter(f"s{k}")
                        peft[k](**{n: v.to("cuda", non_blocking=True) for n, v in f.items()})

            n_peft = sum(len(f["input_ids"]) for _, f in per_task)
            row[f"peft_texts_per_s_b{batch}"] = n_peft / _sync_time(naive, 2)
        print(f"  {precision} batch {batch}: ours {row[f'ours_texts_per_s_b{batch}']:.0f} texts/s, ceiling "
              f"{row[f'ceiling_texts_per_s_b{batch}']:.0f}, graphed ceiling "
              f"{row.get(f'graphed_ceiling_texts_per_s_b{batch}', 0):.0f}, peft {row.get(f'peft_texts_per_s_b{batch}', 0):.0f}",
              flush=True)
    return row


def _profile(args, evals, files) -> int:
    """Where a mixed batch's time goes on the GPU: host-side functions (cProfile, by own time) and
    device kernels (torch.profiler, by CUDA time)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from adapterserve.runtime.config import RuntimeConfig
    from adapterserve.runtime.runtime import Runtime

    precision, batch = args.profile.split(":")
    batch = int(batch)
    rt = Runtime(RuntimeConfig(device="cuda", precision=precision, slots=40, r_max=16, max_batch_size=args.max_rows,
                               cuda_graphs=args.cuda_graphs, lora_kernel=args.lora_kernel))
    texts = evals[0][0] * args.repeat
    calls, ours = _mixed_workload(rt, files, texts)(batch)
    s = _sync_time(ours, 3)
    print(f"{precision} batch {batch}: {len(texts) / s:.0f} texts/s, {len(calls)} infer calls, "
          f"{sum(len(rt.plan_batches(rows)) for rows in calls)} forwards")
    # What one kernel launch costs this host (the floor under every op of a forward).
    x = torch.ones(4, device="cuda")
    launches = _sync_time(lambda: [x.add_(1) for _ in range(10_000)], 3)
    print(f"one kernel launch: {launches / 10_000 * 1e6:.1f} us (x.add_(1) x 10,000)")
    prof = cProfile.Profile()
    prof.enable()
    ours()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        ours()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


def _device_used_bytes() -> int:
    """Device memory in use by anyone (torch and ONNX Runtime's own arena alike)."""
    free, total = torch.cuda.mem_get_info()
    return total - free


def bench_ort_cuda(args, evals, files) -> list[dict]:
    """ONNX Runtime's CUDA provider: the shared-base graph (fp32, stock LoRA ops) with 32 tasks mixed,
    beside the same-run bare torch fp32 base, and per-task merged exports (fp32, fp16) serving one task.
    Memory is device-wide (mem_get_info): ORT allocates outside torch's allocator."""
    from adapterserve.exporters.per_task import export_task
    from adapterserve.runtime.engine.base_model import load_base_model
    from adapterserve.runtime.config import RuntimeConfig
    from adapterserve.runtime.runtime import Runtime

    (sst_x, sst_y), (ag_x, ag_y) = evals
    examples = os.path.join(ROOT, "adapters", "examples")
    texts = sst_x * args.repeat
    rows = []
    gc.collect()
    torch.cuda.empty_cache()
    torch.zeros(1, device="cuda")  # the CUDA context exists before the first reading, so it is not counted
    before = _device_used_bytes()
    rt = Runtime(RuntimeConfig(device="cuda", engine="onnx", slots=40, r_max=16, max_batch_size=args.max_rows))
    row: dict = {"engine": "ORT CUDA shared base fp32 (32 tasks mixed)",
                 "device_used_after_load_bytes": _device_used_bytes() - before,
                 "model_file_bytes": os.path.getsize(os.path.join(rt.engine.model_dir, "model.onnx"))}
    rt.add_adapter("sst2", os.path.join(examples, "sst2"))
    rt.add_adapter("ag_news", os.path.join(examples, "ag_news"))
    if args.accuracy:
        row["sst2_dev_accuracy"] = accuracy(rt, "sst2", sst_x, sst_y)
        row["ag_news_test_accuracy"] = accuracy(rt, "ag_news", ag_x, ag_y)
    workload = _mixed_workload(rt, files, texts)
    bare = load_base_model(RuntimeConfig(device="cuda", precision="fp32"))
    for batch in args.batches:
        _, ours = workload(batch)
        forwards = _forwards(rt, texts, batch)

        def ceiling(forwards=forwards, bare=bare):
            with torch.inference_mode():
                for f in forwards:
                    bare.backbone(**{k: v.to("cuda", non_blocking=True) for k, v in f.items()})

        row[f"ours_texts_per_s_b{batch}"] = len(texts) / _sync_time(ours, args.rounds)
        row[f"ceiling_texts_per_s_b{batch}"] = len(texts) / _sync_time(ceiling, args.rounds)
        row[f"device_used_peak_b{batch}_bytes"] = _device_used_bytes() - before
        print(f"  ORT CUDA shared batch {batch}: {row[f'ours_texts_per_s_b{batch}']:.0f} texts/s, torch fp32 bare "
              f"{row[f'ceiling_texts_per_s_b{batch}']:.0f}", flush=True)
    rows.append(row)
    ceilings = {b: row[f"ceiling_texts_per_s_b{b}"] for b in args.batches}
    plans = {b: _forwards(rt, texts, b) for b in args.batches}
    del rt, workload, bare
    gc.collect()
    torch.cuda.empty_cache()

    # Per-task merged exports: what a user deploys per task without us (one model per task).
    out_root = tempfile.mkdtemp(prefix="gpu-bench-onnx-")
    for fp16 in (False, True):
        out = os.path.join(out_root, "fp16" if fp16 else "fp32")
        export_task(os.path.join(examples, "sst2"), out, fp16=fp16)
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(_bench_merged_task(out, f"ORT CUDA merged per task {'fp16' if fp16 else 'fp32'} (SST-2 only)",
                                       plans, ceilings, len(texts), args))
    return rows


def _bench_merged_task(model_dir: str, name: str, plans: dict, ceilings: dict, n_texts: int, args) -> dict:
    """One per-task merged export on the CUDA provider over the same forwards; its session (and ORT's
    arena with it) is gone when this returns, so the next reading starts clean."""
    import numpy as np

    from adapterserve.runtime.engine.onnx.engine import open_session, providers_for

    before = _device_used_bytes()
    session = open_session(os.path.join(model_dir, "model.onnx"), providers=providers_for(torch.device("cuda")))
    wanted = {i.name for i in session.get_inputs()}
    row = {"engine": name, "model_file_bytes": os.path.getsize(os.path.join(model_dir, "model.onnx")),
           "device_used_after_load_bytes": _device_used_bytes() - before}
    for batch in args.batches:
        feeds = [{k: v.numpy().astype(np.int64) for k, v in f.items() if k in wanted} for f in plans[batch]]

        def merged(feeds=feeds):
            for f in feeds:
                session.run(None, f)

        row[f"ours_texts_per_s_b{batch}"] = n_texts / _sync_time(merged, args.rounds)
        row[f"ceiling_texts_per_s_b{batch}"] = ceilings[batch]
        row[f"device_used_peak_b{batch}_bytes"] = _device_used_bytes() - before
        print(f"  {name} batch {batch}: {row[f'ours_texts_per_s_b{batch}']:.0f} texts/s", flush=True)
    return row


def _onnxruntime_providers() -> str:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime not importable: {e}"
    return f"onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="fp32,fp16,bf16,int8,nf4")
    p.add_argument("--batches", default="32,256", help="texts per infer call (a server's pool)")
    p.add_argument("--max-rows", type=int, default=256, help="max_batch_size: most rows in one forward")
    p.add_argument("--repeat", type=int, default=4, help="SST-2 dev (872 texts) this many times per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ag-news-limit", type=int, default=7600)
    p.add_argument("--no-peft", dest="peft", action="store_false")
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    p.add_argument("--json", default=None)
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "off"],
                   help="our torch engine's forwards replayed as CUDA graphs (auto) or eager (off)")
    p.add_argument("--lora-kernel", default="auto", choices=["auto", "triton", "torch"],
                   help="our engine's LoRA branch on CUDA: the Triton kernels or gather + bmm (auto: torch)")
    p.add_argument("--ort", action="store_true",
                   help="also ONNX Runtime's CUDA provider (needs onnxruntime-gpu): shared base and per-task merged")
    p.add_argument("--profile", default=None, metavar="PRECISION:BATCH",
                   help="instead of the table: cProfile and torch.profiler of our engine at one point")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if not torch.cuda.is_available():
        print("gpu_bench needs a CUDA device; torch sees none")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the parity tests
    from adapterserve.loadtest.synthetic import synthetic_adapter, write_adapter
    from adapterserve.runtime.config import packaged_base_model_dir

    os.environ.setdefault("ADAPTERSERVE_CACHE", tempfile.mkdtemp(prefix="gpu-bench-"))
    device = torch.cuda.get_device_name(0)
    import transformers

    try:
        import bitsandbytes as bnb
        bnb_version = bnb.__version__
    except Exception as e:  # noqa: BLE001 - reported, int8/nf4 rows then fail with the runtime's message
        bnb_version = f"not importable ({e})"
    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "transformers": transformers.__version__, "bitsandbytes": bnb_version, "onnxruntime": _onnxruntime_providers()}
    print(json.dumps(env, indent=1), flush=True)
    evals = load_eval_sets(args.ag_news_limit)
    base = packaged_base_model_dir()
    files = [synthetic_adapter(base, seed=i) for i in range(TASKS)]
    tmp = tempfile.mkdtemp(prefix="gpu-bench-adapters-")
    adapter_dirs = [write_adapter(f, os.path.join(tmp, f"s{i}")) for i, f in enumerate(files)]
    if args.profile:
        return _profile(args, evals, files)
    rows = []
    for precision in [p for p in args.precisions.split(",") if p]:
        try:
            rows.append(bench_precision(precision, args, evals, files, adapter_dirs))
        except Exception as e:  # noqa: BLE001 - one precision failing must not hide the others' figures
            traceback.print_exc()
            rows.append({"precision": precision, "error": f"{type(e).__name__}: {e}"})
        gc.collect()
        torch.cuda.empty_cache()
        if args.json:  # after every precision, so a run cut short still leaves the rows it finished
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump({"env": env, "rows": rows}, fh, indent=1)
    ort_rows = []
    if args.ort:
        try:
            ort_rows = bench_ort_cuda(args, evals, files)
        except Exception as e:  # noqa: BLE001 - reported beside the torch rows
            traceback.print_exc()
            ort_rows = [{"engine": "ORT CUDA", "error": f"{type(e).__name__}: {e}"}]
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"env": env, "rows": rows, "ort_rows": ort_rows}, fh, indent=1)
    print(f"\n{device}; torch {torch.__version__} (CUDA {torch.version.cuda}), bitsandbytes {bnb_version}; "
          f"CUDA graphs {args.cuda_graphs}; LoRA kernel {args.lora_kernel}; {TASKS} tasks mixed, SST-2 dev x{args.repeat} per round, median of {args.rounds}\n")
    print("| precision | weights (bytes) | CUDA after load (bytes) | SST-2 dev | AG News | "
          + " | ".join(f"b{b}: ours / ceiling / × ceiling / graphed ceiling / × graphed / PEFT / × PEFT | peak b{b} (bytes)"
                       for b in args.batches) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * (2 * len(args.batches)))
    for r in rows:
        if "error" in r:
            print(f"| {r['precision']} | {r['error']} |")
            continue
        cells = []
        for b in args.batches:
            ours, ceil, peft = (r[f"ours_texts_per_s_b{b}"], r[f"ceiling_texts_per_s_b{b}"],
                                r.get(f"peft_texts_per_s_b{b}"))
            peft_cells = f"{peft:.0f} / {ours / peft:.2f}" if peft else "– / –"
            graphed = r.get(f"graphed_ceiling_texts_per_s_b{b}")
            graphed_cells = f"{graphed:.0f} / {ours / graphed:.2f}" if graphed else "– / –"
            cells.append(f"{ours:.0f} / {ceil:.0f} / {ours / ceil:.2f} / {graphed_cells} / {peft_cells} | "
                         f"{r[f'peak_cuda_bytes_b{b}']:,}")
        print(f"| {r['precision']} | {r['weights_bytes']:,} | {r['cuda_allocated_after_load_bytes']:,} | "
              f"{r.get('sst2_dev_accuracy', float('nan')) * 100:.2f}% | {r.get('ag_news_test_accuracy', float('nan')) * 100:.2f}% | " + " | ".join(cells) + " |")
    if ort_rows:
        print(f"\n{_onnxruntime_providers()}; ceiling = bare torch fp32 base, same forwards, same run\n")
        print("| ORT engine | model file (bytes) | device memory after load (bytes) | SST-2 dev | AG News | "
              + " | ".join(f"b{b}: texts/s / ceiling / × ceiling" for b in args.batches) + " |")
        print("|---|---:|---:|---:|---:|" + "---:|" * len(args.batches))
        for r in ort_rows:
            if "error" in r:
                print(f"| {r['engine']} | {r['error']} |")
                continue
            cells = [f"{r[f'ours_texts_per_s_b{b}']:.0f} / {r[f'ceiling_texts_per_s_b{b}']:.0f} / "
                     f"{r[f'ours_texts_per_s_b{b}'] / r[f'ceiling_texts_per_s_b{b}']:.2f}" for b in args.batches]
            acc = (f"{r['sst2_dev_accuracy'] * 100:.2f}% | {r['ag_news_test_accuracy'] * 100:.2f}%"
                   if "sst2_dev_accuracy" in r else "– | –")
            print(f"| {r['engine']} | {r['model_file_bytes']:,} | {r['device_used_after_load_bytes']:,} | {acc} | "
                  + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
