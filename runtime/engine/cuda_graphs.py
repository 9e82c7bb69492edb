"""CUDA graphs for the torch engine's padded forward on a GPU.

Why: on CUDA the engine is host-bound, not GPU-bound. A bare MiniLM forward is ~130 kernel launches,
each of the 37 slot layers adds about four (gathers, bmm, baddbmm), and one launch costs ~12 us of
host time on the H100 VM, where the GPU was busy 25 ms of ~430 (docs/benchmarks.md, GPU section).
Replaying a captured graph issues the whole forward as one launch (2.6 x fp16 texts/s at batch 32,
same section).

How: one graph per (rows, width) bucket, captured the first time a batch of that shape comes
(rows rounded up to a power of two, width to a multiple of 16). Each graph reads static input
buffers, which a forward fills before replaying. What a captured graph cannot see changing is
fixed at capture time:
- every slot layer runs its adapter branch at r_max over every row (`SlotBatch.every_layer`): a
  layer no adapter touches at capture time may be touched by one registered later, and an unused
  rank or slot 0 ("no adapter") reads zeros, which add nothing;
- the attention mask goes in as [rows, 1, width] (BERT's additive-mask path) so transformers does
  not look at its values on the host (`torch.all(mask == 1)`), which a capture forbids;
- slot buffers, merged base weights and heads are read in place, so registering or replacing an
  adapter (a copy_ into its slot) reaches every graph with no re-capture.
Rows past the batch are padding rows with slot 0 and one unmasked token; their features are dropped.
A shape whose capture fails is served eagerly from then on (logged once per shape).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

WIDTH_STEP = 16


def rows_bucket(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


def width_bucket(width: int, max_width: int) -> int:
    return min(-(-width // WIDTH_STEP) * WIDTH_STEP, max_width)


class _Graph:
    def __init__(self, rows: int, width: int, device: torch.device, uses_token_types: bool) -> None:
        self.input_ids = torch.zeros(rows, width, dtype=torch.long, device=device)
        self.attention_mask = torch.zeros(rows, 1, width, dtype=torch.long, device=device)
        self.token_type_ids = torch.zeros(rows, width, dtype=torch.long, device=device) if uses_token_types else None
        self.slot_per_row = torch.zeros(rows, dtype=torch.long, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.features: Optional[torch.Tensor] = None

    def fill(self, inputs: dict[str, torch.Tensor], slots: list[int]) -> None:
        n, w = inputs["input_ids"].shape
        self.input_ids.zero_()
        self.input_ids[:n, :w].copy_(inputs["input_ids"], non_blocking=True)
        self.attention_mask.zero_()
        self.attention_mask[:, 0, 0] = 1  # padding rows attend to one token: no all-masked softmax
        self.attention_mask[:n, 0, :w].copy_(inputs["attention_mask"], non_blocking=True)
        if self.token_type_ids is not None:
            self.token_type_ids.zero_()
            if "token_type_ids" in inputs:
                self.token_type_ids[:n, :w].copy_(inputs["token_type_ids"], non_blocking=True)
        self.slot_per_row.zero_()
        self.slot_per_row[:n].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)

    def kwargs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


class GraphedForward:
    """Replays captured forwards of `forward(kwargs, slot_per_row) -> features [rows, H]`."""

    def __init__(self, forward: Callable[[dict, torch.Tensor], torch.Tensor], device: torch.device,
                 max_width: int, uses_token_types: bool) -> None:
        self.forward = forward
        self.device = device
        self.max_width = max_width
        self.uses_token_types = uses_token_types
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.failed: set[tuple[int, int]] = set()
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: graphs replay one at a time
        # One replay at a time: graphs share their pool and each has one set of input buffers.
        self.lock = threading.Lock()

    def __call__(self, inputs: dict[str, torch.Tensor], slots: list[int]) -> Optional[torch.Tensor]:
        """Features [len(slots), H], or None where this shape is served eagerly."""
        n, w = inputs["input_ids"].shape
        key = (rows_bucket(n), width_bucket(w, self.max_width))
        if w > key[1] or key in self.failed:
            return None
        with self.lock:
            graph = self.graphs.get(key)
            if graph is None:
                graph = self._capture(key, inputs, slots)
                if graph is None:
                    return None
            graph.fill(inputs, slots)
            graph.graph.replay()
            return graph.features[:n].clone()  # the next replay overwrites the static output

    def _capture(self, key: tuple[int, int], inputs, slots) -> Optional[_Graph]:
        graph = _Graph(*key, self.device, self.uses_token_types)
        graph.fill(inputs, slots)
        try:
            # Warm-up on a side stream first (cuBLAS handles, lazy inits), as torch's docs require.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.forward(graph.kwargs(), graph.slot_per_row)
            torch.cuda.current_stream(self.device).wait_stream(side)
            # thread_local: other threads (an adapter registration's copies, another worker's heads) may
            # use the GPU meanwhile; torch's capture stream is non-blocking, so their legacy-stream work
            # does not join the capture.
            with torch.cuda.graph(graph.graph, pool=self.pool, capture_error_mode="thread_local"):
                graph.features = self.forward(graph.kwargs(), graph.slot_per_row)
        except Exception as e:  # noqa: BLE001 - an uncapturable shape is still served, eagerly
            log.warning("CUDA graph capture failed for %d rows x %d tokens, serving that shape eagerly: %s",
                        key[0], key[1], e)
            self.failed.add(key)
            torch.cuda.synchronize(self.device)
            return None
        self.graphs[key] = graph
        log.info("captured a CUDA graph for %d rows x %d tokens (%d graphs)", key[0], key[1], len(self.graphs))
        return graph
