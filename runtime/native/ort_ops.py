"""The ONNX Runtime custom op `adapterserve.SlotLoRA` (ort_lora_op.c): the fused LoRA kernel inside
the shared-base ONNX graph, in place of a per-row Gather of the slot tensors and two batched MatMuls.

Built like the torch kernel (gcc, cached under the adapterserve cache directory) and registered on
each ORT session that runs a graph exported with it. Where it cannot be built or a layer's shape
does not fit the kernel, the exporter writes the stock-op graph instead (same numbers, tested).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from adapterserve.runtime.native.build import build, load_once, source


SOURCE = source("ort_lora_op.c")
DOMAIN = "adapterserve"
OP_TYPE = "SlotLoRA"
PACKED_OP_TYPE = "SlotLoRAPacked"  # token-packed rows: input 6 is the rows' offsets [rows + 1]
QKV_OP_TYPE = "SlotLoRAQKVPacked"  # one self-attention's q, k, v LoRA nodes over their packed projection
ATTENTION_OP_TYPE = "VarlenAttention"
ROW_SCALE_OP_TYPE = "SlotRowScale"  # rows scaled by their slot's input scale (+ "Packed": token-packed rows)
ABI = 10

_state: dict[str, object] = {}  # "value" -> built library path, or "error" -> why not


def library_path() -> Optional[str]:
    """Path of the built op library, or None when it cannot be built here (reason: unavailable_reason())."""
    def make() -> str:
        path = build(SOURCE, "libadapterserve_ort_ops.so")
        if ctypes.CDLL(path).adapterserve_ort_abi() != ABI:
            raise OSError(f"{path} has a different op ABI")
        return path

    return load_once(_state, make, "ONNX Runtime LoRA op unavailable, the shared graph uses stock ops")


def unavailable_reason() -> Optional[str]:
    library_path()
    return _state.get("error")  # type: ignore[return-value]


# bf16 slot layouts of the SlotLoRA*BF16 ops (lora_amx.c's header): written once per registration, so a
# forward reads each row's A and B in the operand layout of AMX's tile multiply, at half the bytes.
def bf16_a_shape(r_max: int, d_in: int) -> tuple[int, int]:
    """Per-slot shape of the packed A^T: [r_max rounded up to 16, d_in rounded up to 32 / 2] int32."""
    return -(-r_max // 16) * 16, -(-d_in // 32) * 16


def bf16_b_shape(r_max: int, d_out: int) -> tuple[int, int]:
    """Per-slot shape of the packed B: [rank rows / 2, d_out] int32 (rows rounded up to 32 above 32)."""
    rows = r_max if r_max <= 32 else -(-r_max // 32) * 32
    return rows // 2, d_out


def pack_bf16_a(a: torch.Tensor) -> torch.Tensor:
    """a [..., r_max, d_in] fp32 -> int32 [..., R16, d_in_pad / 2]: bf16 pairs along d_in, in tiles of
    16 ranks x 16 pairs with the rank fastest (A[16 c + n][32 kc + 2 kk (+1)] at [c][kc][kk][n])."""
    *lead, r_max, d_in = a.shape
    r16, half = bf16_a_shape(r_max, d_in)
    padded = a.new_zeros(*lead, r16, 2 * half)
    padded[..., :r_max, :d_in] = a
    pairs = padded.to(torch.bfloat16).view(torch.int32)  # [..., R16, half]: the even index in the low half
    tiles = pairs.reshape(*lead, r16 // 16, 16, half // 16, 16)  # [c, n, kc, kk]
    return tiles.permute(*range(len(lead)), -4, -2, -1, -3).contiguous().reshape(*lead, r16, half)


def pack_bf16_b(b: torch.Tensor) -> torch.Tensor:
    """b [..., r_max, d_out] fp32 -> int32 [..., rows / 2, d_out]: (B[2j][o], B[2j+1][o]) pairs."""
    *lead, r_max, d_out = b.shape
    half, _ = bf16_b_shape(r_max, d_out)
    padded = b.new_zeros(*lead, 2 * half, d_out)
    padded[..., :r_max, :] = b
    pairs = padded.to(torch.bfloat16).reshape(*lead, half, 2, d_out).transpose(-1, -2).contiguous()
    return pairs.view(torch.int32).reshape(*lead, half, d_out)


def amx_bf16_available() -> bool:
    """Whether the bf16 LoRA ops run on AMX tiles here (the int8 graph then uses them). Without AMX
    their portable loop is 10-18x slower than the fp32 op (python -m adapterserve.loadtest.probes.cpu_probes lora-op), so the
    exporter keeps fp32 there."""
    path = library_path()
    if path is None or os.environ.get("ADAPTERSERVE_LORA_AMX") == "off":
        return False
    return bool(ctypes.CDLL(path).adapterserve_amx_bf16())
