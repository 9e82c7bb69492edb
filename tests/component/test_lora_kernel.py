"""The fused CPU LoRA kernel (runtime/lora_kernel.c) against the torch gather + bmm path it replaces:
same deltas to 1e-5 on real tokens, padded positions left untouched, every layout the slot layers
hand it (3-D activations, the pooler's strided 2-D view, rows without an adapter, one slot for all)."""
import pytest
import torch

from adapterserve.runtime.native import lora_kernel
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import ConfigError
from adapterserve.runtime.runtime import Runtime

TOL = 1e-5


def kernel_or_skip():
    kernel = lora_kernel.load()
    if kernel is None:
        reason = lora_kernel.unavailable_reason() or ""
        with open("/proc/cpuinfo") as fh:
            has_avx512 = " avx512f" in fh.read()
        # Only missing hardware excuses it; a missing compiler on an AVX-512 machine is a setup bug.
        if has_avx512:
            pytest.fail(f"fused kernel could not be built on an AVX-512 machine: {reason}")
        pytest.skip(f"no AVX-512 here: {reason}")
    return kernel


def torch_delta(x, a, b, r, slots):
    """The torch path of SlotLoRALinear: gather each row's slot, two bmm."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    ga = a[:, :r].index_select(0, slots)
    gb = b[:, :r].index_select(0, slots)
    d = torch.bmm(torch.bmm(x3, ga.transpose(1, 2)), gb)
    return d if x.dim() == 3 else d.squeeze(1)


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
    want = y0 + torch_delta(x, a, b, r, slots)
    got = y0.clone()
    kernel(x, got, a, b, r8, slots, lengths)
    real = torch.arange(T)[None, :] < lengths[:, None]
    assert (got - want)[real].abs().max().item() <= TOL
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
    assert (got - (y0 + torch_delta(x, a, b, 16, slots))).abs().max().item() <= TOL
    # The pooler's input is hidden[:, 0]: a 2-D view whose rows are T * H floats apart.
    first = x[:, 0]
    assert not first.is_contiguous()
    y2 = torch.randn(5, 32, generator=gen)
    got2 = y2.clone()
    kernel(first, got2, a, b, r8, slots, torch.tensor([6, 6, 1, 2, 6]))
    assert (got2 - (y2 + torch_delta(first, a, b, 16, slots))).abs().max().item() <= TOL


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
    assert (got[0] - (y0 + torch_delta(x, a, b, 16, slots))[0]).abs().max().item() <= TOL
    assert torch.equal(got[1], y0[1])
    assert (got[2] - (y0 + torch_delta(x, a, b, 8, slots))[2]).abs().max().item() <= TOL


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
