"""Per-task ONNX export: base + one adapter merged (weights W + B·A, head from the adapter) into a
stock *ForSequenceClassification, exported with optimum's ONNX exporter (it knows the input
signature and dynamic axes of BERT/DistilBERT/RoBERTa and writes config + tokenizer), then optionally
fused by ORT's transformer optimizer, quantized to int8 or converted to fp16. The folder is
self-contained: model.onnx, config.json, tokenizer files, labels.json, export.json (what was exported
and how: load a CPU export with its `cpu_session.disabled_optimizers`, as our own sessions do).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Optional

from transformers import AutoTokenizer

from adapterserve.adapters.peft_lora import read_adapter_dir
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import NotSupportedError
from adapterserve.runtime.engine.reference import reference_model

log = logging.getLogger(__name__)


def export_task(adapter_dir: str, out_dir: str, base_model: Optional[str] = None, quantize: Optional[str] = None,
                fp16: bool = False, optimize: bool = True) -> str:
    from optimum.exporters.onnx import onnx_export_from_model

    from adapterserve.runtime.engine.onnx.engine import CPU_DISABLED_OPTIMIZERS
    from adapterserve.runtime.runtime import Runtime

    config = RuntimeConfig(base_model=base_model, slots=2, r_max=512)
    rt = Runtime(config)  # parses and validates the adapter against this base exactly as the server does
    spec = rt.load_spec(read_adapter_dir(adapter_dir))
    if spec.eager_only:  # the exported model is the base with LoRA merged in; these kinds are not weight deltas
        raise NotSupportedError(f"export task merges LoRA-form adapters into the base; a {spec.kind()} adapter is not "
                                "a weight delta: serve it with the torch engine")
    base_path = config.base_model_path
    model = reference_model(base_path, spec)
    model.config.id2label = dict(enumerate(spec.labels))
    model.config.label2id = {name: i for i, name in enumerate(spec.labels)}
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_export_from_model(model, output=tmp, task="text-classification", opset=18, do_validation=False)
        path = os.path.join(tmp, "model.onnx")
        if optimize or fp16:
            path = _optimize(path, model, os.path.join(tmp, "model_opt.onnx"), fp16)
        if quantize == "int8":
            from adapterserve.runtime.engine.onnx.export import quantize_int8

            path = quantize_int8(path, os.path.join(tmp, "model_int8.onnx"))
        shutil.copyfile(path, os.path.join(out_dir, "model.onnx"))
        for name in os.listdir(tmp):
            if name.endswith(".json") or name.endswith(".txt"):
                shutil.copyfile(os.path.join(tmp, name), os.path.join(out_dir, name))
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "labels.json"), "w") as fh:
        json.dump(spec.labels, fh)
    with open(os.path.join(out_dir, "export.json"), "w") as fh:
        json.dump({"adapter": os.path.abspath(adapter_dir), "adapter_version": spec.version, "quantize": quantize,
                   "fp16": fp16, "optimized": optimize, "exporter": "optimum onnx_export_from_model (opset 18)",
                   # How to load it on the CPU at full speed (ORT re-fuses the pair otherwise).
                   "cpu_session": {"disabled_optimizers": [] if fp16 else CPU_DISABLED_OPTIMIZERS}}, fh, indent=1)
    return os.path.join(out_dir, "model.onnx")


def _optimize(path: str, model, out: str, fp16: bool) -> str:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim")
    # CPU exports keep LayerNorm + Add unfused: ORT's CPU SkipLayerNormalization is the slower of the two
    # (runtime/onnx_engine.CPU_DISABLED_OPTIMIZERS; load the model with those disabled, export.json says so).
    options = FusionOptions("bert")
    options.enable_skip_layer_norm = fp16
    opt = optimize_model(path, model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1, use_gpu=fp16,
                         optimization_options=options)
    if fp16:
        # For the CUDA execution provider; inputs/outputs stay int64/fp32.
        opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(out)
    return out
