"""What a parsed, validated adapter holds. Produced by adapters.peft_lora, consumed by the runtime."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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
class VectorState:
    """Per-feature vectors one base linear gets from its adapter, beside or instead of LoRA:
    y = out_scale ⊙ (base(in_scale ⊙ x) + ΔW (in_scale ⊙ x)) + out_shift, where base(...) includes the
    base's bias. None = neutral (1 for the scales, 0 for the shift). IA3 sets in_scale (feed-forward)
    or out_scale; DoRA sets out_scale = m / ‖W + ΔW‖ and out_shift = (1 − out_scale) ⊙ bias; a trained
    bias (LoRA bias='lora_only') sets out_shift = its bias − the base's."""

    in_scale: Optional[torch.Tensor] = None  # [d_in] float32
    out_scale: Optional[torch.Tensor] = None  # [d_out] float32
    out_shift: Optional[torch.Tensor] = None  # [d_out] float32

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.in_scale, self.out_scale, self.out_shift) if t is not None]


@dataclass
class KroneckerModule:
    """LoKr's update of one base linear as its two Kronecker factors: ΔW = kron(W1, W2), each factor
    whole (v None) or a low-rank pair W = u @ v, LoKr's scaling folded into W1's u. Above r_max it is
    applied as it is: ΔW x = vec(W1 · X · W2ᵀ) with X the token's input as [in_m, in_n] row-major
    (runtime/engine/slot_layers.KronForm), out_l·in_m·out_k plus in_m·in_n·out_k (or, W2 a pair,
    in_m·k·(in_n + out_k)) products per token where the same update as LoRA takes rank·(d_in + d_out).
    float32."""

    module: str
    u1: torch.Tensor  # [out_l, k1], or W1 [out_l, in_m] when v1 is None
    v1: Optional[torch.Tensor]  # [k1, in_m]
    u2: torch.Tensor  # [out_k, k2], or W2 [out_k, in_n] when v2 is None
    v2: Optional[torch.Tensor]  # [k2, in_n]

    @staticmethod
    def _parts(u: torch.Tensor, v: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with W = U V of the least inner size: a whole factor split by an identity on its smaller side."""
        if v is not None:
            return u, v
        p, q = u.shape
        return (u, torch.eye(q)) if q <= p else (torch.eye(p), u)

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(out_l, out_k, in_m, in_n): d_out = out_l·out_k, d_in = in_m·in_n."""
        in_m = (self.u1 if self.v1 is None else self.v1).shape[1]
        in_n = (self.u2 if self.v2 is None else self.v2).shape[1]
        return self.u1.shape[0], self.u2.shape[0], in_m, in_n

    @property
    def rank(self) -> int:
        """The rank of the same update as LoRA (as_lora): k1·k2."""
        return self._parts(self.u1, self.v1)[0].shape[1] * self._parts(self.u2, self.v2)[0].shape[1]

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same update as LoRA, exactly: kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2) (the
        mixed-product rule), so A = kron(V1, V2)ᵀ [d_in, k1·k2] and B = kron(U1, U2)ᵀ [k1·k2, d_out]."""
        u1, v1 = self._parts(self.u1, self.v1)
        u2, v2 = self._parts(self.u2, self.v2)
        return torch.kron(v1, v2).t().contiguous(), torch.kron(u1, u2).t().contiguous()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.u1, self.v1, self.u2, self.v2) if t is not None]


@dataclass(frozen=True)
class BottleneckOptions:
    """How an AdapterHub bottleneck adapter sits in its sublayer (its BnConfig; the math is in
    runtime/engine/slot_bottlenecks.py)."""

    activation: str
    parallel: bool
    residual_before_ln: object  # True, False or "post_add"
    original_ln_before: bool
    original_ln_after: bool
    adapter_residual_before_ln: bool
    ln_before: bool
    ln_after: bool
    scaling: float  # when the adapter saves no learned scaling tensor


@dataclass
class BottleneckModule:
    """One bottleneck adapter at one sublayer output (encoder.layer.<i>.attention.output or .output):
    h <- up(f(down(x))) * scaling, with residuals and layer norms as its options say. float32."""

    down_weight: torch.Tensor  # [r, hidden]
    down_bias: torch.Tensor  # [r]
    up_weight: torch.Tensor  # [hidden, r]
    up_bias: torch.Tensor  # [hidden]
    scaling: torch.Tensor  # [1] or [hidden]
    norm_before: Optional[tuple]  # (weight, bias) [hidden] of the adapter's own LayerNorm, or None
    norm_after: Optional[tuple]
    options: BottleneckOptions

    def tensors(self) -> list[torch.Tensor]:
        return [self.down_weight, self.down_bias, self.up_weight, self.up_bias, self.scaling,
                *(self.norm_before or ()), *(self.norm_after or ())]

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "BottleneckModule":
        def move(t):
            return t.to(device=device, dtype=dtype)

        def pair(p):
            return tuple(map(move, p)) if p is not None else None

        return BottleneckModule(move(self.down_weight), move(self.down_bias), move(self.up_weight), move(self.up_bias),
                                move(self.scaling), pair(self.norm_before), pair(self.norm_after), self.options)


@dataclass(frozen=True)
class HeadLayout:
    """An AdapterHub classification head: `layers` linears (head tensors "0.weight", "0.bias", ...), the
    activation after each but the last, reading the first token's hidden state or the pooler output."""

    layers: int
    activation: Optional[str]
    reads: str  # "first" or "pooled"


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
    vectors: dict[str, VectorState] = field(default_factory=dict)  # module name -> per-feature vectors
    # Prompt and P-tuning: the virtual tokens' embeddings [n, hidden] float32, put before each row's
    # tokens (PEFT's order: virtual tokens, then [CLS] ...; token type 0, attention on).
    prompt: Optional[torch.Tensor] = None
    virtual_tokens: int = 0  # rows of prompt; kept while the tensor itself is in the disk tier
    # Prefix tuning: each layer's attention keys and values [layers, 2, n, hidden] float32, attended to
    # by the row's tokens before their own (PEFT's past_key_values); the row's positions start at n.
    prefix: Optional[torch.Tensor] = None
    prefix_tokens: int = 0  # n; kept while the tensor itself is in the disk tier
    # AdapterHub bottleneck adapters: sublayer module name -> its adapter; their head is head_layout's.
    bottlenecks: dict[str, BottleneckModule] = field(default_factory=dict)
    head_layout: Optional[HeadLayout] = None
    # LoKr above r_max: module name -> its Kronecker factors (its rank-r_max-or-less LoKr are in `modules`).
    kron: dict[str, KroneckerModule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.size_bytes:
            self.size_bytes = sum(len(v) for v in self.files.values())

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def sequence_state(self) -> bool:
        """Virtual tokens or prefixes: state that changes the sequence, which only eager forwards read."""
        return self.prompt is not None or self.prefix is not None

    @property
    def reserved_positions(self) -> int:
        """Positions a row of this task gives up to the adapter: its virtual tokens or prefix."""
        return self.virtual_tokens + self.prefix_tokens

    @property
    def eager_only(self) -> bool:
        """State only the torch engine's eager forwards apply (neither CUDA graphs nor the ONNX graph)."""
        return bool(self.vectors) or self.sequence_state or bool(self.bottlenecks) or bool(self.kron)

    def kind(self) -> str:
        """The kind as users name it, in messages: the PEFT type, or what a LoRA adapter adds to it."""
        if self.peft_type == "BOTTLENECK":
            return "AdapterHub bottleneck"
        if self.peft_type != "LORA" or not self.vectors:
            return self.peft_type
        scaled = any(v.out_scale is not None for v in self.vectors.values())
        return "LoRA with DoRA" if scaled else "LoRA with trained biases"

    def summary(self) -> dict:
        """What listings show of the adapter without its tensors (stored beside its files)."""
        return {"peft_type": self.peft_type, "rank": self.rank, "target_modules": list(self.target_modules),
                "size_bytes": self.size_bytes}

    def tensor_bytes(self) -> int:
        tensors = [t for m in self.modules.values() for t in (m.a, m.b)] + list(self.head.values())
        tensors += [t for v in self.vectors.values() for t in v.tensors()]
        tensors += [t for t in (self.prompt, self.prefix) if t is not None]
        tensors += [t for m in self.bottlenecks.values() for t in m.tensors()]
        tensors += [t for m in self.kron.values() for t in m.tensors()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # The fields that hold the adapter's tensors (what the host tier drops and reads back), empty values.
    TENSOR_STATE = {"modules": dict, "vectors": dict, "prompt": lambda: None, "prefix": lambda: None,
                    "bottlenecks": dict, "kron": dict}

    def take_tensors(self, other: "AdapterSpec") -> None:
        """Holds the tensors of `other` (the same version read back from disk)."""
        for name in self.TENSOR_STATE:
            setattr(self, name, getattr(other, name))

    def drop_tensors(self) -> None:
        for name, empty in self.TENSOR_STATE.items():
            setattr(self, name, empty())
