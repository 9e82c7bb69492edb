"""The slot pool: every target linear of the base wrapped once by a slot layer that owns fixed-shape
slot buffers, and the writes that load or clear a slot. Both engines serve from one pool: the torch
engine runs the wrapped backbone, the ONNX engine feeds the same buffers to ONNX Runtime as inputs.
"""
from __future__ import annotations

from typing import Optional

import torch

from adapterserve.adapters.peft_lora import BaseShape
from adapterserve.adapters.spec import AdapterSpec
from adapterserve.runtime.engine.base_model import BaseModel
from adapterserve.runtime.engine.batch import SlotContext
from adapterserve.runtime.engine.deberta import per_row_positions
from adapterserve.runtime.engine import packing
from adapterserve.runtime.engine.slot_bottlenecks import SlotBottlenecks, sublayer_outputs
from adapterserve.runtime.engine.slot_layers import SlotLoRALinear
from adapterserve.runtime.engine.slot_prefixes import SlotPrefixes
from adapterserve.runtime.engine.slot_prompts import SlotPromptEmbedding


def _matches(name: str, suffixes: Optional[list[str]]) -> bool:
    return suffixes is None or any(name == s or name.endswith("." + s) for s in suffixes)


class SlotPool:
    def __init__(self, base: BaseModel, slots: int, r_max: int, targets: Optional[list[str]] = None,
                 wide_slots: int = 0, wide_r_max: int = 0) -> None:
        self.base = base
        self.slots = slots
        self.r_max = r_max
        # Wide slots, numbered from `slots` on: adapters above r_max. Their buffers are made when the first
        # one loads, as wide as the widest loaded so far (rounded up to 16), so a server that never sees
        # one pays nothing and one that does pays for the ranks it holds.
        self.wide_slots = wide_slots
        self.wide_r_max = wide_r_max if wide_slots else 0
        self.wide_width = 0
        self.context = SlotContext()  # the batch being run, read by every slot layer
        self.layers: dict[str, SlotLoRALinear] = {}
        self.slot_ranks: dict[int, int] = {}  # slot -> rank of the adapter in it
        # Where the slot layers' base weights are once an engine released them (a safetensors file of
        # "<layer>.weight" / "<layer>.bias"; the ONNX engine's export writes it), or None.
        self.released_weights: Optional[str] = None
        for name, linear in base.linear_layers().items():
            if not _matches(name, targets):
                continue
            wrapped = SlotLoRALinear(linear, linear.in_features, linear.out_features, slots, r_max,
                                     self.context, base.dtype, base.device, name=name)
            parent_name, _, child = name.rpartition(".")
            parent = base.backbone.get_submodule(parent_name) if parent_name else base.backbone
            setattr(parent, child, wrapped)
            self.layers[name] = wrapped
        # DeBERTa projects its shared relative positions through slot layers: per row (runtime/engine/deberta.py).
        per_row_positions(base.backbone)
        self.prompts: Optional[SlotPromptEmbedding] = None  # made when the first prompt adapter loads
        self.prefixes: Optional[SlotPrefixes] = None  # made when the first prefix adapter loads
        # Prefix tuning needs every encoder layer's attention to be one whose keys and values it can extend.
        attention = packing.swappable_attention(base.backbone)
        layers = getattr(getattr(base.backbone, "encoder", None), "layer", None)
        self.prefix_attention = attention if layers is not None and len(attention) == len(layers) else []
        self.bottlenecks: Optional[SlotBottlenecks] = None  # made when the first bottleneck adapter loads
        self.sublayer_outputs = sublayer_outputs(base.backbone) if self.prefix_attention else {}
        # Slots whose head reads the first token's hidden state where the family's features are the
        # pooler's output (AdapterHub heads with use_pooler false on BERT): the engine gives them that.
        self.first_token_slots: set[int] = set()
        if not self.layers:
            raise ValueError(f"no linear layer of the base matches lora targets {targets}")
        self.shape = BaseShape(
            family=base.family,
            hidden_size=base.hidden_size,
            linear_dims={n: (l.d_in, l.d_out) for n, l in self.layers.items()},
            r_max=r_max,
            max_length=base.max_length,
            base_params=self.base_params,
            head_defaults=base.head_defaults,
            token_dim=base.backbone.get_input_embeddings().embedding_dim,
            wide_r_max=self.wide_r_max,
            prefix_layers=len(self.prefix_attention),
            attention_heads=self.prefix_attention[0].num_attention_heads if self.prefix_attention else 0,
            bottleneck_locations=frozenset(self.sublayer_outputs),
        )

    def base_params(self, name: str) -> tuple:
        """(weight [d_out, d_in] float32 on the CPU, or None for a quantized or released weight; bias float32
        or None)
        of one wrapped linear, as the adapter kinds that depend on the base read them."""
        linear = self.layers[name].base
        weight = linear.weight  # None once the ONNX engine has its own copy
        plain = type(linear) is torch.nn.Linear and weight is not None and weight.is_floating_point()
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        if weight is None and self.released_weights is not None:
            from safetensors import safe_open

            with safe_open(self.released_weights, framework="pt") as fh:
                saved = set(fh.keys())
                return tuple(fh.get_tensor(f"{name}.{k}") if f"{name}.{k}" in saved else None for k in ("weight", "bias"))
        return (weight.detach().float().cpu() if plain else None), bias

    def load_slot(self, slot: int, spec: AdapterSpec) -> None:
        """Overwrite `slot` with the adapter in every layer, whatever was there before. The writes
        of all layers go out as one foreach zero and one foreach copy: per-layer ops made a load
        cost ~0.9 ms of dispatch on MiniLM, which adds up when 1,024 adapters share 64 slots."""
        if slot >= self.slots:
            self._load_wide(slot - self.slots, spec)
            return
        assert 0 < slot < self.slots
        dst: list = []
        src: list = []
        zero: list = []
        dtype = self.base.dtype
        if spec.prompt is not None or self.prompts is not None:
            self._prompt_embedding().write(slot, spec.prompt)
        if spec.prefix is not None or self.prefixes is not None:
            self._prefix_table().write(slot, spec.prefix)
        if spec.bottlenecks or self.bottlenecks is not None:
            if self.bottlenecks is None:
                self.bottlenecks = SlotBottlenecks(self.sublayer_outputs, self.context, self.base.device,
                                                   self.base.dtype)
            self.bottlenecks.write(slot, spec.bottlenecks)
        reads_first = (spec.head_layout is not None and spec.head_layout.reads == "first"
                       and self.base.family.uses_pooler)
        (self.first_token_slots.add if reads_first else self.first_token_slots.discard)(slot)
        for name, layer in self.layers.items():
            layer.write_vectors(slot, spec.vectors.get(name))
            if spec.kron or layer.kron:
                layer.write_kron(slot, spec.kron.get(name))
            module = spec.modules.get(name)
            if module is None:
                layer.queue_clear(slot, zero)
            elif module.a.dtype == dtype and module.b.dtype == dtype:
                layer.queue_write(slot, module.a, module.b, dst, src, zero)
            else:
                layer.queue_write(slot, module.a.to(dtype), module.b.to(dtype), dst, src, zero)
        with torch.inference_mode():
            if zero:
                torch._foreach_zero_(zero)
            if not dst:
                pass  # an adapter of vectors only (IA3)
            elif self.base.device.type == "cpu":
                torch._foreach_copy_(dst, src)
            else:  # host tensors into device slots: plain copies (not measured on a GPU here)
                for d, s in zip(dst, src):
                    d.copy_(s)
        self.slot_ranks[slot] = spec.rank

    def _prompt_embedding(self) -> SlotPromptEmbedding:
        if self.prompts is None:
            backbone = self.base.backbone
            self.prompts = SlotPromptEmbedding(backbone.get_input_embeddings(), self.slots, self.context)
            backbone.set_input_embeddings(self.prompts)
        return self.prompts

    def _prefix_table(self) -> SlotPrefixes:
        if self.prefixes is None:
            self.prefixes = SlotPrefixes(self.prefix_attention, self.slots, self.context, self.base.device)
        return self.prefixes

    def _load_wide(self, w: int, spec: AdapterSpec) -> None:
        assert 0 <= w < self.wide_slots and not spec.eager_only
        needed = max((m.rank for m in spec.modules.values()), default=0)
        if needed > self.wide_width:
            self._widen(min(self.wide_r_max, -(-needed // 16) * 16))
        with torch.inference_mode():
            for name, layer in self.layers.items():
                module = spec.modules.get(name)
                r = 0 if module is None else module.rank
                # Past the adapter's rank (all of it where the adapter leaves the layer alone) the slot holds
                # zeros: a forward with several wide adapters runs them together at the widest rank.
                layer.wide_a[w, r:].zero_()
                layer.wide_b[w, r:].zero_()
                if r:
                    layer.wide_a[w, :r].copy_(module.a.t())
                    layer.wide_b[w, :r].copy_(module.b)
                layer.wide_rank[w] = r
        self.slot_ranks[self.slots + w] = spec.rank

    def _widen(self, width: int) -> None:
        """Wide buffers of `width` ranks in every layer, what the narrower ones held copied over first
        (a forward on another worker reads its pinned slots from either, with the same values)."""
        with torch.inference_mode():
            for layer in self.layers.values():
                device, dtype = layer.lora_a.device, layer.lora_a.dtype
                a = torch.zeros(self.wide_slots, width, layer.d_in, dtype=dtype, device=device)
                b = torch.zeros(self.wide_slots, width, layer.d_out, dtype=dtype, device=device)
                if layer.wide_a is not None:
                    a[:, :self.wide_width] = layer.wide_a
                    b[:, :self.wide_width] = layer.wide_b
                else:
                    layer.wide_rank = [0] * self.wide_slots
                layer.wide_a, layer.wide_b = a, b
        self.wide_width = width

    def clear_slot(self, slot: int) -> None:
        """The slot was freed. No batch reads a free slot and the next load overwrites it completely
        (load_slot), so its weights are left in place rather than zeroed."""
        self.slot_ranks.pop(slot, None)
        if slot >= self.slots:
            for layer in self.layers.values():
                layer.wide_rank[slot - self.slots] = 0

    def slot_bytes(self) -> int:
        """Device bytes one slot takes across all wrapped layers."""
        lora = sum((l.lora_a[0].numel() + l.lora_b[0].numel()) * l.lora_a.element_size() for l in self.layers.values())
        vectors = sum((2 * l.d_out + l.d_in) * 4 for l in self.layers.values() if l.in_scale is not None)
        prefixes = self.prefixes.slot_bytes() if self.prefixes is not None else 0
        return lora + vectors + prefixes

    def bottleneck_bytes(self) -> int:
        """Device bytes of the bottleneck adapters in slots (their sizes vary, so they are not slot buffers)."""
        return self.bottlenecks.held_bytes() if self.bottlenecks is not None else 0

    def kron_bytes(self) -> int:
        """Device bytes of the LoKr factors in slots (LoKr above r_max: slot_layers.KronForm)."""
        return sum(form.nbytes() for l in self.layers.values() for form in l.kron.values())

    def wide_bytes(self) -> int:
        """Device bytes of every wide slot together (0 until the first wide adapter loads)."""
        return sum(l.wide_a.numel() * l.wide_a.element_size() + l.wide_b.numel() * l.wide_b.element_size()
                   for l in self.layers.values() if l.wide_a is not None)
