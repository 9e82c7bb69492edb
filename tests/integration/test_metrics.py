"""Metrics: exact counts after a known workload, a clean exposition (prometheus_client parser and
promtool), and a real Prometheus scraping the server."""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.runtime.server.stubs import pb, pb_grpc
from adapterserve.loadtest.server_proc import ServerProcess

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
IN_CI = bool(os.environ.get("CI"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_server(minilm_adapters):
    root, _ = minilm_adapters
    port = free_port()
    proc = ServerProcess("--data-dir", "", "--adapter-root", root, "--no-examples", "--metrics-max-task-labels", "2",
                         metrics_port=port)
    yield proc
    proc.stop()


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap, name, **labels):
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_match_a_known_workload(metrics_server):
    with grpc.insecure_channel(metrics_server.address) as ch:
        reg, cls = pb_grpc.AdapterRegistryStub(ch), pb_grpc.ClassifierStub(ch)
        for task, src in (("m1", "alpha"), ("m2", "beta"), ("m3", "gamma")):
            reg.RegisterAdapter(pb.RegisterAdapterRequest(task=task, path=src))
        before = samples(scrape(metrics_server.metrics_url))
        n_ok, texts_per_request = 12, 3
        for i in range(n_ok):
            cls.Classify(pb.ClassifyRequest(task=f"m{i % 3 + 1}", texts=["some text"] * texts_per_request))
        failures = {"NOT_FOUND": 2, "INVALID_ARGUMENT": 3}
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                cls.Classify(pb.ClassifyRequest(task="missing", texts=["x"]))
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                cls.Classify(pb.ClassifyRequest(task="m1", texts=[]))
        after_text = scrape(metrics_server.metrics_url)
        after = samples(after_text)

        def delta(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        P = "adapterserve_"
        assert delta(P + "requests_total", rpc="Classify", code="OK") == n_ok
        for code, n in failures.items():
            assert delta(P + "requests_total", rpc="Classify", code=code) == n
        assert delta(P + "rejected_requests_total", reason="not_found") == 2
        assert delta(P + "rejected_requests_total", reason="invalid_argument") == 3
        assert delta(P + "request_duration_seconds_count", rpc="Classify") == n_ok + 5
        for hist in ("tokenize_duration_seconds", "queue_duration_seconds", "inference_duration_seconds"):
            assert delta(P + hist + "_count") == n_ok, hist
        assert delta(P + "batch_size_sum") == n_ok * texts_per_request
        assert delta(P + "batch_adapters_count") == delta(P + "batch_size_count") >= 1
        # Label cap 2: m1 and m2 get their own series, m3 reports as _other.
        assert delta(P + "task_texts_total", task="m1") == 4 * texts_per_request
        assert delta(P + "task_requests_total", task="m2") == 4
        assert delta(P + "task_requests_total", task="_other") == 4
        assert value(after, P + "adapters", tier="device") + value(after, P + "adapters", tier="host") == 3
        assert value(after, P + "device_memory_bytes", kind="rss") > 50e6
        assert value(after, P + "adapter_loads_total") >= 3
        assert value(after, P + "inflight_requests") == 0
        assert any(k[0] == P + "build_info" and ("precision", "fp32") in k[1] for k in after)
        from adapterserve.runtime.native.hardware import probe

        kernel_expected = "fused" if probe().native_unavailable is None else "torch"  # gcc is installed by .ci/run
        assert any(k[0] == P + "build_info" and ("lora_path", kernel_expected) in k[1] for k in after)
        assert after_text.count("# HELP adapterserve_") >= 20

        reg.UnregisterAdapter(pb.UnregisterAdapterRequest(task="m1"))
        gone = samples(scrape(metrics_server.metrics_url))
        assert not any(("task", "m1") in k[1] for k in gone), "series of an unregistered task must disappear"


@pytest.mark.skipif(not PROMTOOL and not IN_CI, reason="promtool not installed (apt-get install prometheus); CI installs it")
def test_promtool_check_metrics_is_clean(metrics_server):
    with grpc.insecure_channel(metrics_server.address) as ch:
        pb_grpc.ClassifierStub(ch).GetInfo(pb.GetInfoRequest())
    text = scrape(metrics_server.metrics_url)
    result = subprocess.run([PROMTOOL or "promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@pytest.mark.skipif(not PROMETHEUS and not IN_CI, reason="prometheus not installed (apt-get install prometheus); CI installs it")
def test_real_prometheus_scrapes_the_request_rate(metrics_server, tmp_path):
    port = free_port()
    target = urllib.parse.urlparse(metrics_server.metrics_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: adapterserve\n    static_configs:\n      - targets: ['{target}']\n")
    prom = subprocess.Popen([PROMETHEUS or "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query?"
        rate_per_s, seconds = 10, 12
        with grpc.insecure_channel(metrics_server.address) as ch:
            reg, cls = pb_grpc.AdapterRegistryStub(ch), pb_grpc.ClassifierStub(ch)
            reg.RegisterAdapter(pb.RegisterAdapterRequest(task="prom", path="alpha", replace=True))
            start = time.monotonic()
            for i in range(rate_per_s * seconds):
                cls.Classify(pb.ClassifyRequest(task="prom", texts=["hello"]))
                time.sleep(max(0.0, start + (i + 1) / rate_per_s - time.monotonic()))
        query = 'sum(rate(adapterserve_requests_total{rpc="Classify",code="OK"}[8s]))'
        with urllib.request.urlopen(api + urllib.parse.urlencode({"query": query}), timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        result = body["data"]["result"]
        assert result, f"prometheus returned no series: {body}"
        measured = float(result[0]["value"][1])
        assert 0.5 * rate_per_s <= measured <= 1.5 * rate_per_s, measured
    finally:
        prom.terminate()
        prom.wait(20)
