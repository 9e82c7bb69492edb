"""The slot-wrapped linear: y = base(x) + (x @ A[idx]) @ B[idx] for each row's slot idx.

On the CPU in fp32 the fused kernel (runtime/native/csrc/lora_kernel.c) adds each row's delta reading its slot in
place and only over real tokens; elsewhere it is one gather and two bmm per layer in torch.

Buffers are fixed-shape: A [slots, r_max, d_in] and B [slots, r_max, d_out] with the LoRA scaling
folded into B and ranks zero-padded, so loading an adapter is a copy_ and the graph never changes.
A is stored rank-major so that reading only the first `rank` rows of every slot is a cheap view.

Per-feature vectors (IA3, DoRA's norm scale, trained biases: adapters/spec.VectorState) live in three
more buffers, made the first time an adapter with vectors loads into this layer (a LoRA-only server
never has them): y = out_scale[idx] ⊙ (base(in_scale[idx] ⊙ x) + ΔW (in_scale[idx] ⊙ x)) + out_shift[idx],
float32, neutral 1 / 1 / 0. Only batches holding such a slot pay for them. The shared ONNX graph takes
them as inputs (made at export, `ensure_vectors`), with `vector_flags` saying per slot which it sets;
CUDA graphs do not apply them (the engine refuses such adapters: Engine.refuses).

LoKr above r_max keeps its Kronecker factors per slot (KronForm, made when it loads): the fused kernel
applies them with each row's delta; the torch path otherwise. Like the vectors, eager forwards only.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from torch import nn

from adapterserve.adapters.spec import KroneckerModule
from adapterserve.runtime.engine.batch import SlotContext
from adapterserve.runtime.native.lora_kernel import KRON_MAX, WIDE_MAX_RANK, FusedLoRA


# vector_flags bits (runtime/native/csrc/ort_lora_op.c reads the same)
VEC_IN, VEC_SCALE, VEC_SHIFT = 1, 2, 4


def _row_index(batch, w: int, rows: tuple, device: torch.device) -> torch.Tensor:
    """A wide adapter's rows as an index tensor (the batch holds its token runs when packed), made once
    per forward."""
    found = batch.derived.get(("wide_rows", w))
    if found is None:
        found = batch.derived[("wide_rows", w)] = torch.tensor(rows, dtype=torch.long, device=device)
    return found


def _wide_of_row(batch, device: torch.device) -> torch.Tensor:
    """Per row, w + 1 for a row in wide slot w and 0 for the others (the fused kernel's wide call), made
    once per forward."""
    found = batch.derived.get("wide_of_row")
    if found is None:
        of_row = [0] * batch.slot_per_row.shape[0]
        for w, rows, _ in batch.wide:
            for i in rows:
                of_row[i] = w + 1
        found = batch.derived["wide_of_row"] = torch.tensor(of_row, dtype=torch.long, device=device)
    return found


@dataclasses.dataclass
class KronForm:
    """A slot's LoKr update in one layer as it is applied: W1 [out_l, in_m] and W2ᵀ as P [in_n, k] times
    Q [k, out_k], or P alone [in_n, out_k] (Q None) where W2 is whole or its pair costs more than it."""

    w1: torch.Tensor
    p: torch.Tensor
    q: Optional[torch.Tensor]
    dims: tuple  # (out_l, out_k, in_m, in_n)
    params: np.ndarray  # the fused kernel's 8 int64s (lora_kernel.c kron_token)
    kernel_fits: bool  # within the kernel's per-token buffers

    @classmethod
    def of(cls, m: KroneckerModule, device: torch.device, dtype: torch.dtype) -> "KronForm":
        out_l, out_k, in_m, in_n = m.dims
        w1 = m.u1 if m.v1 is None else m.u1 @ m.v1
        if m.v2 is not None and m.v2.shape[0] * (in_n + out_k) < in_n * out_k:
            p, q = m.v2.t(), m.u2.t()
        else:
            p, q = (m.u2 if m.v2 is None else m.u2 @ m.v2).t(), None

        def move(t):
            return t.to(device=device, dtype=dtype).contiguous()

        w1, p, q = move(w1), move(p), None if q is None else move(q)
        k = 0 if q is None else q.shape[0]
        params = np.array([w1.data_ptr(), p.data_ptr(), 0 if q is None else q.data_ptr(), out_l, out_k, in_m, in_n, k],
                          dtype=np.int64)
        return cls(w1, p, q, (out_l, out_k, in_m, in_n), params, in_m * max(k, out_k) <= KRON_MAX)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x for x [n, d_in]: [n, d_out], as vec(W1 · X · W2ᵀ) per token."""
        out_l, out_k, in_m, in_n = self.dims
        n = x.shape[0]
        z = x.reshape(n * in_m, in_n) @ self.p
        if self.q is not None:
            z = z @ self.q
        return torch.matmul(self.w1, z.view(n, in_m, out_k)).reshape(n, out_l * out_k)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.p, self.q) if t is not None)


def gathered_delta(x: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each row's LoRA delta with stock ops (gather its slot's A/B, two bmm) at full r_max: the
    stock-op ONNX graph, and the reference forward of the ONNX Runtime op while it is traced."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # the pooler sees [B, H]
    delta = torch.bmm(torch.bmm(x3, a_all.index_select(0, idx).transpose(1, 2)), b_all.index_select(0, idx))
    return delta if x.dim() == 3 else delta.squeeze(1)


def row_vectors(y: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [B, T, d] or [B, d] times each row's scale (plus its shift), with stock ops: the stock-op ONNX
    graph's per-feature vectors, and the reference of the ONNX Runtime ops' (the tables hold neutral
    values for slots without vectors, so no flags are read)."""
    def rows(table):
        picked = table.index_select(0, idx)
        return picked if y.dim() == 2 else picked.unsqueeze(1)

    y = y * rows(scale)
    return y if shift is None else y + rows(shift)


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
        # Set by the engine when the Triton kernels serve this layer on CUDA (runtime/engine/triton_lora.py).
        self.gpu_kernel = None
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
        self.slots = slots
        self.vector_slots: set[int] = set()  # slots whose adapter sets vectors in this layer
        self.in_slots: set[int] = set()  # ... an input scale
        self.scale_slots: set[int] = set()  # ... an output scale
        self.shift_slots: set[int] = set()  # ... an output shift
        self.in_scale: Optional[torch.Tensor] = None  # [slots, d_in] float32, made on first use
        self.out_scale: Optional[torch.Tensor] = None  # [slots, d_out]
        self.out_shift: Optional[torch.Tensor] = None  # [slots, d_out]
        # Per slot: VEC_IN | VEC_SCALE | VEC_SHIFT, the vectors it sets here (the ONNX op skips the rest).
        self.vector_flags = torch.zeros(slots, dtype=torch.long)
        self._vector_flags_view = self.vector_flags.numpy()
        # Wide slots (adapters above r_max; slot_pool.SlotPool makes them on first use): A [wide, r_wide,
        # d_in] and B [wide, r_wide, d_out] as the narrow ones, and each wide slot's rank in this layer.
        self.wide_a: Optional[torch.Tensor] = None
        self.wide_b: Optional[torch.Tensor] = None
        self.wide_rank: list[int] = []
        self._wide_rank8_of: tuple = (None, None)  # (wide_rank it was made from, _wide_rank8())
        # LoKr above r_max (adapters/spec.KroneckerModule): slot -> its factors here; the fused kernel's
        # params per slot (made on first use; zeros for a slot without factors here or with factors
        # past the kernel's buffers, which the torch path applies: _kron_unfit).
        self.kron: dict[int, KronForm] = {}
        self._kron_params: Optional[np.ndarray] = None
        self._kron_slots: frozenset = frozenset()
        self._kron_unfit: frozenset = frozenset()

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

    def ensure_vectors(self) -> None:
        """The vector buffers, neutral, if no adapter made them yet."""
        if self.in_scale is None:
            device = self.lora_a.device
            self.in_scale = torch.ones(self.slots, self.d_in, device=device)
            self.out_scale = torch.ones(self.slots, self.d_out, device=device)
            self.out_shift = torch.zeros(self.slots, self.d_out, device=device)

    def write_vectors(self, slot: int, vectors) -> None:
        """vectors: the adapter's VectorState for this layer, or None (neutral)."""
        if vectors is None:
            if slot in self.vector_slots:
                self._vector_flags_view[slot] = 0  # first: a graph run in between skips the slot's vectors
                self.in_scale[slot].fill_(1.0)
                self.out_scale[slot].fill_(1.0)
                self.out_shift[slot].zero_()
                for which in (self.vector_slots, self.in_slots, self.scale_slots, self.shift_slots):
                    which.discard(slot)
            return
        self.ensure_vectors()
        flags = 0
        for buffer, value, neutral, which, flag in ((self.in_scale, vectors.in_scale, 1.0, self.in_slots, VEC_IN),
                                                    (self.out_scale, vectors.out_scale, 1.0, self.scale_slots, VEC_SCALE),
                                                    (self.out_shift, vectors.out_shift, 0.0, self.shift_slots, VEC_SHIFT)):
            if value is None:
                buffer[slot].fill_(neutral)
                which.discard(slot)
            else:
                buffer[slot].copy_(value)
                which.add(slot)
                flags |= flag
        self._vector_flags_view[slot] = flags
        self.vector_slots.add(slot)

    def write_kron(self, slot: int, module: Optional[KroneckerModule]) -> None:
        """module: the adapter's Kronecker factors for this layer, or None (it has none here)."""
        if module is None:
            if self.kron.pop(slot, None) is not None:
                self._kron_params[slot] = 0
        else:
            form = KronForm.of(module, self.lora_a.device, self.lora_a.dtype)
            if self._kron_params is None:
                self._kron_params = np.zeros((self.slots, 8), dtype=np.int64)
            self._kron_params[slot] = form.params if form.kernel_fits else 0
            self.kron[slot] = form
        self._kron_slots = frozenset(self.kron)
        self._kron_unfit = frozenset(s for s, form in self.kron.items() if not form.kernel_fits)

    def _scale_input(self, x: torch.Tensor, batch) -> torch.Tensor:
        """A copy of x with each row scaled by its slot's input scale (DeBERTa's shared input, expanded
        per row: padded rows only)."""
        scale = self.in_scale.index_select(0, batch.slot_per_row).to(x.dtype)
        return x * (scale if x.dim() == 2 else scale.unsqueeze(1))

    def _scale_input_in_place(self, x: torch.Tensor, batch) -> list:
        """Scales, in x, the token runs (packed) or rows (padded, and the pooler's [B, d]) whose slot
        scales this input; returns [(view, its values before)] for the caller to put back. Each run is a
        contiguous slice of x: no index tensor, no copy of the other rows."""
        packed = batch.offsets is not None and x.dim() == 3
        runs = batch.token_runs(self.in_slots) if packed else batch.row_runs(self.in_slots)
        flat = x[0] if packed else x  # [N, d_in] tokens; [B, T, d_in] or [B, d_in] rows
        restore = []
        for start, end, slot in runs:
            view = flat[start:end]
            restore.append((view, view.clone()))
            view.mul_(self.in_scale[slot].to(x.dtype))
        return restore

    def _scale_output(self, y: torch.Tensor, batch, present: frozenset) -> None:
        """In place: y is this layer's own output."""
        if batch.offsets is not None and y.dim() == 3:
            flat = y.view(-1, self.d_out)
            for start, end, slot in batch.token_runs(self.scale_slots | self.shift_slots):
                if slot in self.scale_slots:
                    flat[start:end].mul_(self.out_scale[slot].to(y.dtype))
                if slot in self.shift_slots:
                    flat[start:end].add_(self.out_shift[slot].to(y.dtype))
            return
        idx = batch.slot_per_row
        for table, which, op in ((self.out_scale, self.scale_slots, y.mul_), (self.out_shift, self.shift_slots, y.add_)):
            if present & which:
                rows = table.index_select(0, idx).to(y.dtype)
                op(rows if y.dim() == 2 else rows.unsqueeze(1))

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
        vectors = traced.vectors[self.name]  # the slots' output scale and shift, and their flags
        if traced.fused_op:
            from adapterserve.runtime.engine.onnx.ops import SlotLoRAFunction, SlotLoRAPackedFunction

            tail = (torch.tensor([y_offset]), vectors["out_scale"], vectors["out_shift"], vectors["vector_flags"])
            if traced.offsets is not None and x.dim() == 3:
                return SlotLoRAPackedFunction.apply(y, x, a_all, b_all, traced.slot_r8[self.name], idx, traced.offsets,
                                                    *tail)
            return SlotLoRAFunction.apply(y, x, a_all, b_all, traced.slot_r8[self.name], idx, traced.row_lengths,
                                          *tail)
        assert y_offset == 0, "stock-op graphs get their q/k/v split before the LoRA nodes"
        return row_vectors(y + gathered_delta(x, a_all, b_all, idx), vectors["out_scale"], idx, vectors["out_shift"])

    def _traced_input(self, x: torch.Tensor) -> torch.Tensor:
        """Export path: x scaled by each row's input scale, where the graph takes one for this layer."""
        traced = self.context.traced
        in_scale = traced.vectors[self.name].get("in_scale")
        if in_scale is None:
            return x
        if not traced.fused_op:
            return row_vectors(x, in_scale, traced.slot_per_row)
        from adapterserve.runtime.engine.onnx.ops import SlotRowScaleFunction

        packed = traced.offsets is not None and x.dim() == 3
        return SlotRowScaleFunction.apply(x, in_scale, traced.vectors[self.name]["vector_flags"], traced.slot_per_row,
                                          traced.offsets if packed else traced.row_lengths, packed)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.context.current
        if batch is not None and self.kron:  # set by _kernel_delta in this call (a layer may run twice a forward)
            batch.derived.pop(("kron_in_kernel", id(self)), None)
        y = self._slot_forward(x)
        if batch is not None and self.context.traced is None:
            if batch.wide and any(self.wide_rank):
                y = self._add_wide(x, y, batch)
            if self.kron and not batch.distinct_slots.isdisjoint(self.kron):
                # the fused kernel applied the factors it takes with each row's delta (_kernel_delta)
                left = self._kron_unfit if batch.derived.get(("kron_in_kernel", id(self))) else self._kron_slots
                if not batch.distinct_slots.isdisjoint(left):
                    y = self._add_kron(x, y, batch, left)
        return y

    def _add_kron(self, x: torch.Tensor, y: torch.Tensor, batch, slots: frozenset) -> torch.Tensor:
        """In torch, each LoKr row's update from its Kronecker factors (rows of `slots`), over its real
        tokens (packed: its token run; padded: its first `length` positions; the pooler's [B, d]: the row)."""
        rows_total = batch.slot_per_row.shape[0]
        if x.dim() == 3 and x.shape[0] == 1 and batch.offsets is None and rows_total > 1:  # DeBERTa positions
            if y.shape[0] == 1:
                y = y.expand(rows_total, -1, -1).contiguous()
            deltas: dict = {}  # rows of one slot get the same projection of the one input: made once
            for i, s in enumerate(batch.slot_list):
                if s in slots:
                    if s not in deltas:
                        deltas[s] = self.kron[s].delta(x[0]).to(y.dtype)
                    y[i] += deltas[s]
            return y
        if not y.is_contiguous():
            y = y.contiguous()
        flat_y = y.view(-1, self.d_out)
        flat_x = x.reshape(-1, self.d_in)
        by_row = x.dim() == 2
        per_row = 0 if by_row or batch.offsets is not None else x.shape[1]
        runs = batch.row_runs(slots) if by_row else batch.token_runs(slots, per_row)
        for start, end, s in runs:
            flat_y[start:end] += self.kron[s].delta(flat_x[start:end]).to(y.dtype)
        return y

    def _add_wide(self, x: torch.Tensor, y: torch.Tensor, batch) -> torch.Tensor:
        """Each wide adapter's delta on its own rows (or, packed, its rows' token runs)."""
        rows_total = batch.slot_per_row.shape[0]
        shared = x.dim() == 3 and x.shape[0] == 1 and batch.offsets is None and rows_total > 1  # DeBERTa positions
        if shared and y.shape[0] == 1:
            y = y.expand(rows_total, -1, -1).contiguous()
        # Packed [1, N, d]: the adapters' token runs; padded [B, ...], and the pooler's [B, d] either way: rows.
        tokens = batch.offsets is not None and x.dim() == 3
        if (not shared and self.kernel is not None and x.stride(-1) == 1 and y.stride(-1) == 1
                and self.wide_a.shape[1] <= WIDE_MAX_RANK
                and self.wide_a.dtype == x.dtype == y.dtype == torch.float32):
            # The fused kernel: each wide row reads its slot in place, its real tokens only, at its rank here.
            self.kernel.wide(x, y, self.wide_a, self.wide_b, self._wide_rank8(), _wide_of_row(batch, x.device),
                             batch.offsets if tokens else None, None if tokens else batch.lengths)
            return y
        flat_x, flat_y = (x[0], y[0]) if tokens else (x, y)
        if not shared and len(batch.wide) > 1:
            r = max(self.wide_rank[w] for w, _, _ in batch.wide)
            if r:
                self._add_wide_together(flat_x, flat_y, batch, tokens, r)
            return y
        for w, rows, index in batch.wide:
            r = self.wide_rank[w]
            if not r:
                continue
            a, b = self.wide_a[w, :r], self.wide_b[w, :r]
            if shared:  # every row of the adapter gets the same projection of the one input
                y[index] += ((x[0] @ a.t()) @ b).to(y.dtype)
                continue
            index = index if tokens else _row_index(batch, w, rows, x.device)
            picked = flat_x.index_select(0, index)
            flat_y.index_add_(0, index, torch.matmul(torch.matmul(picked, a.t()), b).to(y.dtype))
        return y

    def _wide_rank8(self) -> torch.Tensor:
        """[W + 1] int64 for the kernel: 0, then each wide slot's rank in this layer rounded up to 8."""
        key = tuple(self.wide_rank)
        if self._wide_rank8_of[0] != key:
            self._wide_rank8_of = (key, torch.tensor([0] + [-(-r // 8) * 8 for r in key], dtype=torch.long))
        return self._wide_rank8_of[1]

    def _add_wide_together(self, flat_x: torch.Tensor, flat_y: torch.Tensor, batch, tokens: bool, r: int) -> None:
        """Every wide adapter of the batch in one pass: each adapter's rows (tokens) padded to the longest
        (padded places repeat a real one; their products are dropped), two batched products at the
        widest rank (ranks past an adapter's own, or a layer it leaves alone, hold zeros: _load_wide)."""
        key = ("wide_layout", tokens)
        layout = batch.derived.get(key)
        if layout is None:  # the same for every slot layer of the forward
            wide = sorted(batch.wide, key=lambda entry: entry[0])
            indices = [index if tokens else _row_index(batch, w, rows, flat_x.device) for w, rows, index in wide]
            longest = max(int(i.shape[0]) for i in indices)
            gather = torch.stack([torch.nn.functional.pad(i, (0, longest - i.shape[0]), value=int(i[0]))
                                  for i in indices]).reshape(-1)
            where = torch.cat([torch.arange(i.shape[0], device=flat_x.device) + k * longest
                               for k, i in enumerate(indices)])
            slots = [w for w, _, _ in wide]
            # Every wide slot in order: the buffers are read as they are, not copied per layer.
            adapters = None if slots == list(range(self.wide_a.shape[0])) else torch.tensor(
                slots, dtype=torch.long, device=flat_x.device)
            layout = batch.derived[key] = (gather, where, torch.cat(indices), adapters, len(slots))
        gather, where, picked, adapters, count = layout
        a, b = self.wide_a[:, :r], self.wide_b[:, :r]  # [W, r, d_in], [W, r, d_out]
        if adapters is not None:
            a, b = a.index_select(0, adapters), b.index_select(0, adapters)
        xs = flat_x.index_select(0, gather).reshape(count, -1, self.d_in)
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b)  # [W, padded units, d_out]
        flat_y.index_add_(0, picked, delta.reshape(gather.shape[0], *flat_y.shape[1:]).index_select(0, where)
                          .to(flat_y.dtype))

    def _slot_forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.context.current
        if (batch is not None and x.dim() == 3 and x.shape[0] == 1 and batch.offsets is None
                and self.context.traced is None and batch.slot_per_row.shape[0] > 1):
            return self._shared_input_forward(x, batch)
        if (batch is None or not self.vector_slots or self.context.traced is not None
                or not (batch.distinct_slots & self.vector_slots)):
            return self._forward(x, batch)
        present = batch.distinct_slots & self.vector_slots
        # Rows whose slot scales this input (IA3's feed-forward vectors) are scaled in x's own buffer for
        # this layer and put back after it: only those rows' tokens are touched, where a copy of x would
        # copy every row and computing their outputs again would cost a product per row.
        restore = self._scale_input_in_place(x, batch) if present & self.in_slots else None
        try:
            if present & (self.scale_slots | self.shift_slots):
                if self.kernel is not None and x.stride(-1) == 1:
                    # The kernel applies each row's output vectors after its delta, while the row is in cache.
                    y = self.base(x)
                    self._kernel_delta(x, y, batch, (self.out_scale, self.out_shift, self.vector_flags))
                else:
                    y = self._forward(x, batch)
                    self._scale_output(y, batch, present)
            else:
                y = self._forward(x, batch)
        finally:
            for view, saved in restore or ():
                view.copy_(saved)
        return y

    def _shared_input_forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        """One [1, T, d] input for a whole padded batch (DeBERTa's relative positions, runtime/engine/deberta.py):
        each row gets its own adapter's projection of it, [B, T, d_out]; the base product runs once."""
        rows = batch.slot_per_row.shape[0]
        present = batch.distinct_slots & self.vector_slots
        if present:  # per-row vectors: a copy of the input per row, every position of it real
            every_position = dataclasses.replace(batch, lengths=None)
            x_rows = x.expand(rows, -1, -1)
            x_rows = self._scale_input(x_rows, every_position) if present & self.in_slots else x_rows.contiguous()
            y = self._forward(x_rows, every_position)
            if present & (self.scale_slots | self.shift_slots):
                self._scale_output(y, every_position, present)
            return y
        shared = self.base(x)
        if not (batch.distinct_slots & self.active_slots):  # no row's adapter changes this layer
            return shared
        # Low rank per row: x A_row is [B, T, r]; one baddbmm over the shared product writes the rows.
        # Slots whose adapter leaves this layer alone (and slot 0) hold zeros here.
        r = batch.rank
        idx = batch.slot_per_row
        xa = torch.matmul(x[0], self.lora_a[:, :r].index_select(0, idx).transpose(1, 2))
        return torch.baddbmm(shared.expand(rows, -1, -1), xa, self.lora_b[:, :r].index_select(0, idx))

    def _kernel_delta(self, x: torch.Tensor, y: torch.Tensor, batch, vectors: Optional[tuple] = None) -> None:
        """The fused kernel: each row reads its own slot in place, real tokens only, at its own rank,
        and its LoKr factors (then its slot's output vectors, where given)."""
        kron = None
        if self.kron and not batch.distinct_slots.isdisjoint(self.kron) and x.dtype == y.dtype == torch.float32:
            kron = self._kron_params
            batch.derived[("kron_in_kernel", id(self))] = True
        if batch.offsets is not None and x.dim() == 3:  # [1, N, d]; the pooler's [B, d] is not
            self.kernel.packed(x, y, self.lora_a, self.lora_b, self.slot_r8, batch.slot_per_row, batch.offsets, vectors,
                               kron)
        else:
            self.kernel(x, y, self.lora_a, self.lora_b, self.slot_r8, batch.slot_per_row, batch.lengths, vectors, kron)

    def _forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        if self.context.traced is not None:
            x = self._traced_input(x)
            return self._traced_forward(x, self.base(x))
        y = self.base(x)
        if batch is None or (not batch.every_layer
                             and (batch.rank == 0 or not (batch.distinct_slots & self.active_slots))
                             and (self.kernel is None or batch.distinct_slots.isdisjoint(self.kron))):
            return y
        r = batch.rank
        packed = batch.offsets is not None and x.dim() == 3  # [1, N, d]; the pooler's [B, d] is not
        if self.kernel is not None and x.stride(-1) == 1 and y.stride(-1) == 1:
            self._kernel_delta(x, y, batch)
            return y
        # In-place accumulate into y (addmm_/baddbmm_): saves a full read+write of the output per layer.
        if batch.single_slot is not None:
            s = batch.single_slot
            xa = x.reshape(-1, self.d_in) @ self.lora_a[s, :r].t()  # [B*T, r]
            y.view(-1, self.d_out).addmm_(xa, self.lora_b[s, :r])
            return y
        if self.gpu_kernel is not None and not packed and x.stride(-1) == 1 and y.stride(-1) == 1:
            self.gpu_kernel.add_delta(x, y, self.lora_a, self.lora_b, batch.slot_per_row, r)
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
