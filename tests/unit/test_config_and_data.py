import pytest

from adapterserve.adapters.tabular import DataError, label_kind, read_examples
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import ConfigError


@pytest.mark.parametrize("kwargs,words", [
    (dict(precision="fp8"), "precision"),
    (dict(device="tpu"), "device"),
    (dict(slots=1), "slot 0"),
    (dict(r_max=0), "r_max"),
    (dict(max_length=2), "max_length"),
])
def test_config_bounds(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        RuntimeConfig(**kwargs)


def test_label_kinds():
    assert label_kind(["0", "1", "1"]) == "int"
    assert label_kind(["pos", "neg"]) == "str"
    with pytest.raises(DataError, match="integers or strings"):
        label_kind(["0.5", "1.0"])
    with pytest.raises(DataError, match="empty label"):
        label_kind(["0", ""])


def test_read_examples_errors(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_examples(str(empty), "text", "label")
    f = tmp_path / "d.csv"
    f.write_text('title,description,label\n"A","b\\nc",1\n')
    with pytest.raises(DataError, match="not found.*title, description, label"):
        read_examples(str(f), "text", "label")
    rows = read_examples(str(f), "title+description", "label")
    assert rows[0].text == "A b c" and rows[0].label == "1"


def test_merged_task_needs_one_model_worker():
    from adapterserve.runtime.config import ServerConfig

    with pytest.raises(ConfigError, match="one model worker"):
        ServerConfig(model_workers=2, merged_task="sst2")
    with pytest.raises(ConfigError, match="model_workers"):
        ServerConfig(model_workers=0)
