"""The fused CPU LoRA kernel (runtime/native/csrc/lora_kernel.c) against the exact (float64) delta,
within the float32 rounding bound of its sums (tests/tolerance.py), on real tokens; padded positions
left untouched; every layout the slot layers hand it (3-D activations, the pooler's strided 2-D view,
rows without an adapter, one slot for all); and the portable path where native code is off."""
import os
import subprocess
import sys

import pytest
import torch

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import ConfigError
from adapterserve.runtime.native import lora_kernel
from adapterserve.runtime.native.hardware import probe
from adapterserve.runtime.runtime import Runtime
from tests.tolerance import exact_lora, lora_delta_bound

pytestmark = pytest.mark.native


def kernel_or_skip():
    kernel = lora_kernel.load()
    if kernel is None:
        reason = lora_kernel.unavailable_reason() or ""
        # Only the hardware decision excuses it; a missing compiler on an AVX-512 machine is a setup bug.
        if probe().native_unavailable is None:
            pytest.fail(f"fused kernel could not be built on an AVX-512 machine: {reason}")
        pytest.skip(f"native kernels do not run here: {reason}")
    return kernel


def assert_within_bound(got, x, a, b, r, slots, y0, where=None):
    want = exact_lora(x, a, b, r, slots, y0)
    bound = lora_delta_bound(x, a, b, r, slots, y0)
    err = (got.double() - want).abs()
    if where is not None:
        err, bound = err[where], bound[where]
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the float32 bound (worst ratio {worst:.3g})"


def random_slots(n_slots, r_max, d_in, d_out, ranks, gen):
    """Slot buffers as write_slot leaves them (zero past each adapter's rank) and the per-slot rank
    table rounded up to 8."""
    a = torch.zeros(n_slots, r_max, d_in)
    b = torch.zeros(n_slots, r_max, d_out)
    r8 = torch.zeros(n_slots, dtype=torch.long)
    for s, r in ranks.items():
        a[s, :r] = torch.randn(r, d_in, generator=gen)
        b[s, :r] = torch.randn(r, d_out, generator=gen) * 0.1
        r8[s] = -(-r // 8) * 8
    return a, b, r8


@pytest.mark.parametrize("d_in,d_out,r_max", [(32, 64, 8), (384, 384, 16), (384, 1536, 16), (1536, 384, 16), (64, 48, 64)])
def test_kernel_equals_gather_bmm_on_real_tokens(d_in, d_out, r_max):
    kernel = kernel_or_skip()
    gen = torch.Generator().manual_seed(d_in + d_out)
    rows, T, n_slots = 11, 9, 12
    ranks = {s: 1 + (s * 5) % r_max for s in range(1, n_slots)}
    a, b, r8 = random_slots(n_slots, r_max, d_in, d_out, ranks, gen)
    slots = torch.tensor([3, 0, 7, 7, 1, 11, 0, 5, 2, 9, 4])  # 0 = no adapter; a repeated slot
    lengths = torch.tensor([9, 1, 4, 9, 2, 7, 3, 8, 5, 6, 9])
    x = torch.randn(rows, T, d_in, generator=gen)
    y0 = torch.randn(rows, T, d_out, generator=gen)
    r = max(ranks[s] for s in slots.tolist() if s)
    got = y0.clone()
    kernel(x, got, a, b, r8, slots, lengths)
    real = torch.arange(T)[None, :] < lengths[:, None]
    assert_within_bound(got, x, a, b, r, slots, y0, where=real)
    assert torch.equal(got[~real], y0[~real]), "padded positions must be left as the base wrote them"
    assert torch.equal(got[1], y0[1]) and torch.equal(got[6], y0[6]), "rows without an adapter are untouched"


def test_kernel_without_lengths_covers_every_position_and_strided_2d_input():
    kernel = kernel_or_skip()
    gen = torch.Generator().manual_seed(1)
    a, b, r8 = random_slots(5, 16, 32, 32, {1: 3, 2: 16, 3: 8, 4: 9}, gen)
    slots = torch.tensor([2, 4, 1, 3, 3])
    x = torch.randn(5, 6, 32, generator=gen)
    y0 = torch.randn(5, 6, 32, generator=gen)
    got = y0.clone()
    kernel(x, got, a, b, r8, slots, None)
    assert_within_bound(got, x, a, b, 16, slots, y0)
    # The pooler's input is hidden[:, 0]: a 2-D view whose rows are T * H floats apart.
    first = x[:, 0]
    assert not first.is_contiguous()
    y2 = torch.randn(5, 32, generator=gen)
    got2 = y2.clone()
    kernel(first, got2, a, b, r8, slots, torch.tensor([6, 6, 1, 2, 6]))
    assert_within_bound(got2, first, a, b, 16, slots, y2)


def test_rows_whose_slot_does_not_touch_the_layer_are_skipped():
    """A rank-table entry of 0 (the slot's adapter does not target this layer) means no work for the
    row, whatever the buffers hold; nonzero entries read only that many rank rows."""
    kernel = kernel_or_skip()
    gen = torch.Generator().manual_seed(2)
    a, b, r8 = random_slots(4, 16, 32, 32, {1: 16, 2: 16, 3: 16}, gen)
    r8[2] = 0
    r8[3] = 8  # rows 8..15 of slot 3 are nonzero here but outside its (table) rank
    slots = torch.tensor([1, 2, 3])
    x = torch.randn(3, 4, 32, generator=gen)
    y0 = torch.randn(3, 4, 32, generator=gen)
    got = y0.clone()
    kernel(x, got, a, b, r8, slots, None)
    assert_within_bound(got[:1], x[:1], a, b, 16, slots[:1], y0[:1])
    assert torch.equal(got[1], y0[1])
    assert_within_bound(got[2:], x[2:], a, b, 8, slots[2:], y0[2:])


@pytest.mark.parametrize("packed", [False, True])
def test_kernel_applies_each_rows_output_vectors_after_its_delta(packed):
    """scale, then shift, per the slot's flags (2: scale, 4: shift), over every position of the row (padded)
    or its tokens (packed), also for a slot with vectors but no LoRA in the layer (IA3, BEFT: rank 0).
    The scale multiplies the delta's rounding: the bound is the delta's times |scale|, plus an ulp of the
    result for the two element-wise roundings."""
    kernel = kernel_or_skip()
    gen = torch.Generator().manual_seed(5)
    d, n_slots = 48, 5
    a, b, r8 = random_slots(n_slots, 16, 32, d, {1: 4, 2: 16, 3: 8}, gen)  # slot 4: vectors only
    scale = 1 + 0.5 * torch.randn(n_slots, d, generator=gen)
    shift = torch.randn(n_slots, d, generator=gen)
    flags = torch.tensor([0, 6, 0, 4, 2])
    slots = torch.tensor([1, 2, 4, 3, 0, 4])
    lengths = torch.tensor([5, 3, 6, 1, 6, 2])
    x = torch.randn(6, 6, 32, generator=gen)
    y0 = torch.randn(6, 6, d, generator=gen)
    got = y0.clone()
    if packed:
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        xp = torch.cat([x[i, :n] for i, n in enumerate(lengths.tolist())])[None]
        yp = torch.cat([y0[i, :n] for i, n in enumerate(lengths.tolist())])[None]
        kernel.packed(xp, yp, a, b, r8, slots, offsets, (scale, shift, flags))
        for i, n in enumerate(lengths.tolist()):
            got[i, :n] = yp[0, offsets[i]:offsets[i] + n]
    else:
        kernel(x, got, a, b, r8, slots, lengths, (scale, shift, flags))
    want = exact_lora(x, a, b, 16, slots, y0)
    bound = lora_delta_bound(x, a, b, 16, slots, y0)
    for i, s in enumerate(slots.tolist()):
        if flags[s] & 2:
            want[i] *= scale[s].double()
            bound[i] *= scale[s].abs().double()
        if flags[s] & 4:
            want[i] += shift[s].double()
    bound += want.abs() * 2 * torch.finfo(torch.float32).eps
    real = torch.arange(6)[None, :] < lengths[:, None]
    # Padded rows: the delta on real tokens, the vectors on every position (as the torch path's broadcast).
    err = (got.double() - want).abs()
    if not packed:
        pad_want = y0.double().clone()
        for i, s in enumerate(slots.tolist()):
            pad_want[i] = pad_want[i] * (scale[s].double() if flags[s] & 2 else 1) + (shift[s].double() if flags[s] & 4 else 0)
        err = torch.where(real[..., None], err, (got.double() - pad_want).abs())
    ratio = (err / bound)[real] if packed else err / bound
    assert ratio.max().item() <= 1.0, f"worst error {ratio.max().item():.3g} of the bound"
    assert torch.equal(got[4], y0[4]), "a row without an adapter is untouched"
    assert not torch.equal(got[2], y0[2]), "a slot of vectors alone (rank 0 here) still gets them"


def test_runtime_picks_the_kernel_and_refuses_it_where_it_cannot_run(tiny_bases):
    kernel_or_skip()
    assert Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=8)).engine.kernel_name == "fused"
    assert Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=8,
                                 lora_kernel="torch")).engine.kernel_name == "torch"
    # auto falls back quietly where the kernel does not apply; fused says why.
    assert Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=12)).engine.kernel_name == "torch"
    assert Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=128)).engine.kernel_name == "torch"
    with pytest.raises(ConfigError, match="r_max a multiple of 8"):
        Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=12, lora_kernel="fused"))
    with pytest.raises(ConfigError, match="int8 on cpu"):
        Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=8, precision="int8", lora_kernel="fused"))
    # bf16 on the CPU keeps fp32 activations: the kernel and the packed forward serve it.
    bf16 = Runtime(RuntimeConfig(base_model=tiny_bases["bert"], slots=4, r_max=8, precision="bf16"))
    assert bf16.engine.kernel_name == "fused" and bf16.engine.packed
    with pytest.raises(ConfigError, match="lora_kernel must be one of"):
        RuntimeConfig(lora_kernel="cuda")


def test_native_switch_off_takes_every_portable_path(tiny_bases):
    """ADAPTERSERVE_NATIVE=off: no kernel, no ONNX Runtime op, the torch LoRA path, and the probe says why."""
    code = ("from adapterserve.runtime.config import RuntimeConfig; from adapterserve.runtime.runtime import Runtime; "
            "from adapterserve.runtime.native import lora_kernel, ort_ops; "
            f"rt = Runtime(RuntimeConfig(base_model={tiny_bases['bert']!r}, slots=4, r_max=8)); "
            "print(rt.engine.kernel_name, lora_kernel.load(), ort_ops.library_path(), lora_kernel.unavailable_reason())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, ADAPTERSERVE_NATIVE="off", HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["torch", "None", "None"], done.stdout
    assert "ADAPTERSERVE_NATIVE=off" in done.stdout


@pytest.mark.parametrize("hidden,threads", [(384, 1), (40, 1), (384, 2)])
def test_head_kernel_equals_each_tasks_linear_and_softmax(hidden, threads):
    """runtime/heads' native path: every row's task head and softmax in one call (rows in any order and
    count per task, so every block of 1-4 rows and 1-4 labels runs; a head no row uses), against
    float64: the logits within the float32 rounding bound of a dot product of `hidden` terms plus the
    bias (hidden 40: a masked tail of 8 lanes); the probabilities against the exact softmax of those
    logits, within the bound of the exp (its reduction and polynomial: a few units of roundoff, plus
    the rounding of its argument), the n-term sum and the division. Columns past a task's labels are
    0 in both outputs."""
    import numpy as np

    kernel = kernel_or_skip()
    rng = np.random.default_rng(hidden)
    labels = [2, 50, 7, 13, 5, 1]
    weights = [rng.normal(size=(n, hidden)).astype(np.float32) for n in labels]
    biases = [rng.normal(size=n).astype(np.float32) for n in labels]
    task_of_row = np.array([3, 0, 1, 1, 2, 0, 3, 3, 1, 1, 1, 1, 2, 3, 3, 5], dtype=np.int64)  # task 4: no row
    features = torch.from_numpy((rng.normal(size=(len(task_of_row), hidden)) * 2).astype(np.float32))
    heads = np.array([(w.ctypes.data, b.ctypes.data, n) for w, b, n in zip(weights, biases, labels)], dtype=np.int64)
    logits = np.full((len(task_of_row), max(labels)), np.nan, dtype=np.float32)
    probs = np.full_like(logits, np.nan)
    kernel.heads(features, task_of_row, heads, logits, probs, threads)
    eps = np.finfo(np.float32).eps / 2  # unit roundoff
    for row, task in enumerate(task_of_row):
        w, b, n = weights[task].astype(np.float64), biases[task].astype(np.float64), labels[task]
        f = features[row].double().numpy()
        want = w @ f + b
        bound = (hidden + 1) * eps / (1 - (hidden + 1) * eps) * (np.abs(w) @ np.abs(f) + np.abs(b))
        assert np.all(np.abs(logits[row, :n] - want) <= bound), f"row {row}"
        y = logits[row, :n].astype(np.float64)
        shifted = y - y.max()
        exact = np.exp(shifted) / np.exp(shifted).sum()
        relative = 2 * (4 + np.abs(shifted).max()) * eps + n * eps / (1 - n * eps) + eps
        assert np.all(np.abs(probs[row, :n] - exact) <= relative * exact + 1e-37), f"row {row}"
        assert not logits[row, n:].any() and not probs[row, n:].any()
