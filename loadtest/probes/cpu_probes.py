"""Small CPU measurements behind design choices recorded in docs/architecture.md (kept to re-check them
on a new CPU; not part of the wheel).

    python -m adapterserve.loadtest.probes.cpu_probes workers       # 1 thread x 2 intra-op threads vs 2 threads x 1
    python -m adapterserve.loadtest.probes.cpu_probes onnx-profile  # ORT profiler: time by op type, shared int8 graph
    python -m adapterserve.loadtest.probes.cpu_probes forward-cost  # bare forward time by rows x tokens (the planner's cost model)
    python -m adapterserve.loadtest.probes.cpu_probes varlen-attention  # the packed graph's attention kernel vs torch SDPA padded
    python -m adapterserve.loadtest.probes.cpu_probes bf16-matmul   # one FFN-sized linear: fp32 vs --precision bf16's Bf16Linear
    python -m adapterserve.loadtest.probes.cpu_probes lora-op       # one LoRA op node: fp32 vs bf16 on AMX vs its portable loop
    python -m adapterserve.loadtest.probes.cpu_probes host-heads    # bench host's batches, CPU heads and softmax in one native call vs numpy
    python -m adapterserve.loadtest.probes.cpu_probes head-kernel-cold    # the head kernel hot and with its weights evicted, 1 and 2 threads
    python -m adapterserve.loadtest.probes.cpu_probes stock-vectors # the stock-op ONNX graph with and without vector inputs
    python -m adapterserve.loadtest.probes.cpu_probes row-scale-copies  # the int8 op graph with and without copying input scales

Each prints medians; none asserts anything. Packaged MiniLM and SST-2 dev texts throughout.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SHORT = "a charming film ."


def _texts(n: int) -> list[str]:
    from adapterserve.loadtest.runtime_bench import sst2_dev_texts

    return sst2_dev_texts(os.path.join(ROOT, "data", "sst2", "dev.tsv"))[:n]


def _median_us(fn, n: int = 300, warm: int = 20) -> float:
    from adapterserve.loadtest.host_bench import median_us

    return median_us(fn, n, warm)[0]


def workers() -> None:
    """Bare MiniLM: one thread running forwards with all intra-op threads, against two threads each
    running forwards with one intra-op thread (what --model-workers 2 does)."""
    from transformers import AutoModel, AutoTokenizer

    from adapterserve.runtime.config import packaged_base_model_dir

    path = packaged_base_model_dir()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = _texts(512)
    threads = torch.get_num_threads()
    for bs in (1, 4, 32):
        batches = [tok(texts[i:i + bs], padding=True, return_tensors="pt") for i in range(0, len(texts), bs)]

        def run(part, n_threads):
            torch.set_num_threads(n_threads)
            with torch.inference_mode():
                for b in part:
                    model(**b)

        run(batches[:2], threads)
        t = time.perf_counter()
        run(batches, threads)
        one = len(texts) / (time.perf_counter() - t)
        pool = [threading.Thread(target=run, args=(batches[i::2], max(1, threads // 2))) for i in range(2)]
        t = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        two = len(texts) / (time.perf_counter() - t)
        print(f"batch {bs:>2}: 1 worker x {threads} threads {one:6.1f} texts/s; "
              f"2 workers x {max(1, threads // 2)} thread {two:6.1f} texts/s ({two / one:.2f} x)")
        torch.set_num_threads(threads)


def _profiled_session(model_path: str, op_library: Optional[str] = None, threads: Optional[int] = None):
    """A CPU session that records ORT's per-node profile (read it back with _time_by_op)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    if threads:
        options.intra_op_num_threads = threads
    if op_library:  # the shared graph's adapterserve.SlotLoRA nodes
        options.register_custom_ops_library(op_library)
    from adapterserve.runtime.engine.onnx.engine import open_session

    return open_session(model_path, options)  # what the engine and the per-task sessions run


def _time_by_op(session) -> collections.Counter:
    """Microseconds per op type over everything the session ran, from its profile."""
    by_op = collections.Counter()
    with open(session.end_profiling()) as fh:
        for event in json.load(fh):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_op[event["args"]["op_name"]] += event["dur"]
    return by_op


def _profile(model_path: str, feed: dict, title: str, op_library: Optional[str] = None) -> None:
    session = _profiled_session(model_path, op_library)
    names = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    runs = 10
    for _ in range(3):
        session.run(None, feed)
    t = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    print(f"{title}: {(time.perf_counter() - t) / runs * 1e3:.1f} ms per run")
    by_op = _time_by_op(session)
    total = sum(by_op.values())
    for op, us in by_op.most_common(12):
        print(f"  {op:<28} {us / total * 100:5.1f}%  {us / (runs + 3) / 1000:6.2f} ms/run")


def onnx_profile() -> None:
    """Time by op type for one run, batch 32 x 26 tokens: the shared int8 graph with 32 adapters
    (ranks 4/8/16, all linears), and the per-task merged int8 graph of the bundled sst2 adapter."""
    import numpy as np
    import torch

    from adapterserve.exporters.per_task import export_task
    from adapterserve.loadtest.synthetic import synthetic_adapter
    from adapterserve.runtime.config import RuntimeConfig, packaged_base_model_dir

    os.environ.setdefault("ADAPTERSERVE_CACHE", tempfile.mkdtemp(prefix="cpu-probes-"))
    from adapterserve.runtime.runtime import Runtime

    rt = Runtime(RuntimeConfig(slots=40, r_max=16, engine="onnx", precision="int8"))
    for i in range(32):
        rt.add_adapter(f"s{i}", synthetic_adapter(packaged_base_model_dir(), seed=i))
    rt.classify([(f"s{i}", SHORT) for i in range(32)])  # loads the 32 slots
    tokens = {"input_ids": np.random.default_rng(0).integers(1000, 2000, (32, 26)).astype(np.int64),
              "attention_mask": np.ones((32, 26), np.int64), "token_type_ids": np.zeros((32, 26), np.int64)}
    feed = rt.engine.batch_feed({k: torch.from_numpy(v) for k, v in tokens.items()},
                                sorted(rt.engine.slot_ranks)[:32], [26] * 32)
    feed.update(rt.engine.slot_feed)
    feed = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feed.items()}  # session.run takes numpy
    from adapterserve.runtime.native.ort_ops import library_path

    _profile(os.path.join(rt.engine.model_dir, "model.onnx"), feed, f"shared-base int8 ({rt.engine.kernel_name}), "
             "32 adapters", library_path() if rt.engine.fused_op else None)
    task_dir = os.path.join(tempfile.mkdtemp(prefix="cpu-probes-task-"), "sst2-int8")
    export_task(os.path.join(ROOT, "adapters", "examples", "sst2"), task_dir, quantize="int8")
    _profile(os.path.join(task_dir, "model.onnx"), tokens, "per-task merged int8 (sst2)")


def forward_cost() -> None:
    """Bare MiniLM forward time over rows x tokens: the fixed cost per forward against the cost per
    padded token, which sets runtime.planning.CPU_OVERHEAD_TOKENS."""
    from transformers import AutoModel

    from adapterserve.runtime.config import packaged_base_model_dir

    model = AutoModel.from_pretrained(packaged_base_model_dir()).eval()
    for rows, tokens in ((1, 8), (1, 16), (1, 32), (4, 16), (8, 16), (16, 16), (32, 16), (64, 16), (32, 32),
                         (64, 32), (32, 64), (64, 64)):
        ids = torch.randint(1000, 2000, (rows, tokens))
        mask = torch.ones(rows, tokens, dtype=torch.long)
        with torch.inference_mode():
            us = _median_us(lambda: model(input_ids=ids, attention_mask=mask), n=max(3, 2000 // (rows * tokens)), warm=2)
        print(f"{rows:3d} rows x {tokens:3d} tokens: {us / 1000:7.2f} ms, {us / (rows * tokens):6.1f} us per token")


def _mixed_int8_pass():
    """The shared int8 engine with 32 synthetic adapters, and a function that runs SST-2 dev through
    it once in batches of 32 with the tasks mixed (rows tokenized up front); returns (runtime, pass)."""
    from adapterserve.loadtest.synthetic import synthetic_adapter
    from adapterserve.runtime.config import RuntimeConfig, packaged_base_model_dir
    from adapterserve.runtime.runtime import Row, Runtime

    texts = _texts(10_000)
    rt = Runtime(RuntimeConfig(slots=40, r_max=16, engine="onnx", precision="int8"))
    for i in range(32):
        rt.add_adapter(f"s{i}", synthetic_adapter(packaged_base_model_dir(), seed=i))
    entries = [rt.registry.get(f"s{i}") for i in range(32)]
    enc = rt.encoder.encode(texts)

    def one_pass() -> int:
        for i in range(0, len(texts), 32):
            rt.infer([Row(entries[j % 32], enc[k]) for j, k in enumerate(range(i, min(i + 32, len(texts))))])
        return len(texts)

    return rt, one_pass


def varlen_attention() -> None:
    """One attention layer over 32 SST-2-like sequences (12 heads x 32, lengths 5-55) on one thread:
    the packed graph's varlen kernel (from the built ORT op library) against torch SDPA padded to the
    longest sequence with a key mask (what a padded batch pays)."""
    import ctypes

    from adapterserve.runtime.native.ort_ops import library_path

    path = library_path()
    if path is None:
        print("the ORT op library cannot be built here (needs gcc and AVX-512)")
        return
    lib = ctypes.CDLL(path)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.varlen_attention.argtypes = [p, p, p, p, i64, p, i64, i64, i64, ctypes.c_float]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    heads, d, rows = 12, 32, 32
    width = heads * d
    lengths = torch.randint(5, 56, (rows,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    q, k, v = (torch.randn(int(offsets[-1]), width) for _ in range(3))
    out = torch.zeros_like(q)
    us = _median_us(lambda: lib.varlen_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), width,
                                                 offsets.data_ptr(), rows, heads, d, d ** -0.5), n=50, warm=3)
    longest = int(lengths.max())
    qp = torch.randn(rows, heads, longest, d)
    mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    us_padded = _median_us(lambda: sdpa(qp, qp, qp, attn_mask=mask), n=50, warm=3)
    print(f"{int(offsets[-1])} tokens in {rows} sequences, 1 thread: varlen kernel {us / 1000:.3f} ms; "
          f"torch SDPA padded to {longest}: {us_padded / 1000:.3f} ms")


def bf16_matmul() -> None:
    """MiniLM's largest linear (384 -> 1,536) over 1,600 packed tokens, the machine's threads: fp32,
    the CPU bf16 base's Bf16Linear (casts in and out included), and the bf16 matmul alone."""
    from adapterserve.runtime.engine.base_model import Bf16Linear

    torch.manual_seed(0)
    x = torch.randn(1600, 384)
    fp32 = torch.nn.Linear(384, 1536)
    bf16 = torch.nn.Linear(384, 1536)
    bf16.load_state_dict(fp32.state_dict())
    bf16.__class__ = Bf16Linear
    bf16.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.inference_mode():
        t32 = _median_us(lambda: fp32(x), n=100, warm=5)
        t16 = _median_us(lambda: bf16(x), n=100, warm=5)
        tmm = _median_us(lambda: torch.nn.functional.linear(xb, bf16.weight, bf16.bias), n=100, warm=5)
        err = (bf16(x) - fp32(x)).abs().max().item()
    print(f"{torch.get_num_threads()} threads, [1600, 384] x [384, 1536]: fp32 {t32 / 1000:.2f} ms; Bf16Linear "
          f"{t16 / 1000:.2f} ms (x {t32 / t16:.1f}); bf16 matmul alone {tmm / 1000:.2f} ms; max |bf16 - fp32| {err:.3f}")


def lora_op() -> None:
    """One LoRA op node on ORT's CPU provider, 2 threads: 32 token-packed rows of 6-26 tokens, each on
    its own slot (ranks 4/8/16, r_max 16): the fp32 op, the bf16 op on AMX tiles and on its portable
    loop (runtime/native/csrc/lora_amx.c), for the shapes of one MiniLM layer."""
    import numpy as np
    import onnxruntime as ort

    from adapterserve.runtime.engine.onnx.ops import single_op_model
    from adapterserve.runtime.native import ort_ops

    rng = np.random.default_rng(0)
    lengths = rng.integers(6, 27, 32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    slot_per_row = np.arange(1, 33, dtype=np.int64)
    r8 = np.array([0] + [(4, 8, 16)[i % 3] for i in range(32)], np.int64)
    print(f"32 rows, {int(offsets[-1])} tokens; AMX here: {ort_ops.amx_bf16_available()}")
    for d_in, d_out in ((384, 384), (384, 1536), (1536, 384)):
        a = np.zeros((33, 16, d_in), np.float32)
        b = np.zeros((33, 16, d_out), np.float32)
        for s in range(1, 33):
            a[s, :r8[s]] = rng.normal(0, 0.05, (r8[s], d_in))
            b[s, :r8[s]] = rng.normal(0, 0.05, (r8[s], d_out))
        n = int(offsets[-1])
        common = {"y": rng.normal(0, 1, (1, n, d_out)).astype(np.float32),
                  "x": rng.normal(0, 1, (1, n, d_in)).astype(np.float32)}
        tail = {"r8": r8, "slot": slot_per_row, "offsets": offsets, "y_offset": np.zeros(1, np.int64)}
        fp32 = {**common, "a": a, "b": b, **tail}
        bf16 = {**common, "a": ort_ops.pack_bf16_a(torch.from_numpy(a)).numpy(),
                "b": ort_ops.pack_bf16_b(torch.from_numpy(b)).numpy(), **tail}
        timings = []
        for label, op_type, feed, amx in (("fp32", "SlotLoRAPacked", fp32, "on"),
                                          ("bf16 AMX", "SlotLoRAPackedBF16", bf16, "on"),
                                          ("bf16 portable", "SlotLoRAPackedBF16", bf16, "off")):
            os.environ["ADAPTERSERVE_LORA_AMX"] = amx  # read when the session registers the ops
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            options.register_custom_ops_library(ort_ops.library_path())
            session = ort.InferenceSession(single_op_model(op_type, feed).SerializeToString(), options)
            us = _median_us(lambda s=session, f=feed: s.run(None, f), n=20 if amx == "off" else 200, warm=3)
            timings.append(f"{label} {us:.0f} us")
        os.environ.pop("ADAPTERSERVE_LORA_AMX")
        print(f"  {d_in:4d} -> {d_out:4d}: " + ", ".join(timings))


def onnx_nodes() -> None:
    """The shared int8 engine's SST-2 loop (as onnx-host) under a profiled session: milliseconds per
    batch of 32 by node, the six encoder layers' nodes of one name summed (which part of a layer costs
    what: the LoRA ops with what is folded into them, attention, each int8 GEMM)."""
    import re
    import threading

    from adapterserve.runtime.native.ort_ops import library_path

    rt, one_pass = _mixed_int8_pass()
    rt.engine.session = _profiled_session(os.path.join(rt.engine.model_dir, "model.onnx"),
                                          library_path() if rt.engine.fused_op else None)
    rt.engine._bindings = threading.local()  # the bindings belong to the engine's own session
    one_pass()
    batches = -(-one_pass() // 32) * 2  # the profile covers both passes
    by_node = collections.Counter()
    with open(rt.engine.session.end_profiling()) as fh:
        for event in json.load(fh):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                name = re.sub(r"layer\.\d+", "layer.N", event["name"][: -len("_kernel_time")])
                by_node[f'{event["args"]["op_name"]} {name}'] += event["dur"]
    print(f"shared-base int8, 32 tasks mixed: {sum(by_node.values()) / batches / 1e3:.2f} ms of nodes per batch")
    for node, us in by_node.most_common(12):
        print(f"  {us / batches / 1e3:6.2f} ms  {node}")


def onnx_folds() -> None:
    """Interleaved A/B of the shared int8 graph with and without each rewrite that folds nodes into
    our LoRA ops (runtime/engine/onnx/export._fuse_qkv, _fold_*): graph variants built from the export's
    pre-fold file, one engine whose session is swapped per variant, SST-2 dev passes as onnx-host,
    six rounds each; prints each variant's texts/s and median."""
    import threading

    import onnx
    import onnxruntime as ort

    from adapterserve.runtime.engine.onnx import export as shared_base
    from adapterserve.runtime.engine.onnx.engine import open_session
    from adapterserve.runtime.native.ort_ops import library_path

    rt, one_pass = _mixed_int8_pass()
    before = [f for f in ("model_int8_bf16lora.onnx", "model_int8.onnx") if os.path.exists(os.path.join(rt.engine.model_dir, f))]
    everything = ["_fuse_qkv", "_fold_residual_adds", "_fold_gelus", "_fold_layer_norms", "_in_place_lora_ops"]
    variants = {"all folds": everything, "no folds": []}
    for fold in everything:
        variants[f"all but {fold}"] = [f for f in everything if f != fold]
    sessions, rates, scratch = {}, {}, tempfile.mkdtemp()
    for name, folds in variants.items():
        model = onnx.load(os.path.join(rt.engine.model_dir, before[0]))
        for fold in folds:
            getattr(shared_base, fold)(model.graph)
        path = os.path.join(scratch, f"{len(sessions)}.onnx")
        onnx.save(model, path)
        options = ort.SessionOptions()
        options.register_custom_ops_library(library_path())
        sessions[name], rates[name] = open_session(path, options), []
    for _ in range(6):
        for name, session in sessions.items():
            rt.engine.session, rt.engine._bindings = session, threading.local()
            one_pass()
            t = time.perf_counter()
            rates[name].append(one_pass() / (time.perf_counter() - t))
    for name, r in rates.items():
        print(f"{name:<32} median {statistics.median(r):7.1f} texts/s  ({' '.join(f'{x:.0f}' for x in r)})")


def host_heads() -> None:
    """`adapterserve bench host`'s batches with the CPU heads' native call on and off, alternating in one
    process (runtime/heads._stacked_scores: head_scores in lora_kernel.c, or a numpy product per task and a
    numpy softmax)."""
    from adapterserve.loadtest.host_bench import host_timer, synthetic_tasks
    from adapterserve.runtime.config import RuntimeConfig, packaged_base_model_dir
    from adapterserve.runtime.native import lora_kernel
    from adapterserve.runtime.runtime import Runtime

    real_load = lora_kernel.load
    base = packaged_base_model_dir()
    texts = [f"sample text number {i} about a film , a match or a market" for i in range(64)]
    rt = Runtime(RuntimeConfig(base_model=base, slots=33, max_batch_size=256))
    tasks = []
    for i, path in enumerate(synthetic_tasks(base, tempfile.mkdtemp(), 32)):
        rt.add_adapter(f"t{i}", path)
        tasks.append(f"t{i}")
    try:
        with torch.inference_mode():
            for size in (32, 256):
                engine = rt.engine
                one_batch, _, _ = host_timer(rt, texts, tasks, size)
                medians: dict = {"native": [], "numpy": []}
                for _ in range(6):
                    for mode, found in medians.items():
                        lora_kernel.load = real_load if mode == "native" else (lambda: None)
                        found.append(_median_us(one_batch, n=100, warm=5))
                rt.engine = engine
                print(f"{size:3d} rows: " + ", ".join(f"{m} {statistics.median(v):.1f} us" for m, v in medians.items()))
    finally:
        lora_kernel.load = real_load


def head_kernel_cold() -> None:
    """The CPU head kernel (lora_kernel.c head_scores) on 32 random heads of 2-50 labels over 384
    features, hot and with 16 MB of other data written between calls (a forward evicts the heads'
    weights), on one thread and on two; median µs of 300 calls each."""
    from adapterserve.runtime.native import lora_kernel

    kernel = lora_kernel.load()
    if kernel is None:
        print("the native kernel does not run here:", lora_kernel.unavailable_reason())
        return
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((n, 384)).astype(np.float32) for n in rng.integers(2, 51, 32)]
    biases = [rng.standard_normal(w.shape[0]).astype(np.float32) for w in weights]
    heads = np.array([(w.ctypes.data, b.ctypes.data, w.shape[0]) for w, b in zip(weights, biases)], dtype=np.int64)
    print(f"head weights: {sum(w.nbytes for w in weights) / 1e6:.2f} MB")
    other = np.ones(4 << 20, np.float32)
    for rows in (32, 256):
        task_of_row = (np.arange(rows) % 32).astype(np.int64)
        features = torch.randn(rows, 384)
        logits, probs = np.empty((rows, 50), np.float32), np.empty((rows, 50), np.float32)
        for threads in (1, 2):
            for evict in (False, True):
                times = []
                for _ in range(300):
                    if evict:
                        other += 1.0
                    start = time.perf_counter()
                    kernel.heads(features, task_of_row, heads, logits, probs, threads)
                    times.append(time.perf_counter() - start)
                print(f"{rows:3d} rows, {threads} thread(s), {'evicted' if evict else 'hot'}: "
                      f"{statistics.median(times) * 1e6:.1f} us")


def _lora_tasks_ab(variants: dict) -> None:
    """32 LoRA tasks through each variant's runtime (name -> a function of (adapter paths, a scratch
    dir) that returns it), the same SST-2 batches alternating between them: texts/s medians."""
    from adapterserve.loadtest.kinds_bench import make_adapter
    from adapterserve.runtime.config import packaged_base_model_dir

    base, tmp = packaged_base_model_dir(), tempfile.mkdtemp()
    paths = [make_adapter(base, os.path.join(tmp, f"lora{i}"), "lora", i) for i in range(32)]
    runtimes = {name: make(paths, os.path.join(tmp, str(k))) for k, (name, make) in enumerate(variants.items())}
    texts = _texts(448)
    batches = [texts[i:i + 32] for i in range(0, len(texts), 32)]

    def one_pass(rt) -> int:
        for batch in batches:
            rt.classify([(f"t{j % 32}", t) for j, t in enumerate(batch)])
        return len(texts)

    rates: dict = {name: [] for name in runtimes}
    with torch.inference_mode():
        for rt in runtimes.values():
            one_pass(rt)
        for _ in range(4):
            for name, rt in runtimes.items():
                t = time.perf_counter()
                rates[name].append(one_pass(rt) / (time.perf_counter() - t))
    for name, r in rates.items():
        print(f"{name:<16} median {statistics.median(r):7.1f} texts/s  ({' '.join(f'{x:.0f}' for x in r)})")


def _onnx_runtime(paths: list, onnx_dir: str, **config):
    from adapterserve.runtime.config import RuntimeConfig
    from adapterserve.runtime.runtime import Runtime

    rt = Runtime(RuntimeConfig(slots=33, r_max=16, engine="onnx", onnx_dir=onnx_dir, **config))
    for i, path in enumerate(paths):
        rt.add_adapter(f"t{i}", path)
    return rt


def stock_vectors() -> None:
    """32 LoRA tasks on the stock-op fp32 shared graph (--lora-kernel torch), as exported (with the
    per-feature vector inputs: Gather/Mul/Add on every slot layer) against the same graph traced without
    them: what the vector inputs cost traffic that does not use them on that graph."""
    from adapterserve.runtime.engine.onnx import export
    from adapterserve.runtime.engine.slot_layers import SlotLoRALinear, gathered_delta

    saved = (export.slot_inputs, SlotLoRALinear._traced_forward, SlotLoRALinear._traced_input)

    def lora_inputs(layers, fused_op, in_scale_layers):
        return [x for x in saved[0](layers, fused_op, in_scale_layers) if x[2] in ("lora_a", "lora_b", "slot_r8")]

    def lora_only(self, x, y, y_offset=0):
        traced = self.context.traced
        return y + gathered_delta(x, *traced.tensors[self.name], traced.slot_per_row)

    def without(paths, onnx_dir):
        export.slot_inputs, SlotLoRALinear._traced_forward = lora_inputs, lora_only
        SlotLoRALinear._traced_input = lambda self, x: x
        try:
            return _onnx_runtime(paths, onnx_dir, lora_kernel="torch")
        finally:
            export.slot_inputs, SlotLoRALinear._traced_forward, SlotLoRALinear._traced_input = saved

    _lora_tasks_ab({"with vectors": lambda p, d: _onnx_runtime(p, d, lora_kernel="torch"), "without": without})


def row_scale_copies() -> None:
    """32 LoRA tasks on the int8 shared graph with our ops, as exported (input scales only where they
    cost no copy) against one that keeps every SlotRowScale node, copies included
    (export._drop_copying_row_scales left out): what those copies cost traffic that does not use them."""
    from adapterserve.runtime.engine.onnx import export

    saved = export._drop_copying_row_scales

    def with_copies(paths, onnx_dir):
        export._drop_copying_row_scales = lambda graph: None
        try:
            return _onnx_runtime(paths, onnx_dir, precision="int8")
        finally:
            export._drop_copying_row_scales = saved

    _lora_tasks_ab({"as exported": lambda p, d: _onnx_runtime(p, d, precision="int8"), "with copies": with_copies})


PROBES = {"row-scale-copies": row_scale_copies, "stock-vectors": stock_vectors, "host-heads": host_heads, "head-kernel-cold": head_kernel_cold, "workers": workers, "onnx-profile": onnx_profile, "forward-cost": forward_cost, "varlen-attention": varlen_attention, "bf16-matmul": bf16_matmul, "lora-op": lora_op,
          "onnx-nodes": onnx_nodes, "onnx-folds": onnx_folds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=sorted(PROBES))
    PROBES[p.parse_args(argv).probe]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
