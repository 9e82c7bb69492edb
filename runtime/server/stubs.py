"""The gRPC stubs of proto/adapterserve/v1/ (adapterserve.proto: pb; inference.proto, the Open Inference
Protocol: oip), generated at build time (setup.py) into
the `adapterserve.v1` package: a wheel ships them, `pip install -e .` writes them into proto/ once.
Importing this never runs protoc."""
from __future__ import annotations

try:
    from adapterserve.v1 import adapterserve_pb2 as pb
    from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
    from adapterserve.v1 import inference_pb2 as oip
    from adapterserve.v1 import inference_pb2_grpc as oip_grpc
except ImportError as e:  # a checkout whose package was never built
    raise ImportError("the gRPC stubs are missing: install the package (`pip install -e .`, or `make setup`), "
                      "which generates them from proto/") from e

__all__ = ["pb", "pb_grpc", "oip", "oip_grpc"]
