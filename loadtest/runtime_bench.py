"""In-process runtime benchmark (runtime-core issue): packaged MiniLM, fp32 torch, real SST-2 dev
sentences in batches of 32.

    python -m adapterserve.loadtest.runtime_bench [--rounds 3] [--json out/runtime_bench.json]

Variants, each on the same batches (same rows, same padding):
  (a) bare      the unwrapped base model forward (the ceiling)
  (b) slots-1   one adapter through the slot engine
  (c) slots-32  32 distinct adapters mixed in every batch
  (d) peft-32   PEFT's own mixed batch (PeftModel(..., adapter_names=[...])) with the same 32 adapters
  (e) merged    one adapter merged into the base weights
and (b)/(c) again with lora_kernel=torch (gather + bmm) beside the default fused CPU kernel. The
variants above run each batch of 32 as one padded forward, as the runtime-core issue specifies; two
more rows let the runtime's batch planner cut every batch into length bands (runtime/planning.py):
(a) and (c) with the same cuts.
Adapters: random LoRA weights, r=8, alpha=16, on every attention/feed-forward linear and the pooler
(the shape of the bundled adapters), 2 labels. Throughput counts collate + forward + heads (+ softmax
for ours); tokenization is done once up front for all variants.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time

import torch

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense"]


def sst2_dev_texts(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [row["sentence"] for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def make_adapters(base_dir: str, out_dir: str, n: int) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
        peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=TARGETS))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        path = os.path.join(out_dir, f"task{i}")
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def timed(fn, batches) -> float:
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "data", "sst2", "dev.tsv"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoModel, AutoModelForSequenceClassification

    from adapterserve.runtime.config import RuntimeConfig, packaged_base_model_dir
    from adapterserve.runtime.runtime import Row, Runtime

    base_dir = packaged_base_model_dir()
    texts = sst2_dev_texts(args.data)
    tmp = tempfile.mkdtemp(prefix="adapterserve-bench-")
    paths = make_adapters(base_dir, tmp, args.adapters)

    def runtime(kernel, overhead=10**9):  # a huge forward cost: one forward per batch, never split
        r = Runtime(RuntimeConfig(slots=max(64, args.adapters + 1), r_max=16, max_batch_size=args.batch_size,
                                  lora_kernel=kernel, forward_overhead_tokens=overhead))
        for i, path in enumerate(paths):
            r.add_adapter(f"task{i}", path)
        return r, [r.registry.get(f"task{i}") for i in range(args.adapters)]

    rt, entries = runtime("auto")
    rt_torch, entries_torch = runtime("torch")
    rt_planned, entries_planned = runtime("auto", overhead=None)  # the default planner
    kernel = rt.engine.kernel_name
    encoded = rt.encoder.encode(texts)
    bs = args.batch_size
    # Keep the data order (real length mix); each batch pads to its own longest row in every variant.
    batches = [list(range(i, min(i + bs, len(texts)))) for i in range(0, len(texts), bs)]

    bare = AutoModel.from_pretrained(base_dir).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2),
                                           paths[0], adapter_name="task0")
    for i, path in enumerate(paths[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"task{i}")
    peft_model.eval()

    def run_bare(idx):
        with torch.inference_mode():
            bare(**rt.encoder.collate([encoded[i] for i in idx], rt.base.device))

    def run_bare_planned(idx):
        rows = [Row(entries_planned[j % args.adapters], encoded[i]) for j, i in enumerate(idx)]
        with torch.inference_mode():
            for group in rt_planned.plan_batches(rows):  # the cuts the planned runtime makes
                bare(**rt.encoder.collate([r.encoded for r in group], rt.base.device))

    def run_slots(assign, on=rt):
        def fn(idx):
            on.infer([Row(assign(j), encoded[i]) for j, i in enumerate(idx)])
        return fn

    def run_peft(idx):
        inputs = rt.encoder.collate([encoded[i] for i in idx], rt.base.device)
        with torch.inference_mode():
            peft_model(**inputs, adapter_names=[f"task{j % args.adapters}" for j in range(len(idx))])

    def run_merged(idx):
        rt.infer([Row(entries[0], encoded[i]) for i in idx])

    variants = {
        "bare": run_bare,
        "slots-1": run_slots(lambda j: entries[0]),
        f"slots-{args.adapters}": run_slots(lambda j: entries[j % args.adapters]),
        "slots-1 torch-path": run_slots(lambda j: entries_torch[0], rt_torch),
        f"slots-{args.adapters} torch-path": run_slots(lambda j: entries_torch[j % args.adapters], rt_torch),
        f"peft-{args.adapters}": run_peft,
        "merged": run_merged,
        "bare planned": run_bare_planned,
        f"slots-{args.adapters} planned": run_slots(lambda j: entries_planned[j % args.adapters], rt_planned),
    }
    for name, fn in variants.items():  # warm-up (slot loads, allocator, lazy init)
        if name == "merged":
            rt.merge("task0")
        fn(batches[0])
        if name == "merged":
            rt.unmerge()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():  # interleaved, so drift hits every variant alike
            if name == "merged":
                rt.merge("task0")
            times[name].append(timed(fn, batches))
            if name == "merged":
                rt.unmerge()
    result = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    ceiling = result["bare"]
    print(f"\nPackaged MiniLM-L6, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(texts)} SST-2 dev sentences, batch {bs}, median of {args.rounds} rounds, LoRA kernel: {kernel}\n")
    print("| variant | texts/s | × bare |")
    print("|---|---:|---:|")
    for name, tps in result.items():
        print(f"| {name} | {tps:.1f} | {tps / ceiling:.3f} |")
    mixed, peft = result[f"slots-{args.adapters}"], result[f"peft-{args.adapters}"]
    print(f"\n(c)/(a) = {mixed / ceiling:.3f} (target ≥ 0.90); (c)/(d) = {mixed / peft:.2f} (target ≥ 1.0)")
    planned = result[f"slots-{args.adapters} planned"] / result["bare planned"]
    print(f"with the batch planner: (c)/(a) = {planned:.3f}; planned (c) = "
          f"{result[f'slots-{args.adapters} planned'] / ceiling:.2f} × padded (a)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"texts_per_second": result, "rounds": times, "batch_size": bs, "texts": len(texts),
                       "lora_kernel": kernel}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
