"""The varlen attention kernel (runtime/native/csrc/varlen_attention.c) against torch SDPA per sequence."""
import ctypes
import subprocess

import pytest
import torch

from adapterserve.runtime.native.build import CFLAGS, source
from adapterserve.runtime.native.hardware import probe

SOURCE = source("varlen_attention.c")
HW = probe()

pytestmark = pytest.mark.native


@pytest.mark.skipif(HW.native_unavailable is not None or HW.compiler is None,
                    reason=f"native kernels cannot run here: {HW.native_unavailable or 'no C compiler'}")
def test_varlen_attention_matches_sdpa_per_sequence(tmp_path):
    lib_path = tmp_path / "libvarlen.so"
    try:
        subprocess.run([HW.compiler, *[f for f in CFLAGS if f != "-fopenmp"], "-o", str(lib_path), SOURCE], check=True,
                       capture_output=True)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"the kernel does not compile on an AVX-512 machine: {e.stderr.decode()[:400]}")
    lib = ctypes.CDLL(str(lib_path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.varlen_attention.argtypes = [p, p, p, p, i64, p, i64, i64, i64, ctypes.c_float]
    torch.manual_seed(0)
    for heads, d in ((12, 32), (4, 64), (4, 8), (3, 20)):  # head sizes off the 16-float grid too
        lengths = torch.tensor([1, 5, 17, 40, 3, 600])  # 600 > the kernel's 512-score stack buffer
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        n, h = int(cu[-1]), heads * d
        q, k, v = (torch.randn(n, h) for _ in range(3))
        out = torch.zeros(n, h)
        lib.varlen_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), h, cu.data_ptr(),
                             len(lengths), heads, d, d ** -0.5)
        for b in range(len(lengths)):
            s, e = int(cu[b]), int(cu[b + 1])
            qh, kh, vh = (z[s:e].view(e - s, heads, d).transpose(0, 1) for z in (q, k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(0, 1).reshape(e - s, h)
            assert (out[s:e] - ref).abs().max().item() <= 1e-5, (heads, d, b)
