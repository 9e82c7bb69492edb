"""Each layer imports only layers below it (docs/architecture.md), function-level imports included.

Layers, lowest first: foundation (errors, config, family table, generated stubs) -> native (hardware
probe, kernel build/load) -> data (adapter files, registry, store) -> engine -> core (Runtime, heads,
planning, tokenization, slots, tiers) -> server (gRPC, batcher, metrics) -> cluster (Ray Serve replicas, router, registry) -> tools (CLI, client,
train/evaluate, exporters, loadtest). A newcomer follows a request by opening files downward.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# package -> folder, as pyproject.toml's [tool.setuptools] package-dir maps them
FOLDERS = {"adapterserve": "adapterserve", "adapterserve.runtime": "runtime", "adapterserve.adapters": "adapters",
           "adapterserve.exporters": "exporters", "adapterserve.loadtest": "loadtest"}
LAYERS = [  # (name, module prefixes); a module belongs to the last layer whose prefix it matches
    ("foundation", ["adapterserve.__init__", "adapterserve.runtime.errors", "adapterserve.runtime.config",
                    "adapterserve.runtime.families", "adapterserve.v1", "adapterserve.adapters.__init__"]),
    ("native", ["adapterserve.runtime.native"]),
    ("data", ["adapterserve.adapters.spec", "adapterserve.adapters.kinds", "adapterserve.adapters.bottleneck",
              "adapterserve.adapters.peft_lora", "adapterserve.adapters.registry",
              "adapterserve.adapters.store", "adapterserve.adapters.tabular"]),
    ("engine", ["adapterserve.runtime.engine"]),
    ("core", ["adapterserve.runtime.__init__", "adapterserve.runtime.runtime", "adapterserve.runtime.types",
              "adapterserve.runtime.heads", "adapterserve.runtime.planning", "adapterserve.runtime.tokenization",
              "adapterserve.runtime.slots", "adapterserve.runtime.host_tier",
              "adapterserve.runtime.residency"]),
    ("server", ["adapterserve.runtime.server"]),
    ("cluster", ["adapterserve.runtime.cluster"]),
    ("tools", ["adapterserve.cli", "adapterserve.client", "adapterserve.__main__", "adapterserve.adapters.train",
               "adapterserve.adapters.evaluate", "adapterserve.exporters", "adapterserve.loadtest"]),
]


def rank(module: str):
    found = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + ".") or (p.endswith(".__init__") and module == p[:-9]):
                found = i
    return found


def modules():
    for package, folder in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            yield package + "." + ".".join(rel.parts), path


def imports(path: pathlib.Path, module: str):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against this module's package
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{node.module}"
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


ALL = list(modules())


def test_every_module_has_a_layer():
    assert ALL, "found no modules"
    unplaced = [m for m, _ in ALL if rank(m) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_imports_only_go_down(module, path):
    mine = rank(module)
    upward = []
    for name, line in imports(path, module):
        if not name.startswith("adapterserve"):
            continue
        theirs = rank(name)
        if theirs is None:  # `from adapterserve.x import y` where y is a name, not a module
            theirs = rank(name.rsplit(".", 1)[0])
        if theirs is not None and theirs > mine:
            upward.append(f"{path.name}:{line} ({LAYERS[mine][0]}) imports {name} ({LAYERS[theirs][0]})")
    assert not upward, "\n".join(upward)


def test_no_top_level_generic_package_names():
    """Code imports the namespaced package only: nothing generic lands in site-packages."""
    ours = {"adapters." + p.stem for p in (REPO / "adapters").glob("*.py")}
    offenders = []
    for module, path in ALL:
        for name, line in imports(path, module):
            top = name.split(".")[0]
            if top in ("runtime", "exporters", "loadtest") or (top == "adapters" and ".".join(name.split(".")[:2]) in ours):
                offenders.append(f"{path}:{line} {name}")
    assert not offenders, offenders
