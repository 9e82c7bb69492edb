"""adapterserve: one frozen encoder, many per-task adapters, mixed-task batches.

The distribution maps the repository's top-level folders into this one namespace (pyproject.toml,
[tool.setuptools] package-dir): `adapterserve.runtime` is runtime/, `adapterserve.adapters` is
adapters/, `adapterserve.exporters` is exporters/, `adapterserve.loadtest` is loadtest/ and
`adapterserve.v1` holds the gRPC stubs generated at build time from proto/adapterserve/v1.
"""
__version__ = "0.2.0"
