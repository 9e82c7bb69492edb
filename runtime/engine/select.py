"""Engine choice: builds the engine a RuntimeConfig asks for over a loaded base (exporting the
shared-base ONNX graph into the cache on first use)."""
from __future__ import annotations

import logging
import os

import torch

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.engine.base import Engine
from adapterserve.runtime.engine.base_model import BaseModel
from adapterserve.runtime.engine.slot_pool import SlotPool
from adapterserve.runtime.engine.torch_engine import TorchEngine
from adapterserve.runtime.errors import ConfigError
from adapterserve.runtime.native.hardware import probe

log = logging.getLogger(__name__)


def resolve_precision(config: RuntimeConfig, device: torch.device) -> str:
    """precision "auto": the fastest whose answers stay with fp32's (docs/benchmarks.md) on this machine:
    fp16 on CUDA; on a CPU, bf16 weights with fp32 activations where it multiplies bf16 natively (AMX or
    AVX512-BF16; elsewhere oneDNN emulates bf16 and it is slower than fp32), else fp32. The ONNX engine's
    auto is fp32 (its int8 moves accuracy by up to a quarter point)."""
    if config.precision != "auto":
        return config.precision
    if config.engine == "onnx":
        return "fp32"
    if device.type == "cuda":
        return "fp16"
    return "bf16" if probe().bf16_native else "fp32"


def base_precision(config: RuntimeConfig) -> str:
    """The precision the torch base loads in: the ONNX engine exports from an fp32 torch base, and its
    int8 then means ONNX Runtime int8, not bitsandbytes."""
    return "fp32" if config.engine == "onnx" else config.precision


def build_engine(config: RuntimeConfig, base: BaseModel) -> Engine:
    # Wide slots are the torch engine's: the shared ONNX graph's slot inputs are r_max wide.
    wide = (config.wide_slots, config.wide_r_max) if config.engine != "onnx" else (0, 0)
    pool = SlotPool(base, config.slots, config.r_max, config.lora_targets, *wide)
    if config.engine == "onnx":
        return _onnx_engine(config, pool)
    return TorchEngine(base, pool, lora_kernel=config.lora_kernel, token_packing=config.token_packing,
                       cuda_graphs=config.cuda_graphs)


def _onnx_engine(config: RuntimeConfig, pool: SlotPool) -> Engine:
    from adapterserve.runtime.engine.onnx.engine import OnnxEngine, default_onnx_dir, providers_for
    from adapterserve.runtime.engine.onnx.export import MODEL_FILE, bf16_lora_default, export_shared_base

    base = pool.base
    if base.family.no_shared_onnx:
        raise ConfigError(f"the ONNX engine cannot serve a {base.family.name} base: {base.family.no_shared_onnx}; "
                          "serve it with --engine torch")
    quantize = "int8" if config.precision == "int8" else None
    # --lora-kernel picks the graph's LoRA nodes too: the fused kernel as an ORT op, or stock ops.
    if config.lora_kernel == "triton":
        raise ConfigError("lora_kernel=triton is the torch engine's CUDA path; the onnx engine takes auto, fused or torch")
    lora_op = {"auto": "auto", "fused": "fused", "torch": "stock"}[config.lora_kernel]
    providers = providers_for(base.device)  # refuses a CUDA base where ORT has no CUDA provider
    if quantize and base.device.type == "cuda":
        raise ConfigError("the ONNX int8 graph (dynamic quantization) runs on ONNX Runtime's CPU provider only; "
                          "on CUDA serve --engine onnx --precision fp32, or the torch engine's int8/nf4")
    if lora_op == "auto" and base.device.type == "cuda":
        lora_op = "stock"  # our op is a CPU kernel: on the CUDA provider it would copy every layer to host
    # The int8 graph's LoRA ops read bf16 slots where they run on AMX tiles (runtime/native/csrc/lora_amx.c).
    bf16_lora = bf16_lora_default(quantize, lora_op)
    model_dir = config.onnx_dir or default_onnx_dir(pool, config.base_model_path, quantize, lora_op, bf16_lora)
    if not os.path.exists(os.path.join(model_dir, MODEL_FILE)):
        log.info("exporting the shared-base ONNX graph to %s (once per base and slot shape)", model_dir)
        # The exporter traces the wrapped backbone through a torch engine over the same pool, used once.
        exporter = TorchEngine(base, pool, lora_kernel="torch", token_packing=config.token_packing, cuda_graphs="off")
        try:
            export_shared_base(exporter, base.tokenizer, model_dir, quantize=quantize, lora_op=lora_op,
                               bf16_lora=bf16_lora)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return OnnxEngine(pool, model_dir, providers, threads=config.torch_threads)
