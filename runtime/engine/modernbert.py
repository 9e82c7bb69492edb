"""ModernBERT over token-packed rows: every row's real tokens back to back as one [1, N] run, the way
ModernBERT itself runs unpadded under flash-attention, on the CPU with our varlen attention.

Per layer: the backbone's own norms, Wqkv, Wo and gated MLP (slot layers included) on [1, N, d];
rotary positions restarting at each row; attention within each row by our kernel. A local layer attends
only to tokens within local_attention // 2 positions (transformers' sliding-window mask, |i - j| <= w/2):
a row no longer than w/2 + 1 tokens sees all of itself either way, so only longer rows take a banded
torch attention of their own. Features: each row's first token, or its mean (classifier_pooling),
after the final norm. Tested against the padded forward and PEFT (tests/component/test_families.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb


def packed_applies(backbone) -> Optional[str]:
    """None when this ModernBERT can run token-packed, else why not."""
    config = backbone.config
    if config.hidden_size // config.num_attention_heads > 256:
        return "attention head size above 256"
    if getattr(config, "attention_dropout", 0.0) or not hasattr(backbone, "layers"):
        return "the backbone is not ModernBERT's eval-mode layout"
    return None


def _banded_rows(q, k, v, offsets: list[int], heads: int, half_window: int, out: torch.Tensor) -> None:
    """Overwrite out's rows longer than half_window + 1 with attention limited to |i - j| <= half_window,
    in blocks of queries against the keys their window reaches: O(length x window), so an 8k-token row
    never builds an 8k x 8k score matrix."""
    d = q.shape[-1] // heads
    block = max(1, 2 * half_window)
    for b in range(len(offsets) - 1):
        start, end = offsets[b], offsets[b + 1]
        n = end - start
        if n <= half_window + 1:
            continue
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            k_lo, k_hi = max(0, lo - half_window), min(n, hi + half_window)
            band = (torch.arange(lo, hi)[:, None] - torch.arange(k_lo, k_hi)[None, :]).abs() <= half_window
            query = q[start + lo:start + hi].view(hi - lo, heads, d).transpose(0, 1)
            key, value = (t[start + k_lo:start + k_hi].view(k_hi - k_lo, heads, d).transpose(0, 1) for t in (k, v))
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=band)
            out[start + lo:start + hi] = attended.transpose(0, 1).reshape(hi - lo, heads * d)


def encode_packed(backbone, kernel, packed: dict, pooling: str) -> torch.Tensor:
    """Features [B, H] of token-packed rows (packing.pack(inputs, 0)): the ModernBERT model's output pooled
    as its classification head reads it."""
    offsets = packed["row_offsets"]
    bounds = offsets.tolist()
    positions = packed["position_ids"]
    hidden = backbone.embeddings(input_ids=packed["input_ids"])  # [1, N, H]
    n = hidden.shape[1]
    for layer in backbone.layers:
        attention = layer.attn
        heads, d = attention.num_heads, attention.head_dim
        qkv = attention.Wqkv(layer.attn_norm(hidden)).view(1, n, 3, heads, d)
        cos, sin = attention.rotary_emb(qkv, position_ids=positions)
        query, key, value = qkv.transpose(3, 1).unbind(dim=2)  # [1, heads, N, d]
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        q, k, v = (t[0].transpose(0, 1).reshape(n, heads * d).contiguous() for t in (query, key, value))
        context = kernel.attention(q, k, v, offsets, heads)
        if attention.local_attention != (-1, -1):
            _banded_rows(q, k, v, bounds, heads, attention.local_attention[0], context)
        hidden = hidden + attention.Wo(context.unsqueeze(0))
        hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
    hidden = backbone.final_norm(hidden)[0]  # [N, H]
    if pooling == "mean":
        counts = offsets.diff()
        rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
        sums = hidden.new_zeros(len(counts), hidden.shape[1]).index_add_(0, rows, hidden)
        return sums / counts.unsqueeze(1).to(hidden.dtype)
    return hidden.index_select(0, offsets[:-1])
