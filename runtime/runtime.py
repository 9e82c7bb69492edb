"""The Python API the server calls: one resident base, many task adapters, mixed-task batches.

    rt = Runtime(RuntimeConfig())
    rt.add_adapter("sst2", "adapters/examples/sst2")
    rt.add_adapter("ag_news", "adapters/examples/ag_news")
    rt.classify([("sst2", "a charming film"), ("ag_news", "Stocks fell today")])

Request path inside: admit (pin each task's current version, registry) -> tokenize -> plan (length
bands that save padding, within the token budget, row count and free slots: planning.py) -> make each
batch's adapters resident and pin them (residency.py) -> one engine forward -> each task's head on its
rows, softmax, labels sorted by score (heads.py).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from adapterserve.adapters.peft_lora import parse_adapter, read_adapter_dir
from adapterserve.adapters.registry import AdapterEntry, Registry, device_head
from adapterserve.adapters.spec import AdapterSpec
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.engine.base_model import load_base_model, resolve_device
from adapterserve.runtime.engine.select import base_precision, build_engine, resolve_precision
from adapterserve.runtime.errors import InvalidInputError, NotSupportedError
from adapterserve.runtime.heads import apply_heads, stacked_head
from adapterserve.runtime.host_tier import HostTier
from adapterserve.runtime.native.hardware import probe
from adapterserve.runtime.planning import CPU_OVERHEAD_TOKENS, GPU_OVERHEAD_TOKENS, PACKED_OVERHEAD_TOKENS, plan_groups
from adapterserve.runtime.residency import Residency
from adapterserve.runtime.tokenization import TextEncoder
from adapterserve.runtime.types import AdapterInfo, ClassifyItem, LabelScore, Prediction, Row, check_task_name

log = logging.getLogger(__name__)

__all__ = ["Runtime", "AdapterInfo", "ClassifyItem", "LabelScore", "Prediction", "Row", "check_task_name"]

AdapterSource = Union[str, dict, AdapterSpec]


class DiskTier(Protocol):
    """Where adapters evicted from host memory are read back from (the server's AdapterStore). A
    version replaced or removed while requests still use it stays readable until release()."""

    def load_files(self, task: str, version: Optional[str] = None) -> dict[str, bytes]: ...

    def holds(self, task: str, version: str) -> bool: ...

    def release(self, task: str, version: str) -> None: ...


class Runtime:
    def __init__(self, config: Optional[RuntimeConfig] = None, disk: Optional[DiskTier] = None,
                 on_slot_load: Optional[Callable[[float], None]] = None) -> None:
        """disk: the tier below host memory (None: adapters stay in host memory); on_slot_load hears
        the seconds each copy into a device slot takes (metrics)."""
        config = config or RuntimeConfig()
        # "auto" precision becomes a concrete one here, once, from the device and the hardware probe.
        self.config = replace(config, precision=resolve_precision(config, resolve_device(config.device)))
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        torch.manual_seed(self.config.seed)
        self.base = load_base_model(replace(self.config, precision=base_precision(self.config)))
        self.engine = build_engine(self.config, self.base)
        words = self.base.backbone.get_input_embeddings()
        self.encoder = TextEncoder(self.base.tokenizer, self.base.max_length,
                                   virtual_base=getattr(words, "num_embeddings", None))
        self.forward_overhead_tokens = self.config.forward_overhead_tokens
        if self.forward_overhead_tokens is None:
            self.forward_overhead_tokens = GPU_OVERHEAD_TOKENS if self.base.device.type == "cuda" else CPU_OVERHEAD_TOKENS
            if self.engine.packed:
                # Packed rows compute no padding: splitting a pool saves nothing, so keep it whole.
                self.forward_overhead_tokens = PACKED_OVERHEAD_TOKENS
        if disk is None:
            host_tier = HostTier(self.config.max_host_adapter_bytes)
        else:
            host_tier = HostTier(
                self.config.max_host_adapter_bytes,
                reload=lambda e: self.load_spec(disk.load_files(e.task, e.version), labels=e.spec.labels,
                                                metadata=e.spec.metadata),
                can_reload=lambda e: disk.holds(e.task, e.version))
        self._disk = disk
        # A retired version is freed (slot, host memory, merge, its blobs) once its last request lets go of it.
        self.registry = Registry(on_retired=self._retired, on_idle=host_tier.shrink)
        self.residency = Residency(self.engine, self.registry, host_tier, self.config.slots, self.base.precision,
                                   on_slot_load, r_max=self.config.r_max,
                                   wide_slots=self.engine.pool.wide_slots if hasattr(self.engine, "pool") else 0)
        log.info("hardware: %s", probe().summary())
        log.info("serving paths: %s", ", ".join(f"{k}={v}" for k, v in self.serving_paths().items()))

    def _retired(self, entry: AdapterEntry) -> None:
        self.residency.forget(entry)
        if self._disk is not None:
            self._disk.release(entry.task, entry.version)

    @property
    def precision(self) -> str:
        """What the served weights really are: the ONNX engine's int8 is ONNX Runtime int8 over an
        fp32 torch base, so the base's own precision would say fp32."""
        return self.config.precision if self.engine.name == "onnx" else self.base.precision

    def serving_paths(self) -> dict[str, str]:
        """The paths the engine took on this machine (logged at start; GetInfo and build_info report them)."""
        return {
            "family": self.base.family.name,
            "pooling": self.base.family.pooling,
            "engine": self.engine.name,
            "precision": self.precision,
            "device": str(self.base.device),
            "lora_path": self.engine.kernel_name,
            "token_packing": "on" if self.engine.packed else "off",
            "cuda_graphs": "on" if getattr(self.engine, "graphs", None) is not None else "off",
            "bf16_lora_ops": "on" if getattr(self.engine, "bf16_lora", False) else "off",
        }

    # -- adapters --------------------------------------------------------------------------------
    def load_spec(self, source: AdapterSource, labels: Optional[list[str]] = None,
                  metadata: Optional[dict] = None, allowed_root: Optional[str] = None,
                  max_bytes: Optional[int] = None, deadline: Optional[float] = None) -> AdapterSpec:
        """Parse and validate an adapter against this base without touching any slot. A directory is
        read only under allowed_root, up to max_bytes and until deadline (time.monotonic()), each if given."""
        if isinstance(source, AdapterSpec):
            return source
        files = read_adapter_dir(source, allowed_root, max_bytes, deadline) if isinstance(source, str) else source
        spec = parse_adapter(files, self.engine.shape, labels=labels, metadata=metadata)
        reason = self.engine.refuses(spec)
        if reason is not None:
            raise NotSupportedError(f"this server's {self.engine.name} engine cannot serve the adapter: {reason}")
        return spec

    def add_adapter(self, task: str, source: AdapterSource, replace: bool = False,
                    labels: Optional[list[str]] = None, metadata: Optional[dict] = None) -> AdapterInfo:
        check_task_name(task)
        spec = self.load_spec(source, labels, metadata)
        head = device_head(spec, self.base.device, self.base.dtype)
        entry = AdapterEntry(task=task, spec=spec, head=head,
                             stacked_head=stacked_head(self.base.family, self.base.device, head)
                             if spec.head_layout is None else None)
        self.residency.track(entry)
        try:
            self.registry.add(entry, replace=replace)
        except Exception:
            self.residency.untrack(entry)
            raise
        # The parsed tensors are what serving needs; the raw files were hashed (version) and, in the
        # server, persisted before this call. Holding both would double host memory per adapter.
        spec.files = {}
        self.residency.admit(entry)
        log.info("registered task %s version %s (rank %d, %d modules, %d labels)", task, spec.version[:12],
                 spec.rank, len(spec.modules) + len(spec.kron), spec.num_labels)
        return self.info(entry)

    def remove_adapter(self, task: str) -> AdapterInfo:
        if self.merged_task is not None and self.merged_task.task == task:
            self.unmerge()
        entry = self.registry.remove(task)
        return self.info(entry)

    def list_adapters(self) -> list[AdapterInfo]:
        return [self.info(e) for e in self.registry.entries()]

    def get_adapter(self, task: str) -> AdapterInfo:
        return self.info(self.registry.get(task))

    def info(self, entry: AdapterEntry) -> AdapterInfo:
        spec = entry.spec
        return AdapterInfo(
            task=entry.task, version=spec.version, peft_type=spec.peft_type, rank=spec.rank,
            target_modules=spec.target_modules, labels=spec.labels, size_bytes=spec.size_bytes,
            residency=self.residency.tier_of(entry),
            registered_at=entry.registered_at, metadata=spec.metadata,
        )

    # -- merged mode (residency.py) ----------------------------------------------------------------
    def merge(self, task: str) -> None:
        """Fold one task's LoRA into the base weights: its rows then run at bare-model cost."""
        self.residency.merge(task)

    def unmerge(self) -> None:
        """Back to slot mode until merge() is called again."""
        self.residency.unmerge()

    @property
    def merged_task(self) -> Optional[AdapterEntry]:
        return self.residency.merged_task

    @property
    def slot_table(self):
        return self.residency.slot_table

    @property
    def host_tier(self) -> HostTier:
        return self.residency.host_tier

    # -- inference -------------------------------------------------------------------------------
    def classify(self, items: Sequence[Union[ClassifyItem, tuple]], truncate: bool = True) -> list[Prediction]:
        items = [i if isinstance(i, ClassifyItem) else ClassifyItem(*i) for i in items]
        if not items:
            return []
        entries: list[AdapterEntry] = []
        try:
            by_task: dict[str, AdapterEntry] = {}
            for item in items:
                if item.task not in by_task:
                    by_task[item.task] = self.registry.acquire(item.task)
                    entries.append(by_task[item.task])
            rows = self.encode_rows([by_task[i.task] for i in items], [i.text for i in items],
                                    [i.text_pair for i in items], truncate)
            self.infer(rows)
            return [r.prediction for r in rows]
        finally:
            for e in entries:
                self.registry.release(e)

    def encode_rows(self, entries: Sequence[AdapterEntry], texts: Sequence[str],
                    pairs: Optional[Sequence[Optional[str]]], truncate: bool) -> list[Row]:
        has_pairs = pairs is not None and any(p is not None for p in pairs)
        if has_pairs and any(p is None for p in pairs):
            raise InvalidInputError("either every text has a text_pair or none does")
        virtual = [e.spec.virtual_tokens for e in entries]
        prefix = [e.spec.prefix_tokens for e in entries]
        encoded = self.encoder.encode(texts, list(pairs) if has_pairs else None, truncate,
                                      virtual if any(virtual) else None, prefix if any(prefix) else None)
        return [Row(e, enc) for e, enc in zip(entries, encoded)]

    def plan_batches(self, rows: Sequence[Row]) -> list[list[Row]]:
        """Cut rows into forwards: length bands that save padding (runtime/planning.py), each within the
        row, padded-token and distinct-adapter caps."""
        return [batch for batch, _, _ in self._plan(rows)]

    def _plan(self, rows: Sequence[Row]) -> list[tuple[list[Row], Optional[np.ndarray], Optional[list[AdapterEntry]]]]:
        """plan_batches, each batch with its rows' lengths (int64) and distinct adapters where planning
        had them at hand (a pool that stays one forward)."""
        lengths = np.fromiter((r.encoded.length for r in rows), dtype=np.int64, count=len(rows))
        keys = [r.entry.key for r in rows]
        distinct = {r.entry.key: r.entry for r in rows}
        wide_table = self.residency.wide_table
        wide = {k for k, e in distinct.items() if self.residency.is_wide(e)} if wide_table is not None else None
        groups = plan_groups(lengths, keys, self.config.max_batch_size, self.config.max_batch_tokens,
                             self.slot_table.capacity, self.forward_overhead_tokens,
                             wide=wide, max_wide=wide_table.capacity if wide_table else 0)
        if len(groups) == 1:  # the whole pool: its rows in any order make the same forward
            return [(list(rows), lengths, list(distinct.values()))]
        return [([rows[i] for i in g], None, None) for g in groups]

    def infer(self, rows: Sequence[Row], on_forward_done: Optional[Callable[[list[Row]], None]] = None) -> None:
        """Set every row's prediction; rows may mix any registered tasks. on_forward_done, if
        given, hears each forward's rows as soon as their predictions are set, except the last
        forward's (the caller has everything once infer returns): the server answers a request once
        its own rows are done, not when the whole pool is, and a one-forward pool costs nothing extra."""
        batches = self._plan(rows)
        for k, (batch, lengths, entries) in enumerate(batches):
            self._run_batch(batch, lengths, entries)
            if on_forward_done is not None and k < len(batches) - 1:
                on_forward_done(batch)

    def _run_batch(self, batch: list[Row], lengths: Optional[np.ndarray] = None,
                   entries: Optional[list[AdapterEntry]] = None) -> None:
        """One forward over batch; lengths and entries (its distinct adapters) if the caller has them."""
        if lengths is None:
            lengths = np.fromiter((r.encoded.length for r in batch), dtype=np.int64, count=len(batch))
        if entries is None:
            entries = list({r.entry.key: r.entry for r in batch}.values())
        position = {e.key: k for k, e in enumerate(entries)}
        task_of_row = np.fromiter((position[r.entry.key] for r in batch), dtype=np.int64, count=len(batch))
        slot_of_task, pinned = self.residency.pin(entries)
        try:
            inputs = self.encoder.collate([r.encoded for r in batch], self.base.device, lengths, packed=self.engine.packed)
            features = self.engine.encode(inputs, np.array(slot_of_task)[task_of_row].tolist(), lengths.tolist())
        finally:
            self.residency.unpin(pinned)
        apply_heads(self.base.family, batch, entries, task_of_row, features)
