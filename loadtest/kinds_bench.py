"""Adapter kinds benchmark: 32 tasks of mixed kinds vs 32 LoRA tasks, in-process, packaged MiniLM, torch
fp32 engine, real SST-2 dev sentences in batches of 32 with every batch mixing the 32 tasks.

    python -m adapterserve.loadtest.kinds_bench [--rounds 3] [--kinds lora,loha,...] [--engine onnx --precision int8] [--json FILE]

The mixed set cycles LoRA (r 8), LoHa (r 3: rank 9 in a slot), VeRA (r 8), IA3 (PEFT's BERT defaults),
LoKr (PEFT's default r 8: rank 128, applied from its Kronecker factors), DoRA (r 8), LoRA with trained biases (r 8), prompt tuning,
P-tuning and prefix tuning (8 virtual tokens or prefix positions) and AdapterHub's Houlsby bottleneck adapter
(reduction 16, its 2-layer head) and BEFT (BitFit), on q/k/v, attention output and feed-forward linears (IA3: key, value,
output.dense). Ceiling: the same batches through the same engine path with no adapter
(slot 0), same run. On torch each batch runs through the three variants in turn, so the machine's drift
over a round weighs on all three alike (on ONNX each variant runs the round's batches in turn: its
sessions' spinning threads would slow the next session). With --engine onnx the mixed set cycles the
kinds the shared graph serves (LoRA, LoHa, VeRA, IA3, DoRA, LoRA with biases, BEFT; it refuses the
sequence kinds, bottleneck adapters, LoKr's factors and wide slots at registration). Also prints each kind's registration latency
(parse, convert, validate, register), median over its adapters.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
KINDS = ["lora", "loha", "vera", "ia3", "lokr", "dora", "lora_bias", "prompt", "p_tuning", "prefix", "bottleneck",
         "beft"]
ONNX_KINDS = ["lora", "loha", "vera", "ia3", "dora", "lora_bias", "beft"]
# AdapterHub's Houlsby adapter (double_seq_bn) as adapters 1.3.0 saves it, with its default 2-layer head.
HOULSBY = {"mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "non_linearity": "swish",
           "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True, "ln_before": False,
           "ln_after": False, "adapter_residual_before_ln": False, "scaling": 1.0, "is_parallel": False,
           "use_gating": False, "phm_layer": False, "inv_adapter": None}


def make_bottleneck(base_dir: str, out: str, seed: int) -> str:
    """The files AdapterHub's save_adapter(..., with_head=True, use_safetensors=True) writes, random weights:
    written here rather than through the `adapters` library (a test dependency, not a bench one)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    hidden, r, labels = config.hidden_size, config.hidden_size // 16, 2 + seed % 5
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    tensors = {}
    for layer in range(config.num_hidden_layers):
        for where in ("attention.output", "output"):
            key = f"bert.encoder.layer.{layer}.{where}.adapters.task"
            tensors.update({f"{key}.adapter_down.0.weight": rand(r, hidden), f"{key}.adapter_down.0.bias": rand(r),
                            f"{key}.adapter_up.weight": rand(hidden, r), f"{key}.adapter_up.bias": rand(hidden)})
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter.safetensors"))
    save_file({"heads.task.1.weight": rand(hidden, hidden), "heads.task.1.bias": rand(hidden),
               "heads.task.4.weight": rand(labels, hidden), "heads.task.4.bias": rand(labels)},
              os.path.join(out, "model_head.safetensors"))
    meta = {"hidden_size": hidden, "model_type": "bert", "name": "task", "version": "adapters.1.3.0"}
    with open(os.path.join(out, "adapter_config.json"), "w") as fh:
        json.dump({"config": HOULSBY, **meta}, fh)
    with open(os.path.join(out, "head_config.json"), "w") as fh:
        json.dump({"config": {"head_type": "classification", "num_labels": labels, "layers": 2,
                              "activation_function": "tanh", "use_pooler": False, "bias": True,
                              "label2id": {f"LABEL_{i}": i for i in range(labels)}}, **meta}, fh)
    return out


def make_adapter(base_dir: str, out: str, kind: str, seed: int) -> str:
    if kind == "bottleneck":
        return make_bottleneck(base_dir, out, seed)
    from peft import (BeftConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig,
                      PromptEncoderConfig, PromptTuningConfig, VeraConfig, get_peft_model)
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2 + seed % 5)
    config = {
        "lora": lambda: LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=TARGETS),
        "loha": lambda: LoHaConfig(task_type="SEQ_CLS", r=3, alpha=6, target_modules=TARGETS),
        "vera": lambda: VeraConfig(task_type="SEQ_CLS", r=8, target_modules=TARGETS, projection_prng_key=seed),
        "ia3": lambda: IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                 feedforward_modules=["output.dense"]),
        "dora": lambda: LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True),
        "lora_bias": lambda: LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=TARGETS, bias="lora_only"),
        # PEFT's default r: rank 128 once converted on MiniLM, so these tasks take wide slots
        "lokr": lambda: LoKrConfig(task_type="SEQ_CLS", r=8, alpha=8, target_modules=TARGETS),
        "prompt": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8),
        "p_tuning": lambda: PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=8, encoder_hidden_size=64),
        "prefix": lambda: PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8),
        "beft": lambda: BeftConfig(task_type="SEQ_CLS", target_modules=TARGETS),
    }[kind]()
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(k in name for k in ("lora_B", "hada_w1_a", "vera_lambda_b", "lokr_w2_b")):
                p.normal_(0, 0.02)
            elif "beft_bias" in name:
                p.normal_(0, 0.02)
            elif "ia3_l" in name or "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--engine", default="torch", choices=["torch", "onnx"])
    p.add_argument("--kinds", default=None, help="the kinds the mixed set cycles (default: every kind the engine "
                   f"serves: {','.join(KINDS)} on torch, {','.join(ONNX_KINDS)} on onnx)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import transformers

    from adapterserve.loadtest.runtime_bench import sst2_dev_texts
    from adapterserve.runtime.config import RuntimeConfig, packaged_base_model_dir
    from adapterserve.runtime.runtime import Runtime

    transformers.logging.set_verbosity_error()
    base = packaged_base_model_dir()
    texts = sst2_dev_texts(os.path.join(ROOT, "data", "sst2", "dev.tsv"))
    tmp = tempfile.mkdtemp()
    kinds = args.kinds.split(",") if args.kinds else (KINDS if args.engine == "torch" else ONNX_KINDS)
    sets = {"lora": [("lora", make_adapter(base, os.path.join(tmp, f"lora{i}"), "lora", i)) for i in range(args.tasks)],
            "mixed": [(kinds[i % len(kinds)], make_adapter(base, os.path.join(tmp, f"mixed{i}"), kinds[i % len(kinds)], i))
                      for i in range(args.tasks)]}
    runtimes, register_ms = {}, {k: [] for k in dict.fromkeys(["lora", *kinds])}
    for name, adapters in sets.items():
        rt = Runtime(RuntimeConfig(slots=args.tasks + 1, r_max=16, engine=args.engine, precision=args.precision))
        for i, (kind, path) in enumerate(adapters):
            start = time.perf_counter()
            rt.add_adapter(f"t{i}", path)
            register_ms[kind].append((time.perf_counter() - start) * 1000)
        runtimes[name] = rt
    batches = [texts[i:i + 32] for i in range(0, len(texts) - 31, 32)]

    def run_tasks(rt, batch):
        return sum(p.input_tokens for p in rt.classify([(f"t{j % args.tasks}", t) for j, t in enumerate(batch)]))

    def run_bare(rt, batch):
        rt.engine.encode(rt.encoder.collate(rt.encoder.encode(batch), rt.base.device), [0] * len(batch))

    results = {"bare": [], "lora": [], "mixed": []}
    with torch.inference_mode():
        # warm; and the positions each set's rows take (virtual tokens and prefix positions included)
        tokens = {name: sum(run_tasks(runtimes[name], batch) for batch in batches) for name in ("lora", "mixed")}
        for batch in batches:
            run_bare(runtimes["lora"], batch)
        # torch: each batch through the three variants in turn, so the machine's drift hits all three alike.
        # ONNX: each variant over all batches in turn: every runtime has its own ONNX Runtime session, whose
        # threads spin on after a run and would take the cores from the next session's run.
        by_batch = args.engine == "torch"
        for _ in range(args.rounds):
            spent = dict.fromkeys(results, 0.0)
            order = ([(b, v) for b in batches for v in results] if by_batch else
                     [(b, v) for v in results for b in batches])
            for batch, variant in order:
                rt = runtimes["lora" if variant == "bare" else variant]
                start = time.perf_counter()
                (run_bare if variant == "bare" else run_tasks)(rt, batch)
                spent[variant] += time.perf_counter() - start
            for variant, seconds in spent.items():
                results[variant].append(len(batches) * 32 / seconds)
            print("  round: " + ", ".join(f"{k} {v[-1]:.0f} texts/s" for k, v in results.items()), flush=True)
    tput = {k: statistics.median(v) for k, v in results.items()}
    engine = runtimes["mixed"]
    print(f"\nengine {engine.engine.name} ({engine.precision}), lora path {engine.engine.kernel_name}, token packing "
          f"{'on' if engine.engine.packed else 'off'}; {args.tasks} tasks mixed in every batch of 32\n")
    print("| variant | texts/s | × bare | × 32 LoRA | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| bare forward, same path (ceiling) | {tput['bare']:.1f} | 1.00 | | |")
    print(f"| 32 LoRA tasks | {tput['lora']:.1f} | {tput['lora'] / tput['bare']:.2f} | 1.00 | |")
    print(f"| 32 tasks of {len(kinds)} kinds | {tput['mixed']:.1f} | {tput['mixed'] / tput['bare']:.2f} | "
          f"{tput['mixed'] / tput['lora']:.2f} | ≥ 0.90 |")
    longer = tokens["mixed"] / tokens["lora"]
    print(f"\nThe mixed set's rows take {longer:.3f} x the LoRA set's positions (virtual tokens, prefixes): "
          f"per position, mixed / LoRA = {tput['mixed'] * longer / tput['lora']:.2f}")
    print("\n| kind | registration, median ms |\n|---|---:|")
    for kind, ms in register_ms.items():
        print(f"| {kind} | {statistics.median(ms):.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"texts_per_s": results, "register_ms": register_ms, "positions": tokens}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
