"""Tolerances derived from magnitudes and summation order, not from the CPU at hand.

A float32 sum of n products has a rounding error of at most gamma(n) times the sum of the products'
magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), whatever order, blocking or
FMA use a kernel picks. Comparing a float32 kernel to a float64 reference against this bound holds on
every x86 CPU (AVX-512 with or without AMX, or none) and still catches a wrong term, which is of the
order of the values themselves.
"""
import torch

U32 = 2.0 ** -24  # float32 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)


def lora_delta_bound(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: int, slots: torch.Tensor,
                     y0: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |fl32(y0 + (x A_s^T) B_s) - exact| for each row's slot s: the d_in-term dot
    products of x A^T, the r-term ones of (x A^T) B, and the final addition into y0."""
    x64, a64, b64 = x.double(), a[:, :r].double().index_select(0, slots), b[:, :r].double().index_select(0, slots)
    x3 = x64 if x64.dim() == 3 else x64.unsqueeze(1)
    xa = torch.bmm(x3, a64.transpose(1, 2))
    xa_mag = torch.bmm(x3.abs(), a64.abs().transpose(1, 2))
    d_in = x.shape[-1]
    bound = gamma(d_in) * torch.bmm(xa_mag, b64.abs()) + gamma(r) * torch.bmm(xa.abs(), b64.abs())
    bound = bound if x.dim() == 3 else bound.squeeze(1)
    delta = torch.bmm(xa, b64)
    delta = delta if x.dim() == 3 else delta.squeeze(1)
    return bound + U32 * (y0.double().abs() + delta.abs())


def exact_lora(x, a, b, r, slots, y0) -> torch.Tensor:
    """y0 + (x A_s^T) B_s in float64."""
    x64 = x.double()
    x3 = x64 if x64.dim() == 3 else x64.unsqueeze(1)
    d = torch.bmm(torch.bmm(x3, a[:, :r].double().index_select(0, slots).transpose(1, 2)),
                  b[:, :r].double().index_select(0, slots))
    return y0.double() + (d if x.dim() == 3 else d.squeeze(1))
