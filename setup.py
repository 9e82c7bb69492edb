"""Build hook: generate the gRPC stubs from proto/ before packaging (wheel, sdist and editable installs).

The stubs are never written at import: a checkout gets them from `pip install -e .` (make setup), a
wheel carries them.
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(ROOT, "proto")
PROTOS = [os.path.join("adapterserve", "v1", "adapterserve.proto"), os.path.join("adapterserve", "v1", "inference.proto")]


def generate_stubs() -> None:
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    for rel in PROTOS:
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={PROTO_ROOT}",
                          f"--pyi_out={PROTO_ROOT}", f"--grpc_python_out={PROTO_ROOT}", os.path.join(PROTO_ROOT, rel)])
        if rc != 0:
            sys.exit(f"protoc failed ({rc}) on proto/{rel}")
        init = os.path.join(PROTO_ROOT, os.path.dirname(rel), "__init__.py")
        if not os.path.exists(init):
            with open(init, "w") as fh:
                fh.write('"""Generated at build time from proto/ (setup.py); do not edit."""\n')


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
