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
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, wide_slots=0))  # rank above r_max: refused
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
    ("unknown_peft_type", dict(edit_config=lambda c: c.update(peft_type="BOFT")), UnsupportedAdapterTypeError, ["BOFT", "not served yet"]),
    ("cpt", dict(edit_config=lambda c: c.update(peft_type="CPT")), UnsupportedAdapterTypeError, ["CPT", "sequence length"]),
    ("prefix_tuning_without_its_config", dict(edit_config=lambda c: c.update(peft_type="PREFIX_TUNING")),
     InvalidAdapterError, ["num_virtual_tokens", "positive integer"]),
    ("dora_without_magnitudes", dict(edit_config=lambda c: c.update(use_dora=True)), InvalidAdapterError, ["use_dora", "lora_magnitude_vector"]),
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
    # config values by type and range (docs/reliability.md)
    ("alpha_nan", dict(files={C: b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'}), InvalidAdapterError, ["lora_alpha", "finite positive"]),
    ("alpha_zero", dict(edit_config=lambda c: c.update(lora_alpha=0)), InvalidAdapterError, ["lora_alpha", "positive"]),
    ("alpha_negative", dict(edit_config=lambda c: c.update(lora_alpha=-8)), InvalidAdapterError, ["lora_alpha"]),
    ("alpha_huge", dict(edit_config=lambda c: c.update(lora_alpha=1e9)), InvalidAdapterError, ["scales the update", "lora_alpha"]),
    ("alpha_null", dict(edit_config=lambda c: c.update(lora_alpha=None)), InvalidAdapterError, ["lora_alpha", "None"]),
    ("alpha_string", dict(edit_config=lambda c: c.update(lora_alpha="8")), InvalidAdapterError, ["lora_alpha"]),
    ("r_string", dict(edit_config=lambda c: c.update(r="4")), InvalidAdapterError, ["r must be a positive integer", "'4'"]),
    ("r_fraction", dict(edit_config=lambda c: c.update(r=4.5)), InvalidAdapterError, ["positive integer"]),
    ("r_null", dict(edit_config=lambda c: c.update(r=None)), InvalidAdapterError, ["positive integer"]),
    ("r_bool", dict(edit_config=lambda c: c.update(r=True)), InvalidAdapterError, ["positive integer"]),
    ("rslora_string", dict(edit_config=lambda c: c.update(use_rslora="yes")), InvalidAdapterError, ["use_rslora"]),
    ("rank_pattern_regex", dict(edit_config=lambda c: c.update(rank_pattern={")": 4})), InvalidAdapterError, ["regular expression"]),
    ("rank_pattern_list", dict(edit_config=lambda c: c.update(rank_pattern=[1])), InvalidAdapterError, ["rank_pattern"]),
    ("deep_json", dict(files={C: b"[" * 100000 + b"]" * 100000}), InvalidAdapterError, ["adapter_config.json"]),
    ("labels_numbers", dict(files={"labels.json": b"[0, 1, 2]"}), InvalidAdapterError, ["distinct non-empty strings"]),
    ("labels_null_and_list", dict(files={"labels.json": b'[null, ["x"], "c"]'}), InvalidAdapterError, ["strings"]),
    ("labels_duplicate", dict(files={"labels.json": b'["a", "a", "b"]'}), InvalidAdapterError, ["distinct"]),
    ("labels_deep", dict(files={"labels.json": b"[" * 100000 + b"]" * 100000}), InvalidAdapterError, ["labels.json"]),
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


def test_metadata_is_bounded(setup):
    rt, good, _, _ = setup
    with pytest.raises(InvalidAdapterError, match="value of 'note' is 5000 characters"):
        rt.load_spec(good, metadata={"note": "x" * 5000})
    with pytest.raises(InvalidAdapterError, match="at most 64"):
        rt.load_spec(good, metadata={f"k{i}": "v" for i in range(65)})
    assert rt.load_spec(good, metadata={"owner": "team-a"}).metadata == {"owner": "team-a"}


def test_a_directory_over_the_size_limit_is_refused_before_it_is_read(setup, tmp_path):
    """A 10 GB sparse weights file: refused from its size alone, in well under a second, nothing read."""
    import time

    from adapterserve.runtime.errors import ResourceExhaustedError

    rt, good, _, _ = setup
    big = tmp_path / "big"
    shutil.copytree(good, big)
    with open(big / W, "r+b") as fh:
        fh.truncate(10 << 30)
    start = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match="above the limit of 65536"):
        rt.load_spec(str(big), max_bytes=65536)
    assert time.monotonic() - start < 1.0
    assert rt.load_spec(good, max_bytes=1 << 20).num_labels == 3


def test_nul_in_a_path_is_bad_input(setup):
    from adapterserve.runtime.errors import InvalidInputError

    rt, _, _, _ = setup
    with pytest.raises(InvalidInputError, match="NUL"):
        rt.load_spec("adapters/\0/x")


def test_a_read_stops_at_the_deadline(setup):
    import time

    from adapterserve.runtime.errors import DeadlineExceededError

    rt, good, _, _ = setup
    with pytest.raises(DeadlineExceededError, match="nothing was registered"):
        rt.load_spec(good, deadline=time.monotonic() - 1)
    assert rt.load_spec(good, deadline=time.monotonic() + 60).num_labels == 3
