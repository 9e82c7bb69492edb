"""ONNX paths on tiny random models: the shared-base graph (slots as inputs) equals torch within 1e-4
with mixed tasks in one run, sees registry changes without re-export, and refuses a graph made for
another base; the per-task merged export matches torch."""
import collections

import numpy as np
import pytest

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import ConfigError, NotSupportedError
from adapterserve.runtime.native import ort_ops
from adapterserve.runtime.runtime import Runtime
from tiny_models import FAMILY_TARGETS, SAMPLE_TEXTS, make_peft_adapter, make_tiny_base

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

# Our ONNX Runtime ops are built where native code runs (docs/architecture.md); elsewhere every graph is
# the stock-op one, and the same answers are expected of it.
OP = ort_ops.library_path() is not None

TOL = 1e-4


def logits(rt, items):
    return [np.array(p.logits) for p in rt.classify(items)]


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def lora_op_nodes(path, bf16: bool = False) -> int:
    """Slot layers served by our LoRA op's nodes in the graph, a q/k/v node serving three (the int8
    graph's bf16 variants where bf16, tests/component/test_bf16_lora.py)."""
    import onnx

    suffix = "BF16" if bf16 else ""
    layers = {f"SlotLoRA{suffix}": 1, f"SlotLoRAPacked{suffix}": 1, f"SlotLoRAQKVPacked{suffix}": 3}
    return sum(layers.get(n.op_type.removesuffix("InPlace"), 0)
               for n in onnx.load(str(path)).graph.node if n.domain == "adapterserve")


def op_count(path, op_type) -> int:
    import onnx

    return sum(n.op_type == op_type for n in onnx.load(str(path)).graph.node)


# "auto": each slot layer is one adapterserve.SlotLoRA node (the fused kernel as an ORT custom op), and
# BERT/RoBERTa get the token-packed graph (SlotLoRAPacked nodes, VarlenAttention, rows back to back);
# "torch": stock Gather/MatMul/Add nodes over padded rows. All must equal the torch engine.
@pytest.mark.parametrize("lora_kernel", ["auto", "torch"])
@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_shared_base_onnx_matches_torch_mixed(tiny_bases, tmp_path, family, lora_kernel):
    base = tiny_bases[family]
    t = FAMILY_TARGETS[family]
    adapters = [make_peft_adapter(base, str(tmp_path / f"a{i}"), num_labels=2 + 2 * i, r=2 + 2 * i, targets=t[i:i + 3],
                                  seed=i) for i in range(3)]
    torch_rt = Runtime(RuntimeConfig(base_model=base, slots=8, r_max=8))
    onnx_rt = Runtime(RuntimeConfig(base_model=base, slots=8, r_max=8, engine="onnx", onnx_dir=str(tmp_path / "onnx"),
                                    lora_kernel=lora_kernel))
    assert onnx_rt.engine.name == "onnx"
    fused = lora_kernel == "auto" and OP
    assert onnx_rt.engine.kernel_name == ("onnx-op" if fused else "onnx-graph")
    n_ops = lora_op_nodes(tmp_path / "onnx" / "model.onnx")
    assert n_ops == (len(onnx_rt.engine.layers) if fused else 0)
    # BERT/RoBERTa attention is ORT's fused MultiHeadAttention (one per layer); DistilBERT keeps stock ops.
    import onnx

    model = tmp_path / "onnx" / "model.onnx"
    packed = fused and family != "distilbert"
    assert onnx_rt.engine.packed == packed
    assert op_count(model, "VarlenAttention") == (2 if packed else 0)
    encoder_layers = sum("pooler" not in name for name in onnx_rt.engine.layers)  # the pooler sees [B, d] rows
    # Each layer's q, k and v LoRA nodes are one node over the packed projection (the attention reads it).
    assert op_count(model, "SlotLoRAQKVPacked") == (2 if packed else 0)
    assert op_count(model, "SlotLoRAPacked") + op_count(model, "SlotLoRAPackedInPlace") == (
        encoder_layers - 3 * 2 if packed else 0)
    assert op_count(model, "MultiHeadAttention") == (0 if family == "distilbert" or packed else 2)
    # The residual Adds after attention.output / output LoRA nodes are folded into them (input 11).
    nodes = onnx.load(str(model)).graph.node
    lora_outputs = {n.output[0] for n in nodes if n.domain == "adapterserve" and n.op_type.startswith("SlotLoRA")}
    assert not any(n.op_type == "Add" and set(n.input) & lora_outputs for n in nodes)
    single = [n for n in nodes if n.domain == "adapterserve" and n.op_type.removesuffix("InPlace") in ("SlotLoRA", "SlotLoRAPacked")]
    # A node runs in its base projection's buffer (*InPlace) exactly when nothing else reads it (here
    # all of them: DistilBERT's q/k/v have a projection each; a padded BERT graph's read one packed).
    readers = collections.Counter(i for n in nodes for i in n.input)
    assert all(n.op_type.endswith("InPlace") == (readers[n.input[0]] == 1) for n in single)
    assert sum(n.op_type.endswith("InPlace") for n in single) == (len(single) if fused else 0)
    # Inputs 8-10 of every LoRA node: the slots' output scale, output shift and vector flags.
    assert all(n.input[8].startswith("out_scale_") and n.input[10].startswith("vector_flags_") for n in single)
    folded = sum(len(n.input) > 11 and n.input[11] != "" for n in single)
    assert folded == (2 * 2 if fused else 0)  # 2 encoder layers x (attention output, output)
    # So is the GELU after each intermediate LoRA node (input 12; input 11 left empty).
    assert not any(n.op_type in ("Gelu", "Erf") and set(n.input) & lora_outputs for n in nodes)
    gelus = [n for n in single if len(n.input) > 12 and n.input[12]]
    assert len(gelus) == (2 if fused else 0) and all(n.input[11] == "" for n in gelus)
    # And the LayerNorm after each folded residual (inputs 13-15): only the embeddings' stays a node.
    assert not any(n.op_type == "LayerNormalization" and set(n.input) & lora_outputs for n in nodes)
    norms = [n for n in single if len(n.input) > 13 and n.input[13]]
    assert len(norms) == (2 * 2 if fused else 0) and all(n.input[11] and n.input[12] == "" for n in norms)
    # The feed-forward output linear's input scale (IA3) is folded into the intermediate node that makes
    # its input (inputs 16-17); the other layers' input scales stay SlotRowScale nodes.
    post = [n for n in single if len(n.input) == 18]
    assert [n.input[16].startswith("in_scale_") for n in post] == ([True] * 2 if fused else [])
    # The other layers' input scales stay SlotRowScale nodes only where they run in their input's buffer
    # (none copies its input): the graph takes no scale for the rest.
    assert sum(op_count(model, "SlotRowScale" + p) for p in ("", "Packed")) == 0
    row_scales = sum(op_count(model, "SlotRowScale" + p + "InPlace") for p in ("", "Packed"))
    assert row_scales == (len(onnx_rt.engine.in_scale_layers) - 2 if fused else 0)
    if fused:  # which: after attention, the feed-forward output (folded), the pooler
        kinds = {n.split(".", 3)[-1] if n.startswith(("encoder.layer.", "transformer.layer.")) else n
                 for n in onnx_rt.engine.in_scale_layers}
        want = {"distilbert": {"attention.out_lin", "ffn.lin2"}, "bert": {"attention.output.dense", "output.dense",
                                                                           "pooler.dense"}}
        assert kinds == want.get(family, {"attention.output.dense", "output.dense"})
    # The session holds the base: the torch backbone's weights are not kept resident a second time.
    assert onnx_rt.engine.released_bytes > 0
    assert all(p is None for m in onnx_rt.base.backbone.modules() for p in m._parameters.values())
    for i, a in enumerate(adapters[:2]):
        torch_rt.add_adapter(f"t{i}", a)
        onnx_rt.add_adapter(f"t{i}", a)
    items = [(f"t{j % 2}", SAMPLE_TEXTS[j]) for j in range(10)]
    assert max_diff(logits(torch_rt, items), logits(onnx_rt, items)) <= TOL
    # Registering and replacing after the session exists reaches the graph (inputs, not a re-export).
    mtime = (tmp_path / "onnx" / "model.onnx").stat().st_mtime
    torch_rt.add_adapter("t2", adapters[2])
    onnx_rt.add_adapter("t2", adapters[2])
    torch_rt.add_adapter("t0", adapters[2], replace=True)
    onnx_rt.add_adapter("t0", adapters[2], replace=True)
    items = [(f"t{j % 3}", SAMPLE_TEXTS[j]) for j in range(10)]
    assert max_diff(logits(torch_rt, items), logits(onnx_rt, items)) <= TOL
    assert (tmp_path / "onnx" / "model.onnx").stat().st_mtime == mtime
    with pytest.raises(NotSupportedError, match="torch engine"):
        onnx_rt.merge("t1")


def test_shared_base_int8_graph_is_quantized_and_serves(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    a = make_peft_adapter(base, str(tmp_path / "a"), num_labels=3, r=4, targets=FAMILY_TARGETS["bert"], seed=1, scale=0.5)
    torch_rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    int8_rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, engine="onnx", precision="int8",
                                    onnx_dir=str(tmp_path / "onnx8")))
    # GetInfo and build_info report what is served: ONNX Runtime int8, not the fp32 torch base it came from.
    assert int8_rt.base.precision == "fp32" and int8_rt.precision == "int8"
    assert int8_rt.serving_paths()["precision"] == "int8" and int8_rt.serving_paths()["engine"] == "onnx"
    torch_rt.add_adapter("t", a)
    int8_rt.add_adapter("t", a)
    items = [("t", s) for s in SAMPLE_TEXTS]
    got = logits(int8_rt, items)
    # A random 32-wide model says nothing about int8 accuracy (measured on MiniLM in docs/benchmarks.md);
    # here: it serves, differs from fp32 (really quantized), and the base MatMuls are integer ops.
    assert all(g.shape == (3,) and np.isfinite(g).all() for g in got)
    assert max_diff(logits(torch_rt, items), got) > 0
    import onnx

    graph = onnx.load(str(tmp_path / "onnx8" / "model.onnx"))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.graph.node)
    # The LoRA nodes survive quantization as our op (bf16 slots where AMX runs, else fp32).
    n_ops = lora_op_nodes(tmp_path / "onnx8" / "model.onnx", bf16=int8_rt.engine.bf16_lora)
    assert n_ops == (len(int8_rt.engine.layers) if OP else 0)


@pytest.mark.skipif(not OP, reason="our ONNX Runtime ops cannot be built here")
def test_padded_bert_graph_keeps_shared_projection_nodes_out_of_place(tiny_bases, tmp_path):
    """BERT exported padded (packed=False) with the fused op: q, k and v read columns of one packed
    projection, so they must not run in its buffer (*InPlace aliases it); every other LoRA node does.
    Served, it still equals torch within 1e-4 on mixed tasks."""
    import onnx

    from adapterserve.runtime.engine.onnx.export import export_shared_base

    base = tiny_bases["bert"]
    adapters = [make_peft_adapter(base, str(tmp_path / f"a{i}"), num_labels=2 + i, r=4 + 4 * i,
                                  targets=FAMILY_TARGETS["bert"], seed=i, scale=0.5) for i in range(2)]
    exporter = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    export_shared_base(exporter.engine, exporter.base.tokenizer, str(tmp_path / "padded"), packed=False)
    nodes = [n for n in onnx.load(str(tmp_path / "padded" / "model.onnx")).graph.node if n.domain == "adapterserve"]
    shared = [n for n in nodes if "attention/self" in n.name]
    assert len(shared) == 3 * 2 and not any(n.op_type.endswith("InPlace") for n in shared)
    assert all(n.op_type in ("SlotLoRAInPlace", "SlotRowScaleInPlace", "SlotRowScale") for n in nodes if n not in shared)
    assert sum(n.op_type == "SlotLoRAInPlace" for n in nodes) == len(nodes) - len(shared) - sum(
        n.op_type.startswith("SlotRowScale") for n in nodes)
    torch_rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    onnx_rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, engine="onnx", onnx_dir=str(tmp_path / "padded")))
    assert not onnx_rt.engine.packed
    for i, a in enumerate(adapters):
        torch_rt.add_adapter(f"t{i}", a)
        onnx_rt.add_adapter(f"t{i}", a)
    items = [(f"t{j % 2}", SAMPLE_TEXTS[j]) for j in range(10)]
    assert max_diff(logits(torch_rt, items), logits(onnx_rt, items)) <= TOL


def test_fused_lora_op_refused_where_it_cannot_apply(tiny_bases, tmp_path):
    # r_max 6 is not a multiple of the kernel's 8-wide rank blocks: "fused" must say so, "auto" falls back.
    base = tiny_bases["bert"]
    with pytest.raises(ConfigError, match="does not fit the kernel" if OP else "cannot be built"):
        Runtime(RuntimeConfig(base_model=base, slots=4, r_max=6, engine="onnx", lora_kernel="fused",
                              onnx_dir=str(tmp_path / "f")))
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=6, engine="onnx", onnx_dir=str(tmp_path / "a")))
    assert rt.engine.kernel_name == "onnx-graph" and lora_op_nodes(tmp_path / "a" / "model.onnx") == 0


def test_graph_for_another_base_is_refused(tiny_bases, tmp_path):
    other = make_tiny_base("bert", str(tmp_path / "other"), seed=1)
    import json

    cfg = json.load(open(tmp_path / "other" / "config.json"))
    cfg.update(hidden_size=48, num_attention_heads=4)
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})).save_pretrained(other)
    Runtime(RuntimeConfig(base_model=other, slots=4, r_max=8, engine="onnx", onnx_dir=str(tmp_path / "g")))
    with pytest.raises(ConfigError, match="exported for another base"):
        Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=8, engine="onnx", onnx_dir=str(tmp_path / "g")))


def test_per_task_export_matches_torch(tiny_bases, tmp_path):
    from adapterserve.exporters.parity import task_model_parity
    from adapterserve.exporters.per_task import export_task

    base = tiny_bases["distilbert"]
    a = make_peft_adapter(base, str(tmp_path / "a"), num_labels=4, r=4, targets=FAMILY_TARGETS["distilbert"], seed=2,
                          labels=["w", "x", "y", "z"])
    out = tmp_path / "export"
    export_task(a, str(out), base_model=base)
    for name in ("model.onnx", "labels.json", "tokenizer.json", "config.json"):
        assert (out / name).exists(), name
    report = task_model_parity(str(out), a, SAMPLE_TEXTS, base_model=base)
    assert report["max_abs_dlogit"] <= TOL and report["argmax_agreement"] == 1.0
    export_task(a, str(tmp_path / "export8"), base_model=base, quantize="int8")
    report8 = task_model_parity(str(tmp_path / "export8"), a, SAMPLE_TEXTS, base_model=base)
    assert report8["texts"] == len(SAMPLE_TEXTS) and report8["max_abs_dlogit"] < 1.0


def test_graph_exported_for_another_op_abi_is_refused(tiny_bases, tmp_path):
    import json

    base = tiny_bases["bert"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, engine="onnx", onnx_dir=str(tmp_path / "g")))
    if not rt.engine.fused_op:
        pytest.skip("the ONNX Runtime LoRA op cannot be built here")
    meta_path = tmp_path / "g" / "shared_base.json"
    meta = json.loads(meta_path.read_text())
    meta["lora_op_abi"] = 0  # as if exported by an older op build
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="ABI 0"):
        Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, engine="onnx", onnx_dir=str(tmp_path / "g")))


def test_cuda_base_without_the_onnxruntime_cuda_provider_is_refused():
    """A CUDA base needs onnxruntime-gpu; with the CPU build (this machine, CI) the message says so
    instead of ORT quietly running every node on the CPU."""
    import onnxruntime as ort
    import torch

    from adapterserve.runtime.engine.onnx.engine import providers_for

    assert providers_for(torch.device("cpu")) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider (tests/component/test_cuda.py covers it)")
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        providers_for(torch.device("cuda"))


def test_cpu_sessions_keep_layernorm_and_residual_add_unfused(tiny_bases, tmp_path):
    """ORT's CPU SkipLayerNormalization is slower than the LayerNorm + Add it fuses (runtime/engine/onnx/engine.py):
    a per-task CPU export leaves the pair unfused, says how to load it, and our sessions keep it so.
    The control (a default session on the same file) shows ORT would fuse it otherwise."""
    import json

    import onnx
    import onnxruntime as ort

    from adapterserve.exporters.per_task import export_task
    from adapterserve.runtime.engine.onnx.engine import CPU_DISABLED_OPTIMIZERS, open_session

    base = tiny_bases["bert"]
    a = make_peft_adapter(base, str(tmp_path / "a"), num_labels=2, r=4, targets=FAMILY_TARGETS["bert"], seed=4)
    out = tmp_path / "export"
    model = export_task(a, str(out), base_model=base)
    assert op_count(model, "SkipLayerNormalization") == 0 and op_count(model, "LayerNormalization") > 0
    assert json.loads((out / "export.json").read_text())["cpu_session"]["disabled_optimizers"] == CPU_DISABLED_OPTIMIZERS

    def ops_after_load(session_factory, name):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / name)
        session_factory(model, options)
        return {n.op_type for n in onnx.load(str(tmp_path / name)).graph.node}

    ours = ops_after_load(lambda p, o: open_session(p, o), "ours.onnx")
    default = ops_after_load(lambda p, o: ort.InferenceSession(p, o, providers=["CPUExecutionProvider"]), "default.onnx")
    assert "SkipLayerNormalization" in default
    assert "SkipLayerNormalization" not in ours and "LayerNormalization" in ours
