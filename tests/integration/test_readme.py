"""The README's five-minute tour runs as written against a real server: every `adapterserve ...` and
`curl ...` shell line and every Python block of that section (the addresses of the test's server in
place of 127.0.0.1:50051 and 127.0.0.1:8000; the client commands also read ADAPTERSERVE_ADDRESS)."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from adapterserve.loadtest.server_proc import ServerProcess, free_port

REPO = pathlib.Path(__file__).resolve().parents[2]


def tour_blocks():
    text = (REPO / "README.md").read_text()
    section = text.split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess("--data-dir", str(tmp_path_factory.mktemp("data")), http_port=free_port())
    yield proc
    proc.stop()


def test_the_tour_has_shell_and_python_blocks():
    kinds = [k for k, _ in tour_blocks()]
    assert kinds.count("bash") >= 1 and kinds.count("python") >= 3


def test_tour_runs_as_written(server):
    env = {**os.environ, "ADAPTERSERVE_ADDRESS": server.address, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    bin_dir = pathlib.Path(sys.executable).parent
    ran = 0
    for kind, code in tour_blocks():
        if kind == "bash":
            for line in code.splitlines():
                command = line.split("  #")[0].strip()
                if command.startswith("adapterserve "):
                    command = command.replace("adapterserve ", f"{bin_dir}/adapterserve ", 1)
                elif command.startswith("curl "):
                    command = command.replace("127.0.0.1:8000", server.http_url.removeprefix("http://"))
                else:
                    continue
                done = subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=120)
                assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
                if "curl " in command:
                    assert json.loads(done.stdout)["outputs" if "/infer" in command else "inputs"], done.stdout
                ran += 1
        else:
            done = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:50051", server.address)], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"
            assert done.stdout.strip(), f"the block printed nothing:\n{code}"
            ran += 1
    assert ran >= 12
