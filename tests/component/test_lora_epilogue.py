"""The nodes folded into the LoRA ops (runtime/native/csrc/row_epilogue.c, runtime/engine/onnx/export._fold_*): the
vectorized erf and GELU against float64, and one op node with its residual, GELU and LayerNorm
inputs against layer_norm(gelu((y + delta) + residual)) computed in float64. Whole graphs with the folds are checked against
torch in test_onnx.py (1e-4) and test_bf16_lora.py."""
import ctypes
import math

import numpy as np
import pytest
import torch

from adapterserve.runtime.engine.onnx.ops import single_op_model
from adapterserve.runtime.native import ort_ops

pytestmark = [pytest.mark.native,
              pytest.mark.skipif(ort_ops.library_path() is None, reason="the ONNX Runtime op library cannot be built here")]


def in_place(fn_name: str, x: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(x, dtype=np.float32).copy()
    getattr(ctypes.CDLL(ort_ops.library_path()), fn_name)(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
    return out


def grid() -> np.ndarray:
    """2M points over [-10, 10] (both erf branches and the switch at 475/512), plus edge values; a
    multiple of 16 long."""
    edges = [0.0, -0.0, 1e-30, -1e-30, 0.927734375, -0.927734375, 0.92773443, 3.9, 4.0, 5.0, -5.0, 30.0, -30.0,
             2.0 ** 100, -2.0 ** 100, 100.0]
    x = np.concatenate([np.linspace(-10, 10, 2_000_000, dtype=np.float32), np.array(edges, np.float32)])
    return np.pad(x, (0, -x.size % 16))


def test_erf_is_faithfully_rounded():
    x = grid()
    want = np.array([math.erf(v) for v in x.astype(np.float64)])
    got = in_place("adapterserve_erf", x)
    ulp = np.spacing(np.abs(want).astype(np.float32).clip(np.finfo(np.float32).tiny))
    assert (np.abs(got - want) / ulp).max() <= 1.0  # measured 0.96 ulp


def test_gelu_is_as_close_to_float64_as_torch_fp32():
    x = grid()
    want = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    got = in_place("adapterserve_gelu", x)
    torch_fp32 = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    # measured: 3.0e-7 here, 1.2e-6 for torch's own fp32 GELU; exact at 0, x at x >= 10, 0 below -10
    assert np.abs(got - want).max() <= min(5e-7, np.abs(torch_fp32 - want).max())
    assert got[np.isin(x, [0.0, 30.0, 100.0, 2.0 ** 100])].tolist() == [0.0, 0.0, 30.0, 2.0 ** 100, 100.0]  # in grid order


def packed_op_feed(rng, bf16: bool, residual: bool, activation, norm: bool, vectors: bool = False):
    """vectors: slot 2 scales and shifts its output (flags 2 | 4), slot 1 only shifts it (4); the next
    layer's input scale (post_scale) is set for slot 1 (flag 1) and left off for slot 2."""
    d_in, d_out, r_max, slots = 32, 48, 16, 3
    a = np.zeros((slots, r_max, d_in), np.float32)
    b = np.zeros((slots, r_max, d_out), np.float32)
    r8 = np.array([0, 8, 16], np.int64)
    for s in (1, 2):
        a[s, :r8[s]], b[s, :r8[s]] = rng.normal(0, 0.3, (r8[s], d_in)), rng.normal(0, 0.3, (r8[s], d_out))
    offsets = np.array([0, 3, 20, 27], np.int64)
    n = int(offsets[-1])
    x = rng.normal(0, 1, (1, n, d_in)).astype(np.float32)
    y = rng.normal(0, 1, (1, n, d_out)).astype(np.float32)
    a_in = ort_ops.pack_bf16_a(torch.from_numpy(a)).numpy() if bf16 else a
    b_in = ort_ops.pack_bf16_b(torch.from_numpy(b)).numpy() if bf16 else b
    feed = {"y": y, "x": x, "a": a_in, "b": b_in, "r8": r8, "slot": np.array([1, 2, 0], np.int64), "offsets": offsets,
            "y_offset": np.zeros(1, np.int64),
            "out_scale": rng.normal(1, 0.3, (slots, d_out)).astype(np.float32) if vectors else None,
            "out_shift": rng.normal(0, 0.3, (slots, d_out)).astype(np.float32) if vectors else None,
            "vector_flags": np.array([0, 4, 6], np.int64) if vectors else None,
            "residual": rng.normal(0, 1, (1, n, d_out)).astype(np.float32) if residual else None,
            "activation": None if activation is None else np.array([activation], np.int64),
            "ln_scale": rng.normal(1, 0.2, d_out).astype(np.float32) if norm else None,
            "ln_bias": rng.normal(0, 0.2, d_out).astype(np.float32) if norm else None,
            "ln_epsilon": np.array([1e-5], np.float32) if norm else None,
            "post_scale": rng.normal(1, 0.3, (slots, d_out)).astype(np.float32) if vectors else None,
            "post_flags": np.array([0, 1, 0], np.int64) if vectors else None}
    want = y[0].astype(np.float64)
    for row, slot in enumerate(feed["slot"]):
        s, e = offsets[row], offsets[row + 1]
        want[s:e] += (x[0, s:e].astype(np.float64) @ a[slot].T.astype(np.float64)) @ b[slot].astype(np.float64)
        if vectors and feed["vector_flags"][slot] & 2:
            want[s:e] *= feed["out_scale"][slot]
        if vectors and feed["vector_flags"][slot] & 4:
            want[s:e] += feed["out_shift"][slot]
    if residual:
        want += feed["residual"][0]
    if activation == 1:
        want = torch.nn.functional.gelu(torch.from_numpy(want)).numpy()
    if norm:
        want = torch.nn.functional.layer_norm(torch.from_numpy(want), (d_out,), torch.from_numpy(feed["ln_scale"]).double(),
                                              torch.from_numpy(feed["ln_bias"]).double(), 1e-5).numpy()
    if vectors:
        for row, slot in enumerate(feed["slot"]):
            if feed["post_flags"][slot] & 1:
                want[offsets[row]:offsets[row + 1]] *= feed["post_scale"][slot]
    return feed, want


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("residual,activation,norm,vectors", [
    (False, 1, False, False), (True, None, False, False), (True, 1, False, False), (False, 0, False, False),
    (True, None, True, False), (False, None, True, False), (False, None, False, True), (True, 1, False, True),
    (True, None, True, True)])
def test_op_applies_its_residual_gelu_and_layer_norm(tmp_path, bf16, residual, activation, norm, vectors):
    """Token-packed rows of 3 / 17 / 7 tokens (one on slot 0, whose output is still y + residual,
    then GELU, then LayerNorm); with vectors, each slot's output scale and shift first and the next
    layer's input scale last. Tolerance: 1e-5 of the output's scale for the fp32 op; bf16 slots
    round the delta."""
    import onnx
    import onnxruntime as ort

    feed, want = packed_op_feed(np.random.default_rng(3), bf16, residual, activation, norm, vectors)
    op = ort_ops.PACKED_OP_TYPE + ("BF16" if bf16 else "")
    onnx.save(single_op_model(op, feed), str(tmp_path / "op.onnx"))
    options = ort.SessionOptions()
    options.register_custom_ops_library(ort_ops.library_path())
    session = ort.InferenceSession(str(tmp_path / "op.onnx"), options)
    got = session.run(None, {k: v for k, v in feed.items() if v is not None})[0][0]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= (1e-2 if bf16 else 1e-5) * scale
    if activation == 1 and not norm and not vectors:  # GELU really applied: an ungelu'd output is far off
        assert (got < -0.2).sum() == 0
