"""The CUDA-graph bucketing and its config flag (no GPU needed: the graphs themselves are tested in
tests/component/test_cuda.py on a CUDA machine)."""
import pytest

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.engine.cuda_graphs import rows_bucket, width_bucket
from adapterserve.runtime.errors import ConfigError


def test_rows_round_up_to_a_power_of_two():
    assert [rows_bucket(n) for n in (1, 2, 3, 4, 5, 31, 32, 33, 255, 256)] == [1, 2, 4, 4, 8, 32, 32, 64, 256, 256]


def test_width_rounds_up_to_16_and_stops_at_the_model_maximum():
    assert [width_bucket(w, 128) for w in (1, 16, 17, 100, 128)] == [16, 16, 32, 112, 128]
    assert width_bucket(120, 120) == 120  # a max length that is not a multiple of 16 is its own bucket


def test_cuda_graphs_flag_is_validated():
    assert RuntimeConfig(cuda_graphs="off").cuda_graphs == "off"
    with pytest.raises(ConfigError, match="cuda_graphs must be one of auto, off"):
        RuntimeConfig(cuda_graphs="on")
