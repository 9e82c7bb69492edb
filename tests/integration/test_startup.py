"""What a user meets at start, against the real `adapterserve serve` process: each mistake is one clear
line on stderr and exit code 2, before the model loads; --adapter TASK=DIR registers at start; a
--config file is read."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from adapterserve.loadtest.server_proc import ServerProcess

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def serve(*args, env=None, timeout=120):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "adapterserve", "serve", "--metrics-port", "0", "--http-port", "0",
                           "--no-examples",
                           "--data-dir", "", *args], env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - start


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def one_clear_line(done, *needles):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [l for l in done.stderr.splitlines() if "error" in l.lower()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_grpc_port_in_use(busy_port):
    done, seconds = serve("--port", str(busy_port))
    one_clear_line(done, f"127.0.0.1:{busy_port}", "--port")
    assert seconds < 30  # refused before the model loads


def test_metrics_port_in_use(busy_port):
    done, _ = serve("--port", "0", "--metrics-port", str(busy_port))
    one_clear_line(done, f":{busy_port}", "--metrics-port")


def test_http_port_in_use(busy_port):
    done, seconds = serve("--port", "0", "--http-port", str(busy_port))
    one_clear_line(done, f":{busy_port}", "--http-port")
    assert seconds < 30


def test_base_model_that_is_not_an_encoder_directory(tmp_path):
    done, _ = serve("--port", "0", "--base-model", str(tmp_path))
    one_clear_line(done, str(tmp_path), "config.json")
    done, _ = serve("--port", "0", "--base-model", str(tmp_path / "nope"))
    one_clear_line(done, "nope")


def test_bad_environment_values():
    done, _ = serve("--port", "0", env={"ADAPTERSERVE_SLOTS": "many"})
    one_clear_line(done, "ADAPTERSERVE_SLOTS", "'many'", "integer")
    done, _ = serve("--port", "0", env={"ADAPTERSERVE_PRECISION": "fp8"})
    one_clear_line(done, "precision", "fp8")


def test_unknown_and_abbreviated_flags_are_refused():
    for flag in (["--max-wait", "5"], ["--no-such-flag"]):
        done, _ = serve("--port", "0", *flag)
        assert done.returncode == 2 and "unrecognized arguments" in done.stderr, done.stderr[-1000:]


def test_help_shows_defaults():
    done = subprocess.run([sys.executable, "-m", "adapterserve", "serve", "--help"], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert done.returncode == 0
    assert "(default: 50051)" in done.stdout and "ADAPTERSERVE_MAX_WAIT_MS" in done.stdout


def test_adapter_flags_and_config_file_register_at_start(tmp_path):
    examples = os.path.join(os.path.dirname(__import__("adapterserve.adapters").adapters.__file__), "examples")
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"max-wait-ms": 1, "adapters": [f"news={examples}/ag_news"]}))
    server = ServerProcess("--config", str(config), "--adapter", f"reviews={examples}/sst2", "--no-examples",
                           "--data-dir", str(tmp_path / "data"))
    try:
        done = subprocess.run([sys.executable, "-m", "adapterserve", "list", "--address", server.address],
                              capture_output=True, text=True, env=ENV, timeout=60)
        tasks = sorted(line.split("\t")[0] for line in done.stdout.splitlines())
        # flags win over the file: --adapter replaces the file's list
        assert tasks == ["reviews"], done.stdout + done.stderr
    finally:
        server.stop()
