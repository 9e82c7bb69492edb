"""Token packing: every row's real tokens back to back as one [1, N] run, with row offsets, so an
encoder forward computes no padded position and a whole pool of rows of any lengths is one forward.

Used by the torch engine's packed forward (runtime/engine/torch_engine.py, CPU fp32 with the fused kernel) and
the token-packed shared ONNX graph (runtime/engine/onnx/export.py, runtime/engine/onnx/engine.py). Attention is
then ours (runtime/native/csrc/varlen_attention.c) and stays within each row; everything else in an encoder
layer works per token already.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def swappable_attention(backbone) -> list:
    """BERT/RoBERTa self-attention modules (absolute positions, encoder only) whose core our
    attention can stand in for; other families keep their own."""
    found = []
    for module in backbone.modules():
        if all(hasattr(module, a) for a in ("query", "key", "value", "num_attention_heads")) \
                and getattr(module, "position_embedding_type", "absolute") == "absolute" \
                and not getattr(module, "is_decoder", False):
            found.append(module)
    return found


def packed_applies(backbone, family_name: str) -> Optional[str]:
    """None when every encoder layer's attention can run token-packed, else why not."""
    attention = swappable_attention(backbone)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not attention or layers is None or len(attention) != len(layers):
        return f"the {family_name} attention is not one the packed forward can swap"
    for m in attention:
        if m.all_head_size // m.num_attention_heads > 256:
            return "attention head size above 256"
    return None


def position_offset(backbone, positions_after_padding: bool) -> int:
    """First position id of a row: RoBERTa counts from its padding index + 1, BERT from 0."""
    if positions_after_padding:
        return int(backbone.config.pad_token_id) + 1
    return 0


def pack(inputs: dict[str, torch.Tensor], first_position: int) -> dict[str, torch.Tensor]:
    """A batch as packed inputs: input_ids, position_ids, token_type_ids [1, N] (positions restart at
    each row) and row_offsets int64 [B + 1]. The batch is either right-padded (input_ids,
    attention_mask, optional token_type_ids [B, T], on the CPU) or packed already by
    TextEncoder.collate(packed=True) (input_ids, token_type_ids [1, N], row_offsets), which then only
    needs its positions.

    In numpy, not torch: a torch CPU op opens an OpenMP region, and right after an ONNX Runtime run
    (whose pool threads still spin) one repeat_interleave of ~800 ids took ~0.9 ms (cProfile of the
    shared int8 engine) and slowed the next run too; these few index ops take microseconds
    (docs/architecture.md, "The CPU int8 path")."""
    if "row_offsets" in inputs:
        offsets = inputs["row_offsets"].numpy()
        counts = np.diff(offsets)
        positions = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], counts) + first_position
        return dict(inputs, position_ids=torch.from_numpy(positions[None]))
    mask = inputs["attention_mask"].numpy().astype(bool)
    counts = mask.sum(axis=1)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = int(offsets[-1])
    positions = np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], counts) + first_position
    types = inputs.get("token_type_ids")
    packed_types = types.numpy()[mask] if types is not None else np.zeros(n, dtype=np.int64)
    return {"input_ids": torch.from_numpy(inputs["input_ids"].numpy()[mask][None]),
            "position_ids": torch.from_numpy(positions[None]),
            "token_type_ids": torch.from_numpy(packed_types[None]),
            "row_offsets": torch.from_numpy(offsets)}
