"""What a parsed, validated adapter holds. Produced by adapters.peft_lora, consumed by the runtime."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraModule:
    """LoRA weights for one base linear, already in the slot layout."""

    module: str  # backbone-relative module name, e.g. encoder.layer.0.attention.self.query
    a: torch.Tensor  # [d_in, r]   (PEFT lora_A.weight transposed)
    b: torch.Tensor  # [r, d_out]  (PEFT lora_B.weight transposed, times the LoRA scaling)

    @property
    def rank(self) -> int:
        return self.a.shape[1]


@dataclass
class AdapterSpec:
    peft_type: str
    rank: int  # largest rank over its modules
    target_modules: list[str]  # backbone-relative module names the adapter changes
    modules: dict[str, LoraModule]
    head: dict[str, torch.Tensor]  # family head tensors, e.g. classifier.weight
    labels: list[str]
    files: dict[str, bytes]  # the original files, for persistence and the version hash
    version: str  # sha256 over the files
    lora_alpha: float = 0.0
    use_rslora: bool = False
    metadata: dict = field(default_factory=dict)
    size_bytes: int = 0  # bytes of the files; kept when the files leave memory (disk tier)

    def __post_init__(self) -> None:
        if not self.size_bytes:
            self.size_bytes = sum(len(v) for v in self.files.values())

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def tensor_bytes(self) -> int:
        tensors = [t for m in self.modules.values() for t in (m.a, m.b)] + list(self.head.values())
        return sum(t.numel() * t.element_size() for t in tensors)
