"""The values that cross the runtime's boundary: what a caller sends, what it gets back, and the row
a text becomes on its way through a batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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


@dataclass
class Prediction:
    task: str
    adapter_version: str
    scores: list[LabelScore]  # sorted by score, highest first
    logits: list[float]  # in label-index order
    input_tokens: int
    truncated: bool

    @property
    def label(self) -> str:
        return self.scores[0].label


@dataclass
class Row:
    """One text on its way through a batch: the adapter version it was admitted with, its tokens."""

    entry: AdapterEntry
    encoded: Encoded
    prediction: Optional[Prediction] = field(default=None)


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
