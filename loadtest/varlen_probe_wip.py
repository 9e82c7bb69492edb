# WIP probe (branch wip/packed-graph): gcc -O3 -march=native -shared -fPIC -o /tmp/libvarlen.so runtime/varlen_attention.c
import ctypes, time, statistics, torch
torch.manual_seed(0); torch.set_num_threads(1)
lib = ctypes.CDLL("/tmp/libvarlen.so")
P, I = ctypes.c_void_p, ctypes.c_int64
lib.varlen_attention.argtypes = [P, P, P, P, I, P, I, I, I, ctypes.c_float]
heads, d = 12, 32
H = heads * d
lengths = torch.randint(5, 56, (32,))
cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
N = int(cu[-1])
q, k, v = (torch.randn(N, H) for _ in range(3))
out = torch.zeros(N, H)
call = lambda: lib.varlen_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), H, cu.data_ptr(), 32, heads, d, d ** -0.5)
call()
ref = torch.zeros(N, H)
for b in range(32):
    s, e = int(cu[b]), int(cu[b + 1])
    qh, kh, vh = (z[s:e].view(e - s, heads, d).transpose(0, 1) for z in (q, k, v))
    ref[s:e] = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(0, 1).reshape(e - s, H)
print("tokens", N, "max |diff| vs torch SDPA", (out - ref).abs().max().item())
ts = []
for _ in range(50):
    t = time.perf_counter(); call(); ts.append(time.perf_counter() - t)
# padded torch reference timing: one SDPA over [32, heads, Tmax, d] with a key mask (what a padded batch pays)
T = int(lengths.max())
qp = torch.randn(32, heads, T, d); mask = (torch.arange(T)[None, :] < lengths[:, None])[:, None, None, :]
tp = []
for _ in range(50):
    t = time.perf_counter(); torch.nn.functional.scaled_dot_product_attention(qp, qp, qp, attn_mask=mask); tp.append(time.perf_counter() - t)
print(f"varlen kernel, 1 thread, one layer: {statistics.median(ts)*1e3:.3f} ms; torch SDPA padded to {T}: {statistics.median(tp)*1e3:.3f} ms")
