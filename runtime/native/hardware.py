"""The one hardware decision: what this machine offers and, from that, which native paths may run.

`probe()` reads the CPU (vendor, model, AVX-512F, AVX512-BF16, AMX with the kernel's permission to use
its tiles), the C compiler, the ADAPTERSERVE_NATIVE switch and the CUDA device once per process. The
kernel loaders ask it before building anything; the runtime logs its `summary()` once at start, and
GetInfo and `adapterserve_build_info` report the same facts beside the paths the engine really took.

ADAPTERSERVE_NATIVE=off forces every portable path (no C kernel, no ONNX Runtime custom op), as on a
machine without a compiler or AVX-512; the tests run once each way.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from typing import Optional

_ARCH_REQ_XCOMP_PERM = 0x1023  # Linux: ask for permission to use an extended state component
_XFEATURE_XTILEDATA = 18  # AMX tile data
_SYS_ARCH_PRCTL = 158  # x86-64 syscall number


@dataclass(frozen=True)
class Hardware:
    machine: str
    cpu_vendor: str
    cpu_model: str
    avx512f: bool
    avx512_bf16: bool
    amx_bf16: bool  # the CPU has AMX-BF16 and the kernel let this process use its tiles
    compiler: Optional[str]
    native_switch: bool  # ADAPTERSERVE_NATIVE is not "off"
    cuda_device: Optional[str]
    cuda_capability: Optional[str]

    @property
    def native_unavailable(self) -> Optional[str]:
        """Why the C kernels cannot run here (None: they can). They are written for x86-64 AVX-512 and
        compiled on first use, or found prebuilt in the kernel cache (`adapterserve build-kernels`)."""
        if not self.native_switch:
            return "native kernels switched off (ADAPTERSERVE_NATIVE=off)"
        if self.machine not in ("x86_64", "AMD64"):
            return f"the kernels are written for x86-64 AVX-512, not {self.machine}"
        if not self.avx512f:
            return "this CPU has no AVX-512F"
        return None

    @property
    def bf16_native(self) -> bool:
        """The CPU multiplies bf16 natively (AMX or AVX512-BF16)."""
        return self.amx_bf16 or self.avx512_bf16

    def summary(self) -> str:
        flags = [name for name, on in (("avx512f", self.avx512f), ("avx512_bf16", self.avx512_bf16),
                                       ("amx_bf16", self.amx_bf16)) if on]
        native = self.native_unavailable or "native kernels allowed"
        cuda = f"; CUDA {self.cuda_device} (sm {self.cuda_capability})" if self.cuda_device else "; no CUDA"
        return (f"{self.cpu_model or self.machine} [{self.cpu_vendor}] flags {','.join(flags) or 'none'}; "
                f"compiler {self.compiler or 'none'}; {native}{cuda}")

    def as_dict(self) -> dict:
        return asdict(self)


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "model name", "flags") and key not in info:
                    info[key] = value.strip()
                if len(info) == 3:
                    break
    except OSError:
        pass
    return info


def _amx_permitted() -> bool:
    """Ask Linux for the AMX tile state, as the C kernels do before their first tile instruction; a
    kernel that refuses (or predates AMX support) means the tiles cannot be used by this process."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _cuda() -> tuple[Optional[str], Optional[str]]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as no CUDA
        pass
    return None, None


@functools.lru_cache(maxsize=None)
def probe() -> Hardware:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    machine = platform.machine()
    amx = {"amx_tile", "amx_bf16"} <= flags and machine in ("x86_64", "AMD64") and _amx_permitted()
    cuda_device, cuda_capability = _cuda()
    return Hardware(
        machine=machine,
        cpu_vendor=info.get("vendor_id", "unknown"),
        cpu_model=info.get("model name", ""),
        avx512f="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
        amx_bf16=amx,
        compiler=os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc"),
        native_switch=os.environ.get("ADAPTERSERVE_NATIVE", "auto").lower() != "off",
        cuda_device=cuda_device,
        cuda_capability=cuda_capability,
    )


def cpu_flags_key() -> str:
    """What a compiled kernel depends on besides its source and flags (-march=native)."""
    return platform.machine() + _cpuinfo().get("flags", "")
