"""Token packing: every row's real tokens back to back as one [1, N] run, with row offsets, so an
encoder forward computes no padded position and a whole pool of rows of any lengths is one forward.

Used by the torch engine's packed forward (runtime/engine.py, CPU fp32 with the fused kernel) and
the token-packed shared ONNX graph (exporters/shared_base.py, runtime/onnx_engine.py). Attention is
then ours (runtime/varlen_attention.c) and stays within each row; everything else in an encoder
layer works per token already.
"""
from __future__ import annotations

from typing import Optional

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


def position_offset(backbone, family_name: str) -> int:
    """First position id of a row: RoBERTa counts from its padding index + 1, BERT from 0."""
    if family_name == "roberta":
        return int(backbone.config.pad_token_id) + 1
    return 0


def pack(inputs: dict[str, torch.Tensor], first_position: int) -> dict[str, torch.Tensor]:
    """A right-padded batch (input_ids, attention_mask, optional token_type_ids [B, T]) as packed
    inputs: input_ids, position_ids, token_type_ids [1, N] (positions restart at each row) and
    row_offsets int64 [B + 1]."""
    mask = inputs["attention_mask"].bool()
    counts = mask.sum(dim=1)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    n = int(offsets[-1])
    positions = torch.arange(n) - offsets[:-1].repeat_interleave(counts) + first_position
    types = inputs.get("token_type_ids")
    return {"input_ids": inputs["input_ids"][mask].unsqueeze(0), "position_ids": positions.unsqueeze(0),
            "token_type_ids": types[mask].unsqueeze(0) if types is not None else torch.zeros(1, n, dtype=torch.long),
            "row_offsets": offsets}
