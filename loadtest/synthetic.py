"""Synthetic PEFT LoRA adapters for benchmarks: random weights of realistic ranks and targets,
2..6 labels, written in PEFT's own file format (adapter_config.json + adapter_model.safetensors),
without building a PEFT model per adapter (1,024 of them must be cheap to make)."""
from __future__ import annotations

import json
import os
import random

import torch
from safetensors.torch import save as save_safetensors

ALL = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
       "intermediate.dense", "output.dense"]
TARGET_SETS = [["attention.self.query", "attention.self.value"], ALL[:4], ALL]


def linear_shapes(base_dir: str) -> tuple[int, int, int]:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    return cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers


def synthetic_adapter(base_dir: str, seed: int, labels: int = 0) -> dict[str, bytes]:
    """BERT-family base (the packaged MiniLM). Returns the files of one adapter; labels 0 = 2..6 at random."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, layers = linear_shapes(base_dir)
    r = rng.choice([4, 8, 16])
    targets = rng.choice(TARGET_SETS)
    labels = labels or rng.randint(2, 6)
    dims = {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
            "intermediate.dense": (hidden, inter), "output.dense": (inter, hidden)}
    tensors = {}
    for layer in range(layers):
        for t in targets:
            d_in, d_out = dims[t]
            key = f"base_model.model.bert.encoder.layer.{layer}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.02
    tensors["base_model.model.classifier.weight"] = torch.randn(labels, hidden, generator=gen) * 0.05
    tensors["base_model.model.classifier.bias"] = torch.zeros(labels)
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": sorted({t.split(".")[-1] if t.startswith("attention.self") else t for t in targets}),
              "modules_to_save": ["classifier"], "bias": "none", "use_rslora": False, "use_dora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "inference_mode": True}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": save_safetensors(tensors),
            "labels.json": json.dumps([f"label_{i}" for i in range(labels)]).encode()}


def write_adapter(files: dict[str, bytes], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(out_dir, name), "wb") as fh:
            fh.write(data)
    return out_dir
