import os

import grpc
import pytest

from adapterserve.runtime.server.stubs import pb, pb_grpc
from adapterserve.loadtest.server_proc import ServerProcess
from tiny_models import make_peft_adapter, make_peft_kind_adapter

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
T = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@pytest.fixture(scope="session")
def minilm_adapters(minilm_dir, tmp_path_factory):
    """Random-weight LoRA adapters for the packaged MiniLM (distinct versions for replace tests)."""
    root = tmp_path_factory.mktemp("root")
    specs = {
        "alpha": dict(num_labels=2, r=4, targets=T[:2], labels=["no", "yes"]),
        "beta": dict(num_labels=3, r=8, targets=T, labels=["x", "y", "z"]),
        "gamma": dict(num_labels=5, r=2, targets=T[2:4]),
        "beta2": dict(num_labels=3, r=4, targets=T[:3], labels=["x", "y", "z"]),
    }
    paths = {name: make_peft_adapter(minilm_dir, str(root / name), seed=i + 10, scale=0.05, **kw)
             for i, (name, kw) in enumerate(specs.items())}
    # Other kinds, so replace/unregister churn, crashes and uploads cover them too (adapters/kinds.py).
    kinds = {"iota": ("ia3", dict(num_labels=3, targets=["key", "value", "output.dense"], scale=0.3)),
             "lambda": ("loha", dict(num_labels=3, r=2, targets=T[:3], scale=0.1)),
             "delta": ("dora", dict(num_labels=3, r=4, targets=T[:4], scale=0.05)),
             "pi": ("prompt", dict(num_labels=2, r=8, scale=0.5)),
             "rho": ("prefix", dict(num_labels=3, r=6, scale=0.5))}
    for i, (name, (kind, kw)) in enumerate(kinds.items()):
        paths[name] = make_peft_kind_adapter(minilm_dir, str(root / name), kind, seed=i + 30, **kw)
    return str(root), paths


@pytest.fixture(scope="module")
def server(minilm_adapters, tmp_path_factory):
    root, _ = minilm_adapters
    data_dir = str(tmp_path_factory.mktemp("data"))
    proc = ServerProcess("--data-dir", data_dir, "--adapter-root", root, "--admin-token", TOKEN,
                         "--max-adapter-bytes", str(4 << 20), "--max-queue", "256", "--max-texts-per-request", "64",
                         "--slots", "8")
    proc.data_dir = data_dir
    yield proc
    proc.stop()


@pytest.fixture
def stubs(server):
    ch = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 32 << 20)])
    yield pb_grpc.ClassifierStub(ch), pb_grpc.AdapterRegistryStub(ch)
    ch.close()


def read_files(path):
    def rd(name):
        p = os.path.join(path, name)
        return open(p, "rb").read() if os.path.exists(p) else b""

    return pb.AdapterFiles(adapter_config=rd("adapter_config.json"), adapter_weights=rd("adapter_model.safetensors"),
                           labels_json=rd("labels.json"))
