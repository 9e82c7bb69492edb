"""The README's five-minute tour runs as written against a real server: every `adapterserve ...` shell
line and every Python block of that section (the address of the test's server in place of
127.0.0.1:50051, which the client commands also read from ADAPTERSERVE_ADDRESS)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from adapterserve.loadtest.server_proc import ServerProcess

REPO = pathlib.Path(__file__).resolve().parents[2]


def tour_blocks():
    text = (REPO / "README.md").read_text()
    section = text.split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess("--data-dir", str(tmp_path_factory.mktemp("data")))
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
                if not command.startswith("adapterserve "):
                    continue
                done = subprocess.run(command.replace("adapterserve ", f"{bin_dir}/adapterserve ", 1), shell=True,
                                      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
                ran += 1
        else:
            done = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:50051", server.address)], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"
            assert done.stdout.strip(), f"the block printed nothing:\n{code}"
            ran += 1
    assert ran >= 9
