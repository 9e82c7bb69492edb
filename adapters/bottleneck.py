"""AdapterHub bottleneck adapters (the `adapters` library: Houlsby `double_seq_bn`, Pfeiffer `seq_bn`,
parallel `par_bn` and their options) with their classification head, read from the directory that
`model.save_adapter(dir, name, with_head=True, use_safetensors=True)` writes:

- adapter_config.json: {"config": {...the BnConfig...}, "model_type", "hidden_size", "name", "version"}
- adapter.safetensors: `<backbone>.encoder.layer.<i>.{attention.output,output}.adapters.<name>.<part>`
  with parts adapter_down.<k>.{weight,bias} (a LayerNorm first with ln_before), adapter_up.{weight,bias},
  adapter_norm_before/after.{weight,bias}, scaling (learned or per-channel)
- head_config.json: {"config": {"head_type": "classification", "layers", "activation_function",
  "use_pooler", "num_labels", "label2id", ...}}
- model_head.safetensors: `heads.<name>.<index>.{weight,bias}`, the head's linears in order.

Each location becomes a spec.BottleneckModule; the engine applies them per row
(runtime/engine/slot_bottlenecks.py, AdapterHub's pre_forward / forward / post_forward). Pickled
checkpoints (pytorch_adapter.bin) are never loaded. Options with per-batch state (use_gating averages
its gate over the sequence), PHM layers and invertible adapters are refused with the option named.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
from typing import Optional

import torch
from safetensors.torch import load as load_safetensors

from adapterserve.adapters.spec import AdapterSpec, BottleneckModule, BottleneckOptions, HeadLayout
from adapterserve.runtime.errors import (BaseMismatchError, InvalidAdapterError, NotSupportedError,
                                         UnsupportedAdapterTypeError)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "model_head.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE)
PICKLE_FILES = ("pytorch_adapter.bin", "pytorch_model_head.bin")

BOTTLENECK_FAMILIES = ("bert", "roberta", "electra")
ACTIVATIONS = ("relu", "swish", "silu", "gelu", "gelu_new", "gelu_fast", "tanh", "sigmoid", "leakyrelu", "linear")
_KEY = re.compile(r"^(?P<module>.+)\.adapters\.(?P<name>[^.]+)\.(?P<part>.+)$")
_REFUSED_OPTIONS = {
    "use_gating": "its gate is averaged over each row's whole sequence",
    "phm_layer": "PHM (hypercomplex) layers",
    "inv_adapter": "invertible adapters on the embeddings",
}


def is_adapterhub(files: dict[str, bytes], config: dict) -> bool:
    """An AdapterHub save: its config nests the method's options under "config" and names no peft_type."""
    return "peft_type" not in config and isinstance(config.get("config"), dict) and (
        WEIGHTS_FILE in files or str(config.get("version", "")).startswith("adapters."))


def parse_bottleneck(files: dict[str, bytes], config: dict, base, labels: Optional[list[str]],
                     metadata: Optional[dict], finish) -> AdapterSpec:
    """finish(spec fields) -> AdapterSpec: the caller's labels, metadata and version handling."""
    options = _options(config["config"])
    family = base.family
    if family.name not in BOTTLENECK_FAMILIES:
        raise UnsupportedAdapterTypeError(
            f"AdapterHub bottleneck adapters are served on BERT, RoBERTa, XLM-R and ELECTRA bases (their sublayer "
            f"outputs are BERT-shaped), not on {family.name}; serve this task as a PEFT adapter")
    model_type = config.get("model_type")
    if model_type is not None and model_type not in family.model_types:
        raise BaseMismatchError(f"{CONFIG_FILE} says the adapter was trained on a {model_type} model; this server's "
                                f"base is {family.name}: register it on a server with its own base")
    if config.get("hidden_size") not in (None, base.hidden_size):
        raise BaseMismatchError(f"{CONFIG_FILE} says hidden size {config.get('hidden_size')}; this base's is "
                                f"{base.hidden_size}: trained on another base?")
    tensors = _safetensors(files, WEIGHTS_FILE)
    modules = _modules(tensors, family.backbone_prefix + ".", base, options)
    head, layout, head_labels = _head(files, base)
    if labels is None and "labels.json" not in files:  # a labels.json beside the adapter wins over label2id
        labels = head_labels
    return finish(modules, head, layout, labels)


def _options(config: dict) -> BottleneckOptions:
    architecture = config.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise UnsupportedAdapterTypeError(
            f"{CONFIG_FILE}: AdapterHub {architecture!r} adapters are not served (its bottleneck adapters are); "
            "train the method with PEFT, whose LoRA, IA3 and prefix tuning this server serves")
    for key, why in _REFUSED_OPTIONS.items():
        if config.get(key):
            raise UnsupportedAdapterTypeError(f"{CONFIG_FILE} sets {key}: {why} are not served; retrain without it")
    activation = str(config.get("non_linearity") or "linear").lower()
    if activation not in ACTIVATIONS:
        raise UnsupportedAdapterTypeError(f"{CONFIG_FILE} non_linearity {activation!r} is not served; served: "
                                          f"{', '.join(ACTIVATIONS)}")
    residual = config.get("residual_before_ln", True)
    if residual not in (True, False, "post_add"):
        raise InvalidAdapterError(f"{CONFIG_FILE} residual_before_ln must be true, false or \"post_add\"; got {residual!r}")
    scaling = config.get("scaling", 1.0)
    if not (isinstance(scaling, (int, float)) and not isinstance(scaling, bool)) and scaling not in ("learned", "channel"):
        raise InvalidAdapterError(f"{CONFIG_FILE} scaling must be a number, \"learned\" or \"channel\"; got {scaling!r}")
    flags = {}
    # Where it sits (mh_adapter, output_adapter, leave_out) is read from its tensors' keys.
    for key in ("original_ln_before", "original_ln_after", "ln_before", "ln_after", "adapter_residual_before_ln",
                "is_parallel"):
        value = config.get(key, False)
        if not isinstance(value, bool):
            raise InvalidAdapterError(f"{CONFIG_FILE} {key} must be true or false; got {value!r}")
        flags[key] = value
    return BottleneckOptions(
        activation=activation, parallel=flags["is_parallel"], residual_before_ln=residual,
        original_ln_before=flags["original_ln_before"], original_ln_after=flags["original_ln_after"],
        adapter_residual_before_ln=flags["adapter_residual_before_ln"], ln_before=flags["ln_before"],
        ln_after=flags["ln_after"], scaling=float(scaling) if not isinstance(scaling, str) else 1.0)


def _safetensors(files: dict[str, bytes], name: str) -> dict[str, torch.Tensor]:
    raw = files.get(name)
    if raw is None:
        pickled = " (pickles are never loaded: save_adapter(..., use_safetensors=True))"
        raise InvalidAdapterError(f"{name} is missing; an AdapterHub adapter needs it{pickled}")
    try:
        tensors = load_safetensors(raw)
    except Exception as e:  # safetensors raises its own SafetensorError and sometimes ValueError
        raise InvalidAdapterError(f"{name} is not a valid safetensors file ({e}); it may be truncated") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise InvalidAdapterError(f"tensor {key} in {name} has dtype {t.dtype}; adapter weights must be floating point")
        if not torch.isfinite(t).all():
            raise InvalidAdapterError(f"tensor {key} in {name} contains NaN or Inf values; retrain or fix the checkpoint")
    return {k: t.float() for k, t in tensors.items()}


def _modules(tensors: dict[str, torch.Tensor], backbone: str, base, options: BottleneckOptions) -> dict:
    parts_of: dict[str, dict[str, torch.Tensor]] = {}
    names = set()
    unexpected = []
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        module = m.group("module")[len(backbone):] if m and m.group("module").startswith(backbone) else None
        if module is None or not re.fullmatch(r"encoder\.layer\.\d+\.(attention\.output|output)", module):
            unexpected.append(key)
            continue
        names.add(m.group("name"))
        parts_of.setdefault(module, {})[m.group("part")] = tensor
    if unexpected:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} has {len(unexpected)} tensor(s) that are not bottleneck adapter "
                                  f"weights of a {base.family.name} base: {', '.join(sorted(unexpected)[:5])}")
    if len(names) > 1:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds several adapters ({', '.join(sorted(names))}); save one per task")
    if not parts_of:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds no bottleneck adapter weights")
    modules = {}
    for module, parts in sorted(parts_of.items()):
        if module not in base.bottleneck_locations:
            raise BaseMismatchError(f"adapter has weights for {module}, which this base does not have "
                                    f"({len(base.bottleneck_locations) // 2} layers): trained on another base?")
        modules[module] = _module(module, parts, base.hidden_size, options)
    return modules


def _module(module: str, parts: dict[str, torch.Tensor], hidden: int, options: BottleneckOptions) -> BottleneckModule:
    linears = sorted((k for k in parts if re.fullmatch(r"adapter_down\.\d+\.weight", k) and parts[k].dim() == 2))
    if len(linears) != 1 or "adapter_up.weight" not in parts:
        raise InvalidAdapterError(f"{module}: a bottleneck adapter needs adapter_down's linear and adapter_up "
                                  f"(found {', '.join(sorted(parts))})")
    down_key = linears[0][:-len(".weight")]
    down, up = parts[linears[0]], parts["adapter_up.weight"]
    r = down.shape[0]
    if down.shape != (r, hidden) or up.shape != (hidden, r):
        raise BaseMismatchError(f"{module}: adapter_down {tuple(down.shape)} and adapter_up {tuple(up.shape)} do not "
                                f"fit hidden size {hidden} (expected [r, {hidden}] and [{hidden}, r])")

    def vector(key: str, size: int, default: Optional[float]) -> Optional[torch.Tensor]:
        value = parts.get(key)
        if value is None:
            return None if default is None else torch.full((size,), default)
        if value.shape != (size,):
            raise InvalidAdapterError(f"{module}: {key} has shape {tuple(value.shape)}, expected ({size},)")
        return value

    def norm(prefix: str, wanted: bool) -> Optional[tuple]:
        if not wanted:
            return None
        weight, bias = vector(f"{prefix}.weight", hidden, None), vector(f"{prefix}.bias", hidden, None)
        if weight is None or bias is None:
            raise InvalidAdapterError(f"{module}: the config sets a layer norm but {prefix}.weight/bias are missing")
        return weight, bias

    scaling = parts.get("scaling")
    if scaling is not None and scaling.shape not in ((1,), (hidden,)):
        raise InvalidAdapterError(f"{module}: scaling has shape {tuple(scaling.shape)}, expected (1,) or ({hidden},)")
    before = "adapter_norm_before" if "adapter_norm_before.weight" in parts else "adapter_down.0"
    return BottleneckModule(
        down_weight=down.contiguous(), down_bias=vector(f"{down_key}.bias", r, 0.0),
        up_weight=up.contiguous(), up_bias=vector("adapter_up.bias", hidden, 0.0),
        scaling=scaling if scaling is not None else torch.tensor([options.scaling]),
        norm_before=norm(before, options.ln_before), norm_after=norm("adapter_norm_after", options.ln_after),
        options=options)


def _head(files: dict[str, bytes], base):
    raw = files.get(HEAD_CONFIG_FILE)
    if raw is None or HEAD_WEIGHTS_FILE not in files:
        raise InvalidAdapterError(f"{HEAD_CONFIG_FILE} and {HEAD_WEIGHTS_FILE} are needed: save the adapter with its "
                                  "classification head (save_adapter(dir, name, with_head=True, use_safetensors=True))")
    try:
        config = json.loads(raw.decode("utf-8")).get("config") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise InvalidAdapterError(f"{HEAD_CONFIG_FILE} is not a JSON object with a \"config\": {e}") from None
    if config.get("head_type") != "classification":
        raise UnsupportedAdapterTypeError(f"{HEAD_CONFIG_FILE} head_type {config.get('head_type')!r}: only "
                                          "\"classification\" heads are served")
    tensors = _safetensors(files, HEAD_WEIGHTS_FILE)
    linears: dict[int, dict] = {}
    for key, tensor in tensors.items():
        m = re.fullmatch(r"heads\.[^.]+\.(\d+)\.(weight|bias)", key)
        if m is None:
            raise InvalidAdapterError(f"{HEAD_WEIGHTS_FILE}: unexpected tensor {key} for a classification head")
        linears.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    layers = config.get("layers")
    if not isinstance(layers, int) or layers < 1 or len(linears) != layers:
        raise InvalidAdapterError(f"{HEAD_CONFIG_FILE} says {layers!r} layers; {HEAD_WEIGHTS_FILE} holds "
                                  f"{len(linears)} linear(s)")
    head: dict[str, torch.Tensor] = {}
    hidden = base.hidden_size
    for k, index in enumerate(sorted(linears)):
        weight = linears[index].get("weight")
        last = k == layers - 1
        if weight is None or weight.dim() != 2 or weight.shape[1] != hidden or (not last and weight.shape[0] != hidden):
            raise BaseMismatchError(f"{HEAD_WEIGHTS_FILE}: head linear {index} has shape "
                                    f"{None if weight is None else tuple(weight.shape)}; this base needs [.., {hidden}]")
        head[f"{k}.weight"] = weight.contiguous()
        bias = linears[index].get("bias")
        head[f"{k}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
    num_labels = head[f"{layers - 1}.weight"].shape[0]
    activation = config.get("activation_function")
    if activation is not None and str(activation).lower() not in ACTIVATIONS:
        raise UnsupportedAdapterTypeError(f"{HEAD_CONFIG_FILE} activation_function {activation!r} is not served")
    use_pooler = bool(config.get("use_pooler", False))
    if use_pooler and not base.family.uses_pooler:
        raise BaseMismatchError(f"{HEAD_CONFIG_FILE} reads the pooler output, which a {base.family.name} base has not")
    label2id = config.get("label2id")
    labels = None
    if isinstance(label2id, dict) and sorted(label2id.values()) == list(range(num_labels)):
        labels = [name for name, _ in sorted(label2id.items(), key=lambda item: item[1])]
    layout = HeadLayout(layers=layers, activation=str(activation).lower() if activation else None,
                        reads="pooled" if use_pooler else "first")
    return head, layout, labels


def adapterhub_library():
    """AdapterHub's `adapters` package (training bottleneck adapters; serving never imports it). In a
    source checkout this package's own directory is also named adapters/, and `python -m` run from the
    checkout puts it first on sys.path, where it would shadow the library: that entry is skipped."""
    found = sys.modules.get("adapters")
    if found is not None and hasattr(found, "AutoAdapterModel"):
        return found
    ours = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.realpath(os.path.join(os.path.abspath(p or os.curdir), "adapters")) != ours]
    if found is not None:
        del sys.modules["adapters"]
    try:
        return importlib.import_module("adapters")
    except ImportError as e:
        raise NotSupportedError(f"bottleneck adapters are trained with AdapterHub's library: pip install "
                                f"adapters==1.3.0 ({e})") from None
    finally:
        sys.path[:] = saved
