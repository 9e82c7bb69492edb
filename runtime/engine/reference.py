"""Pure-PyTorch reference for the slot engine: no slots, no PEFT.

For one adapter it builds transformers' own *ForSequenceClassification on the base, adds each LoRA
delta (B @ A, scaling already folded; LoKr's factors as their LoRA form) to the weight it targets, loads the adapter's head, and runs
texts one at a time. Tests hold the fast path to this and to PEFT.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adapterserve.adapters.spec import AdapterSpec


def reference_model(base_dir: str, spec: AdapterSpec) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=spec.num_labels)
    model.eval()
    backbone = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        pairs = [(name, (m.a, m.b)) for name, m in spec.modules.items()]
        pairs += [(name, m.as_lora()) for name, m in spec.kron.items()]  # LoKr's factors: the same update
        for name, (a, b) in pairs:
            linear = backbone.get_submodule(name)
            linear.weight += (a @ b).t().to(linear.weight.dtype)
        state = {k: v for k, v in spec.head.items()}
        missing = model.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
    return model


def reference_logits(base_dir: str, spec: AdapterSpec, texts: list[str],
                     pairs: Optional[list[str]] = None, max_length: Optional[int] = None) -> torch.Tensor:
    model = reference_model(base_dir, spec)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    out = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            enc = tokenizer(text, pairs[i] if pairs else None, return_tensors="pt", truncation=True,
                            max_length=max_length or tokenizer.model_max_length)
            out.append(model(**enc).logits[0])
    return torch.stack(out)
