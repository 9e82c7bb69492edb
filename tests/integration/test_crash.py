"""kill -9 during registry changes, against the real server: 20 trials, each killing the process at a
random moment while a client registers, replaces and unregisters adapters back to back. After every
restart each task is at exactly its last acknowledged version or the version of the one change that was
in flight, and the data dir holds no temp file and no unreferenced blob (docs/reliability.md)."""
import json
import os
import random
import signal
import threading
import time

import grpc
import pytest

from adapterserve.loadtest.server_proc import ServerProcess
from adapterserve.runtime.server.stubs import pb, pb_grpc
from conftest import read_files

TRIALS = 20
TASKS = ["c0", "c1", "c2"]


def start(data):
    return ServerProcess("--data-dir", str(data), "--no-examples", "--slots", "8")


def listed(address) -> dict:
    with grpc.insecure_channel(address) as ch:
        reg = pb_grpc.AdapterRegistryStub(ch)
        return {a.task: a.version for a in reg.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}


@pytest.mark.slow  # ~2 minutes (a server start per trial): `make test-slow`, which CI runs
def test_kill_9_mid_change_leaves_old_or_new_version(minilm_adapters, tmp_path):
    _, paths = minilm_adapters
    files = {name: read_files(path) for name, path in paths.items()}
    data = tmp_path / "data"
    rng = random.Random(0)
    acked: dict = {}  # task -> version (None: absent), as the client last heard
    server = start(data)
    for trial in range(TRIALS):
        in_flight = {}  # task -> the version the interrupted change would leave (None: removed)
        stop = threading.Event()

        def churn(address=server.address):
            with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 32 << 20)]) as ch:
                reg = pb_grpc.AdapterRegistryStub(ch)
                while not stop.is_set():
                    task = rng.choice(TASKS)
                    name = rng.choice(sorted(files))
                    remove = acked.get(task) is not None and rng.random() < 0.3
                    in_flight.clear()
                    try:
                        if remove:
                            in_flight[task] = None
                            reg.UnregisterAdapter(pb.UnregisterAdapterRequest(task=task), timeout=30)
                            acked[task] = None
                        else:
                            in_flight[task] = "new"
                            a = reg.RegisterAdapter(pb.RegisterAdapterRequest(task=task, files=files[name],
                                                                              replace=True), timeout=30)
                            acked[task] = a.version
                        in_flight.clear()
                    except grpc.RpcError:
                        return  # the server is gone

        worker = threading.Thread(target=churn)
        worker.start()
        time.sleep(rng.uniform(0.05, 0.6))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        worker.join(30)
        stop.set()
        server = start(data)
        now = listed(server.address)
        for task in TASKS:
            allowed = {acked.get(task)}
            if task in in_flight:
                allowed.add(in_flight[task] if in_flight[task] is None else now.get(task))
            assert now.get(task) in allowed, (trial, task, now.get(task), allowed)
            if task in in_flight and in_flight[task] == "new" and now.get(task) is not None:
                # the in-flight replace landed: it must be one of the known adapters' versions
                assert now[task] in _versions(server, files) or now[task] == acked.get(task)
            acked[task] = now.get(task)  # what the restarted server serves is the truth from here on
        assert not [n for n in os.listdir(data) if n.startswith(".tmp-")]
        manifest = json.loads((data / "manifest.json").read_text())
        live = {d for t in manifest["tasks"].values() for d in t["files"].values()}
        assert set(os.listdir(data / "blobs")) == live, f"trial {trial}: unreferenced blobs"
    server.stop()


_known: dict = {}


def _versions(server, files) -> set:
    """The versions the known adapters register as (sha256 of their files), computed once."""
    if not _known:
        from adapterserve.adapters.peft_lora import adapter_version

        for name, f in files.items():
            raw = {"adapter_config.json": f.adapter_config, "adapter_model.safetensors": f.adapter_weights}
            if f.labels_json:
                raw["labels.json"] = f.labels_json
            _known[name] = adapter_version(raw)
    return set(_known.values())
