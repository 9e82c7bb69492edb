"""`adapterserve loadtest run` for 5 s against a real server: the counts add up, the JSON has every field,
`compare` writes its plots. No speed assertions."""
import json
import os
import subprocess
import sys

import grpc

from conftest import AUTH
from adapterserve.runtime.server.stubs import pb, pb_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_and_compare(server, tmp_path):
    with grpc.insecure_channel(server.address) as ch:
        reg = pb_grpc.AdapterRegistryStub(ch)
        reg.RegisterAdapter(pb.RegisterAdapterRequest(task="lt1", path="alpha", replace=True), metadata=AUTH)
        reg.RegisterAdapter(pb.RegisterAdapterRequest(task="lt2", path="gamma", replace=True), metadata=AUTH)
    outs = []
    for name, mode in (("closed", ["--concurrency", "4"]), ("open", ["--rate", "20"])):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, "-m", "loadtest", "run", "--address", server.address, *mode, "--duration", "5",
               "--warmup", "1", "--tasks", "lt1,lt2,missing_task", "--mix", "zipf:1.0", "--texts-per-request", "2",
               "--label", name, "--out", str(out), "--md", str(tmp_path / f"{name}.md"), "--quiet"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(out.read_text())
        for key in ("sent", "ok", "errors", "errors_by_code", "texts_ok", "throughput_texts_per_s",
                    "throughput_requests_per_s", "latency_ms", "client", "config", "latency_sample_ms"):
            assert key in result, key
        assert set(result["latency_ms"]) == {"p50", "p90", "p95", "p99", "max", "mean"}
        assert result["sent"] == result["ok"] + sum(result["errors_by_code"].values())
        assert result["ok"] > 0 and result["texts_ok"] == 2 * result["ok"]
        assert set(result["errors_by_code"]) == {"NOT_FOUND"}  # only the task that does not exist fails
        assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
        assert result["client"]["processes"] >= 1 and result["client"]["cpu_seconds"] > 0
        # The server's own split of each answered request: the handler runs inside the client's
        # round trip, and the model and queue inside the handler.
        srv = result["server_ms"]
        assert set(srv) == {"queue", "tokenize", "inference", "handler", "outside_handler"}
        assert srv["handler"]["p50"] <= result["latency_ms"]["p50"] and srv["handler"]["p99"] <= result["latency_ms"]["p99"]
        assert 0 < srv["inference"]["p50"] <= srv["handler"]["p50"]
        assert srv["outside_handler"]["p50"] > 0 and srv["queue"]["p50"] >= 0
        assert "| outside handler |" in (tmp_path / f"{name}.md").read_text()
        assert "| texts/s |" in (tmp_path / f"{name}.md").read_text()
        outs.append(str(out))
    report = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "loadtest", "compare", *outs, "--out-dir", str(report), "--baseline", "closed"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for png in ("latency_cdf.png", "throughput_vs_concurrency.png", "throughput_vs_adapters.png"):
        data = (report / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "| closed |" in (report / "summary.md").read_text()
