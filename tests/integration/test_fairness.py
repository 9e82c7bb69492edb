"""No one starves (docs/reliability.md), against the real server: one ClassifyStream flooding 3,000
messages, a second stream that never reads its answers, and a unary client beside them. The unary
client gets no error and a p99 under 2 s (a 4-text request alone takes ~0.05 s on 2 cores; the bound
leaves room for sharing the model with both streams); the flood is throttled, not refused, and every
message of it is answered in order."""
import threading
import time

import grpc

from adapterserve.loadtest.server_proc import ServerProcess
from adapterserve.runtime.server.stubs import pb, pb_grpc

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés",
         "an utterly charming and hilarious film", "dull"]


def test_stream_flood_and_slow_reader_do_not_starve_a_unary_client():
    proc = ServerProcess("--data-dir", "", "--max-queue", "256")
    flood_answers, flood_errors = [], []

    def flood():
        with grpc.insecure_channel(proc.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            requests = (pb.ClassifyRequest(task="sst2", texts=TEXTS, request_id=str(i)) for i in range(3000))
            try:
                for r in stub.ClassifyStream(requests, timeout=300):
                    flood_answers.append(r.request_id)
            except grpc.RpcError as e:
                flood_errors.append(e.code())

    def slow_reader():
        with grpc.insecure_channel(proc.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            call = stub.ClassifyStream(iter([pb.ClassifyRequest(task="sst2", texts=TEXTS)] * 500), timeout=300)
            time.sleep(20)  # never reads: its answers wait in flow control
            call.cancel()

    threads = [threading.Thread(target=flood), threading.Thread(target=slow_reader, daemon=True)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        latencies, errors = [], []
        with grpc.insecure_channel(proc.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for _ in range(60):
                t0 = time.perf_counter()
                try:
                    stub.Classify(pb.ClassifyRequest(task="sst2", texts=TEXTS), timeout=30)
                    latencies.append(time.perf_counter() - t0)
                except grpc.RpcError as e:
                    errors.append(e.code())
        threads[0].join(300)
    finally:
        proc.stop()
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert not errors, errors
    assert p99 < 2.0, f"unary p99 {p99:.2f} s beside the flood"
    assert not flood_errors and flood_answers == [str(i) for i in range(3000)], (flood_errors, len(flood_answers))
