"""Train a LoRA task adapter on the base encoder and write a standard PEFT directory.

    adapterserve train --data data/sst2/train.tsv --text-col sentence --label-col label \
        --label-names negative,positive --out adapters/examples/sst2

The output (adapter_config.json, adapter_model.safetensors with the classifier head, labels.json)
loads in PeftModel.from_pretrained and in our runtime alike.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from adapterserve.adapters.bottleneck import BOTTLENECK_FAMILIES, adapterhub_library
from adapterserve.adapters.tabular import DataError, read_examples, label_kind
from adapterserve.runtime.config import packaged_base_model_dir
from adapterserve.runtime.families import Family, family_for


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="adapterserve train", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default=None, help="HF encoder dir (default: packaged MiniLM-L6)")
    p.add_argument("--data", required=True, help="CSV or TSV training file with a header row")
    p.add_argument("--text-col", required=True, help="text column; join several with '+' (title+description)")
    p.add_argument("--text-pair-col", default=None, help="second text column for pair tasks (NLI)")
    p.add_argument("--label-col", required=True)
    p.add_argument("--label-names", default=None,
                   help="comma-separated names for integer labels 0..N-1 (default: the integers as strings)")
    p.add_argument("--method", default="lora", choices=list(METHODS),
                   help="lora | dora | lora_bias (LoRA + the targeted linears' biases) | bitfit (PEFT BEFT: the targeted "
                        "linears' biases alone) | loha | lokr | vera | adalora | ia3 | "
                        "prompt | p_tuning | prefix | bottleneck (AdapterHub's adapters library; writes its directory)")
    p.add_argument("--virtual-tokens", type=int, default=20,
                   help="prompt / p_tuning: virtual tokens put first; prefix: key/value positions per layer")
    p.add_argument("--bottleneck-config", default="seq_bn", choices=list(BOTTLENECK_CONFIGS),
                   help="bottleneck: seq_bn (Pfeiffer) | double_seq_bn (Houlsby) | par_bn (parallel)")
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck: hidden size / bottleneck width")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default=None,
                   help="comma-separated linear names (default: all attention + feed-forward linears, and the BERT pooler)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head-lr", type=float, default=None, help="learning rate of the classifier head (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of steps with linear warm-up")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="output directory (PEFT format)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _labels(examples, label_names):
    values = [e.label for e in examples]
    kind = label_kind(values)
    if kind == "int":
        ints = sorted({int(v) for v in values})
        if label_names:
            names = [n.strip() for n in label_names.split(",")]
            if ints[0] < 0 or ints[-1] >= len(names):
                raise DataError(f"labels run {ints[0]}..{ints[-1]} but --label-names gives {len(names)} names for 0..{len(names) - 1}")
        else:
            if ints[0] < 0:
                raise DataError("integer labels must be 0 or greater")
            names = [str(i) for i in range(ints[-1] + 1)]
        ids = [int(v) for v in values]
    else:
        names = sorted(set(values)) if not label_names else [n.strip() for n in label_names.split(",")]
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise DataError(f"labels {unknown[:5]} are not in --label-names")
        ids = [index[v] for v in values]
    if len(set(ids)) < 2:
        raise DataError(f"the data has only one class ({names[ids[0]]!r}); a classifier needs at least two")
    return names, ids


# Every method the server serves (adapters/kinds.py); each writes its library's standard directory.
METHODS = ("lora", "dora", "lora_bias", "bitfit", "loha", "lokr", "vera", "adalora", "ia3", "prompt", "p_tuning",
           "prefix", "bottleneck")
# --method bottleneck: AdapterHub's configs by their names in the adapters library
BOTTLENECK_CONFIGS = {"seq_bn": "SeqBnConfig", "double_seq_bn": "DoubleSeqBnConfig", "par_bn": "ParBnConfig"}


def peft_config(args: argparse.Namespace, targets: Optional[list[str]], family: Family):
    """targets None: the method's own defaults for the model type (IA3's include its feed-forward modules).
    Every config saves the family's whole head (Family.modules_to_save: DeBERTa's pooler too)."""
    from peft import (AdaLoraConfig, BeftConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig,
                      PromptEncoderConfig, PromptTuningConfig, VeraConfig)

    saved = {"modules_to_save": list(family.modules_to_save)}
    if args.method in ("prompt", "p_tuning"):
        config = PromptTuningConfig if args.method == "prompt" else PromptEncoderConfig
        return config(task_type="SEQ_CLS", num_virtual_tokens=args.virtual_tokens, **saved)
    if args.method == "prefix":
        if family.name != "bert":  # PEFT 0.21's forward hands other families' heads the cache, not the features
            raise DataError(f"--method prefix trains BERT bases only (PEFT 0.21 cannot run its prefix forward on "
                            f"{family.name}); choose another method")
        return PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=args.virtual_tokens, **saved)
    if args.method == "adalora":
        steps = args.max_steps or 1000  # AdaLoRA's rank budget schedule needs the step count
        return AdaLoraConfig(task_type="SEQ_CLS", init_r=args.rank, target_r=max(1, args.rank // 2),
                             lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets, total_step=steps,
                             **saved)
    if args.method == "ia3":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as peft_defaults

        if targets is None and family.model_types[0] not in peft_defaults:  # PEFT has no IA3 default for it
            targets = list(family.default_targets)
        return IA3Config(task_type="SEQ_CLS", target_modules=targets,
                         feedforward_modules=[t for t in targets if t.endswith(family.feedforward_targets)]
                         if targets else None, **saved)
    if args.method == "bitfit":
        return BeftConfig(task_type="SEQ_CLS", target_modules=targets or list(family.default_targets), **saved)
    if args.method == "loha":
        return LoHaConfig(task_type="SEQ_CLS", r=args.rank, alpha=args.alpha, target_modules=targets,
                          module_dropout=args.dropout, **saved)
    if args.method == "lokr":
        return LoKrConfig(task_type="SEQ_CLS", r=args.rank, alpha=args.alpha, target_modules=targets,
                          module_dropout=args.dropout, **saved)
    if args.method == "vera":
        return VeraConfig(task_type="SEQ_CLS", r=args.rank, target_modules=targets, vera_dropout=args.dropout,
                          projection_prng_key=args.seed, **saved)
    return LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=targets, use_dora=args.method == "dora",
                      bias="lora_only" if args.method == "lora_bias" else "none", **saved)


def adapterhub_model(args: argparse.Namespace, base: str, names: list[str], family: Family):
    """An AdapterHub flex-head model with one bottleneck adapter "task" and its classification head, the
    rest frozen (train_adapter)."""
    if family.name not in BOTTLENECK_FAMILIES:
        raise DataError(f"--method bottleneck trains BERT, RoBERTa, XLM-R and ELECTRA bases (the ones the server "
                        f"serves them on), not {family.name}")
    library = adapterhub_library()
    model = library.AutoAdapterModel.from_pretrained(base)
    config = getattr(library, BOTTLENECK_CONFIGS[args.bottleneck_config])(reduction_factor=args.reduction_factor,
                                                                          dropout=args.dropout)
    model.add_adapter("task", config=config)
    model.add_classification_head("task", num_labels=len(names), id2label=dict(enumerate(names)))
    model.train_adapter("task")
    return model


def train(args: argparse.Namespace) -> dict:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    examples = read_examples(args.data, args.text_col, args.label_col, args.text_pair_col, args.limit)
    names, label_ids = _labels(examples, args.label_names)
    base = args.base_model or packaged_base_model_dir()
    family = family_for(AutoConfig.from_pretrained(base))
    targets = [t.strip() for t in args.targets.split(",")] if args.targets else list(family.default_targets) + (
        ["pooler.dense"] if family.uses_pooler else [])
    if args.method == "ia3" and not args.targets:
        targets = None  # PEFT's IA3 defaults: key, value and the feed-forward output (input-scaled)

    tokenizer = AutoTokenizer.from_pretrained(base)
    if args.method == "bottleneck":
        model = adapterhub_model(args, base, names, family)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        model = get_peft_model(model, peft_config(args, targets, family))
    model.train()

    enc = tokenizer([e.text for e in examples], [e.pair for e in examples] if args.text_pair_col else None,
                    truncation=True, max_length=args.max_length)
    n = len(examples)
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    total_steps = max(1, int(steps_per_epoch * args.epochs))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    def is_head(name: str) -> bool:  # PEFT's saved head modules, AdapterHub's flex heads
        return "modules_to_save" in name or name.startswith("heads.")

    head_params = [p for name, p in model.named_parameters() if p.requires_grad and is_head(name)]
    lora_params = [p for name, p in model.named_parameters() if p.requires_grad and not is_head(name)]
    optimizer = torch.optim.AdamW([
        {"params": lora_params, "lr": args.lr},
        {"params": head_params, "lr": args.head_lr or args.lr},
    ], weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup * total_steps), total_steps)
    gen = torch.Generator().manual_seed(args.seed)

    lengths = [len(ids) for ids in enc["input_ids"]]

    def batches():
        # Bucketed shuffling: sort each window of 64 batches by length, then shuffle the batch order.
        # Batches pad to similar lengths (much less wasted compute) and are still random per seed.
        window = args.batch_size * 64
        while True:
            perm = torch.randperm(n, generator=gen).tolist()
            epoch = []
            for w in range(0, n, window):
                chunk = sorted(perm[w:w + window], key=lambda i: lengths[i])
                epoch += [chunk[i:i + args.batch_size] for i in range(0, len(chunk), args.batch_size)]
            for j in torch.randperm(len(epoch), generator=gen).tolist():
                yield epoch[j]

    pad = tokenizer.pad_token_id or 0
    start = time.time()
    seen = 0
    bar = tqdm(total=total_steps, disable=args.quiet, unit="step", dynamic_ncols=True)
    loss_ema = None
    it = batches()
    for step in range(total_steps):
        idx = next(it)
        width = max(len(enc["input_ids"][i]) for i in idx)
        batch = {}
        for key in enc.keys():
            fill = pad if key == "input_ids" else 0
            batch[key] = torch.tensor([enc[key][i] + [fill] * (width - len(enc[key][i])) for i in idx])
        batch["attention_mask"] = torch.tensor([[1] * len(enc["input_ids"][i]) + [0] * (width - len(enc["input_ids"][i])) for i in idx])
        labels = torch.tensor([label_ids[i] for i in idx])
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + head_params, 1.0)
        optimizer.step()
        scheduler.step()
        if args.method == "adalora":  # AdaLoRA's rank budget: masks the least important ranks as it goes
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        seen += len(idx)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}", texts_per_s=f"{seen / (time.time() - start):.0f}")
    bar.close()
    elapsed = time.time() - start

    model.eval()
    os.makedirs(args.out, exist_ok=True)
    if args.method == "bottleneck":
        model.save_adapter(args.out, "task", with_head=True, use_safetensors=True)
        weights = "adapter.safetensors"
    else:
        model.save_pretrained(args.out, safe_serialization=True)
        weights = "adapter_model.safetensors"
    with open(os.path.join(args.out, "labels.json"), "w") as fh:
        json.dump(names, fh)
    summary = {
        "out": args.out, "rows": n, "labels": names, "steps": total_steps, "epochs": args.epochs,
        "train_seconds": round(elapsed, 1), "final_loss_ema": round(loss_ema, 4),
        "adapter_bytes": os.path.getsize(os.path.join(args.out, weights)),
        "args": {k: v for k, v in vars(args).items()},
    }
    with open(os.path.join(args.out, "training.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    try:
        summary = train(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
