"""Start a real adapterserve process on a loopback port (integration tests and benchmarks)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repository root (in a checkout)


def free_port() -> int:
    """A loopback port nothing listens on now (for flags where 0 means off)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, metrics_port: int = 0, http_port: int = 0, env: dict | None = None,
                 ready_timeout: float = 120.0, tls_ca: str | None = None, cwd: str | None = None,
                 command: list[str] | None = None) -> None:
        """command: how to start `serve` (default: this interpreter's `-m adapterserve serve`).
        http_port: the HTTP/REST front end's port (0: off; free_port() picks one)."""
        self.tls_ca = tls_ca
        self.args = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", str(metrics_port),
                     "--http-port", str(http_port), *args]
        self.http_url = f"http://127.0.0.1:{http_port}" if http_port else None
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None
        cmd = [*(command or [sys.executable, "-m", "adapterserve", "serve"]), *self.args]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(ready_timeout):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))
        if self.port is None:
            raise RuntimeError("server exited:\n" + "".join(self.lines[-40:]))
        self.address = f"127.0.0.1:{self.port}"
        self.wait_serving()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"adapterserve listening on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    def wait_serving(self, timeout: float = 60.0) -> None:
        if self.tls_ca:
            with open(self.tls_ca, "rb") as fh:
                channel = grpc.secure_channel(self.address, grpc.ssl_channel_credentials(fh.read()))
        else:
            channel = grpc.insecure_channel(self.address)
        with channel as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            end = time.time() + timeout
            while time.time() < end:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("server never reported SERVING")

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
