"""The torch engine: owns the slot-wrapped backbone and runs one forward for a mixed-task batch.

It knows slots, not tasks: the runtime maps tasks to slots and applies the per-task heads.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from adapterserve.adapters.spec import AdapterSpec
from adapterserve.runtime.engine.base_model import BaseModel
from adapterserve.runtime.engine.batch import SlotBatch
from adapterserve.runtime.engine.cuda_graphs import GraphedForward
from adapterserve.runtime.engine import triton_lora
from adapterserve.runtime.native import lora_kernel
from adapterserve.runtime.engine import modernbert, packing
from adapterserve.runtime.errors import ConfigError
from adapterserve.runtime.native.lora_kernel import FusedLoRA
from adapterserve.runtime.engine.slot_pool import SlotPool

log = logging.getLogger(__name__)


def pool_features(pooling: str, out, attention_mask: torch.Tensor) -> torch.Tensor:
    """The features a family's heads read from a padded forward's output (Family.pooling)."""
    if pooling == "pooler":
        return out.pooler_output
    hidden = out.last_hidden_state
    if pooling == "mean":  # as ModernBertForSequenceClassification: over the row's attended tokens
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return hidden[:, 0]


class TorchEngine:
    name = "torch"

    def __init__(self, base: BaseModel, pool: SlotPool, lora_kernel: str = "auto", token_packing: str = "auto",
                 cuda_graphs: str = "auto") -> None:
        self.base = base
        self.pool = pool
        # The pool's, read on every forward: kept here as plain attributes, not looked up through it.
        self.layers, self.context, self.slots, self.r_max = pool.layers, pool.context, pool.slots, pool.r_max
        self.slot_ranks, self.shape = pool.slot_ranks, pool.shape
        self.first_wide = pool.slots if pool.wide_slots else None  # wide slots are numbered from here
        self.kernel_name = self._attach_kernel(lora_kernel)
        self.packed = token_packing == "auto" and self._packing_applies()
        self.position_offset = packing.position_offset(base.backbone, base.family.positions_after_padding)
        self.merged_slot: Optional[int] = None
        self.graphs: Optional[GraphedForward] = None
        # bitsandbytes int8/NF4 are left eager: LLM.int8 picks outlier columns by value on the host. BERT
        # only so far: the graph feeds a [rows, 1, width] mask, a path checked for BERT's forward alone.
        if (cuda_graphs == "auto" and base.device.type == "cuda" and base.precision in ("fp32", "fp16", "bf16")
                and base.family.name == "bert"):
            uses_types = "token_type_ids" in base.tokenizer.model_input_names
            self.graphs = GraphedForward(self._graph_forward, base.device, base.max_length, uses_types)

    def _attach_kernel(self, choice: str) -> str:
        """Give the fused CPU kernel (or, asked for, the Triton kernels on CUDA) to every layer it can
        serve; returns "fused", "triton" or "torch"."""
        if choice == "torch":
            return "torch"
        if choice == "triton":
            return self._attach_triton()
        # fp32 bases, and bf16 ones on the CPU (fp32 activations, runtime/engine/base_model.py). Not bitsandbytes
        # int8: LLM.int8 rounds every layer's activations to int8, which turns the kernel's different
        # fp32 summation order (~1e-7) into ~4e-3 logit differences from PEFT; int8/NF4 keep the torch
        # path, which matches PEFT's matmuls.
        fits = {n: l for n, l in self.layers.items()
                if self.base.precision in ("fp32", "bf16")
                and FusedLoRA.applies(l.d_in, l.d_out, self.r_max, self.base.dtype, self.base.device)}
        why = None
        if not fits:
            why = (f"it runs fp32 and bf16 bases on the CPU with feature sizes that are multiples of 16 and r_max a "
                   f"multiple of 8 up to {lora_kernel.MAX_RANK} (this base: {self.base.precision} on "
                   f"{self.base.device}, r_max {self.r_max})")
        kernel = lora_kernel.load() if fits else None
        if fits and kernel is None:
            why = lora_kernel.unavailable_reason()
        if why is not None:
            if choice == "fused":
                raise ConfigError(f"lora_kernel=fused cannot be used: {why}; use lora_kernel auto or torch")
            return "torch"
        for layer in fits.values():
            layer.kernel = kernel
        return "fused"

    def _attach_triton(self) -> str:
        """The Triton kernels on CUDA, asked for by name: "auto" keeps the torch path there until they
        are measured on a GPU (docs/benchmarks.md)."""
        why = triton_lora.unavailable_reason(self.base.device)
        if why is None and self.base.precision not in ("fp32", "fp16", "bf16"):
            why = f"they serve fp32, fp16 and bf16 bases, not {self.base.precision}"
        if why is not None:
            raise ConfigError(f"lora_kernel=triton cannot be used: {why}; use lora_kernel auto or torch")
        for layer in self.layers.values():
            layer.gpu_kernel = triton_lora
        return "triton"

    def _packing_applies(self) -> bool:
        """Token-packed forwards need our attention kernel (built with the fused LoRA kernel) and the
        kernel on every slot layer (its packed row call); BERT/RoBERTa attention on fp32 CPU."""
        if self.kernel_name != "fused" or any(layer.kernel is None for layer in self.layers.values()):
            return False
        if self.base.family.packed_forward == "modernbert":
            return modernbert.packed_applies(self.base.backbone) is None
        return packing.packed_applies(self.base.backbone, self.base.family.name) is None

    # -- slots (the pool's) -----------------------------------------------------------------------
    def refuses(self, spec: AdapterSpec) -> Optional[str]:
        if spec.rank > self.r_max:
            if self.graphs is not None:
                return (f"rank {spec.rank} is above r_max {self.r_max}, and the torch engine's CUDA graphs capture "
                        "r_max-wide slots only; serve it with --cuda-graphs off or a larger --r-max")
            if spec.eager_only:
                return (f"a {spec.kind()} adapter of rank {spec.rank} (above r_max {self.r_max}) would need a wide slot, "
                        "which holds LoRA factors only; retrain it with r <= r_max or start with a larger --r-max")
        if spec.prompt is not None and self.graphs is not None:
            return (f"{spec.kind()} adapters put virtual tokens before each row's own, which the torch engine's CUDA "
                    "graphs do not capture; serve them with --cuda-graphs off")
        if spec.prefix is not None and self.graphs is not None:
            return (f"{spec.kind()} adapters add keys and values to every attention layer, which the torch engine's "
                    "CUDA graphs do not capture; serve them with --cuda-graphs off")
        if spec.bottlenecks and self.graphs is not None:
            return (f"{spec.kind()} adapters add a small network at sublayer outputs, which the torch engine's CUDA "
                    "graphs do not capture; serve them with --cuda-graphs off")
        if spec.kron and self.graphs is not None:
            return (f"{spec.kind()} adapters above r_max {self.r_max} are applied from their Kronecker factors, which "
                    "the torch engine's CUDA graphs do not capture; serve them with --cuda-graphs off, retrain "
                    f"with r <= r_max, or start with a --r-max of at least {max(m.rank for m in spec.kron.values())}")
        if spec.vectors and self.graphs is not None:
            return (f"{spec.kind()} adapters set per-feature vectors, which the torch engine's CUDA graphs do not "
                    "capture; serve them with --cuda-graphs off")
        return None

    def load_slot(self, slot: int, spec: AdapterSpec) -> None:
        self.pool.load_slot(slot, spec)

    def clear_slot(self, slot: int) -> None:
        self.pool.clear_slot(slot)

    def slot_bytes(self) -> int:
        return self.pool.slot_bytes()

    # -- merged mode -----------------------------------------------------------------------------
    def merge(self, slot: int) -> None:
        if self.merged_slot is not None:
            self.unmerge()
        for layer in self.layers.values():
            layer.merge_slot(slot)
        self.merged_slot = slot

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()
        self.merged_slot = None

    # -- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, inputs: dict[str, torch.Tensor], slots: list[int],
               lengths: Optional[list[int]] = None) -> torch.Tensor:
        """Run the backbone once for a mixed batch; returns the features heads read: [B, H]
        (BERT: pooler output; DistilBERT/RoBERTa: the first token's hidden state). lengths: each
        row's real token count (inputs padded on the right), so adapter work skips the padding."""
        if self.packed:
            return self._encode_packed(inputs, slots)
        if self.graphs is not None:
            features = self.graphs(inputs, slots)
            if features is not None:
                return features
        prefix_rows = self.pool.prefixes.row_tokens(slots) if self.pool.prefixes is not None else None
        if prefix_rows is not None:
            inputs = dict(inputs, position_ids=self.pool.prefixes.positions(
                self.position_offset, inputs["attention_mask"], prefix_rows))
        return self._padded_forward(inputs, SlotBatch.build(slots, self.slot_ranks, self.base.device, lengths,
                                                            first_wide=self.first_wide))

    def _graph_forward(self, inputs: dict[str, torch.Tensor], slot_per_row: torch.Tensor) -> torch.Tensor:
        """The forward a CUDA graph captures: static inputs, every slot layer at r_max (cuda_graphs.py)."""
        return self._padded_forward(inputs, SlotBatch(
            slot_per_row=slot_per_row, distinct_slots=frozenset(range(1, self.slots)), single_slot=None,
            rank=self.r_max, every_layer=True))

    def _padded_forward(self, inputs: dict[str, torch.Tensor], batch: SlotBatch) -> torch.Tensor:
        self.context.current = batch
        try:
            out = self.base.backbone(**inputs)
        finally:
            self.context.current = None
        features = pool_features(self.base.family.pooling, out, inputs["attention_mask"])
        rows = self._first_token_rows(batch.slot_list)
        if rows is not None:
            features[rows] = out.last_hidden_state[rows, 0].to(features.dtype)
        return features

    def _first_token_rows(self, slots) -> Optional[torch.Tensor]:
        """Rows whose head reads the first token's hidden state, not the pooler's output (None: none)."""
        first = self.pool.first_token_slots
        if not first or not first.intersection(slots):
            return None
        return torch.tensor([i for i, s in enumerate(slots) if s in first], dtype=torch.long, device=self.base.device)

    def _encode_packed(self, inputs: dict[str, torch.Tensor], slots: list[int]) -> torch.Tensor:
        """encode() over the rows' real tokens back to back: the backbone's own embedding, projection,
        LayerNorm and feed-forward modules on [1, N, d], attention by our varlen kernel within each
        row, then each row's first token to the pooler. Same features as the padded forward (tested to
        1e-5), no padded position computed, so the planner keeps a pool in one forward."""
        backbone = self.base.backbone
        packed = packing.pack(inputs, self.position_offset)
        offsets = packed["row_offsets"]
        prefixes = self.pool.prefixes
        prefix_rows = prefixes.row_tokens(slots) if prefixes is not None else None
        if prefix_rows is not None:  # a prefixed row's positions start after its prefix
            counts = (offsets[1:] - offsets[:-1])
            packed["position_ids"] = packed["position_ids"] + torch.repeat_interleave(
                torch.tensor(prefix_rows, dtype=torch.long), counts)[None]
        kernel = next(iter(self.layers.values())).kernel
        self.context.current = SlotBatch.build(slots, self.slot_ranks, self.base.device, None, offsets,
                                               first_wide=self.first_wide)
        try:
            if self.base.family.packed_forward == "modernbert":
                return modernbert.encode_packed(backbone, kernel, packed, self.base.family.pooling)
            return self._bert_packed(backbone, kernel, packed, offsets, prefixes if prefix_rows is not None else None)
        finally:
            self.context.current = None

    def _bert_packed(self, backbone, kernel, packed: dict, offsets: torch.Tensor, prefixes=None) -> torch.Tensor:
        """BERT-shaped encoder layers (BERT, RoBERTa/XLM-R, ELECTRA) over token-packed rows; prefixes: the
        pool's SlotPrefixes when a row of the batch has one."""
        hidden = backbone.embeddings(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                     token_type_ids=packed["token_type_ids"])
        if hasattr(backbone, "embeddings_project"):  # ELECTRA's embeddings narrower than its hidden size
            hidden = backbone.embeddings_project(hidden)
        for index, layer in enumerate(backbone.encoder.layer):
            attention = layer.attention.self
            q, k, v = attention.query(hidden)[0], attention.key(hidden)[0], attention.value(hidden)[0]
            prefix = None if prefixes is None else prefixes.packed_prefix(index, self.context.current)
            context = kernel.attention(q, k, v, offsets, attention.num_attention_heads, prefix)
            hidden_attn = layer.attention.output(context.unsqueeze(0), hidden)
            hidden = layer.output(layer.intermediate(hidden_attn), hidden_attn)
        first = hidden[0].index_select(0, offsets[:-1])  # [B, d]: each row's first token
        if self.base.family.uses_pooler:
            pooled = backbone.pooler(first.unsqueeze(1))
            rows = self._first_token_rows(self.context.current.slot_list)
            if rows is not None:
                pooled[rows] = first[rows]
            return pooled
        return first
