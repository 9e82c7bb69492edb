"""Encoder families benchmark: per family, 32 LoRA tasks mixed in every batch against the same family's
bare forward on the same engine path, same run; and padded against token-packed where packing applies.

    python -m adapterserve.loadtest.families_bench [--rounds 3] [--texts 320] [--families electra,modernbert] [--json FILE]

Bases are random models built from each family's config at MiniLM's size (hidden 384, 6 layers, 12 heads,
feed-forward 1536; ModernBERT's gated MLP 1024 wide, every third layer global), not downloaded
checkpoints: the figures compare paths and families on equal shapes, not the published models. All
families share MiniLM's WordPiece tokenizer, so every family sees the same token counts. Adapters: PEFT
LoRA r 8 on each family's default targets (runtime/families.py), heads of 2 to 6 labels. Texts: SST-2
dev sentences, batches of 32, torch engine fp32 on the CPU, rounds interleaving the variants.
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
FAMILIES = ("bert", "electra", "xlm-roberta", "mpnet", "deberta-v2", "modernbert")
SIZES = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def make_base(family: str, out: str, max_length: int = 512) -> str:
    from transformers import (AutoConfig, AutoModel, BertTokenizerFast, DebertaV2Config, ModernBertConfig)

    from adapterserve.runtime.config import packaged_base_model_dir

    torch.manual_seed(0)
    no_types = family in ("mpnet", "modernbert")
    tokenizer = BertTokenizerFast(vocab_file=os.path.join(packaged_base_model_dir(), "vocab.txt"), do_lower_case=True,
                                  model_max_length=max_length,
                                  **({"model_input_names": ["input_ids", "attention_mask"]} if no_types else {}))
    vocab = tokenizer.vocab_size
    if family == "deberta-v2":  # DeBERTa-v3's settings
        config = DebertaV2Config(vocab_size=vocab, max_position_embeddings=512, relative_attention=True,
                                 position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                                 norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                                 type_vocab_size=0, **SIZES)
    elif family == "modernbert":
        config = ModernBertConfig(vocab_size=vocab, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1024, max_position_embeddings=8192, pad_token_id=0,
                                  cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102)
    else:
        extra = {"pad_token_id": 0, "max_position_embeddings": 514} if family in ("xlm-roberta", "mpnet") else {}
        config = AutoConfig.for_model(family, vocab_size=vocab, **SIZES, **extra)
    AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(base: str, out: str, seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from adapterserve.runtime.families import family_for

    torch.manual_seed(seed)
    family = family_for(AutoConfig.from_pretrained(base))
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2 + seed % 5)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                  target_modules=list(family.default_targets),
                                                  modules_to_save=list(family.modules_to_save)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out)
    return out


def measure(rt, batches, tasks: int, rounds: int) -> dict:
    def run_tasks():
        for batch in batches:
            rt.classify([(f"t{j % tasks}", t) for j, t in enumerate(batch)])

    def run_bare():
        # The same length bands as the tasks' batches (the planner), each forward with no adapter (slot 0).
        from adapterserve.runtime.planning import plan_groups

        for batch in batches:
            encoded = rt.encoder.encode(batch)
            for group in plan_groups([e.length for e in encoded], [0] * len(encoded), rt.config.max_batch_size,
                                     rt.config.max_batch_tokens, rt.slot_table.capacity, rt.forward_overhead_tokens):
                rows = [encoded[i] for i in group]
                rt.engine.encode(rt.encoder.collate(rows, rt.base.device), [0] * len(rows), [e.length for e in rows])

    texts = sum(len(b) for b in batches)
    out = {"bare": [], "tasks": []}
    with torch.inference_mode():
        run_bare(), run_tasks()  # warm
        for _ in range(rounds):
            for name, fn in (("bare", run_bare), ("tasks", run_tasks)):
                start = time.perf_counter()
                fn()
                out[name].append(texts / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--texts", type=int, default=320, help="SST-2 dev sentences per pass (batches of 32)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import transformers

    from adapterserve.loadtest.runtime_bench import sst2_dev_texts
    from adapterserve.runtime.config import RuntimeConfig
    from adapterserve.runtime.runtime import Runtime

    transformers.logging.set_verbosity_error()
    texts = sst2_dev_texts(os.path.join(ROOT, "data", "sst2", "dev.tsv"))[:args.texts]
    batches = [texts[i:i + 32] for i in range(0, len(texts) - 31, 32)]
    tmp = tempfile.mkdtemp()
    results = {}
    for family in args.families.split(","):
        base = make_base(family, os.path.join(tmp, family))
        adapters = [make_adapter(base, os.path.join(tmp, f"{family}_{i}"), i) for i in range(args.tasks)]
        for packing in ("auto", "off"):
            rt = Runtime(RuntimeConfig(base_model=base, slots=args.tasks + 1, r_max=8, token_packing=packing))
            if packing == "off" and not results[family]["auto"]["packed"]:
                break  # no packed path: the auto run was the padded one
            for i, path in enumerate(adapters):
                rt.add_adapter(f"t{i}", path)
            figures = measure(rt, batches, args.tasks, args.rounds)
            figures.update(packed=rt.engine.packed, lora_path=rt.engine.kernel_name)
            results.setdefault(family, {})[packing] = figures
            print(f"  {family} packed={rt.engine.packed}: bare {figures['bare']:.0f}, {args.tasks} tasks "
                  f"{figures['tasks']:.0f} texts/s", flush=True)
    print(f"\ntorch engine fp32 on the CPU, {args.tasks} LoRA tasks (r 8) mixed in every batch of 32, "
          f"{len(batches) * 32} SST-2 dev texts per pass, median of {args.rounds} rounds\n")
    print("| family | path | bare forward (ceiling), texts/s | 32 tasks, texts/s | × bare | packed × padded |")
    print("|---|---|---:|---:|---:|---:|")
    for family, runs in results.items():
        padded = runs.get("off", runs["auto"])
        for packing, f in runs.items():
            path = ("packed" if f["packed"] else "padded") + f", {f['lora_path']}"
            gain = f"{f['tasks'] / padded['tasks']:.2f}" if f["packed"] else ""
            print(f"| {family} | {path} | {f['bare']:.1f} | {f['tasks']:.1f} | {f['tasks'] / f['bare']:.2f} | {gain} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
