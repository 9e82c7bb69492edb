"""Flags, environment and config file into one ServerConfig; docs/configuration.md stays generated."""
import json
import pathlib

import pytest

from adapterserve.runtime.errors import ConfigError
from adapterserve.runtime.server.settings import configuration_markdown, parse_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_configuration_doc_is_current():
    assert (REPO / "docs" / "configuration.md").read_text() == configuration_markdown(), \
        "regenerate: python -m adapterserve.runtime.server.settings > docs/configuration.md"


def test_precedence_flag_over_env_over_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"max-wait-ms": 3, "slots": 9, "port": 1234}))
    config, _ = parse_config(["--config", str(f), "--slots", "12"], environ={"ADAPTERSERVE_PORT": "4321"})
    assert (config.runtime.slots, config.port, config.max_wait_ms) == (12, 4321, 3.0)


def test_lists_and_bools():
    config, _ = parse_config(["--adapter", "a=x", "--adapter", "b=y", "--no-examples"], environ={})
    assert config.adapters == ["a=x", "b=y"] and config.register_examples is False
    config, _ = parse_config([], environ={"ADAPTERSERVE_ADAPTERS": "a=x,b=y", "ADAPTERSERVE_REGISTER_EXAMPLES": "false"})
    assert config.preload() == [("a", "x"), ("b", "y")] and config.register_examples is False


@pytest.mark.parametrize("argv,environ,needle", [
    ([], {"ADAPTERSERVE_SLOTS": "many"}, "ADAPTERSERVE_SLOTS='many': expected an integer"),
    ([], {"ADAPTERSERVE_REGISTER_EXAMPLES": "maybe"}, "expected true or false"),
    (["--max-wait-ms", "soon"], {}, "--max-wait-ms 'soon': expected a number"),
    (["--adapter", "nodir"], {}, "expected TASK=DIR"),
    ([], {"ADAPTERSERVE_PRECISION": "fp8"}, "precision must be one of"),
])
def test_bad_values_name_their_source(argv, environ, needle):
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(argv, environ=environ)
    assert needle in str(e.value)


def test_bad_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config(["--config", str(f)], environ={})
    f.write_text(json.dumps({"slotz": 3}))
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_config(["--config", str(f)], environ={})


def test_abbreviations_are_refused():
    with pytest.raises(SystemExit) as e:
        parse_config(["--max-wait", "5"], environ={})
    assert e.value.code == 2


def test_precision_auto_follows_the_hardware_decision(monkeypatch):
    """auto: fp16 on CUDA; bf16 where the CPU multiplies bf16 natively; fp32 elsewhere and for ONNX."""
    import dataclasses

    import torch

    from adapterserve.runtime.config import RuntimeConfig
    from adapterserve.runtime.engine import select
    from adapterserve.runtime.native.hardware import probe

    hw = probe()
    auto = RuntimeConfig(precision="auto")
    for native_bf16, want in ((True, "bf16"), (False, "fp32")):
        fake = dataclasses.replace(hw, amx_bf16=native_bf16, avx512_bf16=native_bf16)
        monkeypatch.setattr(select, "probe", lambda fake=fake: fake)
        assert select.resolve_precision(auto, torch.device("cpu")) == want
    assert select.resolve_precision(auto, torch.device("cuda")) == "fp16"
    assert select.resolve_precision(RuntimeConfig(precision="auto", engine="onnx"), torch.device("cpu")) == "fp32"
    assert select.resolve_precision(RuntimeConfig(precision="int8"), torch.device("cpu")) == "int8"


def test_admin_token_from_a_file(tmp_path):
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    config, _ = parse_config(["--admin-token-file", str(f)], environ={})
    assert config.admin_token == "s3cret"
    with pytest.raises(ConfigError, match="not both"):
        parse_config(["--admin-token-file", str(f), "--admin-token", "x"], environ={})
    with pytest.raises(ConfigError, match="No such file"):
        parse_config(["--admin-token-file", str(tmp_path / "none")], environ={})
