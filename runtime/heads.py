"""Per-task heads over the features of one mixed batch: stacked where every head is one linear (on the
CPU every head and its softmax in one native call, runtime/native/csrc/lora_kernel.c head_scores, or
numpy; on a GPU one gather and one batched product for the batch), else each task on its own rows.
A stacked batch leaves each row its index into the batch's BatchScores: no per-row object is made
until someone reads the row's Prediction (types.Row).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from adapterserve.adapters.registry import AdapterEntry
from adapterserve.runtime.engine.slot_bottlenecks import activation
from adapterserve.runtime.families import Family
from adapterserve.runtime.native import lora_kernel
from adapterserve.runtime.types import BatchScores, Prediction, Row


def stacked_head(family: Family, device: torch.device, head: dict) -> Optional[tuple]:
    """AdapterEntry.stacked_head, where the head is one linear (Family.linear_head). On a GPU each
    task's own head costs a few kernel launches (~50 ms of host time per pass over 32 tasks on the
    H100 VM); on the CPU a torch op, a softmax and a sort per task cost ~0.4 ms more per batch of
    32 mixed tasks than one numpy pass (shared int8 ONNX engine, docs/benchmarks.md)."""
    names = family.linear_head
    if names is None:
        return None
    weight, bias = head[names[0]], head[names[1]]
    n, hidden = weight.shape
    if device.type == "cpu":  # the CPU path (_stacked_scores: the native head kernel, or numpy)
        w, b = weight.float().contiguous().numpy(), bias.float().contiguous().numpy()
        # The kernel's row for this head, once here: reading .ctypes.data per batch cost ~1 us a head.
        return w, b, (w.ctypes.data, b.ctypes.data, n)
    padded = max(8, 1 << (n - 1).bit_length())
    w = weight.new_zeros(padded, hidden)
    w[:n] = weight
    b = bias.new_zeros(padded)
    b[:n] = bias
    return w, b


def _stacked_scores(entries: list[AdapterEntry], task_of_row: np.ndarray, features: torch.Tensor) -> BatchScores:
    """Every row's logits and probabilities [rows, P] (host; row i's first n_labels columns are its
    task's, the rest 0). On the CPU no torch op (each opens an OpenMP region; right after an ONNX
    Runtime run, whose threads still spin, that is what made packing slow, runtime/engine/packing.py):
    the native head kernel does every head and softmax in one call, or numpy a product per task where
    native code is off. On a GPU one gather of each row's padded head and one batched product, instead
    of a slice, a linear and a cast per task."""
    rows = len(task_of_row)
    if features.device.type == "cpu":
        heads = np.array([e.stacked_head[2] for e in entries], dtype=np.int64)  # [tasks, 3]: W, bias, labels
        width = int(heads[:, 2].max())
        kernel = lora_kernel.load()
        if kernel is not None:
            logits = np.empty((rows, width), dtype=np.float32)
            probs = np.empty((rows, width), dtype=np.float32)
            # One thread: two cut the cold call by a third on an idle machine (cpu_probes head-kernel-cold),
            # but where the other core is busy (the event loop, another worker) the team's wake-up cost
            # 7.8 ms a batch instead of ~0.2 ms (bench host beside a test run).
            kernel.heads(features.float().contiguous(), task_of_row, heads, logits, probs)
            return BatchScores(probs, logits)
        # Each task's head on its own rows (one product per task): gathering a [rows, P, H] copy of the
        # heads per row cost more than every product together (25 MB for 256 rows of 50-label heads).
        # The rows sorted by task once, so each product reads and writes contiguous rows in place.
        by_task = np.argsort(task_of_row, kind="stable")
        bounds = np.searchsorted(task_of_row[by_task], np.arange(len(entries) + 1)).tolist()
        f = features.float().numpy()[by_task]
        sorted_out = np.zeros((rows, width), dtype=np.float32)
        for k, e in enumerate(entries):
            lo, hi = bounds[k], bounds[k + 1]
            w, b = e.stacked_head[:2]
            out = sorted_out[lo:hi, :w.shape[0]]
            np.matmul(f[lo:hi], w.T, out=out)
            out += b
        logits = np.empty_like(sorted_out)
        logits[by_task] = sorted_out
        return BatchScores(_masked_softmax(logits, heads[:, 2][task_of_row]), logits)
    width = max(e.stacked_head[0].shape[0] for e in entries)
    ws, bs = [], []
    for e in entries:
        w, b = e.stacked_head
        ws.append(w if w.shape[0] == width else F.pad(w, (0, 0, 0, width - w.shape[0])))
        bs.append(b if b.shape[0] == width else F.pad(b, (0, width - b.shape[0])))
    idx = torch.from_numpy(task_of_row).to(features.device)
    weight = torch.stack(ws).index_select(0, idx)  # [rows, P, H]
    bias = torch.stack(bs).index_select(0, idx).unsqueeze(1)  # [rows, 1, P]
    logits = torch.baddbmm(bias, features.unsqueeze(1).to(weight.dtype), weight.transpose(1, 2))
    logits = logits.squeeze(1).float().cpu().numpy()
    # The padded heads' columns are 0 (zero weights and bias), as on the CPU.
    n_labels = np.fromiter((len(e.spec.labels) for e in entries), dtype=np.int64, count=len(entries))[task_of_row]
    return BatchScores(_masked_softmax(logits, n_labels), logits)


def _masked_softmax(logits: np.ndarray, n_labels: np.ndarray) -> np.ndarray:
    """Row-wise softmax over each row's first n_labels columns; the columns after get probability 0."""
    masked = np.where(np.arange(logits.shape[1]) < n_labels[:, None], logits, -np.inf)
    ex = np.exp(masked - masked.max(axis=1, keepdims=True))
    return ex / ex.sum(axis=1, keepdims=True)


def _head_logits(family: Family, entry: AdapterEntry, features: torch.Tensor) -> torch.Tensor:
    """The family's head, or an AdapterHub head's linears (spec.HeadLayout) with its activation between."""
    layout = entry.spec.head_layout
    if layout is None:
        return family.apply_head(entry.head, features)
    x = features
    for k in range(layout.layers):
        x = F.linear(x.to(entry.head[f"{k}.weight"].dtype), entry.head[f"{k}.weight"], entry.head[f"{k}.bias"])
        if k < layout.layers - 1 and layout.activation:
            x = activation(layout.activation)(x)
    return x


def _per_task_logits(family: Family, entries: list[AdapterEntry], rows_of: dict[int, list[int]],
                     features: torch.Tensor) -> list[np.ndarray]:
    """Each task's head on its own rows; returns each task's logits [its rows, labels] on the host."""
    if len(entries) > 1:
        # One gather puts each task's rows next to each other; its head then reads a slice.
        perm = [i for e in entries for i in rows_of[e.key]]
        features = features.index_select(0, torch.tensor(perm, device=features.device))
    sizes = [len(rows_of[e.key]) for e in entries]
    logits = [_head_logits(family, e, f).float() for e, f in zip(entries, features.split(sizes))]
    if features.device.type != "cpu":
        # One device->host copy (one sync) for every task's logits, not three per task:
        # with 32 tasks in a GPU batch the per-task copies cost more than the forward.
        width = max(lg.shape[1] for lg in logits)
        host = torch.cat([F.pad(lg, (0, width - lg.shape[1])) for lg in logits]).cpu()
        logits = [h[:, :lg.shape[1]] for h, lg in zip(host.split(sizes), logits)]
    return [lg.numpy() for lg in logits]

def apply_heads(family: Family, batch: list[Row], entries: list[AdapterEntry], task_of_row: np.ndarray,
                features: torch.Tensor) -> None:
    """Set every row's scores: entries are the batch's distinct adapters, task_of_row int64 [rows] the
    index of each row's adapter in entries."""
    with torch.inference_mode():
        if len(entries) > 1 and all(e.stacked_head is not None for e in entries):
            scores = _stacked_scores(entries, task_of_row, features)
            for i, r in enumerate(batch):  # each row reads its row of the batch's arrays when asked
                r.scored(scores, i)
            return
        rows_of: dict[int, list[int]] = {}
        for i, r in enumerate(batch):
            rows_of.setdefault(r.entry.key, []).append(i)
        logits = _per_task_logits(family, entries, rows_of, features)
    # Softmax and order on the host in numpy: no device sync per task, and no torch CPU op
    # per task either (each opens a parallel region: 0.5 ms apiece on a 16-core GPU host).
    for e, x in zip(entries, logits):
        probs, order = _softmax_order(x)
        for j, i in enumerate(rows_of[e.key]):
            batch[i].prediction = _prediction(e, batch[i], probs[j], order[j], x[j])


def _softmax_order(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise softmax and label order (most probable first, ties by index)."""
    ex = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = ex / ex.sum(axis=1, keepdims=True)
    return probs, np.argsort(-probs, axis=1, kind="stable")


def _prediction(entry: AdapterEntry, row: Row, probs: np.ndarray, order: np.ndarray, logits: np.ndarray) -> Prediction:
    return Prediction(entry.task, entry.version, entry.spec.labels, (probs, order, logits), row.encoded.length,
                      row.encoded.truncated)
