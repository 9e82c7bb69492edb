"""The wheel serves on its own: built from this checkout, installed non-editable into a fresh venv
outside the repository, started as `adapterserve serve`, driven by the `adapterserve` client commands.

The fresh venv takes the package from the wheel alone; its third-party dependencies (torch and the
rest, pinned in pyproject.toml) come from the test's own environment through a .pth line, so the test
does not download gigabytes. What must not happen at run time: anything written into site-packages
(stubs, kernels, caches of ours), or anything imported from the checkout.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from adapterserve.loadtest.server_proc import ServerProcess
from adapterserve.runtime.native.hardware import probe

REPO = pathlib.Path(__file__).resolve().parents[2]


def snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what git would ship (tracked and new, not ignored), so no stale build/ or
    # generated file of this checkout can slip into the wheel.
    source = tmp / "src"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, source / rel)
    dist = tmp / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next(dist.glob("adapterserve-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = pathlib.Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                                text=True).strip())
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (site / "_adapterserve_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"tmp": tmp, "wheel": wheel, "venv": venv, "site": site, "bin": venv / "bin"}


def test_wheel_carries_stubs_proto_kernels_and_examples_but_no_probes(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    for must in ("adapterserve/v1/adapterserve_pb2.py", "adapterserve/v1/adapterserve_pb2_grpc.py",
                 "adapterserve/v1/adapterserve.proto", "adapterserve/cli.py",
                 "adapterserve/adapters/examples/sst2/adapter_model.safetensors",
                 *(f"adapterserve/runtime/native/csrc/{p.name}" for p in (REPO / "runtime/native/csrc").glob("*.c"))):
        assert must in names, f"{must} is not in the wheel"
    assert not [n for n in names if "/probes/" in n], "loadtest/probes must stay out of the wheel"
    assert not [n for n in names if n.split("/")[0] in ("runtime", "adapters", "exporters", "loadtest", "tests")], \
        "nothing outside the adapterserve namespace"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "adapterserve = adapterserve.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry[0]).decode()


def test_installed_wheel_serves_classifies_and_registers(installed, tmp_path):
    bin_, site = installed["bin"], installed["site"]
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERSERVE_KERNEL_DIR"}
    env["PYTHONPATH"] = ""  # nothing from the checkout
    # Bytecode caching is the interpreter's, not ours; keep it out of the comparison.
    env.update(ADAPTERSERVE_CACHE=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    before = snapshot(site)
    where = subprocess.run([str(bin_ / "python"), "-c", "import adapterserve, adapterserve.runtime, adapterserve.v1;"
                            "print(adapterserve.__file__, adapterserve.runtime.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(str(site) in p for p in where.stdout.split()), f"imported from outside the wheel: {where.stdout}"

    server = ServerProcess("--data-dir", str(tmp_path / "data"), env=env, cwd=str(tmp_path),
                           command=[str(bin_ / "adapterserve"), "serve"])
    try:
        def cli(*args):
            done = subprocess.run([str(bin_ / "adapterserve"), *args, "--address", server.address], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        out = json.loads(cli("classify", "sst2", "a charming, moving and beautifully acted film", "dull and lifeless",
                             "--json", "--top-k", "0"))
        assert [p[0]["label"] for p in out["predictions"]] == ["positive", "negative"]
        assert all(abs(sum(s["score"] for s in p) - 1) < 1e-5 for p in out["predictions"])
        news = json.loads(cli("classify", "ag_news", "Stocks fell as oil prices rose and the central bank held rates",
                              "--json"))
        assert news["predictions"][0][0]["label"] == "business"

        adapter = tmp_path / "my-adapter"
        shutil.copytree(site / "adapterserve" / "adapters" / "examples" / "sst2", adapter)
        assert "registered mytask version" in cli("register", "mytask", str(adapter))
        assert "mytask" in cli("list")
        mine = json.loads(cli("classify", "mytask", "dull and lifeless", "--json"))
        assert mine["predictions"][0][0]["label"] == "negative"
        assert mine["adapter_version"] == out["adapter_version"], "same files, same version"
        info = json.loads(cli("info"))
        assert info["precision"] == "fp32" and info["engine"] == "torch" and info["hardware"]
        if probe().native_unavailable is None and probe().compiler:
            # The C sources came from the wheel and compiled into the cache, not into site-packages.
            assert info["paths"]["lora_path"] == "fused", info
            assert "fused LoRA kernel loaded from " + str(tmp_path / "cache") in server.log()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert snapshot(site) == before, "the server wrote into site-packages"


@pytest.mark.skipif(probe().native_unavailable is not None or probe().compiler is None,
                    reason="native kernels cannot be built here")
def test_prebuilt_kernels_serve_without_a_compiler(installed, tmp_path):
    """`adapterserve build-kernels --kernel-dir DIR` on a machine with gcc; then a server whose PATH has
    no compiler at all loads the fused kernel from DIR (ADAPTERSERVE_KERNEL_DIR), as an image would."""
    bin_ = installed["bin"]
    kernels = tmp_path / "kernels"
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "ADAPTERSERVE_KERNEL_DIR")}
    env.update(PYTHONPATH="", HF_HUB_OFFLINE="1", ADAPTERSERVE_CACHE=str(tmp_path / "cache"))
    built = subprocess.run([str(bin_ / "adapterserve"), "build-kernels", "--kernel-dir", str(kernels)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0 and "fused LoRA kernel: " + str(kernels) in built.stdout, built.stdout + built.stderr
    bare = dict(env, PATH=str(bin_), ADAPTERSERVE_KERNEL_DIR=str(kernels))  # no gcc, no cc
    server = ServerProcess("--data-dir", "", "--no-examples", env=bare, cwd=str(tmp_path),
                           command=[str(bin_ / "adapterserve"), "serve"])
    try:
        assert "fused LoRA kernel loaded from " + str(kernels) in server.log()
        assert "compiler none" in server.log(), "the probe must see no compiler on this PATH"
    finally:
        server.stop()
