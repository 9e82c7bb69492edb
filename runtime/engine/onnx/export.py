"""Shared-base ONNX export: the slot-wrapped encoder with every layer's slot tensors and the per-row
slot index as graph inputs, base weights as initializers. One ONNX Runtime session then serves every
task, mixed in one run; registering a task changes inputs, never the graph.

Exported with torch.onnx.export (TorchScript exporter, dynamo=False) with dynamic batch and
sequence axes; optimum's exporter only knows stock architectures, not graphs with extra inputs.
Each slot layer becomes one `adapterserve.SlotLoRA` node (the fused kernel as an ONNX Runtime custom
op, runtime/native/csrc/ort_lora_op.c; graph inputs add each layer's rank table and the rows' real lengths)
where that op can be built, else stock Gather/MatMul/Add nodes (`lora_op` in shared_base.json).

Two layouts (`layout` in shared_base.json). "packed" (BERT/RoBERTa with the fused op): every row's
real tokens back to back as [1, N] inputs with row offsets, `adapterserve.SlotLoRAPacked` and our
`adapterserve.VarlenAttention`, so a pool of rows of any lengths is one forward with no padding.
"padded" (DistilBERT, whose attention is not swapped, and the stock-op graph): [rows, T] with an
attention mask and ORT's MultiHeadAttention where it applies.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
from typing import Optional

import torch
from torch import nn

from adapterserve.runtime.engine.batch import TracedSlots
from adapterserve.runtime.engine.torch_engine import TorchEngine
from adapterserve.runtime.engine import packing
from adapterserve.runtime.native.ort_ops import ABI as OP_ABI
from adapterserve.runtime.engine.slot_layers import SlotLoRALinear

log = logging.getLogger(__name__)

META_FILE = "shared_base.json"
MODEL_FILE = "model.onnx"
# The slot layers' fp32 base weights and biases ("<layer>.weight", "<layer>.bias"), which the engine
# releases once the graph holds them: read back (memory-mapped) only to register an adapter whose
# values depend on them (DoRA's weight norm, a trained bias's difference from the base's).
SLOT_WEIGHTS_FILE = "slot_layer_weights.safetensors"
OPSET = 18


FUSED_OP = "adapterserve.SlotLoRA"
STOCK_OPS = "gather"


class _MultiHeadAttention(torch.autograd.Function):
    """Export-time only: traces as ORT's fused com.microsoft.MultiHeadAttention on the projected
    q/k/v. The LoRA nodes on q/k/v keep ORT's optimizer from matching its Attention pattern, which
    left attention as a dozen stock nodes (reshapes, transposes, scaled MatMul, Softmax): a quarter
    of the int8 graph's time. The forward is the reference the op must equal."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, num_heads, hidden):  # noqa: ARG004 - ctx unused
        b, t, d = q.shape
        heads = [z.view(b, -1, num_heads, d // num_heads).transpose(1, 2) for z in (q, k, v)]
        mask = key_padding_mask.bool()[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(*heads, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, d)

    @staticmethod
    def symbolic(g, q, k, v, key_padding_mask, num_heads, hidden):
        # The optional bias input comes before the mask: a zero bias (q/k/v already carry theirs).
        bias = g.op("Constant", value_t=torch.zeros(3 * hidden))
        return g.op("com.microsoft::MultiHeadAttention", q, k, v, bias, key_padding_mask,
                    num_heads_i=num_heads).setType(q.type())


def _qkv(attention, hidden_states):
    """q, k, v of one self-attention. With all three slot-wrapped, their base projections become one
    packed [d, 3d] MatMul (one int8 GEMM after quantization, which ORT splits across threads, instead
    of three small ones that it runs on one), then each gets its own LoRA node."""
    layers = (attention.query, attention.key, attention.value)
    if not all(isinstance(x, SlotLoRALinear) and isinstance(x.base, nn.Linear) and x.base.bias is not None
               for x in layers):
        return tuple(x(hidden_states) for x in layers)
    weight = torch.cat([x.base.weight for x in layers])
    bias = torch.cat([x.base.bias for x in layers])
    packed = torch.nn.functional.linear(hidden_states, weight, bias)
    if attention.query.context.traced.fused_op:
        # Each LoRA node reads its columns of the packed output itself: no Split copy in between.
        offsets = [0, layers[0].d_out, layers[0].d_out + layers[1].d_out]
        return tuple(x._traced_forward(hidden_states, packed, off) for x, off in zip(layers, offsets))
    ys = packed.split([x.d_out for x in layers], dim=-1)
    return tuple(x._traced_forward(hidden_states, y) for x, y in zip(layers, ys))


class _FusedAttention:
    """Swaps the self-attention forwards for the fused op while the graph is traced: ORT's
    MultiHeadAttention over padded rows, or (offsets given) our VarlenAttention over packed tokens."""

    def __init__(self, backbone, key_padding_mask: Optional[torch.Tensor], offsets: Optional[torch.Tensor] = None) -> None:
        self.modules = packing.swappable_attention(backbone)
        self.mask = key_padding_mask
        self.offsets = offsets

    def __enter__(self):
        from adapterserve.runtime.engine.onnx.ops import VarlenAttentionFunction

        for m in self.modules:
            def forward(hidden_states, *args, _m=m, **kwargs):
                q, k, v = _qkv(_m, hidden_states)
                if self.offsets is not None:
                    heads = torch.tensor([_m.num_attention_heads])
                    return VarlenAttentionFunction.apply(q, k, v, self.offsets, heads), None
                return _MultiHeadAttention.apply(q, k, v, self.mask, _m.num_attention_heads, _m.all_head_size), None
            m.forward = forward
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            del m.forward  # back to the class's forward


def _traced_slots(layout: list, slot_tensors: tuple, slot_per_row, fused_op: bool, row_lengths=None,
                  offsets=None) -> TracedSlots:
    """The graph's slot inputs (in `slot_inputs` order) as the slot layers read them while traced."""
    by_layer: dict = collections.defaultdict(dict)
    for (_, layer, attr), tensor in zip(layout, slot_tensors):
        by_layer[layer][attr] = tensor
    tensors = {n: (t.pop("lora_a"), t.pop("lora_b")) for n, t in by_layer.items()}
    r8 = {n: t.pop("slot_r8") for n, t in by_layer.items()} if fused_op else None
    return TracedSlots(slot_per_row, tensors, fused_op, r8, row_lengths, offsets, vectors=dict(by_layer))


class _SharedBaseGraph(nn.Module):
    def __init__(self, engine: TorchEngine, uses_token_types: bool, fused_op: bool, layout: list) -> None:
        super().__init__()
        self.engine = engine
        self.backbone = engine.base.backbone
        self.layout = layout
        self.uses_token_types = uses_token_types
        self.fused_op = fused_op

    def forward(self, input_ids, attention_mask, token_type_ids, slot_per_row, row_lengths, *slot_tensors):
        self.engine.context.traced = _traced_slots(self.layout, slot_tensors, slot_per_row, self.fused_op,
                                                   row_lengths)
        try:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.uses_token_types:
                kwargs["token_type_ids"] = token_type_ids
            with _FusedAttention(self.backbone, attention_mask.to(torch.int32)):
                out = self.backbone(**kwargs)
        finally:
            self.engine.context.traced = None
        if self.engine.base.family.uses_pooler:
            return out.pooler_output
        return out.last_hidden_state[:, 0]


class _PackedSharedBaseGraph(nn.Module):
    """The same encoder over token-packed rows: every token of every row in one [1, N] run, so no
    padded position is computed and a whole pool is one forward. Attention stays within each row
    (adapterserve.VarlenAttention); the pooler reads each row's first token."""

    def __init__(self, engine: TorchEngine, uses_token_types: bool, layout: list) -> None:
        super().__init__()
        self.engine = engine
        self.backbone = engine.base.backbone
        self.layout = layout
        self.uses_token_types = uses_token_types

    def forward(self, input_ids, position_ids, token_type_ids, offsets, slot_per_row, *slot_tensors):
        lengths = offsets[1:] - offsets[:-1]
        self.engine.context.traced = _traced_slots(self.layout, slot_tensors, slot_per_row, True, lengths, offsets)
        try:
            kwargs = {"input_ids": input_ids, "position_ids": position_ids}
            # Always where the embeddings have token types: without them RoBERTa expands its buffered
            # types ([1, max positions]) to [1, N], which fails once a pool packs more tokens than that.
            if self.uses_token_types or hasattr(self.backbone.embeddings, "token_type_embeddings"):
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.backbone.embeddings(**kwargs)
            with _FusedAttention(self.backbone, None, offsets):
                hidden = self.backbone.encoder(hidden)[0]
            first = hidden[0].index_select(0, offsets[:-1])  # [B, H]: each row's first token
            if self.engine.base.family.uses_pooler:
                return self.backbone.pooler(first.unsqueeze(1))
            return first
        finally:
            self.engine.context.traced = None


PACKED_INPUTS = ["input_ids", "position_ids", "token_type_ids", "row_offsets", "slot_per_row"]
PADDED_INPUTS = ["input_ids", "attention_mask", "token_type_ids", "slot_per_row", "row_lengths"]
# Slot layer attribute -> graph input name prefix (the layer's index follows).
_SLOT_INPUT_NAMES = {"lora_a": "lora_a", "lora_b": "lora_b", "slot_r8": "lora_r8", "out_scale": "out_scale",
                     "out_shift": "out_shift", "vector_flags": "vector_flags", "in_scale": "in_scale"}


def slot_inputs(layers: dict, fused_op: bool, in_scale_layers) -> list[tuple[str, str, str]]:
    """(graph input, slot layer name, its buffer's attribute) of every slot input, in graph order: each
    layer's LoRA factors (and rank table with the op), its output scale and shift (and the slots' vector
    flags with the op), and its input scale where the graph takes one (`in_scale_layers`)."""
    found = []
    for i, name in enumerate(layers):
        attrs = ["lora_a", "lora_b"] + (["slot_r8"] if fused_op else []) + ["out_scale", "out_shift"]
        attrs += (["vector_flags"] if fused_op else []) + (["in_scale"] if name in in_scale_layers else [])
        found += [(f"{_SLOT_INPUT_NAMES[a]}_{i}", name, a) for a in attrs]
    return found


def in_scale_layers(engine: TorchEngine) -> list[str]:
    """Slot layers whose input the graph scales per row (IA3's feed-forward vectors): all but q/k/v
    where `_qkv` computes their base projections as one product of the shared hidden states."""
    shared = set()
    for attention in packing.swappable_attention(engine.base.backbone):
        layers = (attention.query, attention.key, attention.value)
        if all(isinstance(x, SlotLoRALinear) and isinstance(x.base, nn.Linear) and x.base.bias is not None
               for x in layers):
            shared.update(x.name for x in layers)
    return [n for n in engine.layers if n not in shared]


def fused_op_applies(engine: TorchEngine) -> Optional[str]:
    """None when every slot layer can use the ONNX Runtime LoRA op, else why not."""
    from adapterserve.runtime.native.lora_kernel import FusedLoRA
    from adapterserve.runtime.native.ort_ops import library_path, unavailable_reason

    if library_path() is None:
        return f"the op library cannot be built: {unavailable_reason()}"
    for name, layer in engine.layers.items():
        if not FusedLoRA.applies(layer.d_in, layer.d_out, engine.r_max, layer.lora_a.dtype, layer.lora_a.device):
            return (f"layer {name} ({layer.d_in}->{layer.d_out}, r_max {engine.r_max}) does not fit the kernel "
                    "(dims multiples of 16, r_max a multiple of 8 and <= 64)")
    return None


def bf16_lora_default(quantize: Optional[str], lora_op: str) -> bool:
    """Whether an int8 graph gets the bf16 LoRA ops by default: where they run on AMX tiles here."""
    from adapterserve.runtime.native.ort_ops import amx_bf16_available

    return quantize == "int8" and lora_op != "stock" and amx_bf16_available()


def export_shared_base(engine: TorchEngine, tokenizer, out_dir: str, quantize: Optional[str] = None,
                       optimize: bool = True, lora_op: str = "auto", packed: Optional[bool] = None,
                       bf16_lora: Optional[bool] = None) -> str:
    """Write model.onnx (+ shared_base.json and the tokenizer) to out_dir; returns the model path.
    lora_op: "auto" (the fused op where it applies), "fused" (refuse if it does not), "stock".
    packed: token-packed rows (None: wherever the fused op and the attention swap apply).
    bf16_lora: the int8 graph's LoRA ops take bf16 slots (runtime/native/csrc/lora_amx.c); None: where AMX runs."""
    if engine.base.precision not in ("fp32",):
        raise ValueError(f"export the shared base from an fp32 base, not {engine.base.precision}; "
                         "use --quantize int8 for an int8 graph")
    if lora_op not in ("auto", "fused", "stock"):
        raise ValueError(f"lora_op must be auto, fused or stock, not {lora_op!r}")
    fused = False
    if lora_op != "stock":
        why_not = fused_op_applies(engine)
        if why_not and lora_op == "fused":
            raise ValueError(f"the ONNX Runtime LoRA op cannot be used: {why_not}")
        if why_not:
            log.warning("shared graph uses stock ops for LoRA: %s", why_not)
        fused = why_not is None
    why_not_packed = ("the fused LoRA op is not used" if not fused
                      else packing.packed_applies(engine.base.backbone, engine.base.family.name))
    if packed and why_not_packed:
        raise ValueError(f"the token-packed graph cannot be exported: {why_not_packed}")
    packed = why_not_packed is None if packed is None else packed
    os.makedirs(out_dir, exist_ok=True)
    uses_types = "token_type_ids" in tokenizer.model_input_names
    fp32_path = os.path.join(out_dir, "model_fp32.onnx")
    for layer in engine.layers.values():
        layer.ensure_vectors()  # graph inputs whether or not an adapter has set vectors yet
    scaled_inputs = in_scale_layers(engine)
    layout = slot_inputs(engine.layers, fused, scaled_inputs)
    if packed:
        _export_packed(engine, uses_types, fp32_path, layout)
    else:
        _export_padded(engine, uses_types, fused, fp32_path, layout)
    path = fp32_path
    if optimize:
        path = _optimize(path, engine, os.path.join(out_dir, "model_opt.onnx"), fused)
    if quantize == "int8":
        path = quantize_int8(path, os.path.join(out_dir, "model_int8.onnx"))
    bf16_lora = bf16_lora_default(quantize, lora_op) if bf16_lora is None else bf16_lora
    if bf16_lora and (quantize != "int8" or not fused):
        raise ValueError("bf16 LoRA slots are for the int8 graph with the fused op; the fp32 graph stays fp32")
    if bf16_lora:
        path = _bf16_lora_ops(path, engine, os.path.join(out_dir, "model_int8_bf16lora.onnx"))
    if fused:
        path = _fold_into_lora_ops(path, os.path.join(out_dir, "model_folded.onnx"))
        import onnx

        kept = {i.name for i in onnx.load(path).graph.input}
        scaled_inputs = [layer for name, layer, attr in layout if attr == "in_scale" and name in kept]
    final = os.path.join(out_dir, MODEL_FILE)
    if path != final:
        shutil.copyfile(path, final)
    tokenizer.save_pretrained(out_dir)
    _save_slot_layer_weights(engine, os.path.join(out_dir, SLOT_WEIGHTS_FILE))
    meta = {
        "format": "adapterserve-shared-base/1",
        "family": engine.base.family.name,
        "hidden_size": engine.base.hidden_size,
        "max_length": engine.base.max_length,
        "slots": engine.slots,
        "r_max": engine.r_max,
        "quantize": quantize,
        "lora_op": FUSED_OP if fused else STOCK_OPS,
        "lora_op_abi": OP_ABI if fused else None,
        # "bf16": the LoRA ops read bf16 slots (int32 pair layouts, runtime/ort_lora_op.pack_bf16_*).
        "lora_precision": "bf16" if bf16_lora else "fp32",
        "layers": [{"name": n, "d_in": l.d_in, "d_out": l.d_out} for n, l in engine.layers.items()],
        "uses_token_types": uses_types,
        # "packed": rows' tokens back to back ([1, N] inputs, row_offsets); "padded": [B, T] rows.
        "layout": "packed" if packed else "padded",
        "position_offset": engine.position_offset,
        # Per-feature vectors (IA3, DoRA, trained biases): every layer's output scale and shift are
        # inputs; input scales only for these layers (in_scale_layers).
        "vectors": True,
        "in_scale_layers": scaled_inputs,
    }
    with open(os.path.join(out_dir, META_FILE), "w") as fh:
        json.dump(meta, fh, indent=1)
    return final


def _save_slot_layer_weights(engine: TorchEngine, path: str) -> None:
    from safetensors.torch import save_file

    weights = {}
    for name, layer in engine.layers.items():
        for kind in ("weight", "bias"):
            value = getattr(layer.base, kind, None) if type(layer.base) is nn.Linear else None
            if value is not None:
                weights[f"{name}.{kind}"] = value.detach().float().cpu().contiguous()
    partial = path + ".partial"
    save_file(weights, partial)
    os.replace(partial, path)


def _bf16_lora_ops(path: str, engine: TorchEngine, out: str) -> str:
    """The graph with SlotLoRA(Packed) nodes as their BF16 variants, whose A/B inputs (lora_a_i,
    lora_b_i) become int32 [slots, ...] in the pair layouts of runtime/native/csrc/lora_amx.c."""
    import onnx

    from adapterserve.runtime.native.ort_ops import DOMAIN, OP_TYPE, PACKED_OP_TYPE, bf16_a_shape, bf16_b_shape

    model = onnx.load(path)
    graph = model.graph
    variants = {OP_TYPE: OP_TYPE + "BF16", PACKED_OP_TYPE: PACKED_OP_TYPE + "BF16"}
    shapes = {}
    for i, layer in enumerate(engine.layers.values()):
        shapes[f"lora_a_{i}"] = bf16_a_shape(engine.r_max, layer.d_in)
        shapes[f"lora_b_{i}"] = bf16_b_shape(engine.r_max, layer.d_out)
    retyped = set()
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type in variants:
            node.op_type = variants[node.op_type]
            retyped.update(node.input[2:4])
        elif set(node.input) & set(shapes):
            raise ValueError(f"slot input of {node.op_type} node {node.name} is not a LoRA op's: cannot make it bf16")
    if retyped != set(shapes):
        raise ValueError(f"the LoRA ops' slot inputs are not the graph's slot inputs ({sorted(retyped ^ set(shapes))})")
    for graph_input in graph.input:
        if graph_input.name in shapes:
            graph_input.CopyFrom(onnx.helper.make_tensor_value_info(
                graph_input.name, onnx.TensorProto.INT32, ["slots", *shapes[graph_input.name]]))
    onnx.save(model, out)
    return out


def _fold_into_lora_ops(path: str, out: str) -> str:
    """The nodes right after the LoRA ops folded into them (runtime/native/csrc/row_epilogue.c): each saves a
    pass over [tokens, width] and one node, as the op applies it while the row is in cache."""
    import onnx

    model = onnx.load(path)
    _fuse_qkv(model.graph)
    _fold_residual_adds(model.graph)
    _fold_gelus(model.graph)
    _fold_layer_norms(model.graph)
    _fold_row_scales(model.graph)
    _in_place_lora_ops(model.graph)
    _drop_copying_row_scales(model.graph)
    onnx.save(model, out)
    return out


# A LoRA node as traced: y, x, A, B, slot_r8, slot_per_row, lengths/offsets, y_offset, then the slots'
# output scale, output shift and vector flags (runtime/native/csrc/ort_lora_op.c); folds append after.
LORA_INPUTS = 11
RESIDUAL_INPUT, ACTIVATION_INPUT, LAYER_NORM_INPUTS, POST_SCALE_INPUTS = 11, 12, 13, 16


def _set_inputs(node, first: int, names: list) -> None:
    """node's optional inputs from `first` on, the ones between left empty."""
    node.input.extend([""] * (first - len(node.input)) + names)


def _fuse_qkv(graph) -> None:
    """Each self-attention's q, k and v LoRA nodes (token-packed layout), which all read one packed
    [N, dq + dk + dv] base projection at column offsets 0, dq, dq + dk, replaced by one
    SlotLoRAQKVPacked(BF16) node that adds the three deltas in place; its VarlenAttention then reads
    the packed output (k and v inputs left empty). Saves copying q, k and v out of the packed tensor
    and two of three trips to the thread pool per layer (runtime/native/csrc/ort_lora_op.c, compute_qkv)."""
    import onnx

    from adapterserve.runtime.native.ort_ops import ATTENTION_OP_TYPE, DOMAIN, PACKED_OP_TYPE, QKV_OP_TYPE

    produced_by = {o: n for n in graph.node for o in n.output}
    consumers, constants = _readers(graph), _constant_values(graph)
    widths = {}  # slot B inputs' last dim (d_out), static in the exported graph
    for graph_input in graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            widths[graph_input.name] = dims[-1].dim_value
    removed = []
    for attention in graph.node:
        if attention.domain != DOMAIN or attention.op_type != ATTENTION_OP_TYPE or len(attention.input) != 5:
            continue
        parts = [produced_by.get(i) for i in attention.input[:3]]
        if any(p is None or p.domain != DOMAIN or not p.op_type.startswith(PACKED_OP_TYPE) or len(p.input) != LORA_INPUTS
               or consumers[p.output[0]] != 1 for p in parts):
            continue
        q, k, _ = parts
        if (len({p.op_type for p in parts}) != 1 or len({tuple(p.input[i] for i in (0, 1, 5, 6)) for p in parts}) != 1
                or consumers[q.input[0]] != 3 or any(p.input[3] not in widths or p.input[7] not in constants for p in parts)):
            continue
        offsets = [int(constants[p.input[7]].reshape(-1)[0]) for p in parts]
        if offsets != [0, widths[q.input[3]], widths[q.input[3]] + widths[k.input[3]]]:
            continue
        fused = onnx.helper.make_node(
            q.op_type.replace(PACKED_OP_TYPE, QKV_OP_TYPE),
            [q.input[0], q.input[1], *[p.input[i] for p in parts for i in (2, 3, 4, 8, 9, 10)], q.input[5], q.input[6]],
            [q.input[0] + "_qkv_lora"], name=q.name + "_qkv", domain=DOMAIN)
        graph.node.insert(list(graph.node).index(q), fused)
        attention.input[0], attention.input[1], attention.input[2] = fused.output[0], "", ""
        removed += parts
    for node in removed:
        graph.node.remove(node)
    # The y_offset constants only the removed nodes read (ORT warns about unused initializers at load).
    still_read = {i for n in graph.node for i in n.input}
    orphans = {p.input[7] for p in removed} - still_read
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in orphans]:
        graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name in orphans]:
        graph.initializer.remove(init)


def _readers(graph) -> collections.Counter:
    """How many nodes read each tensor."""
    return collections.Counter(i for n in graph.node for i in n.input)


def _constant_values(graph) -> dict:
    """Initializers and Constant nodes' outputs by name, as numpy arrays."""
    import onnx

    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    return values


def _lora_output_folds(graph):
    """(LoRA op producing each tensor, how many nodes read each tensor, graph outputs), for folding a
    node into the op that feeds it: allowed only when the op's output has no other reader."""
    from adapterserve.runtime.native.ort_ops import DOMAIN

    lora_by_output = {n.output[0]: n for n in graph.node if n.domain == DOMAIN and n.op_type.startswith("SlotLoRA")}
    return lora_by_output, _readers(graph), {o.name for o in graph.output}


def _fold_residual_adds(graph) -> None:
    """Each residual Add that takes a LoRA op's output (attention.output.dense and output.dense in BERT
    layers) folded into that op as its optional input 11. Same sum, same order: (y + delta) + residual."""
    lora_by_output, consumers, outputs = _lora_output_folds(graph)
    constants = set(_constant_values(graph))
    removed = []
    for add in graph.node:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        for k in (0, 1):
            lora, residual = lora_by_output.get(add.input[k]), add.input[1 - k]
            if (lora is not None and len(lora.input) == LORA_INPUTS and consumers[add.input[k]] == 1
                    and add.input[k] not in outputs and residual not in constants):  # an activation, not a bias
                _set_inputs(lora, RESIDUAL_INPUT, [residual])
                lora.output[0] = add.output[0]
                removed.append(add)
                break
    for add in removed:
        graph.node.remove(add)


GELU_ACTIVATION = "lora_activation_gelu"  # the int64 [1] initializer = 1 that turns on the op's GELU


def _fold_gelus(graph) -> None:
    """Each exact GELU (ORT's fused com.microsoft Gelu, intermediate.dense in BERT layers) of a LoRA op's
    output folded into that op as its optional input 12 (input 11, the residual, left empty where absent)."""
    import numpy as np
    import onnx

    lora_by_output, consumers, outputs = _lora_output_folds(graph)
    removed = []
    for gelu in graph.node:
        lora = lora_by_output.get(gelu.input[0]) if gelu.input else None
        if (gelu.op_type != "Gelu" or gelu.domain != "com.microsoft" or lora is None
                or len(lora.input) > ACTIVATION_INPUT or consumers[gelu.input[0]] != 1 or gelu.input[0] in outputs):
            continue
        _set_inputs(lora, ACTIVATION_INPUT, [GELU_ACTIVATION])
        lora.output[0] = gelu.output[0]
        removed.append(gelu)
    for gelu in removed:
        graph.node.remove(gelu)
    if removed:
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), GELU_ACTIVATION))


def _fold_layer_norms(graph) -> None:
    """Each LayerNormalization over the last axis of a LoRA op's output (the residual sums of
    attention.output and output in BERT layers, once their Adds are folded) folded into that op as its
    optional inputs 13-15: scale, bias and an epsilon initializer (inputs 11 and 12 left empty where absent)."""
    import numpy as np
    import onnx

    lora_by_output, consumers, outputs = _lora_output_folds(graph)
    initializers = {i.name for i in graph.initializer}
    removed = []
    for ln in graph.node:
        lora = lora_by_output.get(ln.input[0]) if ln.input else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ln.attribute}
        if (ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx") or lora is None
                or len(lora.input) > LAYER_NORM_INPUTS or consumers[ln.input[0]] != 1 or ln.input[0] in outputs
                or attrs.get("axis", -1) != -1 or attrs.get("stash_type", 1) != 1
                or len(ln.input) != 3 or not set(ln.input[1:]) <= initializers or any(ln.output[1:])):
            continue
        epsilon = f"{ln.output[0]}_epsilon"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([attrs.get("epsilon", 1e-5)], np.float32), epsilon))
        _set_inputs(lora, LAYER_NORM_INPUTS, [ln.input[1], ln.input[2], epsilon])
        lora.output[0] = ln.output[0]
        removed.append(ln)
    for ln in removed:
        graph.node.remove(ln)


def _fold_row_scales(graph) -> None:
    """Each SlotRowScale(Packed) of a LoRA op's output (the input scale of output.dense in BERT layers,
    whose input is intermediate.dense's GELU) folded into that op as its optional inputs 16-17: the
    scale table and its flags, applied last. The rest (inputs made by other nodes) stay as nodes."""
    from adapterserve.runtime.native.ort_ops import DOMAIN, QKV_OP_TYPE, ROW_SCALE_OP_TYPE

    lora_by_output, consumers, outputs = _lora_output_folds(graph)
    removed = []
    for scale in graph.node:
        lora = lora_by_output.get(scale.input[0]) if scale.input else None
        if (scale.domain != DOMAIN or not scale.op_type.startswith(ROW_SCALE_OP_TYPE) or lora is None
                or lora.op_type.startswith(QKV_OP_TYPE) or len(lora.input) > POST_SCALE_INPUTS
                or consumers[scale.input[0]] != 1 or scale.input[0] in outputs or lora.input[5] != scale.input[3]):
            continue
        _set_inputs(lora, POST_SCALE_INPUTS, [scale.input[1], scale.input[2]])
        lora.output[0] = scale.output[0]
        removed.append(scale)
    for scale in removed:
        graph.node.remove(scale)


def _drop_copying_row_scales(graph) -> None:
    """The SlotRowScale nodes left that would copy their input (another node reads it too: the input of
    intermediate.dense, which the residual also reads; DistilBERT's q/k/v) removed with their scale
    inputs, so no forward copies an input for a scale few adapters use (the copies' cost was not
    measurable: `cpu_probes row-scale-copies`, docs/benchmarks.md). The engine then refuses adapters that
    scale those layers' inputs (shared_base.json `in_scale_layers` lists the layers that kept theirs)."""
    from adapterserve.runtime.native.ort_ops import DOMAIN, ROW_SCALE_OP_TYPE

    copying = [n for n in graph.node if n.domain == DOMAIN and n.op_type in (ROW_SCALE_OP_TYPE, ROW_SCALE_OP_TYPE + "Packed")]
    for scale in copying:
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name == scale.output[0]:
                    node.input[k] = scale.input[0]
        graph.node.remove(scale)
    still_read = {i for n in graph.node for i in n.input}
    for graph_input in [i for i in graph.input if i.name.startswith("in_scale_") and i.name not in still_read]:
        graph.input.remove(graph_input)


IN_PLACE = "InPlace"  # op type suffix: the node writes into y's buffer (runtime/native/csrc/ort_lora_op.c, y_is_output)


def _in_place_lora_ops(graph) -> None:
    """Each LoRA node that is the only reader of its base projection y and starts at its column 0, and
    each SlotRowScale node that is the only reader of its x, renamed to its *InPlace variant, which ORT
    runs in that input's buffer: no copy of it into a fresh output per node (ORT never took up the ops' may-inplace hint: their outputs have no static shape)."""
    from adapterserve.runtime.native.ort_ops import DOMAIN, OP_TYPE, PACKED_OP_TYPE, ROW_SCALE_OP_TYPE

    consumers = _readers(graph)
    zero_offsets = {name for name, value in _constant_values(graph).items() if value.reshape(-1).tolist() == [0]}
    fixed = {i.name for i in graph.input} | {o.name for o in graph.output}
    singles = {t + b for t in (OP_TYPE, PACKED_OP_TYPE) for b in ("", "BF16")}
    row_scales = {ROW_SCALE_OP_TYPE, ROW_SCALE_OP_TYPE + "Packed"}
    for node in graph.node:
        if node.domain != DOMAIN or consumers[node.input[0]] != 1 or node.input[0] in fixed:
            continue
        if (node.op_type in singles and node.input[7] in zero_offsets) or node.op_type in row_scales:
            node.op_type += IN_PLACE


def _slot_tensors(engine: TorchEngine, layout: list) -> list:
    return [getattr(engine.layers[layer], attr) for _, layer, attr in layout]


def _export_packed(engine: TorchEngine, uses_types: bool, path: str, layout: list) -> None:
    graph = _PackedSharedBaseGraph(engine, uses_types, layout).eval()
    lengths = [3, 5]
    n = sum(lengths)
    ids = torch.ones(1, n, dtype=torch.long)
    positions = torch.cat([torch.arange(k) for k in lengths]).unsqueeze(0) + engine.position_offset
    types = torch.zeros(1, n, dtype=torch.long)
    offsets = torch.tensor([0, 3, 8], dtype=torch.long)
    slots = torch.tensor([0, 1], dtype=torch.long)
    slot_tensors = _slot_tensors(engine, layout)
    names = PACKED_INPUTS + [name for name, _, _ in layout]
    dynamic = {"input_ids": {1: "tokens"}, "position_ids": {1: "tokens"}, "token_type_ids": {1: "tokens"},
               "row_offsets": {0: "rows_plus_one"}, "slot_per_row": {0: "rows"}, "features": {0: "rows"}}
    for name in names[len(PACKED_INPUTS):]:
        dynamic[name] = {0: "slots"}
    with torch.no_grad():
        torch.onnx.export(graph, (ids, positions, types, offsets, slots, *slot_tensors), path, input_names=names,
                          output_names=["features"], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True, custom_opsets={"adapterserve": 1})


def _export_padded(engine: TorchEngine, uses_types: bool, fused: bool, fp32_path: str, layout: list) -> None:
    graph = _SharedBaseGraph(engine, uses_types, fused, layout).eval()
    batch, seq = 2, 8
    device = engine.base.device  # a CUDA base traces with CUDA inputs (same graph, same initializers)
    ids = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    types = torch.zeros(batch, seq, dtype=torch.long, device=device)
    slots = torch.tensor([0, 1], dtype=torch.long, device=device)
    lengths = torch.full((batch,), seq, dtype=torch.long, device=device)
    slot_tensors = _slot_tensors(engine, layout)
    names = PADDED_INPUTS + [name for name, _, _ in layout]
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
               "token_type_ids": {0: "batch", 1: "sequence"}, "slot_per_row": {0: "batch"},
               "row_lengths": {0: "batch"}, "features": {0: "batch"}}
    for n in names[len(PADDED_INPUTS):]:
        dynamic[n] = {0: "slots"}
    with torch.no_grad():
        torch.onnx.export(graph, (ids, mask, types, slots, lengths, *slot_tensors), fp32_path, input_names=names,
                          output_names=["features"], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True, custom_opsets={"adapterserve": 1, "com.microsoft": 1} if fused else {"com.microsoft": 1})


def _optimize(path: str, engine: TorchEngine, out: str, fused_op: bool) -> str:
    """ORT's transformer optimizer fuses LayerNorm/GELU (and attention where the pattern still
    matches with LoRA branches on q/k/v). Falls back to the unoptimized graph if it cannot run.
    With our custom op only its Python fusions run (opt_level 0): level 1 first loads the graph into
    an ORT session of its own, which does not know the op."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = engine.base.backbone.config
        model_type = {"bert": "bert", "distilbert": "bert", "roberta": "bert"}[engine.base.family.name]
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads")
        opt = optimize_model(path, model_type=model_type, num_heads=heads, hidden_size=engine.base.hidden_size,
                             opt_level=0 if fused_op else 1, use_gpu=False)
        opt.save_model_to_file(out)
        return out
    except Exception as e:  # noqa: BLE001 - an unfused graph is still correct
        log.warning("ORT transformer optimizer skipped: %s", e)
        return path


def quantize_int8(path: str, out: str) -> str:
    """Dynamic int8 quantization of the weight MatMuls (initializers); LoRA MatMuls take graph inputs
    and stay fp32. QInt8 weights with uint8 activations is ORT's recommended setting on x86 with
    AVX-512 VNNI; per-channel scales keep accuracy on small encoders."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: ORT's fused contrib ops (from the optimizer) have no shape-inference types.
    quantize_dynamic(path, out, weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    return out
