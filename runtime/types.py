"""The values that cross the runtime's boundary: what a caller sends, what it gets back, and the row
a text becomes on its way through a batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from adapterserve.adapters.registry import AdapterEntry
from adapterserve.runtime.errors import InvalidInputError
from adapterserve.runtime.tokenization import Encoded


@dataclass
class ClassifyItem:
    task: str
    text: str
    text_pair: Optional[str] = None


@dataclass
class LabelScore:
    label: str
    index: int
    score: float


class BatchScores:
    """One batch's probabilities and logits [rows, P] (a row's columns past its labels: probability 0)
    and, made on first use, every row's label order, most probable first: a caller that reads only each
    row's top label never sorts (one sort of [256, 64] cost ~110 us of a 256-row batch's host work)."""

    __slots__ = ("probs", "logits", "_order", "_best")

    def __init__(self, probs: np.ndarray, logits: np.ndarray) -> None:
        self.probs, self.logits = probs, logits
        self._order: Optional[np.ndarray] = None
        self._best: Optional[tuple[list[int], list[float]]] = None

    @property
    def best(self) -> tuple[list[int], list[float]]:
        """Every row's most probable label (the first of equals, as the order has it) and its
        probability, as Python lists made in one pass: a caller reading each row's top label then
        indexes lists instead of slicing an array per row. A column past a row's labels (probability 0)
        never wins: its labels' probabilities sum to 1."""
        if self._best is None:
            index = self.probs.argmax(axis=1)
            self._best = index.tolist(), self.probs[np.arange(len(index)), index].tolist()
        return self._best

    @property
    def order(self) -> np.ndarray:
        if self._order is None:  # two threads may both sort: the same answer
            self._order = np.argsort(-self.probs, axis=1, kind="stable")
        return self._order


class Prediction:
    """One row's answer, over the batch's arrays: the label objects are built only when read, and
    top(k) builds only k of them (a 50-label head costs nothing per row until someone asks)."""

    __slots__ = ("task", "adapter_version", "input_tokens", "truncated", "_labels", "_arrays", "_row", "_scores")

    def __init__(self, task: str, adapter_version: str, labels: list[str], scores, input_tokens: int,
                 truncated: bool, row: Optional[int] = None) -> None:
        """scores: (probs [>= n] in label order, order [n] label indices most probable first, logits
        [n]); or, with row given, the batch's BatchScores and this row's index in it, read only when
        asked (a batch of 256 rows then makes no per-row arrays)."""
        self.task, self.adapter_version = task, adapter_version
        self.input_tokens, self.truncated = input_tokens, truncated
        self._labels, self._arrays, self._row = labels, scores, row
        self._scores: Optional[list[LabelScore]] = None

    @property
    def _probs(self) -> np.ndarray:
        return self._arrays[0] if self._row is None else self._arrays.probs[self._row]

    @property
    def _order(self) -> np.ndarray:
        return self._arrays[1] if self._row is None else self._arrays.order[self._row, :len(self._labels)]

    @property
    def _logits(self) -> np.ndarray:
        return self._arrays[2] if self._row is None else self._arrays.logits[self._row, :len(self._labels)]

    def top(self, k: Optional[int] = None) -> list[LabelScore]:
        """The k most probable labels, highest first (None or 0: all)."""
        if self._scores is not None:
            return self._scores[:k or None]
        if k == 1 and self._row is not None:  # no sort (BatchScores.best)
            index, probs = self._arrays.best
            i = index[self._row]
            return [LabelScore(self._labels[i], i, probs[self._row])]
        order = self._order[:k] if k else self._order
        probs = self._probs
        return [LabelScore(self._labels[i], i, float(probs[i])) for i in order.tolist()]

    @property
    def scores(self) -> list[LabelScore]:  # sorted by score, highest first
        if self._scores is None:
            self._scores = self.top()
        return self._scores

    @property
    def logits(self) -> list[float]:  # in label-index order
        return self._logits.tolist()

    def probabilities(self) -> np.ndarray:
        """[n] float32 in label-index order."""
        return self._probs[:len(self._logits)]

    def logit_array(self) -> np.ndarray:
        return self._logits

    @property
    def label(self) -> str:
        return self.top(1)[0].label


class Row:
    """One text on its way through a batch: the adapter version it was admitted with, its tokens and,
    once its forward is done, its Prediction. A batch with stacked heads leaves each row only its
    index into the batch's BatchScores; the Prediction object is made when someone reads it (the
    server, building that request's answer), not on the model thread for every row."""

    __slots__ = ("entry", "encoded", "_scores", "_index", "_prediction")

    def __init__(self, entry: AdapterEntry, encoded: Encoded, prediction: Optional[Prediction] = None) -> None:
        self.entry, self.encoded = entry, encoded
        self._scores: Optional[BatchScores] = None
        self._index = 0
        self._prediction = prediction

    def scored(self, scores: BatchScores, index: int) -> None:
        self._scores, self._index, self._prediction = scores, index, None

    @property
    def prediction(self) -> Optional[Prediction]:
        if self._prediction is None and self._scores is not None:
            entry, encoded = self.entry, self.encoded
            self._prediction = Prediction(entry.task, entry.version, entry.spec.labels, self._scores, encoded.length,
                                          encoded.truncated, self._index)
        return self._prediction

    @prediction.setter
    def prediction(self, value: Optional[Prediction]) -> None:
        self._scores, self._prediction = None, value


@dataclass
class AdapterInfo:
    task: str
    version: str
    peft_type: str
    rank: int
    target_modules: list[str]
    labels: list[str]
    size_bytes: int
    residency: str  # DEVICE, HOST or DISK
    registered_at: float
    metadata: dict


def check_task_name(task: str) -> None:
    if not task or len(task) > 128 or not all(c.isalnum() or c in "-_." for c in task):
        shown = repr(task[:64]) + ("..." if len(task) > 64 else "")
        raise InvalidInputError(f"task name {shown} must be 1-128 characters of letters, digits, '-', '_' or '.'")
