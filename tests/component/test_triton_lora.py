"""The Triton LoRA kernels (runtime/engine/triton_lora.py) against the exact (float64) delta over mixed
ranks, rows without an adapter, slots that leave the layer alone, 3-D activations and the pooler's
strided 2-D view, within the bound that their roundings allow (fp32 accumulation of the two products,
x A^T rounded to the base dtype in half precision, the result rounded into y).

On a CUDA device at fp32, fp16 and bf16; without one, in Triton's interpreter on the CPU (fp32 and
fp16: numpy has no bf16) where Triton is installed; skipped where neither is (CI installs no Triton:
it ships with torch's CUDA builds, not the CPU wheel). The engine's choice of the kernels, and its
refusal where they cannot run, are tested everywhere.
"""
import os
import subprocess
import sys

import pytest
import torch

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import ConfigError
from adapterserve.runtime.runtime import Runtime

U = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gamma(n: int, u: float = 2.0 ** -24) -> float:
    return n * u / (1 - n * u)


def check_kernel(device: str, dtype: torch.dtype) -> None:
    from adapterserve.runtime.engine import triton_lora

    gen = torch.Generator().manual_seed(0)
    r_max, slots = 32, 6
    for shape, d_out in (((5, 19, 48), 72), ((6, 40), 200)):
        d_in = shape[-1]
        a = torch.zeros(slots, r_max, d_in)
        b = torch.zeros(slots, r_max, d_out)
        ranks = {1: 4, 2: 32, 4: 20}  # slot 3 holds an adapter that leaves this layer alone (zeros); 5 unused
        for s, r in ranks.items():
            a[s, :r] = torch.randn(r, d_in, generator=gen)
            b[s, :r] = torch.randn(r, d_out, generator=gen) * 0.1
        a, b = a.to(dtype).to(device), b.to(dtype).to(device)
        slot_per_row = torch.tensor([2, 0, 1, 4, 3, 2][:shape[0]], device=device)
        if len(shape) == 2:  # the pooler's input: each row's first token, a strided view
            x = torch.randn(shape[0], 3, d_in, generator=gen).to(dtype).to(device)[:, 0]
            assert not x.is_contiguous()
        else:
            x = torch.randn(*shape, generator=gen).to(dtype).to(device)
        y0 = torch.randn(*shape[:-1], d_out, generator=gen).to(dtype).to(device)
        y = y0.clone()
        triton_lora.add_delta(x, y, a, b, slot_per_row, max(ranks.values()))

        x64 = x.double().cpu() if x.dim() == 3 else x.double().cpu().unsqueeze(1)
        a64, b64 = a.double().cpu()[slot_per_row.cpu()], b.double().cpu()[slot_per_row.cpu()]
        xa = torch.bmm(x64, a64.transpose(1, 2))
        want = y0.double().cpu() + torch.bmm(xa, b64).reshape(y0.shape)
        # fp32 sums of the d_in products, x A^T rounded to dtype (half only), fp32 sums of the r products,
        # the sum rounded into y (dtype, after fp32).
        u = U[dtype]
        half = u if dtype != torch.float32 else 0.0
        m1 = torch.bmm(torch.bmm(x64.abs(), a64.abs().transpose(1, 2)), b64.abs()).reshape(y0.shape)
        m2 = torch.bmm(xa.abs(), b64.abs()).reshape(y0.shape)
        delta_bound = gamma(d_in) * m1 + (half + gamma(r_max)) * (m2 + gamma(d_in) * m1)
        bound = 1.01 * (delta_bound + (u + 2.0 ** -24) * (want.abs() + delta_bound))
        err = (y.double().cpu() - want).abs()
        worst = (err / bound).max().item()
        assert worst <= 1.0, f"{dtype} {shape}: error {err.max().item():.3g}, worst ratio to its bound {worst:.3g}"
        untouched = (slot_per_row.cpu() == 0) | (slot_per_row.cpu() == 3)
        assert torch.equal(y.cpu()[untouched], y0.cpu()[untouched])  # no adapter, or one that skips the layer


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not torch.cuda.is_available() or not _triton_importable(), reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernels_on_cuda(dtype):
    check_kernel("cuda", dtype)


@pytest.mark.skipif(not _triton_importable(), reason="Triton is not installed (it ships with torch's CUDA builds)")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_kernels_in_the_interpreter(dtype):
    """The same check on the CPU: Triton's interpreter runs the kernels over numpy (set before Triton
    compiles them, hence a process of its own)."""
    code = ("import torch; from tests.component.test_triton_lora import check_kernel; "
            f"check_kernel('cpu', torch.{dtype})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_engine_refuses_triton_where_it_cannot_run(tiny_bases):
    with pytest.raises(ConfigError, match="lora_kernel=triton cannot be used: the Triton LoRA kernels run on CUDA"):
        Runtime(RuntimeConfig(base_model=tiny_bases["bert"], device="cpu", lora_kernel="triton"))
    with pytest.raises(ConfigError, match="the onnx engine takes auto, fused or torch"):
        Runtime(RuntimeConfig(base_model=tiny_bases["bert"], device="cpu", engine="onnx", lora_kernel="triton"))
    # auto on the CPU is still the fused kernel or torch, never triton
    assert Runtime(RuntimeConfig(base_model=tiny_bases["bert"], device="cpu")).engine.kernel_name in ("fused", "torch")
