"""Bad adapters are refused with a message that names the problem, and the runtime keeps serving
the adapters it had."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import (BaseMismatchError, InvalidAdapterError, PermissionDeniedError,
                            UnsupportedAdapterTypeError)
from adapterserve.runtime.runtime import Runtime
from tiny_models import SAMPLE_TEXTS, make_peft_adapter

W = "adapter_model.safetensors"
C = "adapter_config.json"
PREFIX = "base_model.model.bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def setup(tiny_bases, tmp_path_factory):
    base = tiny_bases["bert"]
    root = tmp_path_factory.mktemp("bad")
    good = make_peft_adapter(base, str(root / "good"), num_labels=3, r=4, seed=1, labels=["a", "b", "c"])
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("good", good)
    before = rt.classify([("good", t) for t in SAMPLE_TEXTS[:3]])
    return rt, good, root, before


def _variant(good, root, name, edit_weights=None, edit_config=None, files=None):
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(good, d)
    if edit_weights:
        w = load_file(str(d / W))
        edit_weights(w)
        save_file(w, str(d / W))
    if edit_config:
        c = json.loads((d / C).read_text())
        edit_config(c)
        (d / C).write_text(json.dumps(c))
    for fname, content in (files or {}).items():
        if content is None:
            os.remove(d / fname)
        else:
            (d / fname).write_bytes(content)
    return str(d)


def _set(key, value):
    def edit(w):
        w[key] = value
    return edit


def _pop(key):
    return lambda w: w.pop(key)


BAD = [
    # (case, kwargs for _variant, expected error, words the message must contain)
    ("wrong_shape", dict(edit_weights=_set(f"{PREFIX}.lora_A.weight", torch.randn(4, 31))), BaseMismatchError, ["shapes", "32"]),
    ("missing_module", dict(edit_weights=lambda w: (w.__setitem__(
        "base_model.model.bert.encoder.layer.7.attention.self.query.lora_A.weight", torch.randn(4, 32)), w.__setitem__(
        "base_model.model.bert.encoder.layer.7.attention.self.query.lora_B.weight", torch.randn(32, 4)))),
     BaseMismatchError, ["encoder.layer.7.attention.self.query", "does not have"]),
    ("rank_above_rmax", dict(edit_weights=lambda w: (w.__setitem__(f"{PREFIX}.lora_A.weight", torch.randn(16, 32)),
                                                     w.__setitem__(f"{PREFIX}.lora_B.weight", torch.randn(32, 16))),
                             edit_config=lambda c: c.update(rank_pattern={"encoder.layer.0.attention.self.query": 16})),
     InvalidAdapterError, ["rank 16", "r_max 8"]),
    ("nan", dict(edit_weights=_set(f"{PREFIX}.lora_B.weight", torch.full((32, 4), float("nan")))), InvalidAdapterError, ["NaN"]),
    ("inf", dict(edit_weights=_set("base_model.model.classifier.weight", torch.full((3, 32), float("inf")))), InvalidAdapterError, ["Inf"]),
    ("unknown_peft_type", dict(edit_config=lambda c: c.update(peft_type="LOHA")), UnsupportedAdapterTypeError, ["LOHA"]),
    ("prefix_tuning", dict(edit_config=lambda c: c.update(peft_type="PREFIX_TUNING")), UnsupportedAdapterTypeError, ["PREFIX_TUNING", "sequence length"]),
    ("dora", dict(edit_config=lambda c: c.update(use_dora=True)), UnsupportedAdapterTypeError, ["DoRA"]),
    ("only_pickle", dict(files={W: None, "adapter_model.bin": b"\x80\x04pickle"}), InvalidAdapterError, ["pickle", "safetensors"]),
    ("unexpected_keys", dict(edit_weights=_set("base_model.model.bert.embeddings.word_embeddings.weight", torch.zeros(2, 2))),
     InvalidAdapterError, ["unexpected", "word_embeddings"]),
    ("label_count", dict(files={"labels.json": json.dumps(["a", "b"]).encode()}), InvalidAdapterError, ["2 labels", "3 outputs"]),
    ("empty_weights", dict(files={W: b""}), InvalidAdapterError, ["empty"]),
    ("truncated_weights", dict(files={W: b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"}), InvalidAdapterError, ["safetensors"]),
    ("empty_config", dict(files={C: b""}), InvalidAdapterError, ["JSON"]),
    ("no_head", dict(edit_weights=lambda w: (w.pop("base_model.model.classifier.weight"), w.pop("base_model.model.classifier.bias"))),
     InvalidAdapterError, ["classification head", "SEQ_CLS"]),
    ("head_hidden_size", dict(edit_weights=_set("base_model.model.classifier.weight", torch.randn(3, 48))), BaseMismatchError, ["hidden size 32"]),
    ("half_pair", dict(edit_weights=_pop(f"{PREFIX}.lora_B.weight")), InvalidAdapterError, ["lora_B"]),
    ("rank_disagrees_config", dict(edit_config=lambda c: c.update(r=2)), InvalidAdapterError, ["rank 4", "says 2"]),
    ("bias_all", dict(edit_config=lambda c: c.update(bias="all")), UnsupportedAdapterTypeError, ["bias"]),
    ("integer_weights", dict(edit_weights=_set(f"{PREFIX}.lora_A.weight", torch.ones(4, 32, dtype=torch.int32))), InvalidAdapterError, ["floating point"]),
]


@pytest.mark.parametrize("case,kwargs,error,words", BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_is_refused_and_nothing_is_lost(setup, case, kwargs, error, words):
    rt, good, root, before = setup
    path = _variant(good, root, case, **kwargs)
    resident_before = rt.slot_table.resident()
    with pytest.raises(error) as info:
        rt.add_adapter(f"bad_{case}", path)
    for w in words:
        assert w in str(info.value), f"message {info.value!s} lacks {w!r}"
    assert [a.task for a in rt.list_adapters()] == ["good"]
    assert rt.slot_table.resident() == resident_before
    after = rt.classify([("good", t) for t in SAMPLE_TEXTS[:3]])
    assert [p.logits for p in after] == [p.logits for p in before]


def test_path_escaping_the_allowed_root_is_refused(setup, tmp_path):
    rt, good, root, _ = setup
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.symlink(good, allowed / "link_out")
    with pytest.raises(PermissionDeniedError, match="outside the allowed adapter root"):
        rt.load_spec(str(allowed / "link_out"), allowed_root=str(allowed))
    with pytest.raises(PermissionDeniedError):
        rt.load_spec(str(allowed / ".." / ".." / "x"), allowed_root=str(allowed))
    shutil.copytree(good, allowed / "inside")
    assert rt.load_spec(str(allowed / "inside"), allowed_root=str(allowed)).num_labels == 3


def test_existing_task_needs_replace(setup):
    from adapterserve.runtime.errors import TaskExistsError

    rt, good, _, _ = setup
    with pytest.raises(TaskExistsError, match="replace"):
        rt.add_adapter("good", good)
