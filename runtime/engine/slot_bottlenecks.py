"""AdapterHub bottleneck adapters per slot, applied where AdapterHub applies them: at the BERT-shaped
sublayer outputs (encoder.layer.<i>.attention.output for `mh_adapter`, encoder.layer.<i>.output for
`output_adapter`), whose forward is LayerNorm(dropout(dense(h)) + input). Each such module's class is
swapped once for a subclass that runs its own forward when no row of the batch has an adapter there.
Otherwise, after the dense output x:
- adapters whose effect is an addition to x before the norm (`adds_before_norm`: Houlsby's, parallel
  ones) add it to their rows of x, so one LayerNorm serves every row: the fused CPU kernel's
  `bottleneck_runs` where it computes them (`kernel_form`: no norms of their own; relu, swish, gelu),
  else `bottleneck_delta` in torch;
- the others' rows (Pfeiffer's, which norms before) are computed again after the norm through
  `bottleneck_forward` (AdapterHub's Adapter / ParallelAdapter pre_forward, forward and post_forward)
  and written over theirs.
Padded rows are gathered by row, token-packed ones by token; adapters of the same options run as one
batched torch pass.

Adapters are held per slot as the spec's modules on the model's device (sizes differ per adapter and
per layer, so there is no fixed-shape buffer). Only the torch engine's eager forwards read them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F
from transformers.activations import get_activation

from adapterserve.adapters.spec import BottleneckModule
from adapterserve.runtime.engine.batch import SlotBatch, SlotContext
from adapterserve.runtime.engine.mixins import mix_in
from adapterserve.runtime.native.lora_kernel import BOTTLENECK_MAX_RANK


def sublayer_outputs(backbone) -> dict:
    """BERT-shaped sublayer output modules by name (dense, dropout, LayerNorm; forward(h, input))."""
    found = {}
    for name, module in backbone.named_modules():
        if name.startswith("encoder.layer.") and name.endswith(("attention.output", ".output")) \
                and all(hasattr(module, a) for a in ("dense", "dropout", "LayerNorm")) and name.count(".") <= 4:
            found[name] = module
    return found


def activation(name: str):
    """An AdapterHub activation by its config name (its Activation_Function_Class: transformers' table,
    leakyrelu beside it); the adapters' heads use the same names."""
    if name == "leakyrelu":
        return F.leaky_relu
    return get_activation(name)


def _norm(h: torch.Tensor, affine: Optional[tuple]) -> torch.Tensor:
    weight, bias = affine
    return F.layer_norm(h, (h.shape[-1],)) * weight + bias


def adds_before_norm(options) -> bool:
    """Whether the adapter's effect on a row is an addition to the sublayer's dense output before its
    LayerNorm, LayerNorm(x + d + input) with d = bottleneck_delta(...): true where AdapterHub runs it
    after the dense output with the sublayer's own norm last and not before (Houlsby and parallel
    adapters), false for Pfeiffer's (original_ln_before) and where that norm is off."""
    o = options
    if not o.original_ln_after or o.original_ln_before:
        return False
    # sequential: the residual is x (residual_before_ln True or False alike with no norm before), and
    # norm(adapter + residual) would not be an addition
    return o.parallel or (o.residual_before_ln in (True, False)
                          and not (o.adapter_residual_before_ln and o.ln_after))


# AdapterHub activations the native kernel computes (lora_kernel.c bottleneck_runs: its codes)
KERNEL_ACTIVATIONS = {"relu": 0, "swish": 1, "silu": 1, "gelu": 2}


def kernel_form(m: BottleneckModule) -> Optional[tuple]:
    """The adapter as the native kernel reads it, or None where the kernel does not compute it (an
    effect that is not an addition, its own norms, another activation, not fp32 on the CPU, a width off
    the 16-float grid, a rank over the kernel's bound): (tensors kept alive, the kernel's 6 params but the addresses)."""
    o = m.options
    if (not adds_before_norm(o) or m.norm_before is not None or m.norm_after is not None
            or o.activation not in KERNEL_ACTIVATIONS or m.down_weight.dtype != torch.float32
            or m.down_weight.device.type != "cpu" or m.down_weight.shape[1] % 16
            or m.down_weight.shape[0] > BOTTLENECK_MAX_RANK):
        return None
    scaling = m.scaling.reshape(-1)  # [1] or [hidden]
    tensors = (m.down_weight.contiguous(), m.down_bias.reshape(-1).contiguous(),
               (m.up_weight * scaling[:, None]).t().contiguous(), (m.up_bias.reshape(-1) * scaling).contiguous())
    params = np.array([t.data_ptr() for t in tensors] + [m.down_weight.shape[0], KERNEL_ACTIVATIONS[o.activation]],
                      dtype=np.int64)
    return tensors, params


def bottleneck_delta(m: BottleneckModule, x: torch.Tensor, sublayer_input: Optional[torch.Tensor]) -> torch.Tensor:
    """d for an adapter whose options adds_before_norm: bottleneck_forward's result is then
    layer_norm(x + d + sublayer_input). The residual it adds back is x itself (no norm ran before it),
    so only the adapter's own output, normed where norm_after comes after that residual, is left."""
    o = m.options
    h = sublayer_input if o.parallel else x
    z = h if m.norm_before is None else _norm(h, m.norm_before)
    down = activation(o.activation)(torch.matmul(z, m.down_weight.transpose(-1, -2)) + m.down_bias)
    out = (torch.matmul(down, m.up_weight.transpose(-1, -2)) + m.up_bias) * m.scaling
    return out if m.norm_after is None else _norm(out, m.norm_after)


def bottleneck_forward(m: BottleneckModule, x: torch.Tensor, sublayer_input: torch.Tensor, layer_norm) -> torch.Tensor:
    """AdapterHub's bottleneck_layer_forward for one adapter: x = dropout(dense(h)) of the sublayer,
    sublayer_input its residual input, layer_norm the sublayer's own LayerNorm. m may be several
    adapters of the same options stacked (stack_modules): x is then [adapters, tokens, hidden]."""
    o = m.options
    if o.parallel:  # ParallelAdapter.pre_forward: the adapter reads the sublayer's input
        h, residual = sublayer_input, sublayer_input
    else:
        residual = x if o.residual_before_ln is True else None
        h = x
        if o.original_ln_before:
            h = h + sublayer_input
            if o.residual_before_ln == "post_add":
                residual = h
            h = layer_norm(h)
        if o.residual_before_ln is False:
            residual = h
    z = h if m.norm_before is None else _norm(h, m.norm_before)
    down = activation(o.activation)(torch.matmul(z, m.down_weight.transpose(-1, -2)) + m.down_bias)
    out = (torch.matmul(down, m.up_weight.transpose(-1, -2)) + m.up_bias) * m.scaling
    if o.parallel:
        if m.norm_after is not None:
            out = _norm(out, m.norm_after)
        out = out + x  # ParallelAdapter.post_forward
    else:
        if o.adapter_residual_before_ln:
            out = out + residual
        if m.norm_after is not None:
            out = _norm(out, m.norm_after)
        if not o.adapter_residual_before_ln:
            out = out + residual
    if o.original_ln_after:
        out = layer_norm(out + sublayer_input)
    return out


def stack_modules(modules: list) -> BottleneckModule:
    """Adapters of the same options as one: weights [adapters, r, hidden] with their ranks zero-padded to
    the widest (a padded rank adds act(0) times a zero column of up: nothing), vectors [adapters, 1, n]."""
    r = max(m.down_weight.shape[0] for m in modules)

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = r - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t, t.new_zeros(shape)], dim=dim)

    def vectors(ts) -> torch.Tensor:
        return torch.stack(list(ts)).unsqueeze(1)

    first = modules[0]
    return BottleneckModule(
        down_weight=torch.stack([pad(m.down_weight, 0) for m in modules]),
        down_bias=vectors(pad(m.down_bias, 0) for m in modules),
        up_weight=torch.stack([pad(m.up_weight, 1) for m in modules]),
        up_bias=vectors(m.up_bias for m in modules),
        scaling=vectors(m.scaling.expand(first.up_bias.shape[0]) for m in modules),
        norm_before=(vectors(m.norm_before[0] for m in modules), vectors(m.norm_before[1] for m in modules))
        if first.norm_before is not None else None,
        norm_after=(vectors(m.norm_after[0] for m in modules), vectors(m.norm_after[1] for m in modules))
        if first.norm_after is not None else None,
        options=first.options)


_MISSING = object()


class SlotBottlenecks:
    def __init__(self, outputs: dict, context: SlotContext, device: torch.device, dtype: torch.dtype) -> None:
        self.context = context
        self.device, self.dtype = device, dtype
        self.by_slot: dict[int, dict[str, BottleneckModule]] = {}
        # (location, slots) -> their adapters there stacked (stack_modules): steady traffic reuses the
        # same groups forward after forward (_kept).
        self.stacked: dict[tuple, BottleneckModule] = {}
        self.slots_at: dict[str, set[int]] = {name: set() for name in outputs}
        # slot -> location -> kernel_form(), where the native kernel computes that adapter there
        self.kernel_forms: dict[int, dict[str, tuple]] = {}
        self.params: dict[tuple, Optional[np.ndarray]] = {}  # (location, run owners) -> kernel_params()
        for name, module in outputs.items():
            mix_in(module, BottleneckedOutput, slot_bottlenecks=self, bottleneck_name=name)

    def write(self, slot: int, modules: Optional[dict]) -> None:
        for held in self.slots_at.values():
            held.discard(slot)
        self.by_slot.pop(slot, None)
        self.kernel_forms.pop(slot, None)
        self.stacked = {}
        self.params = {}
        if not modules:
            return
        # Before the slot is marked: a forward in flight never sees it half written.
        self.by_slot[slot] = {name: m.to(self.device, self.dtype) for name, m in modules.items()}
        forms = {name: kernel_form(m) for name, m in self.by_slot[slot].items()}
        self.kernel_forms[slot] = {name: form for name, form in forms.items() if form is not None}
        for name in modules:
            self.slots_at[name].add(slot)

    def _kept(self, cache: dict, key: tuple, make):
        """cache[key], made once; a cache reaching a few entries per location starts afresh (traffic
        whose batches mix ever other sets of tasks), as any slot write does."""
        found = cache.get(key, _MISSING)  # one read: another worker may clear the cache in between
        if found is _MISSING:
            if len(cache) >= 4 * len(self.slots_at):
                cache.clear()
            found = cache[key] = make()
        return found

    def stacked_at(self, name: str, slots: tuple) -> BottleneckModule:
        return self._kept(self.stacked, (name, slots), lambda: stack_modules([self.by_slot[s][name] for s in slots]))

    def held_bytes(self) -> int:
        """Device bytes of the adapters held, of the stacked groups kept for reuse and of the kernel's
        forms, each tensor once (a kernel form reads the module's own down projection)."""
        modules = [m for ms in self.by_slot.values() for m in ms.values()] + list(self.stacked.values())
        tensors = [t for m in modules for t in m.tensors()]
        tensors += [t for fs in self.kernel_forms.values() for held, _ in fs.values() for t in held]
        held = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
        return sum(held.values())

    def rows_of(self, batch: SlotBatch, device: torch.device) -> dict:
        """slot -> the batch's rows (padded) or tokens (packed) of each bottleneck slot, made once per
        forward (every sublayer of every layer reads them)."""
        found = batch.derived.get("bottleneck_rows")
        if found is None:
            rows: dict[int, list] = {}
            runs = batch.token_runs(self.by_slot) if batch.offsets is not None else batch.row_runs(self.by_slot)
            for start, end, s in runs:
                rows.setdefault(s, []).extend(range(start, end))
            found = {s: torch.tensor(r, dtype=torch.long, device=device) for s, r in rows.items()}
            batch.derived["bottleneck_rows"] = found
        return found

    def kernel_params(self, name: str, owners: tuple) -> Optional[np.ndarray]:
        """The kernel's params [runs, 6] for runs owned by these slots at one location (kept until a slot
        write, as the stacks are), or None where the kernel does not compute one of them there."""
        def make():
            forms = [self.kernel_forms.get(s, {}).get(name) for s in owners]
            return None if any(f is None for f in forms) else np.stack([f[1] for f in forms])

        return self._kept(self.params, (name, owners), make)


class BottleneckedOutput:
    """Mixed into a BERT-shaped sublayer output class: its own forward unless a row of the batch has a
    bottleneck adapter at this location."""

    slot_bottlenecks: SlotBottlenecks
    bottleneck_name: str

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        held = self.slot_bottlenecks
        batch = held.context.current
        here = held.slots_at[self.bottleneck_name] & batch.distinct_slots if batch is not None else None
        if not here:
            return super().forward(hidden_states, input_tensor)
        x = self.dropout(self.dense(hidden_states))
        dim = 1 if batch.offsets is not None else 0  # packed activations are [1, N, d]
        groups: dict = {}
        for slot in sorted(here):  # adapters of the same options run as one batched computation
            groups.setdefault(held.by_slot[slot][self.bottleneck_name].options, []).append(slot)
        # Adapters whose effect adds to x before the norm add it to their rows of x (each row is one
        # adapter's, so the others read x as it was): one LayerNorm then serves every row. The others'
        # rows are computed again after it and written over.
        later = []
        kernel = getattr(self.dense, "kernel", None)  # the fused CPU kernel, where the engine gave it one
        for options, slots in groups.items():
            src = input_tensor if options.parallel else x
            if kernel is not None and self._kernel_adds(kernel, slots, batch, x, src):
                continue
            if adds_before_norm(options):
                # a sequential adapter reads x alone: its rows' input is not gathered
                self._apply(bottleneck_delta, slots, batch, x, input_tensor if options.parallel else None,
                            x, dim, add=True)
            else:
                later.append(slots)
        out = self.LayerNorm(x + input_tensor)
        for slots in later:
            self._apply(lambda m, xs, ins: bottleneck_forward(m, xs, ins, self.LayerNorm), slots, batch, x,
                        input_tensor, out, dim, add=False)
        return out

    def _kernel_adds(self, kernel, slots: list, batch: SlotBatch, x: torch.Tensor, src: torch.Tensor) -> bool:
        """The native kernel adds these adapters' effect into their rows of x in place, where it computes
        every one of them here (kernel_form) and the activations are flat views; False otherwise."""
        held = self.slot_bottlenecks
        name = self.bottleneck_name
        if not (x.is_contiguous() and src.is_contiguous()):
            return False
        row_tokens = x.shape[-2] if x.dim() == 3 and batch.offsets is None else 1
        starts, ends, owners = batch.run_arrays(slots, row_tokens)
        params = held.kernel_params(name, owners)
        if params is None:
            return False
        hidden = x.shape[-1]
        kernel.bottleneck(x.view(-1, hidden), src.view(-1, hidden), starts, ends, params)
        return True

    def _apply(self, fn, slots: list, batch: SlotBatch, x: torch.Tensor,
               sublayer_input: Optional[torch.Tensor], target: torch.Tensor, dim: int, add: bool) -> None:
        """fn(adapter, its rows of x, their sublayer input) for each adapter of `slots` (one group of the
        same options), added to (add) or written over its rows of target."""
        held = self.slot_bottlenecks
        rows = held.rows_of(batch, x.device)
        if len(slots) == 1:
            idx = rows[slots[0]]
            result = fn(held.by_slot[slots[0]][self.bottleneck_name], x.index_select(dim, idx),
                        None if sublayer_input is None else sublayer_input.index_select(dim, idx)).to(target.dtype)
            (target.index_add_ if add else target.index_copy_)(dim, idx, result)
            return
        self._grouped(fn, held.stacked_at(self.bottleneck_name, tuple(slots)), tuple(slots), rows, batch, x,
                      sublayer_input, target, dim, add)

    def _grouped(self, fn, stacked: BottleneckModule, slots: tuple, rows: dict, batch: SlotBatch, x: torch.Tensor,
                 sublayer_input: Optional[torch.Tensor], out: torch.Tensor, dim: int, add: bool) -> None:
        """Several adapters' rows at once: each adapter's rows (tokens) padded to the longest, [adapters,
        T, ...], one batched pass. Padded places repeat a real token (every step works per token, and
        their results are dropped)."""
        hidden = x.shape[-1]
        # Packed [1, N, hidden]: a token is the unit; padded [rows, T, hidden]: a row is.
        flat_x, flat_out = (x[0], out[0]) if dim == 1 else (x, out)
        flat_in = None if sublayer_input is None else sublayer_input[0] if dim == 1 else sublayer_input
        layout = batch.derived.get(("bottleneck_layout", slots))
        if layout is None:  # the same for every sublayer of the forward
            indices = [rows[s] for s in slots]
            longest = max(int(i.shape[0]) for i in indices)
            gather = torch.stack([torch.nn.functional.pad(i, (0, longest - i.shape[0]), value=int(i[0])) for i in indices])
            where = torch.cat([torch.arange(i.shape[0], device=x.device) + k * longest for k, i in enumerate(indices)])
            layout = batch.derived[("bottleneck_layout", slots)] = (gather.reshape(-1), where, torch.cat(indices))
        gather, where, picked = layout
        view = (len(slots), -1, hidden)
        adapted = fn(stacked, flat_x.index_select(0, gather).view(view),
                     None if flat_in is None else flat_in.index_select(0, gather).view(view))
        adapted = adapted.reshape(-1, *flat_x.shape[1:]).index_select(0, where).to(out.dtype)
        (flat_out.index_add_ if add else flat_out.index_copy_)(0, picked, adapted)
