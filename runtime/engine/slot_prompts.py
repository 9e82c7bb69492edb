"""Virtual tokens (prompt and P-tuning) per slot: the backbone's word embedding, wrapped once the first
prompt adapter loads, answers ids at or above the vocabulary size from the row's slot's prompt table.

The tokenizer side (runtime/tokenization.py) puts placeholder ids vocab + 0 .. vocab + n - 1 before a
prompt task's tokens (token type 0, attention on), so every later stage (planning, packing, positions,
attention masks, each row's first token for the head) treats virtual tokens as ordinary ones; this is
PEFT's own order (prompts, then [CLS] ...). Only the torch engine's eager forwards read it: the ONNX
graph and CUDA graphs have no input for it, and those engines refuse prompt adapters.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from adapterserve.runtime.engine.batch import SlotContext


class SlotPromptEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, slots: int, context: SlotContext) -> None:
        super().__init__()
        self.base = base
        self.vocab = base.num_embeddings
        self.slots = slots
        self.context = context
        self.table: Optional[torch.Tensor] = None  # [slots, n_max, hidden] float32, grown on demand
        self.prompt_slots: set[int] = set()

    def write(self, slot: int, prompt: Optional[torch.Tensor]) -> None:
        if prompt is None:
            self.prompt_slots.discard(slot)
            return
        n, hidden = prompt.shape
        if self.table is None or self.table.shape[1] < n:
            grown = torch.zeros(self.slots, n, hidden, device=self.base.weight.device)
            if self.table is not None:  # forwards in flight keep reading their pinned slots' rows
                grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        self.table[slot, :n].copy_(prompt)
        self.prompt_slots.add(slot)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch = self.context.current
        if batch is None or not (batch.distinct_slots & self.prompt_slots):
            return self.base(ids)
        virtual = ids >= self.vocab
        out = self.base(ids.masked_fill(virtual, 0))
        where = virtual.nonzero(as_tuple=True)
        if batch.offsets is not None:  # packed [1, N]: the row of each token from the offsets
            rows = torch.searchsorted(batch.offsets[1:].to(ids.device), where[1], right=True)
        else:  # padded [B, T]
            rows = where[0]
        slots = batch.slot_per_row.index_select(0, rows)
        out[where] = self.table[slots, ids[where] - self.vocab].to(out.dtype)
        return out
