"""Loader for the fused CPU LoRA kernel (`lora_kernel.c`), built on first use with the system C compiler.

The slot layers call it instead of gather + bmm when it applies (CPU, fp32, feature dims that are
multiples of 16, r_max a multiple of 8 and <= 64); otherwise, or when it cannot be built (no compiler, no AVX-512), they
use the torch path, which gives the same numbers (tested against float64 within the float32 rounding
bound of the sums, tests/tolerance.py). The build takes well under a second
and is cached per source, compiler flags and CPU under the adapterserve cache directory.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Optional

import numpy as np
import torch

from adapterserve.runtime.native.build import build, load_once, source

log = logging.getLogger(__name__)

SOURCE = source("lora_kernel.c")
ABI = 8
MAX_RANK = 64  # r_max bound of the narrow slots
WIDE_MAX_RANK = 256  # the kernel's per-token buffer (TOKEN_MAX_R): the widest wide slots it serves
BOTTLENECK_MAX_RANK = 256  # bottleneck_runs' per-token buffer (BN_MAX_R)
KRON_MAX = 8192  # kron_token's per-token buffers: in_m * max(k, out_k) at most this
ALIGN = 16  # feature dims must be multiples of one AVX-512 vector


class FusedLoRA:
    """ctypes handle on the built kernel; `__call__` adds the LoRA delta of every row into y in place."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)  # CDLL releases the GIL during calls: model workers run it concurrently
        if lib.lora_kernel_abi() != ABI:
            raise OSError(f"{path} has a different kernel ABI")
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        # x, x strides, y, y strides, rows, T, din, dout, A, B, r_max, slot_r8, slot, len, out scale, out shift,
        # vector flags, LoKr factors per slot, threads
        lib.lora_rows.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr,
                                  ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
        lib.lora_rows.restype = None
        self._fn = lib.lora_rows
        # x, x token stride, y, y token stride, rows, din, dout, A, B, r_max, slot_r8, slot, offsets, out scale,
        # out shift, vector flags, LoKr factors per slot, threads
        lib.lora_rows_packed.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr,
                                         ptr, ptr, ctypes.c_int]
        lib.lora_rows_packed.restype = None
        self._packed = lib.lora_rows_packed
        # q, k, v, out, row stride, offsets, sequences, heads, head size, scale, prefix keys, prefix values,
        # prefix length per sequence, prefix capacity, threads
        lib.varlen_attention_rows.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, ctypes.c_float,
                                              ptr, ptr, ptr, i64, ctypes.c_int]
        lib.varlen_attention_rows.restype = None
        self._attention = lib.varlen_attention_rows
        # y, src, y row stride, src row stride, d, runs, run starts, run ends, params (6 per run), threads
        lib.bottleneck_runs.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int]
        lib.bottleneck_runs.restype = None
        self._bottleneck = lib.bottleneck_runs
        # features, hidden, rows, task of each row, tasks, heads, order and bounds scratch, logits, probs, width
        lib.head_scores.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
        lib.head_scores.restype = None
        self._heads = lib.head_scores
        self.path = path

    @staticmethod
    def applies(d_in: int, d_out: int, r_max: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a slot layer of this shape can use the kernel (r_max <= 64 bounds every adapter's rank)."""
        return (device.type == "cpu" and dtype == torch.float32 and d_in % ALIGN == 0 and d_out % ALIGN == 0
                and r_max % 8 == 0 and r_max <= MAX_RANK)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 slot_r8: torch.Tensor, slot_per_row: torch.Tensor, lengths: Optional[torch.Tensor],
                 vectors: Optional[tuple] = None, kron: Optional[np.ndarray] = None) -> None:
        """x [rows, T, din] or [rows, din], y likewise with dout (feature dim contiguous);
        a [slots, r_max, din], b [slots, r_max, dout] contiguous; slot_r8 int64 [slots]: each slot's
        rank in this layer rounded up to 8, 0 = untouched; slot_per_row, lengths int64 [rows]
        (lengths None: all T positions). vectors: (out_scale, out_shift [slots, dout] fp32, flags int64
        [slots]), applied to each row after its delta where its slot's flags say; None: none. kron: int64
        [slots, 8], each slot's LoKr factors (slot_layers.KronForm.params; zeros where it has none, the
        tensors kept alive by the caller) added over its rows' tokens; None: none."""
        self._rows_at(x, y, a.data_ptr(), b.data_ptr(), a.shape, b.shape[2], slot_r8, slot_per_row, lengths, vectors,
                      kron)

    def packed(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot_r8: torch.Tensor,
               slot_per_row: torch.Tensor, offsets: torch.Tensor, vectors: Optional[tuple] = None,
               kron: Optional[np.ndarray] = None) -> None:
        """Token-packed rows: x [..., N, din], y [..., N, dout] (one run of every row's tokens; the
        feature dim contiguous), row b is tokens offsets[b] .. offsets[b + 1] - 1 (int64 [rows + 1]).
        vectors, kron: as for __call__."""
        self._packed_at(x, y, a.data_ptr(), b.data_ptr(), a.shape, b.shape[2], slot_r8, slot_per_row, offsets,
                        vectors, kron)

    def _rows_at(self, x, y, a_ptr: int, b_ptr: int, a_shape, dout: int, slot_r8, slot_per_row, lengths,
                 vectors, kron=None) -> None:
        if x.dim() == 2:
            rows, t, x_tok, y_tok = x.shape[0], 1, 0, 0
        else:
            rows, t, x_tok, y_tok = x.shape[0], x.shape[1], x.stride(1), y.stride(1)
        self._fn(x.data_ptr(), x.stride(0), x_tok, y.data_ptr(), y.stride(0), y_tok, rows, t, a_shape[2], dout,
                 a_ptr, b_ptr, a_shape[1], slot_r8.data_ptr(), slot_per_row.data_ptr(),
                 lengths.data_ptr() if lengths is not None else None, *_vector_pointers(vectors),
                 _kron_pointer(kron, slot_r8), torch.get_num_threads())

    def _packed_at(self, x, y, a_ptr: int, b_ptr: int, a_shape, dout: int, slot_r8, slot_per_row, offsets,
                   vectors, kron=None) -> None:
        self._packed(x.data_ptr(), x.stride(-2), y.data_ptr(), y.stride(-2), slot_per_row.shape[0], a_shape[2], dout,
                     a_ptr, b_ptr, a_shape[1], slot_r8.data_ptr(), slot_per_row.data_ptr(), offsets.data_ptr(),
                     *_vector_pointers(vectors), _kron_pointer(kron, slot_r8), torch.get_num_threads())

    def heads(self, features: torch.Tensor, task_of_row: np.ndarray, heads: np.ndarray, logits: np.ndarray,
              probs: np.ndarray, threads: int = 1) -> None:
        """Per-task linear heads and their softmax (lora_kernel.c head_scores): features [rows, hidden]
        float32 contiguous on the CPU, task_of_row int64 [rows] (an index into heads), heads int64
        [tasks, 3] (the address of each task's W [n, hidden] and bias [n], float32 contiguous, kept
        alive by the caller, and n); fills logits and probs (float32 [rows, width], width >= every n):
        each row's first n columns, zeros after. threads: how many share the heads."""
        rows, tasks = task_of_row.shape[0], heads.shape[0]
        scratch = np.empty(rows + tasks + 1, dtype=np.int64)
        self._heads(features.data_ptr(), features.shape[1], rows, task_of_row.ctypes.data, tasks, heads.ctypes.data,
                    scratch.ctypes.data, scratch.ctypes.data + 8 * rows, logits.ctypes.data, probs.ctypes.data,
                    logits.shape[1], threads)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                  heads: int, prefix: Optional[tuple] = None) -> torch.Tensor:
        """softmax(q kᵀ / √d) v within each token-packed sequence: q, k, v contiguous [N, heads × d]
        fp32, offsets int64 [sequences + 1]. prefix: (keys, values, lengths): each sequence's own
        prefix keys and values, [sequences, cap, heads × d] fp32 contiguous, of which sequence b attends
        to the first lengths[b] (int64 [sequences]) before its own. Returns [N, heads × d]."""
        width = q.shape[-1]
        d = width // heads
        out = torch.empty_like(q)
        pk = pv = lengths = None
        cap = 0
        if prefix is not None:
            pk, pv, counts = prefix
            assert pk.is_contiguous() and pv.is_contiguous() and pk.dtype == torch.float32 and pk.shape == pv.shape
            assert pk.shape[0] == offsets.shape[0] - 1 and pk.shape[2] == width and counts.dtype == torch.int64
            pk, pv, lengths, cap = pk.data_ptr(), pv.data_ptr(), counts.data_ptr(), pk.shape[1]
        self._attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), width, offsets.data_ptr(),
                        offsets.shape[0] - 1, heads, d, d ** -0.5, pk, pv, lengths, cap, torch.get_num_threads())
        return out


    def bottleneck(self, y: torch.Tensor, src: torch.Tensor, starts: np.ndarray, ends: np.ndarray,
                   params: np.ndarray) -> None:
        """Adds each run's bottleneck adapter into y in place (lora_kernel.c bottleneck_runs): y, src fp32
        [tokens, d] with unit feature stride (src may be y); starts, ends int64 [runs]; params int64
        [runs, 6] (the weights' addresses, kept alive by the caller, their rank and activation)."""
        assert y.dtype == src.dtype == torch.float32 and y.stride(-1) == 1 and src.stride(-1) == 1
        assert params.dtype == np.int64 and params.flags.c_contiguous and params.shape == (starts.shape[0], 6)
        self._bottleneck(y.data_ptr(), src.data_ptr(), y.stride(0), src.stride(0), y.shape[1], starts.shape[0],
                         starts.ctypes.data, ends.ctypes.data, params.ctypes.data, torch.get_num_threads())

    def wide(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank8: torch.Tensor,
             wide_of_row: torch.Tensor, offsets: Optional[torch.Tensor], lengths: Optional[torch.Tensor]) -> None:
        """Rows in wide slots, as __call__ (offsets None) or packed (offsets given) do for narrow ones:
        a [W, r_wide, din], b [W, r_wide, dout] contiguous, r_wide <= WIDE_MAX_RANK; rank8 int64 [W + 1]:
        entry w + 1 wide slot w's rank in this layer rounded up to 8, entry 0 zero; wide_of_row int64
        [rows]: w + 1 for a row in wide slot w, 0 for the others (skipped)."""
        assert a.is_contiguous() and b.is_contiguous() and a.shape[1] <= WIDE_MAX_RANK
        # The kernel skips slot 0 and reads slot s at A + s * r_wide * din: the base it is given is one
        # slot before wide slot 0, never read at.
        a_ptr = a.data_ptr() - a.stride(0) * a.element_size()
        b_ptr = b.data_ptr() - b.stride(0) * b.element_size()
        if offsets is not None:
            self._packed_at(x, y, a_ptr, b_ptr, a.shape, b.shape[2], rank8, wide_of_row, offsets, None)
        else:
            self._rows_at(x, y, a_ptr, b_ptr, a.shape, b.shape[2], rank8, wide_of_row, lengths, None)


def _kron_pointer(kron: Optional[np.ndarray], slot_r8: torch.Tensor) -> Optional[int]:
    if kron is None:
        return None
    assert kron.dtype == np.int64 and kron.flags.c_contiguous and kron.shape == (slot_r8.shape[0], 8)
    return kron.ctypes.data


def _vector_pointers(vectors: Optional[tuple]) -> tuple:
    if vectors is None:
        return None, None, None
    scale, shift, flags = vectors
    return scale.data_ptr(), shift.data_ptr(), flags.data_ptr()


_loaded: dict[str, object] = {}  # "value" -> FusedLoRA, or "error" -> why it is unavailable


def load() -> Optional[FusedLoRA]:
    """The kernel, or None when it cannot run here (the reason is logged once; see `unavailable_reason`)."""
    def make() -> FusedLoRA:
        kernel = FusedLoRA(build(SOURCE, "liblora_kernel.so"))
        log.info("fused LoRA kernel loaded from %s", kernel.path)
        return kernel

    return load_once(_loaded, make, "fused LoRA kernel unavailable, using the torch path")


def unavailable_reason() -> Optional[str]:
    load()
    return _loaded.get("error")  # type: ignore[return-value]
