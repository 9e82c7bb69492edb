"""ONNX Runtime engine over the shared-base graph (runtime/engine/onnx/export.py).

Slot storage is the slot pool's (runtime/engine/slot_pool.py: same validation, same copy_ into a
slot as the torch engine); this engine hands those buffers to ONNX Runtime as inputs (torch CPU tensors share memory with numpy,
so no copy on our side; whether ORT copies inputs was not measured). Registering, replacing or evicting an adapter therefore reaches the graph on
its next run, with no re-export. An int8 graph with bf16 LoRA ops (AMX) reads packed bf16 copies of
those buffers instead, which load_slot rewrites after the torch engine's write.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from typing import Optional

import numpy as np
import torch

from adapterserve.runtime.engine import packing
from adapterserve.runtime.config import cache_root
from adapterserve.runtime.engine.base_model import BaseModel
from adapterserve.runtime.engine.slot_pool import SlotPool
from adapterserve.runtime.errors import ConfigError, NotSupportedError

log = logging.getLogger(__name__)


# Part of the export cache key: bump it whenever the exported graph's inputs, ops or rewrites change, so a
# cached graph from another build is re-exported rather than fed the wrong inputs.
GRAPH_FORMAT = 10


# ORT's CPU SkipLayerNormalization kernel (1.31.1) is far slower than the LayerNormalization + Add it
# replaces: ~0.9 ms against ~0.2 ms per BERT-layer norm at 832 tokens x 384 (python -m adapterserve.loadtest.probes.cpu_probes
# onnx-profile; docs/benchmarks.md). CPU sessions therefore keep the pair unfused: a per-task merged int8
# export runs 35.1 -> 23.5 ms per run; the shared int8 graph, where ORT fused one pair, 28.7 -> 27.4 ms.
CPU_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


def open_session(path: str, options=None, providers: Optional[list] = None):
    """An ONNX Runtime session for one of our graphs (shared base or per-task export); on the CPU
    provider without the SkipLayerNormalization fusion (CPU_DISABLED_OPTIMIZERS)."""
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    disabled = CPU_DISABLED_OPTIMIZERS if first == "CPUExecutionProvider" else []
    return ort.InferenceSession(path, options, providers=providers, disabled_optimizers=disabled)


def providers_for(device: torch.device) -> list:
    """ORT execution providers for a base on `device`. The base's device decides, not what ORT has:
    on CUDA the slot buffers and the batch already live in GPU memory and are bound there in place."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ConfigError(f"the base is on CUDA but this ONNX Runtime ({ort.__version__}) has no CUDA execution "
                          "provider; install onnxruntime-gpu (built for this CUDA), or serve with --device cpu")
    # TF32 off: fp32 means fp32 here as in torch (whose matmul default is TF32 off), within 1e-4 of the CPU.
    return [("CUDAExecutionProvider", {"device_id": device.index or 0, "use_tf32": 0}), "CPUExecutionProvider"]


def default_onnx_dir(pool: SlotPool, base_path: str, quantize: Optional[str], lora_op: str = "auto",
                     bf16_lora: bool = False) -> str:
    key = json.dumps([os.path.realpath(base_path), pool.slots, pool.r_max, sorted(pool.layers), quantize,
                      lora_op, GRAPH_FORMAT] + (["bf16-lora"] if bf16_lora else []))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "onnx", digest)


class OnnxEngine:
    name = "onnx"

    def __init__(self, pool: SlotPool, model_dir: str, providers: Optional[list] = None,
                 threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        from adapterserve.runtime.engine.onnx.export import FUSED_OP, META_FILE, MODEL_FILE, SLOT_WEIGHTS_FILE, slot_inputs

        self.pool = pool
        self.base = pool.base
        slots_from = pool
        meta_path = os.path.join(model_dir, META_FILE)
        if not os.path.exists(meta_path):
            raise ConfigError(f"{model_dir} has no {META_FILE}; export it with `adapterserve export shared`")
        with open(meta_path) as fh:
            meta = json.load(fh)
        want = [{"name": n, "d_in": l.d_in, "d_out": l.d_out} for n, l in slots_from.layers.items()]
        if meta["hidden_size"] != self.base.hidden_size or meta["layers"] != want:
            raise ConfigError(
                f"the ONNX model in {model_dir} was exported for another base (hidden size {meta['hidden_size']}, "
                f"{len(meta['layers'])} slot layers) than the one loaded (hidden size {self.base.hidden_size}, "
                f"{len(want)} slot layers); re-export it for this base")
        if meta["r_max"] != slots_from.r_max:
            raise ConfigError(f"the ONNX model has r_max {meta['r_max']}, the server {slots_from.r_max}; they must match")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.fused_op = meta.get("lora_op") == FUSED_OP
        if self.fused_op:
            from adapterserve.runtime.native import ort_ops

            path = ort_ops.library_path()
            if path is not None and meta.get("lora_op_abi") != ort_ops.ABI:
                raise ConfigError(f"the ONNX model in {model_dir} was exported for {FUSED_OP} ABI "
                                  f"{meta.get('lora_op_abi')}, this build has {ort_ops.ABI}; re-export it "
                                  "(delete the directory, or `adapterserve export shared`)")
            if path is None:
                raise ConfigError(f"the ONNX model in {model_dir} uses the {FUSED_OP} op, which cannot be built here "
                                  f"({ort_ops.unavailable_reason()}); re-export it with stock ops "
                                  "(`adapterserve export shared --lora-op stock`, or serve with --lora-kernel torch)")
            options.register_custom_ops_library(path)
        self.device = slots_from.base.device
        providers = providers or providers_for(self.device)
        self.session = open_session(os.path.join(model_dir, MODEL_FILE), options, providers)
        # On the CUDA provider every tensor is bound where it lives (slot buffers, batch, output) by
        # address: nothing crosses the bus per forward but the small per-batch inputs ORT copies itself.
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        if self.on_cuda != (self.device.type == "cuda"):
            raise ConfigError(f"ONNX Runtime runs on {self.session.get_providers()[0]} but the base is on "
                              f"{self.device}; they must match")
        if self.on_cuda and self.fused_op:
            raise ConfigError(f"the ONNX model in {model_dir} uses {FUSED_OP}, a CPU kernel; export the CUDA "
                              "graph with stock ops (`adapterserve export shared --lora-op stock`)")
        # "packed": each forward is one run of the rows' real tokens back to back (no padding).
        self.packed = meta.get("layout") == "packed"
        self.position_offset = int(meta.get("position_offset", 0))
        # Graphs with per-feature vector inputs (IA3, DoRA, trained biases) and the layers whose input they scale.
        self.takes_vectors = bool(meta.get("vectors"))
        self.in_scale_layers = set(meta.get("in_scale_layers", ()))
        # build_info's lora_path: the fused kernel as an ORT op, or stock Gather/MatMul nodes.
        self.kernel_name = "onnx-op" if self.fused_op else "onnx-graph"
        self.graph_inputs = {i.name for i in self.session.get_inputs()}
        # The slot buffers are only ever written in place (copy_), so their numpy views are made once
        # here, not per forward: every forward feeds the same arrays, whose contents the registry changes.
        if self.takes_vectors:
            for layer in slots_from.layers.values():
                layer.ensure_vectors()
        layout = slot_inputs(slots_from.layers, self.fused_op, self.in_scale_layers)
        self.slot_feed = {name: getattr(slots_from.layers[layer], attr) for name, layer, attr in layout
                          if self.takes_vectors or attr in ("lora_a", "lora_b", "slot_r8")}
        # bf16 LoRA slots (int8 graph on AMX): the graph reads packed bf16 copies of the slot buffers,
        # kept here and rewritten for each slot the registry loads (load_slot).
        self.bf16_lora = meta.get("lora_precision") == "bf16"
        self._bf16_slots: list[tuple] = []  # (slot layer, its packed A^T, its packed B)
        if self.bf16_lora:
            from adapterserve.runtime.native import ort_ops

            if not ort_ops.amx_bf16_available():
                log.warning("the ONNX graph in %s has bf16 LoRA ops but AMX does not run here: they take their "
                            "portable loop, 10-18x slower than the fp32 op; re-export it on this machine", model_dir)
            for i, layer in enumerate(slots_from.layers.values()):
                at, bp = ort_ops.pack_bf16_a(layer.lora_a), ort_ops.pack_bf16_b(layer.lora_b)
                self._bf16_slots.append((layer, at, bp))
                self.slot_feed[f"lora_a_{i}"], self.slot_feed[f"lora_b_{i}"] = at, bp
        self.slot_feed = {k: v for k, v in self.slot_feed.items() if k in self.graph_inputs}
        # The slot inputs (111 on MiniLM) are bound once per model thread (an IOBinding is not shared between
        # threads); a forward binds only its few per-batch inputs. Passing every input to run() each
        # time cost ~150 us per forward (0.86 -> 0.71 ms for one 4-token text, docs/benchmarks.md).
        self._bindings = threading.local()
        self.quantize = meta.get("quantize")
        self.model_dir = model_dir
        weights = os.path.join(model_dir, SLOT_WEIGHTS_FILE)
        pool.released_weights = weights if os.path.exists(weights) else None  # else DoRA is refused, saying why
        self.released_bytes = _release_backbone_weights(pool.base)
        log.info("ONNX engine on %s (%s); released %.1f MB of torch backbone weights", self.session.get_providers()[0],
                 self.quantize or "fp32", self.released_bytes / 1e6)

    # The pool validates and owns the slot buffers; the graph reads them in place.
    @property
    def layers(self):
        return self.pool.layers

    @property
    def shape(self):
        return self.pool.shape

    @property
    def slots(self):
        return self.pool.slots

    @property
    def slot_ranks(self):
        return self.pool.slot_ranks

    @property
    def merged_slot(self):
        return None

    def refuses(self, spec) -> Optional[str]:
        if spec.prompt is not None:
            return (f"{spec.kind()} adapters put virtual tokens before each row's own, which the shared ONNX graph has "
                    "no input for; serve them with --engine torch")
        if spec.bottlenecks:
            return (f"{spec.kind()} adapters add a small network at sublayer outputs, which the shared ONNX graph "
                    "has no inputs for; serve them with --engine torch")
        if spec.prefix is not None:
            return (f"{spec.kind()} adapters add keys and values to every attention layer, which the shared ONNX graph "
                    "has no input for; serve them with --engine torch")
        if spec.kron:
            return (f"{spec.kind()} adapters above r_max {self.pool.r_max} are applied from their Kronecker factors, "
                    "which the shared ONNX graph has no inputs for; serve them with --engine torch, or export the graph "
                    f"with a --r-max of at least {max(m.rank for m in spec.kron.values())} (they then convert to LoRA)")
        if spec.vectors and not self.takes_vectors:
            return (f"{spec.kind()} adapters set per-feature vectors, which this shared ONNX graph (exported before "
                    "it took them) has no inputs for; re-export it, or serve them with --engine torch")
        for name, vectors in spec.vectors.items():
            if vectors.in_scale is not None and name not in self.in_scale_layers:
                return (f"{spec.kind()} adapters scale the input of {name}, which the shared ONNX graph takes no scale "
                        "for (that input feeds other nodes too: q/k/v's shared projection or a residual, so scaling "
                        "it would cost a copy on every forward); serve them with --engine torch, or train without "
                        "that feed-forward module")
        return None

    def load_slot(self, slot, spec) -> None:
        self.pool.load_slot(slot, spec)
        if self._bf16_slots:
            from adapterserve.runtime.native.ort_ops import pack_bf16_a, pack_bf16_b

            with torch.inference_mode():
                for layer, at, bp in self._bf16_slots:
                    if layer.slot_r8[slot]:  # a layer the adapter leaves alone is never read for it
                        at[slot].copy_(pack_bf16_a(layer.lora_a[slot]))
                        bp[slot].copy_(pack_bf16_b(layer.lora_b[slot]))
        if self.on_cuda:
            torch.cuda.synchronize(self.device)  # ORT reads the slot buffers on its own stream

    def clear_slot(self, slot) -> None:
        self.pool.clear_slot(slot)

    def slot_bytes(self) -> int:
        return self.pool.slot_bytes()

    def merge(self, slot) -> None:
        raise NotSupportedError("merged mode is served by the torch engine; the ONNX engine applies adapters through slots")

    def unmerge(self) -> None:
        pass

    def batch_feed(self, inputs: dict[str, torch.Tensor], slots: list[int],
                   lengths: Optional[list[int]] = None) -> dict:
        """The graph's per-batch inputs for a padded batch (padding on the right); with `slot_feed`
        they are every input the graph takes. Packed layout: the rows' real tokens back to back,
        each row's position ids from its own start, and the rows' offsets."""
        if self.packed:
            packed = packing.pack(inputs, self.position_offset)
            feed = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
                    "row_offsets": packed["row_offsets"], "slot_per_row": np.asarray(slots, dtype=np.int64)}
            if "token_type_ids" in self.graph_inputs:
                feed["token_type_ids"] = packed["token_type_ids"]
            return feed
        feed = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "slot_per_row": np.asarray(slots, dtype=np.int64),
        }
        if self.fused_op:
            width = inputs["input_ids"].shape[1]
            feed["row_lengths"] = (np.asarray(lengths, dtype=np.int64) if lengths is not None
                                   else np.full(len(slots), width, dtype=np.int64))
        if "token_type_ids" in self.graph_inputs:
            types = inputs.get("token_type_ids")
            feed["token_type_ids"] = types if types is not None else torch.zeros_like(inputs["input_ids"])
        return feed

    def encode(self, inputs: dict[str, torch.Tensor], slots: list[int],
               lengths: Optional[list[int]] = None) -> torch.Tensor:
        return self._run(self.batch_feed(inputs, slots, lengths))

    def _run(self, feed: dict) -> torch.Tensor:
        binding = getattr(self._bindings, "value", None)
        if binding is None:
            binding = self.session.io_binding()
            for name, tensor in self.slot_feed.items():
                self._bind(binding, name, tensor)  # the slot buffers' own memory: slot writes reach it
            self._bindings.value = binding
        bound = [self._bind(binding, name, value) for name, value in feed.items()]  # alive until the run ends
        if not self.on_cuda:
            binding.bind_output("features")  # unallocated each run: ORT sizes it to this batch
            self.session.run_with_iobinding(binding)
            (features,) = binding.copy_outputs_to_cpu()
            return torch.from_numpy(features)
        rows = len(feed["slot_per_row"])
        features = torch.empty(rows, self.base.hidden_size, dtype=torch.float32, device=self.device)
        binding.bind_output("features", "cuda", self.device.index or 0, np.float32, list(features.shape),
                            features.data_ptr())
        # The batch was copied to the GPU on torch's stream; ORT runs on its own, so wait for the copy.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)  # returns once its stream is done: features are written
        del bound
        return features

    def _bind(self, binding, name: str, value):
        """Bind one input; returns what must stay alive until the run (ORT reads a CUDA input in place)."""
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            value = value.contiguous()
            binding.bind_input(name, "cuda", value.device.index or 0, _NUMPY_DTYPES[value.dtype], list(value.shape),
                               value.data_ptr())
            return value
        if isinstance(value, torch.Tensor):
            value = value.numpy()
        value = np.ascontiguousarray(value)
        binding.bind_cpu_input(name, value)
        return value


_NUMPY_DTYPES = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}


def _release_backbone_weights(base: BaseModel) -> int:
    """The session holds the base weights now; the torch backbone was needed only to export. Drop its
    parameters (keeping the slot buffers, which feed the graph) so the base is not resident twice."""
    released = 0
    for module in base.backbone.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                released += param.numel() * param.element_size()
                module._parameters[name] = None
    if base.device.type == "cuda":
        torch.cuda.empty_cache()  # hand the freed weights back to the device, where ORT allocates its own
    return released
