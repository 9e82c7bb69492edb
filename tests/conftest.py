import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tiny_models helpers

from tiny_models import FAMILIES, NEW_FAMILIES, make_tiny_base  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {f: make_tiny_base(f, str(root / f)) for f in FAMILIES}


@pytest.fixture(scope="session")
def new_family_bases(tmp_path_factory):
    """ELECTRA, MPNet, DeBERTa-v3, ModernBERT (cls and mean pooling) and XLM-R with its own tokenizer."""
    root = tmp_path_factory.mktemp("new_bases")
    return {f: make_tiny_base(f, str(root / f)) for f in NEW_FAMILIES}


@pytest.fixture(scope="session")
def minilm_dir():
    from adapterserve.runtime.config import packaged_base_model_dir

    return packaged_base_model_dir()
