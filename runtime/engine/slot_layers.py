"""The slot-wrapped linear: y = base(x) + (x @ A[idx]) @ B[idx] for each row's slot idx.

On the CPU in fp32 the fused kernel (runtime/native/csrc/lora_kernel.c) adds each row's delta reading its slot in
place and only over real tokens; elsewhere it is one gather and two bmm per layer in torch.

Buffers are fixed-shape: A [slots, r_max, d_in] and B [slots, r_max, d_out] with the LoRA scaling
folded into B and ranks zero-padded, so loading an adapter is a copy_ and the graph never changes.
A is stored rank-major so that reading only the first `rank` rows of every slot is a cheap view.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from adapterserve.runtime.engine.batch import SlotContext
from adapterserve.runtime.native.lora_kernel import FusedLoRA


def gathered_delta(x: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each row's LoRA delta with stock ops (gather its slot's A/B, two bmm) at full r_max: the
    stock-op ONNX graph, and the reference forward of the ONNX Runtime op while it is traced."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # the pooler sees [B, H]
    delta = torch.bmm(torch.bmm(x3, a_all.index_select(0, idx).transpose(1, 2)), b_all.index_select(0, idx))
    return delta if x.dim() == 3 else delta.squeeze(1)


class SlotLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, d_in: int, d_out: int, slots: int, r_max: int,
                 context: SlotContext, dtype: torch.dtype, device: torch.device, name: str = "") -> None:
        super().__init__()
        self.name = name  # the base's module name (export node names, error messages)
        self.base = base
        self.d_in, self.d_out = d_in, d_out
        self.context = context
        self.register_buffer("lora_a", torch.zeros(slots, r_max, d_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(slots, r_max, d_out, dtype=dtype, device=device), persistent=False)
        # Slots whose adapter changes this layer: lets a batch skip layers none of its adapters target.
        self.active_slots: set[int] = set()
        self._unmerged_weight: Optional[torch.Tensor] = None
        # Set by the engine when the fused CPU kernel serves this layer (see runtime/native/csrc/lora_kernel.c).
        self.kernel: Optional[FusedLoRA] = None
        # Each slot's rank in this layer rounded up to the kernel's 8-wide blocks, 0 = not targeted:
        # in a mixed batch every row then pays for its own adapter's rank, not the batch's largest.
        self.slot_r8 = torch.zeros(slots, dtype=torch.long)
        self._slot_r8_view = self.slot_r8.numpy()  # element writes without a torch op each
        # Rows of each slot that may hold nonzero values (the last occupant's rank): a load zeroes only
        # what its own rank does not overwrite, so evicting needs no zeroing at all.
        self._filled = [0] * slots
        # Per-slot views made once: slicing a view is half the cost of indexing the buffer each load.
        self._a_slots = list(self.lora_a.unbind(0))
        self._b_slots = list(self.lora_b.unbind(0))

    # -- slot writes (the engine queues them for every layer and runs them as two foreach ops) ---
    def queue_write(self, slot: int, a: torch.Tensor, b: torch.Tensor, dst: list, src: list, zero: list) -> None:
        """a: [d_in, r], b: [r, d_out] (scaled)."""
        r = a.shape[1]
        a_slot, b_slot = self._a_slots[slot], self._b_slots[slot]
        dst += [a_slot[:r], b_slot[:r]]
        src += [a.t(), b]
        filled = self._filled[slot]
        if filled > r:
            zero += [a_slot[r:filled], b_slot[r:filled]]
        self._filled[slot] = r
        self._slot_r8_view[slot] = min(-(-r // 8) * 8, self.lora_a.shape[1])
        self.active_slots.add(slot)

    def queue_clear(self, slot: int, zero: list) -> None:
        """The slot's adapter does not target this layer."""
        filled = self._filled[slot]
        if filled:
            zero += [self._a_slots[slot][:filled], self._b_slots[slot][:filled]]
            self._filled[slot] = 0
        self._slot_r8_view[slot] = 0
        self.active_slots.discard(slot)

    # -- merged mode ---------------------------------------------------------------------------
    def merge_slot(self, slot: int) -> None:
        weight = self.base.weight
        if self._unmerged_weight is None:
            # Keep the exact original so unmerge restores it bit for bit, however often we cycle.
            self._unmerged_weight = weight.detach().clone()
        if slot in self.active_slots:
            delta = (self.lora_b[slot].t().float() @ self.lora_a[slot].float())  # [d_out, d_in]
            weight.data.copy_((self._unmerged_weight.float() + delta).to(weight.dtype))

    def unmerge(self) -> None:
        if self._unmerged_weight is not None:
            self.base.weight.data.copy_(self._unmerged_weight)
            self._unmerged_weight = None

    name: str = ""  # module name in the backbone, set by the engine (keys the traced slot inputs)

    def _traced_forward(self, x: torch.Tensor, y: torch.Tensor, y_offset: int = 0) -> torch.Tensor:
        """Export path: full r_max, slot tensors from graph inputs, no Python-side shortcuts. With
        the ONNX Runtime op the graph gets one adapterserve.SlotLoRA node (runtime/native/csrc/ort_lora_op.c);
        without it, stock ops: a per-row Gather of the slot tensors and two batched MatMuls. y may be a
        packed projection (q/k/v in one MatMul) whose columns for this layer start at y_offset."""
        traced = self.context.traced
        a_all, b_all = traced.tensors[self.name]
        idx = traced.slot_per_row
        if traced.fused_op:
            from adapterserve.runtime.engine.onnx.ops import SlotLoRAFunction, SlotLoRAPackedFunction

            if traced.offsets is not None and x.dim() == 3:
                return SlotLoRAPackedFunction.apply(y, x, a_all, b_all, traced.slot_r8[self.name], idx, traced.offsets,
                                                    torch.tensor([y_offset]))
            return SlotLoRAFunction.apply(y, x, a_all, b_all, traced.slot_r8[self.name], idx, traced.row_lengths,
                                          torch.tensor([y_offset]))
        assert y_offset == 0, "stock-op graphs get their q/k/v split before the LoRA nodes"
        return y + gathered_delta(x, a_all, b_all, idx)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.context.traced is not None:
            return self._traced_forward(x, y)
        batch = self.context.current
        if batch is None or (not batch.every_layer
                             and (batch.rank == 0 or not (batch.distinct_slots & self.active_slots))):
            return y
        r = batch.rank
        kernel = self.kernel
        packed = batch.offsets is not None and x.dim() == 3  # [1, N, d]; the pooler's [B, d] is not
        if kernel is not None and x.stride(-1) == 1 and y.stride(-1) == 1:
            # Each row reads its own slot in place, real tokens only, at its own rank.
            if packed:
                kernel.packed(x, y, self.lora_a, self.lora_b, self.slot_r8, batch.slot_per_row, batch.offsets)
            else:
                kernel(x, y, self.lora_a, self.lora_b, self.slot_r8, batch.slot_per_row, batch.lengths)
            return y
        # In-place accumulate into y (addmm_/baddbmm_): saves a full read+write of the output per layer.
        if batch.single_slot is not None:
            s = batch.single_slot
            xa = x.reshape(-1, self.d_in) @ self.lora_a[s, :r].t()  # [B*T, r]
            y.view(-1, self.d_out).addmm_(xa, self.lora_b[s, :r])
            return y
        x3 = x if x.dim() == 3 else x.unsqueeze(1)  # the pooler sees [B, H]
        y3 = y if y.dim() == 3 else y.unsqueeze(1)
        idx = batch.slot_per_row
        if packed:  # one "row" per token, each with its row's slot
            x3, y3 = x.view(-1, 1, self.d_in), y.view(-1, 1, self.d_out)
            idx = idx.repeat_interleave(batch.offsets.diff().to(idx.device))
        a = self.lora_a[:, :r].index_select(0, idx)  # [B, r, d_in]
        b = self.lora_b[:, :r].index_select(0, idx)  # [B, r, d_out]
        y3.baddbmm_(torch.bmm(x3, a.transpose(1, 2)), b)
        return y
