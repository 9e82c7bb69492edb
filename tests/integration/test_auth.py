"""Authentication before work, against the real server: unauthenticated 60 MB uploads are refused
from their metadata, without the server receiving and parsing them, so they cannot drive its memory."""
import threading

import grpc

from adapterserve.loadtest.server_proc import ServerProcess
from adapterserve.runtime.server.stubs import pb, pb_grpc

RSS_BOUND = 100 << 20  # bytes of server RSS growth allowed over 18 refused 60 MB uploads


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def test_unauthenticated_uploads_do_not_drive_memory(tmp_path):
    proc = ServerProcess("--data-dir", "", "--no-examples", "--admin-token", "s3cret")
    try:
        payload = pb.RegisterAdapterRequest(task="big", files=pb.AdapterFiles(adapter_config=b"{}",
                                                                               adapter_weights=b"\0" * (60 << 20)))
        before = rss(proc.proc.pid)
        codes, details = [], []

        def upload(token):
            with grpc.insecure_channel(proc.address, options=[("grpc.max_send_message_length", 128 << 20)]) as ch:
                metadata = (("authorization", f"Bearer {token}"),) if token else None
                try:
                    pb_grpc.AdapterRegistryStub(ch).RegisterAdapter(payload, metadata=metadata, timeout=60)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    details.append(e.details())

        for wave in range(3):  # 3 waves of 6 concurrent uploads, with no token and with a wrong one
            threads = [threading.Thread(target=upload, args=(None if i % 2 else "guess",)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        grown = rss(proc.proc.pid) - before
        print(f"server RSS growth over 18 refused uploads: {grown / 2**20:.1f} MiB")
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 18, codes
        assert all("Bearer" in d or "wrong" in d for d in details)
        assert grown < RSS_BOUND, f"server RSS grew by {grown / 2**20:.0f} MiB"
        # The right token still works (the upload is then read, and refused for what it is).
        with grpc.insecure_channel(proc.address) as ch:
            try:
                pb_grpc.AdapterRegistryStub(ch).RegisterAdapter(
                    pb.RegisterAdapterRequest(task="t", files=pb.AdapterFiles(adapter_config=b"{}", adapter_weights=b"x")),
                    metadata=(("authorization", "Bearer s3cret"),), timeout=60)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    finally:
        proc.stop()


def test_classify_token_guards_the_data_plane_only():
    proc = ServerProcess("--data-dir", "", "--classify-token", "reader", "--admin-token", "admin")
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(proc.address) as ch:
            clf = pb_grpc.ClassifierStub(ch)
            request = pb.ClassifyRequest(task="sst2", texts=["a charming film"])
            for metadata in (None, (("authorization", "Bearer admin2"),)):
                try:
                    clf.Classify(request, metadata=metadata, timeout=30)
                    raise AssertionError("served without the token")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            for token in ("reader", "admin"):
                assert clf.Classify(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30).predictions
            # the unknown-task answer does not list other tasks to anyone
            try:
                clf.Classify(pb.ClassifyRequest(task="nope", texts=["x"]), metadata=(("authorization", "Bearer reader"),))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND and "sst2" not in e.details()
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.stop()


def test_metrics_need_the_admin_token_when_one_is_set():
    """With auth on, /metrics (per-task series name tasks) answers 401 without the admin token."""
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = ServerProcess("--data-dir", "", "--admin-token", "admin", metrics_port=port)
    try:
        try:
            urllib.request.urlopen(proc.metrics_url, timeout=10)
            raise AssertionError("/metrics answered without the token")
        except urllib.error.HTTPError as e:
            assert e.code == 401
        request = urllib.request.Request(proc.metrics_url, headers={"Authorization": "Bearer admin"})
        text = urllib.request.urlopen(request, timeout=10).read().decode()
        assert "adapterserve_build_info" in text
    finally:
        proc.stop()
