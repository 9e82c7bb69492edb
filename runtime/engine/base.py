"""The engine contract: what the runtime may ask of an engine, and nothing else.

An engine owns the slot-wrapped backbone. It knows slots, not tasks: the runtime maps tasks to slots,
pins them for a batch, and applies each task's head to the features an engine returns. Slot 0 is
"no adapter" and is never written.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from adapterserve.adapters.peft_lora import BaseShape
from adapterserve.adapters.spec import AdapterSpec


class Engine(Protocol):
    name: str  # "torch" | "onnx"
    kernel_name: str  # how adapter deltas are computed: "fused", "torch", "onnx-op", "onnx-graph"
    packed: bool  # forwards run over token-packed rows (no padding): the planner keeps pools whole
    shape: BaseShape  # what an adapter must fit: family, hidden size, each slot layer's (d_in, d_out), r_max
    slots: int  # slot count, slot 0 included
    merged_slot: Optional[int]  # the slot whose delta is folded into the base weights, if any

    def refuses(self, spec: AdapterSpec) -> Optional[str]:
        """Why this engine cannot serve the adapter (None: it can), checked before it is registered."""

    def load_slot(self, slot: int, spec: AdapterSpec) -> None:
        """Copy an adapter into a slot (zero-padded to r_max); layers it does not touch are cleared."""

    def clear_slot(self, slot: int) -> None:
        """Return a slot to the neutral value (no delta)."""

    def slot_bytes(self) -> int:
        """Bytes the slot buffers hold on the device."""

    def merge(self, slot: int) -> None:
        """Fold one slot's delta into the base weights (single-task fast path)."""

    def unmerge(self) -> None:
        """Restore the base weights exactly."""

    def encode(self, inputs: dict[str, torch.Tensor], slots: list[int],
               lengths: Optional[list[int]] = None) -> torch.Tensor:
        """One forward for a mixed batch: inputs from TextEncoder.collate ([rows, width] tensors),
        slots[i] the slot of row i, lengths[i] its real tokens. Returns the pooled features
        [rows, hidden] that the task heads read."""
