"""The int8 shared graph's bf16 LoRA ops (runtime/native/csrc/lora_amx.c) on tiny random models: the same logits
as the fp32 op in the same int8 graph to bf16 rounding, the portable loop equal to the AMX tiles,
registrations after the session exists reach the packed bf16 slots, and the fp32 graph refuses them."""
import json

import numpy as np
import pytest

from adapterserve.runtime.engine.onnx.export import export_shared_base
from adapterserve.runtime.engine.onnx.ops import single_op_model
from adapterserve.runtime.native import ort_ops
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime
from tiny_models import FAMILY_TARGETS, SAMPLE_TEXTS, make_peft_adapter

pytestmark = [pytest.mark.native,
              pytest.mark.skipif(ort_ops.library_path() is None, reason="the ONNX Runtime op library cannot be built here")]

# bf16 keeps 8 significant bits: x, A, B and xA each rounded once move a LoRA delta of size d by ~4e-3 d.
# The adapters here (scale 0.5 on a 32-wide model) move the logits by ~1; 2e-2 leaves room for that.
BF16_TOL = 2e-2
AMX = ort_ops.amx_bf16_available()


def logits(rt, items):
    return np.stack([np.array(p.logits) for p in rt.classify(items)])


def op_types(path) -> list[str]:
    import onnx

    return [n.op_type.removesuffix("InPlace") for n in onnx.load(str(path)).graph.node if n.domain == "adapterserve"]


@pytest.fixture
def adapters(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    t = FAMILY_TARGETS["bert"]
    # Ranks 4 / 8 / 16 (r_max 16); the second leaves some layers out.
    return [make_peft_adapter(base, str(tmp_path / f"a{i}"), num_labels=3, r=r, targets=t[i:i + 4], seed=i, scale=0.5)
            for i, r in enumerate((4, 8, 16))]


def export(base, out_dir, bf16_lora):
    """An int8 shared graph with the fused op, its LoRA ops bf16 or fp32."""
    rt = Runtime(RuntimeConfig(base_model=base, slots=6, r_max=16))
    export_shared_base(rt.engine, rt.base.tokenizer, str(out_dir), quantize="int8", bf16_lora=bf16_lora)
    return str(out_dir)


def serve(base, onnx_dir, adapters):
    rt = Runtime(RuntimeConfig(base_model=base, slots=6, r_max=16, engine="onnx", precision="int8", onnx_dir=onnx_dir))
    for i, a in enumerate(adapters):
        rt.add_adapter(f"t{i}", a)
    return rt


def items(n_tasks):
    return [(f"t{j % n_tasks}", SAMPLE_TEXTS[j % len(SAMPLE_TEXTS)] + " more words" * (j // 4)) for j in range(24)]


def test_bf16_op_matches_a_float64_reference(tmp_path, monkeypatch):
    """One SlotLoRAPackedBF16 node: 5 token-packed rows (1 to 37 tokens: 16-token tiles and tails),
    ranks 8 / 16 / 24 / 40 over r_max 48 (several rank chunks), 48 -> 80 (a din that is not a
    multiple of 32), one row on slot 0 (no adapter); against (x A^T) B in float64 from the fp32 slots.
    Both paths: AMX tiles (where they run) and the portable loop (ADAPTERSERVE_LORA_AMX=off, read when
    a session registers the ops)."""
    import onnx
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    d_in, d_out, r_max, slots = 48, 80, 48, 5
    a = np.zeros((slots, r_max, d_in), np.float32)
    b = np.zeros((slots, r_max, d_out), np.float32)
    r8 = np.zeros(slots, np.int64)
    for s, r in zip(range(1, slots), (8, 16, 24, 40)):
        a[s, :r], b[s, :r], r8[s] = rng.normal(0, 0.3, (r, d_in)), rng.normal(0, 0.3, (r, d_out)), r
    lengths = [1, 16, 17, 37, 5]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    slot_per_row = np.array([1, 2, 3, 4, 0], np.int64)
    n = int(offsets[-1])
    x = rng.normal(0, 1, (1, n, d_in)).astype(np.float32)
    y = rng.normal(0, 1, (1, n, d_out)).astype(np.float32)
    packed_a = ort_ops.pack_bf16_a(torch.from_numpy(a)).numpy()
    packed_b = ort_ops.pack_bf16_b(torch.from_numpy(b)).numpy()
    feed = dict(zip(["y", "x", "a", "b", "r8", "slot", "offsets", "y_offset"],
                    [y, x, packed_a, packed_b, r8, slot_per_row, offsets, np.zeros(1, np.int64)]))
    onnx.save(single_op_model("SlotLoRAPackedBF16", feed), str(tmp_path / "op.onnx"))

    def run(amx: str) -> np.ndarray:
        monkeypatch.setenv("ADAPTERSERVE_LORA_AMX", amx)
        options = ort.SessionOptions()
        options.register_custom_ops_library(ort_ops.library_path())
        return ort.InferenceSession(str(tmp_path / "op.onnx"), options).run(None, feed)[0]

    outputs = {"off": run("off")}
    if AMX:
        outputs["on"] = run("on")
    want = y[0].astype(np.float64)
    for row, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        slot = slot_per_row[row]
        want[s:e] += (x[0, s:e].astype(np.float64) @ a[slot].T.astype(np.float64)) @ b[slot].astype(np.float64)
    delta = np.abs(want - y[0]).max()
    assert delta > 1
    for out in outputs.values():
        assert np.array_equal(out[0, offsets[4]:], y[0, offsets[4]:])  # slot 0: untouched
        assert np.abs(out[0] - want).max() <= 1e-2 * delta
    if AMX:  # both round the same operands to bf16; only the order of the fp32 sums differs
        assert np.abs(outputs["on"] - outputs["off"]).max() <= 1e-5 * delta


def test_bf16_lora_ops_add_no_error_to_the_int8_graph(tiny_bases, tmp_path, adapters):
    base = tiny_bases["bert"]
    fp32_dir, bf16_dir = export(base, tmp_path / "fp32", False), export(base, tmp_path / "bf16", True)
    assert op_types(bf16_dir + "/model.onnx").count("SlotLoRAPackedBF16") == \
        op_types(fp32_dir + "/model.onnx").count("SlotLoRAPacked") > 0
    assert "SlotLoRAPacked" not in op_types(bf16_dir + "/model.onnx")
    with open(bf16_dir + "/shared_base.json") as fh:
        assert json.load(fh)["lora_precision"] == "bf16"
    torch_rt = Runtime(RuntimeConfig(base_model=base, slots=6, r_max=16))
    for i, a in enumerate(adapters):
        torch_rt.add_adapter(f"t{i}", a)
    exact = logits(torch_rt, items(3))
    fp32_op, bf16_op = logits(serve(base, fp32_dir, adapters), items(3)), logits(serve(base, bf16_dir, adapters), items(3))
    # Dynamic int8 quantization amplifies any change of its inputs (a value crossing a rounding step),
    # so the bar is the int8 graph's own error against torch fp32 (measured here: 0.18 max, 0.013 mean;
    # the bf16 ops' graph: 0.06 max). A wrong layout or slot moves logits by ~1.
    int8_error = np.abs(fp32_op - exact)
    bf16_error = np.abs(bf16_op - exact)
    assert bf16_error.max() <= 1.5 * int8_error.max() + BF16_TOL
    assert bf16_error.mean() <= 1.5 * int8_error.mean() + BF16_TOL / 10
    assert np.abs(bf16_op - fp32_op).max() > 0  # really bf16: not the fp32 op under another name


def test_registrations_after_load_reach_the_bf16_slots(tiny_bases, tmp_path, adapters):
    base = tiny_bases["bert"]
    bf16_dir = export(base, tmp_path / "bf16", True)
    rt = serve(base, bf16_dir, adapters[:2])
    logits(rt, items(2))
    rt.add_adapter("t0", adapters[2], replace=True)  # rank 16 over rank 4, in a slot the graph has read
    rt.remove_adapter("t1")
    rt.add_adapter("t1", adapters[0])
    fresh = serve(base, bf16_dir, [adapters[2], adapters[0]])
    assert np.abs(logits(rt, items(2)) - logits(fresh, items(2))).max() <= 1e-6


def test_int8_graph_takes_bf16_lora_ops_by_default_only_where_amx_runs(tiny_bases, tmp_path):
    rt = Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=8, engine="onnx", precision="int8",
                               onnx_dir=str(tmp_path / "int8")))
    assert rt.engine.bf16_lora == AMX
    assert ("SlotLoRAPackedBF16" in op_types(tmp_path / "int8" / "model.onnx")) == AMX


def test_fp32_graph_refuses_bf16_lora_ops(tiny_bases, tmp_path):
    rt = Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=8))
    with pytest.raises(ValueError, match="int8 graph"):
        export_shared_base(rt.engine, rt.base.tokenizer, str(tmp_path / "x"), bf16_lora=True)
    fp32 = Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=8, engine="onnx",
                                 onnx_dir=str(tmp_path / "fp32")))
    assert not fp32.engine.bf16_lora
