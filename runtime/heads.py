"""Per-task heads over the features of one mixed batch: stacked where every head is one linear (one
gather and one batched product for the batch), else each task on its own rows; then softmax, label
order and the Prediction of every row, computed on the host in numpy.
"""
from __future__ import annotations

from typing import Iterable, Optional

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
    if device.type == "cpu":  # the CPU path (_stacked_logits: the native head kernel, or numpy)
        w, b = weight.float().contiguous().numpy(), bias.float().contiguous().numpy()
        # Their addresses once here: reading .ctypes.data per batch cost ~1 us a head.
        return w, b, w.ctypes.data, b.ctypes.data
    padded = max(8, 1 << (n - 1).bit_length())
    w = weight.new_zeros(padded, hidden)
    w[:n] = weight
    b = bias.new_zeros(padded)
    b[:n] = bias
    return w, b


def _stacked_logits(batch: list[Row], entries: list[AdapterEntry], features: torch.Tensor) -> np.ndarray:
    """Every row's logits [rows, P] (host); row i's first n_labels columns are its logits. On a GPU one
    gather of each row's padded head and one batched product, instead of a slice, a linear and a cast
    per task. On the CPU no torch op (each opens an OpenMP region; right after an ONNX Runtime run,
    whose threads still spin, that is what made packing slow, runtime/engine/packing.py): the native
    head kernel in one call, or a numpy product per task where native code is off."""
    position = {e.key: k for k, e in enumerate(entries)}
    if features.device.type == "cpu":
        # Each task's head on its own rows (one product per task): gathering a [rows, P, H] copy of the
        # heads per row cost more than every product together (25 MB for 256 rows of 50-label heads).
        # The rows sorted by task once, so each product reads and writes contiguous rows in place.
        width = max(e.stacked_head[0].shape[0] for e in entries)
        idx = np.fromiter((position[r.entry.key] for r in batch), dtype=np.int64, count=len(batch))
        by_task = np.argsort(idx, kind="stable")
        bounds = np.searchsorted(idx[by_task], np.arange(len(entries) + 1))
        kernel = lora_kernel.load()
        if kernel is not None:  # every task's product in one native call
            out = np.zeros((len(batch), width), dtype=np.float32)
            heads = [e.stacked_head for e in entries]  # each (weight, bias, their addresses): alive while held
            kernel.heads(np.ascontiguousarray(features.float().numpy()), by_task, bounds,
                         np.fromiter((h[2] for h in heads), dtype=np.int64, count=len(heads)),
                         np.fromiter((h[3] for h in heads), dtype=np.int64, count=len(heads)),
                         np.fromiter((h[0].shape[0] for h in heads), dtype=np.int64, count=len(heads)), out)
            return out
        f = features.float().numpy()[by_task]
        bounds = bounds.tolist()
        sorted_out = np.zeros((len(batch), width), dtype=np.float32)
        for k, e in enumerate(entries):
            lo, hi = bounds[k], bounds[k + 1]
            w, b = e.stacked_head[:2]
            rows = sorted_out[lo:hi, :w.shape[0]]
            np.matmul(f[lo:hi], w.T, out=rows)
            rows += b
        out = np.empty_like(sorted_out)
        out[by_task] = sorted_out
        return out
    width = max(e.stacked_head[0].shape[0] for e in entries)
    ws, bs = [], []
    for e in entries:
        w, b = e.stacked_head
        ws.append(w if w.shape[0] == width else F.pad(w, (0, 0, 0, width - w.shape[0])))
        bs.append(b if b.shape[0] == width else F.pad(b, (0, width - b.shape[0])))
    idx = torch.tensor([position[r.entry.key] for r in batch], device=features.device)
    weight = torch.stack(ws).index_select(0, idx)  # [rows, P, H]
    bias = torch.stack(bs).index_select(0, idx).unsqueeze(1)  # [rows, 1, P]
    logits = torch.baddbmm(bias, features.unsqueeze(1).to(weight.dtype), weight.transpose(1, 2))
    return logits.squeeze(1).float().cpu().numpy()


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

def apply_heads(family: Family, batch: list[Row], entries: Iterable[AdapterEntry], features: torch.Tensor) -> None:
    entries = list(entries)
    with torch.inference_mode():
        if len(entries) > 1 and all(e.stacked_head is not None for e in entries):
            _predict_stacked(batch, _stacked_logits(batch, entries, features))
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

def _predict_stacked(batch: list[Row], logits: np.ndarray) -> None:
    """Predictions from the padded logits [rows, P] of _stacked_logits: one softmax and one sort
    over the batch, each row's columns past its task's labels masked out (they sort last)."""
    n_labels = np.fromiter((len(r.entry.spec.labels) for r in batch), dtype=np.int64, count=len(batch))
    masked = np.where(np.arange(logits.shape[1]) < n_labels[:, None], logits, -np.inf)
    ex = np.exp(masked - masked.max(axis=1, keepdims=True))
    scores = BatchScores(ex / ex.sum(axis=1, keepdims=True), logits)  # the order is sorted when first read
    for i, r in enumerate(batch):  # each reads its row of the batch's arrays when asked
        entry, encoded = r.entry, r.encoded
        r.prediction = Prediction(entry.task, entry.version, entry.spec.labels, scores, len(encoded.input_ids),
                                  encoded.truncated, i)


def _softmax_order(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise softmax and label order (most probable first, ties by index)."""
    ex = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = ex / ex.sum(axis=1, keepdims=True)
    return probs, np.argsort(-probs, axis=1, kind="stable")


def _prediction(entry: AdapterEntry, row: Row, probs: np.ndarray, order: np.ndarray, logits: np.ndarray) -> Prediction:
    return Prediction(entry.task, entry.version, entry.spec.labels, (probs, order, logits), row.encoded.length,
                      row.encoded.truncated)
