"""Prefix tuning per slot: in every encoder layer, a row whose slot holds a prefix attends to that
prefix's keys and values before its own tokens, and its positions start after the prefix. This is
PEFT's prefix forward on transformers' BERT-shaped encoders: past_key_values with an all-ones prefix
mask, and position ids shifted by past_key_values_length.

The prefix table [slots, layers, 2, n_max, hidden] float32 grows on demand, as the prompt table does.
Padded forwards: each BERT-shaped self-attention module's class is swapped once for a subclass that
adds the batch's prefixes when the batch has a prefix row, and runs the module's own forward when it
has none. Token-packed forwards: the engine's varlen attention kernel reads each row's prefix keys and
values before its own (`packed_prefix`). The engine shifts the positions (`positions`).
Only the torch engine's eager forwards read it: CUDA graphs and the ONNX graph refuse prefix adapters.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from adapterserve.runtime.engine.batch import SlotBatch, SlotContext
from adapterserve.runtime.engine.mixins import mix_in


class SlotPrefixes:
    def __init__(self, attention: list, slots: int, context: SlotContext, device: torch.device) -> None:
        """attention: one self-attention module per encoder layer, in order."""
        self.slots = slots
        self.context = context
        self.device = device
        self.table: Optional[torch.Tensor] = None
        self.tokens = [0] * slots  # prefix length per slot; 0 = none
        self.prefix_slots: set[int] = set()
        for layer, module in enumerate(attention):
            mix_in(module, PrefixedSelfAttention, slot_prefixes=self, prefix_layer=layer)

    def write(self, slot: int, prefix: Optional[torch.Tensor]) -> None:
        if prefix is None:
            self.prefix_slots.discard(slot)
            self.tokens[slot] = 0
            return
        layers, _, n, hidden = prefix.shape
        if self.table is None or self.table.shape[3] < n:
            grown = torch.zeros(self.slots, layers, 2, n, hidden, device=self.device)
            if self.table is not None:  # forwards in flight keep reading their pinned slots' prefixes
                grown[:, :, :, :self.table.shape[3]] = self.table
            self.table = grown
        with torch.inference_mode():
            self.table[slot, :, :, :n].copy_(prefix)
        self.tokens[slot] = n
        self.prefix_slots.add(slot)

    def slot_bytes(self) -> int:
        return 0 if self.table is None else self.table[0].numel() * self.table.element_size()

    def row_tokens(self, slots) -> Optional[list[int]]:
        """Each row's prefix length for a batch's slot per row, or None when no row has a prefix."""
        if not self.prefix_slots.intersection(slots):
            return None
        return [self.tokens[s] if s < self.slots else 0 for s in slots]

    def positions(self, first_position: int, attention_mask: torch.Tensor, row_tokens: list[int]) -> torch.Tensor:
        """Padded [B, T] position ids with each row's real tokens after its prefix (padding at the first
        position: masked out, and within the table)."""
        length = attention_mask.shape[1]
        shift = torch.tensor(row_tokens, dtype=torch.long, device=attention_mask.device)[:, None]
        positions = torch.arange(length, device=attention_mask.device)[None] + shift + first_position
        return torch.where(attention_mask.bool(), positions, torch.full_like(positions, first_position))

    def batch_prefixes(self, layer: int, batch: SlotBatch, dtype: torch.dtype):
        """Keys and values [B, m, hidden] of the batch's rows at one layer (m: the longest prefix in the
        batch; rows without one read slot 0's zeros) and their additive mask [B, m]."""
        mask = batch.derived.get(("prefix_mask", dtype))
        if mask is None:  # the same for every layer of the forward
            rows = [self.tokens[s] for s in batch.slot_list]
            valid = torch.arange(max(rows))[None] < torch.tensor(rows)[:, None]
            mask = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, torch.finfo(dtype).min)
            mask = batch.derived[("prefix_mask", dtype)] = mask.to(self.table.device)
        kv = self.table[batch.slot_per_row, layer, :, :mask.shape[1]].to(dtype)  # [B, 2, m, hidden]
        return kv[:, 0], kv[:, 1], mask

    def packed_prefix(self, layer: int, batch: SlotBatch) -> tuple:
        """Token-packed forwards: (keys, values, lengths) for the varlen kernel at one layer, each row's
        prefix [rows, n, hidden] (n: the batch's longest; rows without one read slot 0 and length 0)."""
        found = batch.derived.get("prefix_rows")
        if found is None:  # the same for every layer of the forward
            counts = [self.tokens[s] if s < self.slots else 0 for s in batch.slot_list]
            index = torch.tensor([s if n else 0 for s, n in zip(batch.slot_list, counts)], dtype=torch.long,
                                 device=self.device)
            found = batch.derived["prefix_rows"] = (index, torch.tensor(counts, dtype=torch.long), max(counts))
        index, lengths, n = found
        return self.table[index, layer, 0, :n], self.table[index, layer, 1, :n], lengths


class PrefixedSelfAttention:
    """Mixed into a BERT-shaped self-attention class (query, key, value, num_attention_heads,
    attention_head_size): the module's own forward unless the batch has a prefix row."""

    slot_prefixes: SlotPrefixes
    prefix_layer: int

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *args, **kwargs):
        prefixes = self.slot_prefixes
        batch = prefixes.context.current
        if batch is None or batch.offsets is not None or not prefixes.prefix_slots & batch.distinct_slots:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        size, length, _ = hidden_states.shape
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        keys, values, prefix_mask = prefixes.batch_prefixes(self.prefix_layer, batch, hidden_states.dtype)
        m = keys.shape[1]

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(size, -1, heads, head_dim).transpose(1, 2)

        query = split(self.query(hidden_states))
        key = split(torch.cat([keys, self.key(hidden_states)], dim=1))
        value = split(torch.cat([values, self.value(hidden_states)], dim=1))
        own = attention_mask
        if own is None:
            own = torch.zeros(size, 1, 1, length, dtype=hidden_states.dtype, device=hidden_states.device)
        own = own.to(hidden_states.dtype).expand(size, 1, length, length)
        mask = torch.cat([prefix_mask[:, None, None, :].expand(size, 1, length, m), own], dim=-1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return out.transpose(1, 2).reshape(size, length, heads * head_dim), None
