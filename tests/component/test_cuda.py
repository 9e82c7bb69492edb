"""The torch engine on a CUDA device, every precision, against PEFT on the same base and device; its
CUDA-graph replays against its eager forwards; the ONNX engine on ONNX Runtime's CUDA provider
(where onnxruntime-gpu is installed) against the CPU engine.

Skipped where torch sees no CUDA device (CI and the development machine); run on a lent GPU with
`pytest tests/component/test_cuda.py` (docs/benchmarks.md records where and what it saw)."""
import os

import pytest
import torch
from tiny_models import SAMPLE_TEXTS

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "adapters", "examples")
T = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# max |Δlogit| against PEFT on the same base, one text per forward (logits up to 3.7 here). fp32 with
# TF32 off is exact up to summation order; half precisions round the LoRA delta at different points
# than PEFT (PEFT adds lora_B(lora_A(x)) * scale to the base output, we add x A^T (scale B) with one
# baddbmm). LLM.int8 re-quantizes every layer's input to int8, so those rounding differences move
# int8 codes and grow layer by layer. Seen on an H100 (docs/benchmarks.md): fp32 7e-7, fp16 2.0e-3,
# bf16 2.3e-2, int8 3.9e-2, nf4 2.0e-3.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2, "int8": 8e-2, "nf4": 1e-2}


def peft_logits(base_dir, adapter_dir, precision, num_labels, texts):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapterserve.loadtest.gpu_bench import peft_base_kwargs

    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels,
                                                               **peft_base_kwargs(precision))
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    with torch.inference_mode():
        out = [model(**tok(t, return_tensors="pt").to("cuda")).logits[0].float().cpu() for t in texts]
    return torch.stack(out)


@pytest.fixture(scope="module")
def adapter(minilm_dir, tmp_path_factory):
    from tiny_models import make_peft_adapter

    return make_peft_adapter(minilm_dir, str(tmp_path_factory.mktemp("cuda") / "a"), num_labels=4, r=8, targets=T,
                             seed=3, scale=0.05)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "nf4"])
def test_cuda_engine_matches_peft_on_the_same_base(minilm_dir, adapter, precision):
    rt = Runtime(RuntimeConfig(device="cuda", precision=precision, slots=4, r_max=16))
    assert rt.base.device.type == "cuda" and rt.engine.kernel_name == "torch" and not rt.engine.packed
    rt.add_adapter("t", adapter)
    rt.add_adapter("sst2", os.path.join(EXAMPLES, "sst2"))
    for task, path, labels in (("t", adapter, 4), ("sst2", os.path.join(EXAMPLES, "sst2"), 2)):
        got = torch.tensor([rt.classify([(task, t)])[0].logits for t in SAMPLE_TEXTS])
        want = peft_logits(minilm_dir, path, precision, labels, SAMPLE_TEXTS)
        err = (got - want).abs().max().item()
        print(f"{precision} {task}: max |Δlogit| vs PEFT {err:.2e} (max |logit| {want.abs().max().item():.2f})")
        assert err <= TOLERANCE[precision], f"{precision} {task}: {err:.2e}"
        assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.9
    # Two tasks with different head sizes mixed in one forward, against the same rows served alone.
    mixed = rt.classify([(("t", "sst2")[i % 2], t) for i, t in enumerate(SAMPLE_TEXTS)])
    alone = [rt.classify([(("t", "sst2")[i % 2], t)])[0] for i, t in enumerate(SAMPLE_TEXTS)]
    for m, a in zip(mixed, alone):
        assert len(m.logits) == len(a.logits)
        assert max(abs(x - y) for x, y in zip(m.logits, a.logits)) <= 2 * TOLERANCE[precision]


def test_cuda_fp32_matches_the_cpu_engine(adapter):
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = Runtime(RuntimeConfig(device="cuda", slots=4, r_max=16))
    cpu = Runtime(RuntimeConfig(device="cpu", slots=4, r_max=16))
    for rt in (gpu, cpu):
        rt.add_adapter("t", adapter)
    a = torch.tensor([p.logits for p in gpu.classify([("t", t) for t in SAMPLE_TEXTS])])
    b = torch.tensor([p.logits for p in cpu.classify([("t", t) for t in SAMPLE_TEXTS])])
    print(f"cuda fp32 vs cpu fp32: max |Δlogit| {(a - b).abs().max().item():.2e}")
    assert (a - b).abs().max().item() <= 1e-4


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not torch.cuda.is_available() or not _ort_has_cuda(), reason="needs onnxruntime-gpu")
def test_onnx_engine_on_the_cuda_provider_matches_the_cpu_engine(adapter, tmp_path):
    """The shared-base graph on ORT's CUDA provider (stock LoRA ops, slot buffers bound in GPU memory)
    serves two tasks mixed in one run, and a replaced adapter reaches the graph without re-export."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = Runtime(RuntimeConfig(device="cuda", engine="onnx", slots=4, r_max=16, onnx_dir=str(tmp_path / "g")))
    cpu = Runtime(RuntimeConfig(device="cpu", slots=4, r_max=16))
    assert gpu.engine.on_cuda and gpu.engine.kernel_name == "onnx-graph"
    sst2 = os.path.join(EXAMPLES, "sst2")
    for rt in (gpu, cpu):
        rt.add_adapter("t", adapter)
        rt.add_adapter("sst2", sst2)
    requests = [(("t", "sst2")[i % 2], t) for i, t in enumerate(SAMPLE_TEXTS)]
    for name, rows in (("mixed", requests), ("one task", [("t", t) for t in SAMPLE_TEXTS])):
        got = [p.logits for p in gpu.classify(rows)]
        want = [p.logits for p in cpu.classify(rows)]
        err = max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w))
        print(f"ORT CUDA vs torch CPU fp32, {name}: max |Δlogit| {err:.2e}")
        assert all(len(g) == len(w) for g, w in zip(got, want)) and err <= 1e-4
    for rt in (gpu, cpu):  # replace "t" by the SST-2 adapter: new weights, new head size
        rt.add_adapter("t", sst2, replace=True)
    got = torch.tensor([p.logits for p in gpu.classify([("t", t) for t in SAMPLE_TEXTS])])
    want = torch.tensor([p.logits for p in cpu.classify([("t", t) for t in SAMPLE_TEXTS])])
    assert got.shape == (len(SAMPLE_TEXTS), 2) and (got - want).abs().max().item() <= 1e-4


def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("precision,kernel", [("fp32", "torch"), ("fp16", "torch"), ("fp32", "triton"),
                                              ("fp16", "triton"), ("bf16", "triton")])
def test_cuda_graphs_match_eager_forwards(minilm_dir, tmp_path, precision, kernel):
    """Replayed CUDA graphs against the eager forward of the torch path: several (rows, width) buckets,
    tasks mixed, an adapter replaced after its graph was captured, and a task registered later that
    targets layers no adapter touched at capture time (every slot layer is in the graph). With
    kernel=triton the graphed side runs the Triton LoRA kernels (runtime/engine/triton_lora.py)."""
    from tiny_models import make_peft_adapter

    if kernel == "triton" and not _triton():
        pytest.skip("Triton is not installed")
    torch.backends.cuda.matmul.allow_tf32 = False
    qv = make_peft_adapter(minilm_dir, str(tmp_path / "qv"), num_labels=3, r=4, targets=["query", "value"], seed=5,
                           scale=0.05)
    ffn = make_peft_adapter(minilm_dir, str(tmp_path / "ffn"), num_labels=2, r=16,
                            targets=["intermediate.dense", "output.dense"], seed=6, scale=0.05)
    graphed = Runtime(RuntimeConfig(device="cuda", precision=precision, slots=6, r_max=16, lora_kernel=kernel))
    eager = Runtime(RuntimeConfig(device="cuda", precision=precision, slots=6, r_max=16, cuda_graphs="off",
                                  lora_kernel="torch"))
    assert graphed.engine.graphs is not None and eager.engine.graphs is None
    assert graphed.engine.kernel_name == kernel and eager.engine.kernel_name == "torch"
    tolerance = TOLERANCE[precision]

    def compare(requests):
        got = [p.logits for p in graphed.classify(requests)]
        want = [p.logits for p in eager.classify(requests)]
        assert all(len(g) == len(w) for g, w in zip(got, want))
        err = max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w))
        print(f"{precision} graphs ({kernel}) vs eager (torch), {len(requests)} rows: max |Δlogit| {err:.2e}")
        assert err <= tolerance

    for rt in (graphed, eager):
        rt.add_adapter("qv", qv)
        rt.add_adapter("sst2", os.path.join(EXAMPLES, "sst2"))
    texts = SAMPLE_TEXTS * 4
    compare([("qv", texts[0])])
    compare([(("qv", "sst2")[i % 2], t) for i, t in enumerate(texts[:3])])
    compare([(("qv", "sst2")[i % 2], t) for i, t in enumerate(texts)])
    captured = len(graphed.engine.graphs.graphs)
    assert captured >= 2
    for rt in (graphed, eager):
        rt.add_adapter("ffn", ffn)  # touches the feed-forward layers, which no adapter did at capture
        rt.add_adapter("qv", ffn, replace=True)  # new weights and head size in the slot the graphs read
    compare([(("qv", "sst2", "ffn")[i % 3], t) for i, t in enumerate(texts)])
    compare([("ffn", texts[0])])
    assert len(graphed.engine.graphs.graphs) == captured  # same buckets: replayed, not re-captured


def test_cuda_graph_captures_while_another_thread_registers_adapters(minilm_dir, tmp_path):
    """Captures happen at first use of a shape, while other threads may be using the GPU (here: a
    thread replacing an adapter over and over, each a host->device copy into a slot). No capture may
    fail and every answer must equal the eager forward's."""
    import threading

    from tiny_models import make_peft_adapter

    churn = make_peft_adapter(minilm_dir, str(tmp_path / "churn"), num_labels=2, r=8, targets=T, seed=7, scale=0.05)
    sst2 = os.path.join(EXAMPLES, "sst2")
    graphed = Runtime(RuntimeConfig(device="cuda", precision="fp16", slots=6, r_max=16))
    eager = Runtime(RuntimeConfig(device="cuda", precision="fp16", slots=6, r_max=16, cuda_graphs="off"))
    for rt in (graphed, eager):
        rt.add_adapter("sst2", sst2)
        rt.add_adapter("churn", churn)
    stop, errors = threading.Event(), []

    def register():
        while not stop.is_set():
            try:
                graphed.add_adapter("churn", churn, replace=True)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)
                return

    thread = threading.Thread(target=register)
    thread.start()
    texts = SAMPLE_TEXTS * 8
    try:
        got = [graphed.classify([("sst2", t) for t in texts[:n]]) for n in (1, 2, 3, 5, 9, 17, 33, 65)]
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert not graphed.engine.graphs.failed and len(graphed.engine.graphs.graphs) >= 7
    for n, preds in zip((1, 2, 3, 5, 9, 17, 33, 65), got):
        want = eager.classify([("sst2", t) for t in texts[:n]])
        assert max(abs(x - y) for p, q in zip(preds, want) for x, y in zip(p.logits, q.logits)) <= TOLERANCE["fp16"]


@pytest.mark.parametrize("name", ["xlm-roberta", "electra", "mpnet", "deberta-v2", "modernbert-mean"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_encoder_families_on_cuda_match_peft(new_family_bases, tmp_path, name, precision):
    """Every family of runtime/families.py on the CUDA torch engine: four tasks mixed in one batch against
    PEFT on the same device and precision (tests/component/test_families.py does the same on the CPU)."""
    from tiny_models import FAMILY_TARGETS, make_peft_adapter, model_type

    base = new_family_bases[name]
    targets = FAMILY_TARGETS[model_type(base)]
    labels = {"a": 2, "b": 3, "c": 50, "d": 4}
    paths = {task: make_peft_adapter(base, str(tmp_path / task), num_labels=n, r=2 + 2 * i, targets=targets[i % 2:][:3],
                                     seed=40 + i) for i, (task, n) in enumerate(labels.items())}
    rt = Runtime(RuntimeConfig(base_model=base, device="cuda", precision=precision, slots=8, r_max=8))
    for task, path in paths.items():
        rt.add_adapter(task, path)
    items = [(task, text) for task in paths for text in SAMPLE_TEXTS[:4]]
    preds = rt.classify(items)
    for task, path in paths.items():
        got = torch.tensor([p.logits for (t, _), p in zip(items, preds) if t == task])
        want = peft_logits(base, path, precision, labels[task], SAMPLE_TEXTS[:4])
        assert (got - want).abs().max().item() <= TOLERANCE[precision], f"{name}/{task}/{precision}"
