"""DeBERTa-v2/v3 in a mixed batch: per-row positional projections.

DeBERTa's disentangled attention projects the shared relative-position embeddings through the same
query/key linears as the tokens (share_att_key, DeBERTa-v3's setting) or through pos_query/pos_key
linears, once per layer, as a [1, 2k, H] input that transformers then repeats for every row. When
those linears carry adapters, each row needs its own adapter's projection of the positions (PEFT
applies the adapter to that call too): the slot layer answers a [1, 2k, H] input of a B-row batch with
[B, 2k, H] (slot_layers.SlotLoRALinear, shared input), and this class's attention bias uses the rows
as they are instead of repeating them.

`disentangled_attention_bias` below is transformers 4.57's (modeling_deberta_v2.py) with only the
repeat made conditional; transformers is pinned, and the DeBERTa tests compare against PEFT.
"""
from __future__ import annotations

import torch
from transformers.models.deberta_v2.modeling_deberta_v2 import (DisentangledSelfAttention, build_relative_position,
                                                                build_rpos, scaled_size_sqrt)


class SlotDisentangledSelfAttention(DisentangledSelfAttention):
    def _positions(self, projected: torch.Tensor, query_layer: torch.Tensor) -> torch.Tensor:
        """[rows * heads, 2k, d] from a projection of the positions that is shared ([1, 2k, H]) or per row."""
        per_head = self.transpose_for_scores(projected, self.num_attention_heads)
        if per_head.size(0) == query_layer.size(0):
            return per_head
        return per_head.repeat(query_layer.size(0) // self.num_attention_heads, 1, 1)

    def disentangled_attention_bias(self, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
        if relative_pos is None:
            relative_pos = build_relative_position(query_layer, key_layer, bucket_size=self.position_buckets,
                                                   max_position=self.max_relative_positions)
        if relative_pos.dim() == 2:
            relative_pos = relative_pos.unsqueeze(0).unsqueeze(0)
        elif relative_pos.dim() == 3:
            relative_pos = relative_pos.unsqueeze(1)
        elif relative_pos.dim() != 4:
            raise ValueError(f"Relative position ids must be of dim 2 or 3 or 4. {relative_pos.dim()}")

        att_span = self.pos_ebd_size
        relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long)
        rel_embeddings = rel_embeddings[0: att_span * 2, :].unsqueeze(0)
        if self.share_att_key:
            pos_query_layer = self._positions(self.query_proj(rel_embeddings), query_layer)
            pos_key_layer = self._positions(self.key_proj(rel_embeddings), query_layer)
        else:
            if "c2p" in self.pos_att_type:
                pos_key_layer = self._positions(self.pos_key_proj(rel_embeddings), query_layer)
            if "p2c" in self.pos_att_type:
                pos_query_layer = self._positions(self.pos_query_proj(rel_embeddings), query_layer)

        score = 0
        if "c2p" in self.pos_att_type:  # content -> position
            scale = scaled_size_sqrt(pos_key_layer, scale_factor)
            c2p_att = torch.bmm(query_layer, pos_key_layer.transpose(-1, -2))
            c2p_pos = torch.clamp(relative_pos + att_span, 0, att_span * 2 - 1)
            c2p_att = torch.gather(c2p_att, dim=-1, index=c2p_pos.squeeze(0).expand(
                [query_layer.size(0), query_layer.size(1), relative_pos.size(-1)]))
            score += c2p_att / scale.to(dtype=c2p_att.dtype)
        if "p2c" in self.pos_att_type:  # position -> content
            scale = scaled_size_sqrt(pos_query_layer, scale_factor)
            r_pos = build_rpos(query_layer, key_layer, relative_pos, self.max_relative_positions, self.position_buckets)
            p2c_pos = torch.clamp(-r_pos + att_span, 0, att_span * 2 - 1)
            p2c_att = torch.bmm(key_layer, pos_query_layer.transpose(-1, -2))
            p2c_att = torch.gather(p2c_att, dim=-1, index=p2c_pos.squeeze(0).expand(
                [query_layer.size(0), key_layer.size(-2), key_layer.size(-2)])).transpose(-1, -2)
            score += p2c_att / scale.to(dtype=p2c_att.dtype)
        return score


def per_row_positions(backbone: torch.nn.Module) -> int:
    """Give every DeBERTa attention of the backbone per-row positional projections; returns how many."""
    count = 0
    for module in backbone.modules():
        if type(module) is DisentangledSelfAttention:
            module.__class__ = SlotDisentangledSelfAttention
            count += 1
    return count
