"""The varlen attention kernel (runtime/native/csrc/varlen_attention.c) against float64 attention per
sequence, within a bound derived from the float32 sums it makes (tests/tolerance.py): the d-term score
dot products, the exp (the kernel's polynomial is within a few ulp), the n-term softmax normaliser and
the n-term weighted sum of v. Whatever order or FMA use a CPU's build picks, the error stays inside it;
a wrong key, head or sequence boundary moves outputs by the size of v itself. With prefixes (prefix
tuning), each sequence also attends to its own first n prefix keys and values, n = 0 for some."""
import ctypes
import subprocess

import pytest
import torch

from adapterserve.runtime.native.build import CFLAGS, source
from adapterserve.runtime.native.hardware import probe
from tests.tolerance import U32, gamma

SOURCE = source("varlen_attention.c")
HW = probe()

pytestmark = pytest.mark.native


@pytest.mark.skipif(HW.native_unavailable is not None or HW.compiler is None,
                    reason=f"native kernels cannot run here: {HW.native_unavailable or 'no C compiler'}")
@pytest.mark.parametrize("with_prefix", [False, True])
def test_varlen_attention_matches_sdpa_per_sequence(tmp_path, with_prefix):
    lib_path = tmp_path / "libvarlen.so"
    try:
        subprocess.run([HW.compiler, *[f for f in CFLAGS if f != "-fopenmp"], "-o", str(lib_path), SOURCE], check=True,
                       capture_output=True)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"the kernel does not compile on an AVX-512 machine: {e.stderr.decode()[:400]}")
    lib = ctypes.CDLL(str(lib_path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.varlen_attention.argtypes = [p, p, p, p, i64, p, i64, i64, i64, ctypes.c_float, p, p, p, i64]
    torch.manual_seed(0)
    for heads, d in ((12, 32), (4, 64), (4, 8), (3, 20)):  # head sizes off the 16-float grid too
        lengths = torch.tensor([1, 5, 17, 40, 3, 600])  # 600 > the kernel's 512-score stack buffer
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        n, h = int(cu[-1]), heads * d
        q, k, v = (torch.randn(n, h) for _ in range(3))
        out = torch.zeros(n, h)
        cap = 9
        prefix_lengths = torch.tensor([0, 3, 9, 0, 1, 9] if with_prefix else [0] * 6)
        pk, pv = torch.randn(len(lengths), cap, h), torch.randn(len(lengths), cap, h)
        lib.varlen_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), h, cu.data_ptr(),
                             len(lengths), heads, d, d ** -0.5, *((pk.data_ptr(), pv.data_ptr(),
                             prefix_lengths.data_ptr(), cap) if with_prefix else (None, None, None, 0)))
        for b in range(len(lengths)):
            s, e = int(cu[b]), int(cu[b + 1])
            m = int(prefix_lengths[b])
            qh = q[s:e].double().view(e - s, heads, d).transpose(0, 1)
            kh, vh = (torch.cat([pz[b, :m], z[s:e]]).double().view(m + e - s, heads, d).transpose(0, 1)
                      for z, pz in ((k, pk), (v, pv)))
            ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(0, 1).reshape(e - s, h)
            # |Δscore| <= gamma(d) * sum |q||k| / sqrt(d); a weight's relative error <= 2 |Δscore| (the row's
            # max is subtracted) + exp and normaliser rounding; the output's, that times max|v| plus the sum's.
            score_err = gamma(d) * (torch.bmm(qh.abs(), kh.abs().transpose(1, 2)) * d ** -0.5).amax(dim=(1, 2))
            n_keys = m + e - s
            rel = 2 * score_err + 8 * U32 + gamma(n_keys)  # per head
            bound = ((rel + gamma(n_keys)) * vh.abs().amax(dim=(1, 2)))  # [heads]
            err = (out[s:e].double() - ref).view(e - s, heads, d).abs().amax(dim=(0, 2))
            assert (err <= bound).all(), (heads, d, b, err.max().item(), bound.min().item())
