"""Per-forward batch metadata, passed explicitly from the engine to the slot layers."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class SlotBatch:
    slot_per_row: torch.Tensor  # [B] int64 on the model's device; 0 = no adapter
    distinct_slots: frozenset  # nonzero slots present in the batch
    single_slot: Optional[int]  # set when every row uses the same nonzero slot (no gather needed)
    rank: int  # largest adapter rank in the batch: slot buffers are read only up to it
    # [B] int64 on the CPU: each row's real (unpadded) token count, padding on the right. The fused
    # kernel adds no delta past it (those positions are masked out of attention and never read);
    # None = every position counts.
    lengths: Optional[torch.Tensor] = None
    # Token-packed forward (TorchEngine on the CPU): every row's tokens back to back as one [1, N]
    # run; row b is tokens offsets[b] .. offsets[b + 1] - 1 (int64 [B + 1]). 3-D activations are then
    # [1, N, d]; the pooler's [B, d] stays one row per entry. None = rows padded to a common length.
    offsets: Optional[torch.Tensor] = None
    # A captured CUDA graph's forward (runtime/engine/cuda_graphs.py): every slot layer runs its branch at
    # `rank` over every row, whatever the slots hold now, since the graph is replayed as slots change.
    every_layer: bool = False
    # The same as Python values, for layers that walk rows (per-feature vectors on packed rows).
    slot_list: tuple = ()
    bounds: tuple = ()  # offsets as ints when packed
    # Rows whose adapter sits in a wide slot (rank above r_max: slot_pool.SlotPool): (wide slot index, row
    # indices, index tensor: the rows', or when packed their tokens') per wide adapter. Those rows read
    # slot 0 in slot_per_row; the layers add their delta with one gather and scatter per adapter.
    wide: tuple = ()
    # What layers derive from the batch once per forward and reuse in every layer (bottleneck rows' token
    # indices: runtime/engine/slot_bottlenecks.py); keyed by the deriving module.
    derived: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def build(cls, slots: list[int], ranks: dict[int, int], device: torch.device,
              lengths: Optional[list[int]] = None, offsets: Optional[torch.Tensor] = None,
              first_wide: Optional[int] = None) -> "SlotBatch":
        """first_wide: the first wide slot number (slots at or above it are wide), None: no wide slots."""
        wide: tuple = ()
        if first_wide is not None and any(s >= first_wide for s in slots):
            rows_of: dict[int, list[int]] = {}
            for i, s in enumerate(slots):
                if s >= first_wide:
                    rows_of.setdefault(s - first_wide, []).append(i)
            bounds = offsets.tolist() if offsets is not None else None
            wide = tuple((w, tuple(rows), torch.tensor(
                rows if bounds is None else [t for i in rows for t in range(bounds[i], bounds[i + 1])],
                dtype=torch.long, device=device)) for w, rows in rows_of.items())
            slots = [s if s < first_wide else 0 for s in slots]
        distinct = frozenset(s for s in slots if s != 0)
        single = next(iter(distinct)) if len(distinct) == 1 and 0 not in slots else None
        rank = max((ranks[s] for s in distinct), default=0)
        return cls(
            slot_per_row=torch.tensor(slots, dtype=torch.long, device=device),
            distinct_slots=distinct,
            single_slot=single,
            rank=rank,
            lengths=torch.tensor(lengths, dtype=torch.long) if lengths is not None else None,
            offsets=offsets,
            slot_list=tuple(slots),
            bounds=tuple(offsets.tolist()) if offsets is not None else (),
            wide=wide,
        )

    def token_runs(self, which, tokens_per_row: int = 0) -> tuple:
        """(start, end, slot) of each row whose slot is in `which`, in a flat [tokens, d] view of the
        batch's activations: its token run when packed, else its real tokens at row × tokens_per_row.
        Made once per forward (every layer asks for the same sets)."""
        return self._runs("tokens", which, tokens_per_row)

    def row_runs(self, which) -> tuple:
        """(i, i + 1, slot) of each row i whose slot is in `which`: one unit per row (padded rows, and the
        pooler's [B, d] on packed batches too)."""
        return self._runs("rows", which, 0)

    def run_arrays(self, which, tokens_per_row: int = 0) -> tuple:
        """token_runs as a native kernel takes them: (starts, ends) int64 arrays and the slot of each run,
        made once per forward."""
        key = ("run_arrays", frozenset(which), tokens_per_row)
        found = self.derived.get(key)
        if found is None:
            runs = self.token_runs(which, tokens_per_row)
            found = self.derived[key] = (np.array([r[0] for r in runs], dtype=np.int64),
                                         np.array([r[1] for r in runs], dtype=np.int64), tuple(r[2] for r in runs))
        return found

    def _runs(self, unit: str, which, tokens_per_row: int) -> tuple:
        key = ("runs", unit, frozenset(which), tokens_per_row)
        found = self.derived.get(key)
        if found is None:
            runs = []
            for i, s in enumerate(self.slot_list):
                if s in which:
                    if unit == "rows":
                        start, end = i, i + 1
                    elif self.bounds:
                        start, end = self.bounds[i], self.bounds[i + 1]
                    else:
                        start = i * tokens_per_row
                        end = start + (tokens_per_row if self.lengths is None else int(self.lengths[i]))
                    runs.append((start, end, s))
            found = self.derived[key] = tuple(runs)
        return found


class SlotContext(threading.local):
    """Holder the engine sets around one forward; slot layers read it. One per engine, not global:
    transformers' module signatures give no way to pass per-row slot indices down to a Linear.
    Thread-local, so several model workers can run forwards on the same engine at once."""

    def __init__(self) -> None:
        self.current: Optional[SlotBatch] = None
        # Set only while exporting the shared-base ONNX graph: slot index per row and every layer's
        # (A, B) slot tensors as graph inputs, so registering a task changes inputs, not the graph.
        self.traced: Optional["TracedSlots"] = None


class TracedSlots:
    def __init__(self, slot_per_row: torch.Tensor, tensors: dict, fused_op: bool = False,
                 slot_r8: Optional[dict] = None, row_lengths: Optional[torch.Tensor] = None,
                 offsets: Optional[torch.Tensor] = None, vectors: Optional[dict] = None) -> None:
        self.slot_per_row = slot_per_row  # [B] int64
        self.tensors = tensors  # layer name -> (A [slots, r_max, d_in], B [slots, r_max, d_out])
        # With the ONNX Runtime LoRA op: layer name -> [slots] int64 rank table, and [B] real lengths.
        self.fused_op = fused_op
        self.slot_r8 = slot_r8 or {}
        self.row_lengths = row_lengths
        # Token-packed graph: the rows' token offsets [B + 1] into one [1, N, d] run of tokens; 3-D
        # slot layers then become adapterserve.SlotLoRAPacked nodes (the pooler, [B, d], stays SlotLoRA).
        self.offsets = offsets
        # layer name -> {"out_scale", "out_shift" (+ "vector_flags" with the op; + "in_scale" where the
        # graph takes one for the layer): graph inputs} (slot_layers.SlotLoRALinear's vector buffers).
        self.vectors = vectors or {}
