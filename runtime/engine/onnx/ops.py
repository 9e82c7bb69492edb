"""Export-time views of the native ONNX Runtime ops (runtime/native/ort_ops.py): torch autograd
Functions that trace as `adapterserve.*` nodes, each with a forward that is the pure-PyTorch reference
the op must equal, and a one-op model builder for checking and timing an op alone.
"""
from __future__ import annotations

import torch

from adapterserve.runtime.engine.slot_layers import gathered_delta, row_vectors
from adapterserve.runtime.native.ort_ops import ATTENTION_OP_TYPE, DOMAIN, OP_TYPE, PACKED_OP_TYPE, ROW_SCALE_OP_TYPE


class SlotLoRAFunction(torch.autograd.Function):
    """Export-time only: traces as the custom op; its forward is the reference the op must equal.
    y may pack several projections (q/k/v); this node's dout columns start at y_offset. out_scale,
    out_shift [slots, dout] and vector_flags [slots]: the slots' per-feature vectors (the op's inputs 8-10)."""

    @staticmethod
    def forward(ctx, y, x, a, b, slot_r8, slot_per_row, row_lengths, y_offset,  # noqa: ARG004 - ctx unused
                out_scale, out_shift, vector_flags):
        """y_offset: int64 [1] tensor (a graph constant)."""
        out = y.narrow(-1, int(y_offset[0]), b.shape[-1]) + gathered_delta(x, a, b, slot_per_row)
        return row_vectors(out, out_scale, slot_per_row, out_shift)

    @staticmethod
    def symbolic(g, y, x, a, b, slot_r8, slot_per_row, row_lengths, y_offset, out_scale, out_shift, vector_flags):
        out = g.op(f"{DOMAIN}::{OP_TYPE}", y, x, a, b, slot_r8, slot_per_row, row_lengths, y_offset, out_scale,
                   out_shift, vector_flags)
        # Same dtype and rank as y; the last dim may be narrower (packed y), so sizes are left unknown.
        rank = y.type().dim()
        return out.setType(y.type().with_sizes([None] * rank) if rank is not None else y.type())


class SlotLoRAPackedFunction(torch.autograd.Function):
    """Export-time only: adapterserve.SlotLoRAPacked over one [1, N, d] run of token-packed rows
    (row b is tokens offsets[b] .. offsets[b+1]-1); the forward is the reference the op must equal."""

    @staticmethod
    def forward(ctx, y, x, a, b, slot_r8, slot_per_row, offsets, y_offset,  # noqa: ARG004 - ctx unused
                out_scale, out_shift, vector_flags):
        per_token = torch.repeat_interleave(slot_per_row, offsets[1:] - offsets[:-1])
        delta = gathered_delta(x[0], a, b, per_token)  # each token as its own row
        out = y.narrow(-1, int(y_offset[0]), b.shape[-1])[0] + delta
        return row_vectors(out, out_scale, per_token, out_shift).unsqueeze(0)

    @staticmethod
    def symbolic(g, y, x, a, b, slot_r8, slot_per_row, offsets, y_offset, out_scale, out_shift, vector_flags):
        out = g.op(f"{DOMAIN}::{PACKED_OP_TYPE}", y, x, a, b, slot_r8, slot_per_row, offsets, y_offset, out_scale,
                   out_shift, vector_flags)
        return out.setType(y.type().with_sizes([None] * 3))


class SlotRowScaleFunction(torch.autograd.Function):
    """Export-time only: adapterserve.SlotRowScale(Packed), x with each row multiplied by its slot's
    input scale (rows: row_lengths [B] padded, or offsets [B + 1] into one [1, N, d] run when packed).
    The exporter folds it into the LoRA op that makes x where it can (export._fold_row_scales)."""

    @staticmethod
    def forward(ctx, x, in_scale, vector_flags, slot_per_row, rows, packed):  # noqa: ARG004 - ctx unused
        if not packed:
            return row_vectors(x, in_scale, slot_per_row)
        per_token = torch.repeat_interleave(slot_per_row, rows[1:] - rows[:-1])
        return row_vectors(x[0], in_scale, per_token).unsqueeze(0)

    @staticmethod
    def symbolic(g, x, in_scale, vector_flags, slot_per_row, rows, packed):
        op = ROW_SCALE_OP_TYPE + ("Packed" if packed else "")
        return g.op(f"{DOMAIN}::{op}", x, in_scale, vector_flags, slot_per_row, rows).setType(x.type())


class VarlenAttentionFunction(torch.autograd.Function):
    """Export-time only: adapterserve.VarlenAttention, softmax(q k^T / sqrt(d)) v within each of the
    token-packed sequences of q, k, v [1, N, H] (runtime/native/csrc/varlen_attention.c)."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, num_heads):  # noqa: ARG004 - ctx unused
        heads = int(num_heads[0])
        out = torch.empty_like(q)
        bounds = offsets.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            qh, kh, vh = (z[0, s:e].view(e - s, heads, -1).transpose(0, 1) for z in (q, k, v))
            out[0, s:e] = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(0, 1).reshape(e - s, -1)
        return out

    @staticmethod
    def symbolic(g, q, k, v, offsets, num_heads):
        return g.op(f"{DOMAIN}::{ATTENTION_OP_TYPE}", q, k, v, offsets, num_heads).setType(q.type())


def single_op_model(op_type: str, inputs: dict):
    """An ONNX model of one adapterserve op over named numpy inputs (their dtypes and shapes; None: an
    absent optional input), for checking and timing the op alone (tests/component/test_bf16_lora.py,
    test_lora_epilogue.py, loadtest/cpu_probes lora-op). Feed it the inputs that are not None."""
    import numpy as np
    from onnx import TensorProto, helper

    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32,
             np.dtype(np.int64): TensorProto.INT64}
    node = helper.make_node(op_type, [k if v is not None else "" for k, v in inputs.items()], ["out"], domain=DOMAIN)
    graph = helper.make_graph([node], op_type, [helper.make_tensor_value_info(k, types[v.dtype], v.shape)
                                                for k, v in inputs.items() if v is not None],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8  # ONNX Runtime 1.31 reads IR versions up to 13; the onnx package writes newer
    return model
