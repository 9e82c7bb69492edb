"""What the data dir survives, against the real server: a full disk, damaged files, leftovers of killed
writes, and replaced versions' blobs (docs/reliability.md).

- Full disk (a real tmpfs; CI runs as root, elsewhere skipped with the reason): a register or an
  unregister that cannot be persisted answers RESOURCE_EXHAUSTED naming the cause, changes nothing in
  memory or on disk, and a restart shows exactly the acknowledged tasks.
- A flipped byte in one task's blob quarantines that task only: the server starts, every healthy task
  serves, GetAdapter says why; registering it again heals it. A truncated manifest falls back to the
  previous one.
- Temp files of killed writes and blobs no version names are gone after a restart; replacing a task
  frees its old version's blobs.
"""
import json
import os
import socket
import subprocess
import urllib.request

import grpc
import pytest

from adapterserve.loadtest.server_proc import ServerProcess
from adapterserve.runtime.server.stubs import pb, pb_grpc
from conftest import read_files

TEXT = ["a gorgeous , witty , seductive movie ."]


def start(data_dir, root, metrics_port=0):
    return ServerProcess("--data-dir", str(data_dir), "--adapter-root", root, "--no-examples", "--slots", "8",
                         metrics_port=metrics_port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stubs(server):
    ch = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 32 << 20)])
    return ch, pb_grpc.ClassifierStub(ch), pb_grpc.AdapterRegistryStub(ch)


def register(reg, task, path, replace=False):
    return reg.RegisterAdapter(pb.RegisterAdapterRequest(task=task, files=read_files(path), replace=replace), timeout=60)


def served(clf, task) -> bool:
    try:
        clf.Classify(pb.ClassifyRequest(task=task, texts=TEXT), timeout=30)
        return True
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        return False


def listed(reg) -> dict:
    return {a.task: a.version for a in reg.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}


def blob_state(data_dir) -> tuple[set, set]:
    """(blob names on disk, blob names the manifest references)"""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    live = {d for t in manifest["tasks"].values() for d in t["files"].values()}
    return set(os.listdir(data_dir / "blobs")), live


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory) -> None:
    """Write a filler file until the filesystem has no byte left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (65536, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_full_disk_changes_nothing_and_says_why(minilm_adapters, tmpfs):
    root, paths = minilm_adapters
    server = start(tmpfs, root)
    try:
        ch, clf, reg = stubs(server)
        kept = register(reg, "alpha", paths["alpha"]).version
        fill(tmpfs)
        with pytest.raises(grpc.RpcError) as e:
            register(reg, "beta", paths["beta"])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no space left on device" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            reg.UnregisterAdapter(pb.UnregisterAdapterRequest(task="alpha"), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--data-dir" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            register(reg, "alpha", paths["beta2"], replace=True)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert listed(reg) == {"alpha": kept} and served(clf, "alpha") and not served(clf, "beta")
        ch.close()
    finally:
        assert server.stop() == 0
    os.unlink(tmpfs / "filler")
    server = start(tmpfs, root)
    try:
        ch, clf, reg = stubs(server)
        assert listed(reg) == {"alpha": kept}, "only what was acknowledged survives the restart"
        assert served(clf, "alpha") and not served(clf, "beta")
        on_disk, live = blob_state(tmpfs)
        assert on_disk == live, f"unreferenced blobs left: {on_disk - live}"
        assert not [n for n in os.listdir(tmpfs) if n.startswith(".tmp-")]
        ch.close()
    finally:
        server.stop()


def test_damaged_blob_quarantines_one_task_and_healthy_ones_serve(minilm_adapters, tmp_path):
    root, paths = minilm_adapters
    data = tmp_path / "data"
    server = start(data, root)
    ch, clf, reg = stubs(server)
    versions = {t: register(reg, t, paths[t]).version for t in ("alpha", "gamma")}
    ch.close()
    server.stop()
    manifest = json.loads((data / "manifest.json").read_text())
    blob = data / "blobs" / manifest["tasks"]["gamma"]["files"]["adapter_model.safetensors"]
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))
    server = start(data, root, metrics_port=free_port())
    try:
        scrape = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert "adapterserve_adapters_quarantined 1.0" in scrape
        ch, clf, reg = stubs(server)
        assert listed(reg) == {"alpha": versions["alpha"]} and served(clf, "alpha") and not served(clf, "gamma")
        with pytest.raises(grpc.RpcError) as e:
            reg.GetAdapter(pb.GetAdapterRequest(task="gamma"), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "checksum" in e.value.details()
        assert "quarantined" in server.log()
        # Registering it again heals it.
        assert register(reg, "gamma", paths["gamma"]).version == versions["gamma"]
        assert served(clf, "gamma")
        ch.close()
    finally:
        server.stop()


def test_truncated_manifest_falls_back_to_the_previous_one(minilm_adapters, tmp_path):
    root, paths = minilm_adapters
    data = tmp_path / "data"
    server = start(data, root)
    ch, clf, reg = stubs(server)
    first = register(reg, "alpha", paths["alpha"]).version
    register(reg, "gamma", paths["gamma"])
    ch.close()
    server.stop()
    text = (data / "manifest.json").read_bytes()
    (data / "manifest.json").write_bytes(text[: len(text) // 2])
    server = start(data, root)
    try:
        ch, clf, reg = stubs(server)
        assert listed(reg) == {"alpha": first} and served(clf, "alpha")
        assert "manifest.json is unreadable" in server.log()
        ch.close()
    finally:
        server.stop()


def test_leftovers_are_swept_and_replaced_versions_free_their_blobs(minilm_adapters, tmp_path):
    root, paths = minilm_adapters
    data = tmp_path / "data"
    server = start(data, root)
    ch, clf, reg = stubs(server)
    for i, name in enumerate(["alpha", "beta", "beta2", "gamma", "alpha"]):
        register(reg, "t", paths[name], replace=i > 0)
    on_disk, live = blob_state(data)
    assert on_disk == live and len(live) == 3, (on_disk, live)  # config, weights, labels of the current version
    ch.close()
    server.stop()
    (data / ".tmp-killed").write_bytes(b"x" * 1000)
    (data / "blobs" / ".tmp-killed").write_bytes(b"x" * 1000)
    (data / "blobs" / ("0" * 64)).write_bytes(b"orphan")
    server = start(data, root)
    try:
        on_disk, live = blob_state(data)
        assert on_disk == live and not (data / ".tmp-killed").exists()
        ch, clf, reg = stubs(server)
        assert served(clf, "t")
        ch.close()
    finally:
        server.stop()
