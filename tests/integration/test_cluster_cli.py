"""`adapterserve cluster` as a user runs it: a process that starts its own Ray head, serves the same
gRPC API on the port it prints, and stops cleanly on SIGTERM. Marked `cluster` (make test-cluster)."""
import subprocess
import sys

import grpc
import pytest

from adapterserve.loadtest.server_proc import ServerProcess
from adapterserve.runtime.server.stubs import pb, pb_grpc

pytestmark = pytest.mark.cluster


def test_cluster_command_serves_and_stops(tmp_path):
    proc = ServerProcess("--data-dir", str(tmp_path / "data"), "--replicas", "1", "--replica-cpus", "0.5",
                         "--ray-cpus", "1", "--grace", "1", ready_timeout=240,
                         command=[sys.executable, "-m", "adapterserve", "cluster"])
    try:
        with grpc.insecure_channel(proc.address) as ch:
            response = pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(task="sst2", texts=["a charming film"]))
            assert response.predictions[0].scores[0].label == "positive"
    finally:
        code = proc.stop(timeout=60)
    assert code == 0, proc.log()[-3000:]
    assert "replicas on Ray Serve" in proc.log()


def test_cluster_without_ray_says_what_to_install():
    # As on a machine without the [ray] extra: the import of ray fails.
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None; "
                           "from adapterserve.cli import main; sys.exit(main(['cluster', '--replicas', '1']))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("adapterserve: error: adapterserve cluster needs Ray Serve: "
                                                    "pip install 'adapterserve[ray]'")
