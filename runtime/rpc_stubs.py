"""Generated gRPC stubs for proto/adapterserve/v1, built from the .proto with grpcio-tools.

The generated modules are not in git: `make setup` runs `python -m runtime.rpc_stubs`, and importing
this module regenerates them whenever they are missing or older than the .proto, so they can never
drift from the contract.
"""
from __future__ import annotations

import os
import sys

PROTO_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "proto")
PROTO_FILE = os.path.join(PROTO_ROOT, "adapterserve", "v1", "adapterserve.proto")
_OUT = os.path.join(PROTO_ROOT, "adapterserve", "v1")
_GENERATED = [os.path.join(_OUT, n) for n in ("adapterserve_pb2.py", "adapterserve_pb2_grpc.py")]


def generate(force: bool = False) -> None:
    stale = force or any(not os.path.exists(g) or os.path.getmtime(g) < os.path.getmtime(PROTO_FILE) for g in _GENERATED)
    if not stale:
        return
    from grpc_tools import protoc

    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={PROTO_ROOT}",
                      f"--pyi_out={PROTO_ROOT}", f"--grpc_python_out={PROTO_ROOT}", PROTO_FILE])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {PROTO_FILE}")
    for pkg in (os.path.join(PROTO_ROOT, "adapterserve"), _OUT):
        init = os.path.join(pkg, "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()


generate()
if PROTO_ROOT not in sys.path:
    sys.path.insert(0, PROTO_ROOT)

from adapterserve.v1 import adapterserve_pb2 as pb  # noqa: E402
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc", "generate"]

if __name__ == "__main__":
    generate(force=True)
    print(f"generated stubs for {PROTO_FILE}")
