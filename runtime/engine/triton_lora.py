"""Mixed-task LoRA on CUDA in two Triton kernels per slot layer, each row at its own slot, in place:

    y[b, t, :] += (x[b, t, :] @ A[s_b]^T) @ B[s_b]        s_b = slot_per_row[b] != 0

`shrink` writes x A^T for every row's tokens (fp32, [rows * T, R]); `expand` adds that times B into y
tile by tile. This replaces the torch path's gather of every row's A and B, two bmm and an add (four
kernels and two [rows, r, d] copies per layer) by two kernels that read the slots in place, and both
run inside the CUDA graphs (runtime/engine/cuda_graphs.py: the slot of each row is read on the device,
so a replay after a slot changes is still right). Rows at slot 0 (no adapter) are skipped.

Products accumulate in fp32. In half precision x A^T is rounded to the base dtype before the second
product, as torch's bmm rounds its output; fp32 products are IEEE, not TF32 (the torch path's
matmuls run with TF32 off where fp32 must match PEFT). R is the batch's rank rounded up to a power of
two of at least 16 (tl.dot's smallest tile); slot buffers hold zeros past each adapter's rank, and
past r_max nothing is read.

Triton ships with torch's CUDA builds; `unavailable_reason()` says why the kernels cannot run here
(no CUDA, no Triton), and the engine then keeps the torch path, which the tests compare this against
(tests/component/test_cuda.py, tests/component/test_triton_lora.py in Triton's interpreter).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

BLOCK_T = 16  # tokens per tile
BLOCK_K = 64  # input features per step of the first product
BLOCK_N = 64  # output features per tile of the second


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, xa_ptr, slot_ptr, T, sx_row, sx_tok, sa_slot, sa_r, r_lim, D_IN: tl.constexpr,
               R: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(slot_ptr + row)
        if slot == 0:
            return
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        r = tl.arange(0, R)
        acc = tl.zeros((BT, R), dtype=tl.float32)
        for k0 in range(0, D_IN, BK):
            k = k0 + tl.arange(0, BK)
            xs = tl.load(x_ptr + row * sx_row + t[:, None] * sx_tok + k[None, :],
                         mask=(t[:, None] < T) & (k[None, :] < D_IN), other=0.0)
            a = tl.load(a_ptr + slot * sa_slot + r[None, :] * sa_r + k[:, None],
                        mask=(k[:, None] < D_IN) & (r[None, :] < r_lim), other=0.0)  # [BK, R]: A^T
            if IEEE:
                acc += tl.dot(xs, a, input_precision="ieee")
            else:
                acc += tl.dot(xs, a)
        tl.store(xa_ptr + (row * T + t[:, None]) * R + r[None, :], acc, mask=t[:, None] < T)

    @triton.jit
    def expand(xa_ptr, b_ptr, y_ptr, slot_ptr, T, sy_row, sy_tok, sb_slot, sb_r, r_lim, D_OUT: tl.constexpr,
               R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(slot_ptr + row)
        if slot == 0:
            return
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        n = tl.program_id(2) * BN + tl.arange(0, BN)
        r = tl.arange(0, R)
        b = tl.load(b_ptr + slot * sb_slot + r[:, None] * sb_r + n[None, :],
                    mask=(r[:, None] < r_lim) & (n[None, :] < D_OUT), other=0.0)  # [R, BN]
        xa = tl.load(xa_ptr + (row * T + t[:, None]) * R + r[None, :], mask=t[:, None] < T, other=0.0)
        if IEEE:
            delta = tl.dot(xa, b, input_precision="ieee")
        else:
            delta = tl.dot(xa.to(b.dtype), b)  # x A^T rounded to the base dtype, as torch's bmm does
        where = y_ptr + row * sy_row + t[:, None] * sy_tok + n[None, :]
        inside = (t[:, None] < T) & (n[None, :] < D_OUT)
        y = tl.load(where, mask=inside, other=0.0)
        tl.store(where, (y.to(tl.float32) + delta).to(y.dtype), mask=inside)

    return triton, shrink, expand


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None where the kernels can run on `device`, else why not."""
    if device.type != "cuda":
        return f"the Triton LoRA kernels run on CUDA devices, not {device.type}"
    try:
        _kernels()
    except ImportError as e:
        return f"Triton is not installed ({e})"
    return None


def padded_rank(rank: int) -> int:
    """The kernels' R for a batch of this rank: a power of two, at least 16."""
    return max(16, 1 << max(0, rank - 1).bit_length())


def add_delta(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot_per_row: torch.Tensor,
              rank: int) -> None:
    """y += each row's LoRA delta at its slot, in place. x [rows, T, d_in] or [rows, d_in] and y likewise
    with d_out (feature dim contiguous, same dtype as a and b); a [slots, r_max, d_in], b [slots, r_max,
    d_out] contiguous; slot_per_row int64 [rows] on the device; rank: the largest adapter rank the rows
    use (every slot's buffers are read up to it)."""
    triton, shrink, expand = _kernels()
    if x.dim() == 2:
        rows, t, sx_tok, sy_tok = x.shape[0], 1, 0, 0
    else:
        rows, t, sx_tok, sy_tok = x.shape[0], x.shape[1], x.stride(1), y.stride(1)
    d_in, d_out = x.shape[-1], y.shape[-1]
    r = padded_rank(rank)
    r_lim = min(rank, a.shape[1])
    ieee = x.dtype == torch.float32
    xa = torch.empty(rows * t, r, dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(t, BLOCK_T)
    # Feature sizes are compile-time constants (one build per layer shape: a handful per model).
    shrink[(rows, tiles)](x, a, xa, slot_per_row, t, x.stride(0), sx_tok, a.stride(0), a.stride(1), r_lim,
                          D_IN=d_in, R=r, BT=BLOCK_T, BK=BLOCK_K, IEEE=ieee)
    expand[(rows, tiles, triton.cdiv(d_out, BLOCK_N))](xa, b, y, slot_per_row, t, y.stride(0), sy_tok,
                                                       b.stride(0), b.stride(1), r_lim,
                                                       D_OUT=d_out, R=r, BT=BLOCK_T, BN=BLOCK_N, IEEE=ieee)
