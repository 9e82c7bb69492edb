"""SIGTERM under load, against the real server: health reports NOT_SERVING (HTTP readiness 503) while the
ports are still open, new work is refused with UNAVAILABLE (HTTP 503), and the process exits within
--grace + 1 s however much work is still in flight, on gRPC and HTTP."""
import json
import signal
import threading
import time
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterserve.loadtest.server_proc import ServerProcess, free_port
from adapterserve.runtime.server.stubs import pb, pb_grpc

LONG = " ".join(["the film is a long meditation on memory , loss and the stubborn joy of small things"] * 6)


def test_sigterm_under_heavy_load_exits_within_grace_plus_one_second(tmp_path):
    grace = 1.0
    proc = ServerProcess("--data-dir", "", "--grace", str(grace), "--max-queue", "100000",
                         "--max-texts-per-request", "256", http_port=free_port())
    statuses, refused, http_refused = [], [], []

    def post_infer(texts, timeout):
        body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})
        request = urllib.request.Request(proc.http_url + "/v2/models/sst2/infer", data=body.encode(), method="POST")
        try:
            return urllib.request.urlopen(request, timeout=timeout).status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def http_status(path):
        try:
            return urllib.request.urlopen(proc.http_url + path, timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code
    stop_polling = threading.Event()

    def poll_health():
        with grpc.insecure_channel(proc.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not stop_polling.is_set():
                try:
                    statuses.append(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status)
                except grpc.RpcError as e:
                    statuses.append(e.code())
                time.sleep(0.01)

    with grpc.insecure_channel(proc.address) as ch:
        clf = pb_grpc.ClassifierStub(ch)
        # ~40 s of forwards on 2 cores: far more than the grace.
        inflight = [clf.Classify.future(pb.ClassifyRequest(task="sst2", texts=[LONG] * 256), timeout=120)
                    for _ in range(16)]
        http_inflight = threading.Thread(target=post_infer, args=([LONG] * 256, 120), daemon=True)
        http_inflight.start()
        time.sleep(1.0)
        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        time.sleep(0.1)
        sent = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        # Within the drain's first quarter-grace, while both ports still accept connections.
        http_refused += [http_status("/v2/health/ready"), post_infer(["new work"], 5)]
        try:
            clf.Classify(pb.ClassifyRequest(task="sst2", texts=["new work"]), timeout=5)
        except grpc.RpcError as e:
            refused.append(e.code())
        code = proc.proc.wait(30)
        exited = time.monotonic() - sent
        stop_polling.set()
        poller.join(5)
        for f in inflight:
            f.cancel()
    assert code == 0, proc.log()[-3000:]
    assert exited <= grace + 1.0, f"exited {exited:.2f} s after SIGTERM with --grace {grace}"
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses[:50]
    assert refused and refused[0] == grpc.StatusCode.UNAVAILABLE, refused
    assert http_refused == [503, 503], http_refused
