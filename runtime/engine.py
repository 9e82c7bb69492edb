"""The torch engine: owns the slot-wrapped backbone and runs one forward for a mixed-task batch.

It knows slots, not tasks: the runtime maps tasks to slots and applies the per-task heads.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from adapters.peft_lora import BaseShape
from adapters.spec import AdapterSpec
from runtime.base_model import BaseModel
from runtime.batch import SlotBatch, SlotContext
from runtime.errors import NotSupportedError
from runtime.slot_layers import SlotLoRALinear

log = logging.getLogger(__name__)


def _matches(name: str, suffixes: Optional[list[str]]) -> bool:
    return suffixes is None or any(name == s or name.endswith("." + s) for s in suffixes)


class TorchEngine:
    name = "torch"

    def __init__(self, base: BaseModel, slots: int, r_max: int, targets: Optional[list[str]] = None) -> None:
        self.base = base
        self.slots = slots
        self.r_max = r_max
        self.context = SlotContext()
        self.layers: dict[str, SlotLoRALinear] = {}
        self.slot_ranks: dict[int, int] = {}
        for name, linear in base.linear_layers().items():
            if not _matches(name, targets):
                continue
            wrapped = SlotLoRALinear(linear, linear.in_features, linear.out_features, slots, r_max,
                                     self.context, base.dtype, base.device)
            parent_name, _, child = name.rpartition(".")
            parent = base.backbone.get_submodule(parent_name) if parent_name else base.backbone
            setattr(parent, child, wrapped)
            wrapped.name = name
            self.layers[name] = wrapped
        if not self.layers:
            raise ValueError(f"no linear layer of the base matches lora targets {targets}")
        self.shape = BaseShape(
            family=base.family,
            hidden_size=base.hidden_size,
            linear_dims={n: (l.d_in, l.d_out) for n, l in self.layers.items()},
            r_max=r_max,
        )
        self.merged_slot: Optional[int] = None
        self.weights_released = False  # set when an ONNX session took over the base weights

    # -- slots -----------------------------------------------------------------------------------
    def load_slot(self, slot: int, spec: AdapterSpec) -> None:
        assert 0 < slot < self.slots
        for name, layer in self.layers.items():
            module = spec.modules.get(name)
            if module is None:
                layer.clear_slot(slot)
            else:
                layer.write_slot(slot, module.a.to(self.base.dtype), module.b.to(self.base.dtype))
        self.slot_ranks[slot] = spec.rank

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.slot_ranks.pop(slot, None)

    def slot_bytes(self) -> int:
        """Device bytes one slot takes across all wrapped layers."""
        return sum((l.lora_a[0].numel() + l.lora_b[0].numel()) * l.lora_a.element_size() for l in self.layers.values())

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
    def encode(self, inputs: dict[str, torch.Tensor], slots: list[int]) -> torch.Tensor:
        """Run the backbone once for a mixed batch; returns the features heads read: [B, H]
        (BERT: pooler output; DistilBERT/RoBERTa: the first token's hidden state)."""
        if self.weights_released:
            raise NotSupportedError("this runtime serves the base through ONNX Runtime; its torch weights were released")
        self.context.current = SlotBatch.build(slots, self.slot_ranks, self.base.device)
        try:
            out = self.base.backbone(**inputs)
        finally:
            self.context.current = None
        if self.base.family.uses_pooler:
            return out.pooler_output
        return out.last_hidden_state[:, 0]

