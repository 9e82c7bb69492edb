"""Build and load the C kernels in csrc/: compiled once per source, flags and CPU with the system C
compiler, cached under the kernel cache (`kernel_cache_dir()`), loaded once per process.

A cached build is used without a compiler, so an image can carry kernels built by
`adapterserve build-kernels` and serve on a machine that has no gcc.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
import threading

from adapterserve.runtime.config import cache_root
from adapterserve.runtime.native.hardware import cpu_flags_key, probe

log = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.RLock()


def source(name: str) -> str:
    return os.path.join(CSRC, name)


def kernel_cache_dir() -> str:
    """ADAPTERSERVE_KERNEL_DIR, else <cache>/kernels (ADAPTERSERVE_CACHE, default ~/.cache/adapterserve)."""
    return os.environ.get("ADAPTERSERVE_KERNEL_DIR") or os.path.join(cache_root(), "kernels")


def build(source_path: str, lib_name: str) -> str:
    """Compile source_path (or reuse a cached build); returns the shared library's path. A source may
    #include the other C files beside it (the ONNX Runtime ops include them all), so the cache key
    covers every file in csrc/."""
    text = b""
    for p in dict.fromkeys([source_path, *sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".c"))]):
        with open(p, "rb") as fh:
            text += fh.read()
    key = hashlib.sha256(text + " ".join(CFLAGS).encode() + cpu_flags_key().encode()).hexdigest()[:16]
    directory = os.path.join(kernel_cache_dir(), key)
    path = os.path.join(directory, lib_name)
    if os.path.exists(path):
        return path
    compiler = probe().compiler
    if compiler is None:
        raise OSError(f"no C compiler (gcc/cc) on PATH and no prebuilt {lib_name} in {kernel_cache_dir()} "
                      "(adapterserve build-kernels makes one)")
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *CFLAGS, "-o", tmp, source_path], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, path)  # atomic: concurrent builders (test workers, servers) never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_once(state: dict, make, fallback: str):
    """Run make() (build + load a native library) once per process; its result, or None where the
    hardware decision rules native code out or the build fails. The reason is kept in state["error"]
    and logged once with what the caller falls back to."""
    with _lock:
        if "value" in state or "error" in state:
            return state.get("value")
        try:
            reason = probe().native_unavailable
            if reason is not None:
                raise OSError(reason)
            state["value"] = make()
            return state["value"]
        except (OSError, subprocess.SubprocessError) as e:
            state["error"] = str(e)
            log.warning("%s: %s", fallback, e)
            return None
