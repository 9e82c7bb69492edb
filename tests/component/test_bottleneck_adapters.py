"""AdapterHub bottleneck adapters (adapters/bottleneck.py, runtime/engine/slot_bottlenecks.py): Pfeiffer,
Houlsby and parallel adapters and their options, with 1- and 2-layer heads reading the first token or
the pooler, mixed in one batch with each other and with PEFT LoRA tasks, equal the `adapters` library's
own model on each alone (max |Δlogit| <= 1e-4 in fp32) on tiny BERT, RoBERTa, XLM-R and ELECTRA and on
the packaged MiniLM, token-packed and padded; bad directories are refused with their message while
serving goes on; engines and modes that cannot apply them refuse them."""
import dataclasses
import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import (BaseMismatchError, InvalidAdapterError, NotSupportedError,
                                         UnsupportedAdapterTypeError)
from adapterserve.runtime.runtime import Runtime
from tiny_models import SAMPLE_TEXTS, adapterhub_logits, make_adapterhub_bottleneck, make_peft_adapter

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

TOL = 1e-4
MIN_EFFECT = 1e-2

# task -> (AdapterHub config, options for make_adapterhub_bottleneck)
VARIANTS = {
    "pfeiffer": ("seq_bn", dict(num_labels=3)),
    "houlsby": ("double_seq_bn", dict(num_labels=2, head_layers=1)),
    "parallel": ("par_bn", dict(num_labels=4, use_pooler=True)),  # the pooler where the family has one
    "ln_after_channel": ("seq_bn", dict(num_labels=5, ln_after=True, reduction_factor=4, non_linearity="gelu",
                                        scaling="channel")),
    "post_add_learned": ("double_seq_bn", dict(num_labels=3, residual_before_ln="post_add", original_ln_before=True,
                                               adapter_residual_before_ln=True, scaling="learned",
                                               leave_out=[0])),
    # Same options as pfeiffer / houlsby: computed together with them in one batched pass, ranks padded
    "pfeiffer_wider": ("seq_bn", dict(num_labels=2, reduction_factor=8)),
    "houlsby_again": ("double_seq_bn", dict(num_labels=3, head_layers=1)),
    # Sequential without the sublayer's norm before: one whose own norm comes after its residual adds to
    # the dense output before the sublayer's norm; one whose norm takes the residual too does not
    # (slot_bottlenecks.adds_before_norm).
    "houlsby_ln_after": ("double_seq_bn", dict(num_labels=2, ln_after=True, non_linearity="relu")),
    "houlsby_residual_ln_after": ("double_seq_bn", dict(num_labels=3, ln_after=True, adapter_residual_before_ln=True)),
    # the native kernel's other activation, and a per-channel scaling folded into its up-projection
    "houlsby_gelu_channel": ("double_seq_bn", dict(num_labels=2, non_linearity="gelu", scaling="channel")),
}


def build(base, root, family):
    adapters = {}
    for i, (task, (config, kw)) in enumerate(VARIANTS.items()):
        kw = dict(kw)
        if family != "bert":
            kw.pop("use_pooler", None)
        adapters[task] = make_adapterhub_bottleneck(base, str(root / task), config, seed=300 + i, **kw)
    return adapters


def check_mixed(rt, base, adapters, lora, label):
    rng = random.Random(1)
    tasks = [*adapters, "lora"]
    items = [(task, text) for task in tasks for text in rng.sample(SAMPLE_TEXTS, 4)]
    rng.shuffle(items)
    preds = rt.classify(items)
    for task in tasks:
        idx = [i for i, (t, _) in enumerate(items) if t == task]
        texts = [items[i][1] for i in idx]
        got = torch.tensor([preds[i].logits for i in idx])
        if task == "lora":
            from tiny_models import peft_logits
            want = peft_logits(base, lora, texts)
        else:
            want = adapterhub_logits(base, adapters[task], texts)
        assert (got - want).abs().max().item() <= TOL, f"{label} {task}"


@pytest.fixture(scope="module", params=["bert", "roberta", "xlm-roberta", "electra"])
def family_setup(request, tiny_bases, new_family_bases, tmp_path_factory):
    name = request.param
    base = tiny_bases[name] if name in tiny_bases else new_family_bases[name]
    root = tmp_path_factory.mktemp(f"bn_{name}")
    return name, base, build(base, root, name), make_peft_adapter(base, str(root / "lora"), num_labels=2, r=4, seed=9)


@pytest.mark.parametrize("token_packing", ["auto", "off"])
def test_bottlenecks_mixed_with_lora_match_the_adapters_library(family_setup, token_packing):
    family, base, adapters, lora = family_setup
    rt = Runtime(RuntimeConfig(base_model=base, slots=10, r_max=8, token_packing=token_packing))
    if token_packing == "off" and not rt.engine._packing_applies():
        pytest.skip("no token-packed path here (native kernels off): the auto run is the padded one")
    assert not (token_packing == "off" and rt.engine.packed)
    for task, path in adapters.items():
        info = rt.add_adapter(task, path)
        assert info.peft_type == "BOTTLENECK"
    rt.add_adapter("lora", lora)
    check_mixed(rt, base, adapters, lora, f"{family}/packed={rt.engine.packed}")


def test_the_adapter_changes_the_answer(tiny_bases, tmp_path):
    """The same head without the bottleneck modules answers differently: the modules are applied."""
    base = tiny_bases["bert"]
    path = make_adapterhub_bottleneck(base, str(tmp_path / "a"), "seq_bn", seed=1)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    spec = rt.load_spec(path)
    rt.add_adapter("with", spec)
    rt.add_adapter("head_only", dataclasses.replace(spec, bottlenecks={}, files={"x": b"1"}, version="v"))
    texts = SAMPLE_TEXTS[:4]
    a = torch.tensor([p.logits for p in rt.classify([("with", t) for t in texts])])
    b = torch.tensor([p.logits for p in rt.classify([("head_only", t) for t in texts])])
    assert (a - b).abs().max().item() > MIN_EFFECT
    # The adapter's tensors count as device memory (adapterserve_adapter_memory_bytes{tier="device"}).
    held = sum(t.numel() * 4 for m in spec.bottlenecks.values() for t in m.tensors())
    assert rt.engine.pool.bottleneck_bytes() >= held > 0


def test_bottlenecks_on_the_packaged_minilm(minilm_dir, tmp_path):
    adapters = build(minilm_dir, tmp_path, "bert")
    lora = make_peft_adapter(minilm_dir, str(tmp_path / "lora"), num_labels=2, r=4, seed=9)
    rt = Runtime(RuntimeConfig(slots=10, r_max=8))
    for task, path in adapters.items():
        rt.add_adapter(task, path)
    rt.add_adapter("lora", lora)
    check_mixed(rt, minilm_dir, adapters, lora, "minilm")


def test_more_bottleneck_tasks_than_slots_and_the_disk_tier(tiny_bases, tmp_path):
    """Eviction from slots and from host memory, and reloading from the store, keep the answers."""
    from adapterserve.adapters.store import AdapterStore

    base = tiny_bases["bert"]
    store = AdapterStore(str(tmp_path / "data"))
    adapters = {f"t{i}": make_adapterhub_bottleneck(base, str(tmp_path / f"t{i}"), "seq_bn", seed=40 + i)
                for i in range(5)}
    rt = Runtime(RuntimeConfig(base_model=base, slots=3, r_max=8, max_host_adapter_bytes=1), disk=store)
    for task, path in adapters.items():
        spec = rt.load_spec(path)
        store.put(task, spec.files, spec.version, spec.labels, spec.metadata, 0.0)
        rt.add_adapter(task, spec)
    items = [(t, s) for s in SAMPLE_TEXTS[:3] for t in adapters]
    for _ in range(2):
        preds = rt.classify(items)
        for task, path in adapters.items():
            got = torch.tensor([p.logits for p, (t, _) in zip(preds, items) if t == task])
            assert (got - adapterhub_logits(base, path, SAMPLE_TEXTS[:3])).abs().max().item() <= TOL
    assert rt.host_tier.reloads > 0


def test_modes_and_engines_that_cannot_apply_them_refuse(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    path = make_adapterhub_bottleneck(base, str(tmp_path / "a"), "seq_bn", seed=2)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("a", path)
    with pytest.raises(NotSupportedError, match="served through slots"):
        rt.merge("a")
    from adapterserve.exporters.per_task import export_task

    with pytest.raises(NotSupportedError, match="AdapterHub bottleneck adapter is not"):
        export_task(path, str(tmp_path / "export"), base_model=base)


def test_labels_come_from_the_head_config(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    path = make_adapterhub_bottleneck(base, str(tmp_path / "a"), "seq_bn", num_labels=2, seed=3)
    head = json.load(open(os.path.join(path, "head_config.json")))
    head["config"]["label2id"] = {"positive": 1, "negative": 0}
    json.dump(head, open(os.path.join(path, "head_config.json"), "w"))
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    assert rt.add_adapter("a", path).labels == ["negative", "positive"]


# ---- bad directories ---------------------------------------------------------------------------------

L0 = "bert.encoder.layer.0.output.adapters.task"


def _edit(weights=None, config=None, head_config=None, head_weights=None, remove=()):
    def apply(d):
        for name, edit in (("adapter.safetensors", weights), ("model_head.safetensors", head_weights)):
            if edit:
                w = load_file(str(d / name))
                edit(w)
                save_file(w, str(d / name))
        for name, edit in (("adapter_config.json", config), ("head_config.json", head_config)):
            if edit:
                c = json.loads((d / name).read_text())
                edit(c["config"])
                (d / name).write_text(json.dumps(c))
        for name in remove:
            os.remove(d / name)
    return apply


def _pickle_only(d):
    os.remove(d / "adapter.safetensors")
    (d / "pytorch_adapter.bin").write_bytes(b"\x80\x04pickle")


BAD = [
    ("bin_only", _pickle_only, InvalidAdapterError, ["pytorch_adapter.bin", "never loaded", "use_safetensors=True"]),
    ("no_head", _edit(remove=("head_config.json", "model_head.safetensors")), InvalidAdapterError,
     ["with_head=True"]),
    ("gating", _edit(config=lambda c: c.update(use_gating=True)), UnsupportedAdapterTypeError, ["use_gating"]),
    ("phm", _edit(config=lambda c: c.update(phm_layer=True)), UnsupportedAdapterTypeError, ["phm_layer", "PHM"]),
    ("lora_architecture", _edit(config=lambda c: c.update(architecture="lora")), UnsupportedAdapterTypeError,
     ["'lora'", "PEFT"]),
    ("activation", _edit(config=lambda c: c.update(non_linearity="softsign")), UnsupportedAdapterTypeError,
     ["softsign"]),
    ("down_shape", _edit(weights=lambda w: w.__setitem__(f"{L0}.adapter_down.0.weight", torch.randn(2, 31))),
     BaseMismatchError, ["adapter_down (2, 31)", "hidden size 32"]),
    ("missing_up", _edit(weights=lambda w: w.pop(f"{L0}.adapter_up.weight")), InvalidAdapterError,
     ["adapter_up", "encoder.layer.0.output"]),
    ("layer_beyond_base", _edit(weights=lambda w: w.__setitem__(
        "bert.encoder.layer.7.output.adapters.task.adapter_up.weight", torch.randn(32, 2))), BaseMismatchError,
     ["encoder.layer.7.output", "does not have"]),
    ("nan", _edit(weights=lambda w: w.__setitem__(f"{L0}.adapter_up.weight", torch.full((32, 2), float("nan")))),
     InvalidAdapterError, ["NaN"]),
    ("tagging_head", _edit(head_config=lambda c: c.update(head_type="tagging")), UnsupportedAdapterTypeError,
     ["tagging", "classification"]),
    ("head_layers", _edit(head_config=lambda c: c.update(layers=3)), InvalidAdapterError, ["3 layers", "2 linear"]),
    ("head_width", _edit(head_weights=lambda w: w.__setitem__("heads.task.1.weight", torch.randn(32, 30))),
     BaseMismatchError, ["head linear 1", "(32, 30)"]),
]


@pytest.fixture(scope="module")
def bad_setup(tiny_bases, tmp_path_factory):
    base = tiny_bases["bert"]
    root = tmp_path_factory.mktemp("bad_bn")
    good = make_adapterhub_bottleneck(base, str(root / "good"), "seq_bn", seed=5)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("good", good)
    before = rt.classify([("good", t) for t in SAMPLE_TEXTS[:3]])
    return rt, good, root, before


@pytest.mark.parametrize("case,edit,error,words", BAD, ids=[b[0] for b in BAD])
def test_bad_bottleneck_is_refused_and_nothing_is_lost(bad_setup, case, edit, error, words):
    rt, good, root, before = bad_setup
    d = root / case
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(good, d)
    edit(d)
    with pytest.raises(error) as info:
        rt.add_adapter(f"bad_{case}", str(d))
    for w in words:
        assert w in str(info.value), f"message {info.value!s} lacks {w!r}"
    assert [a.task for a in rt.list_adapters()] == ["good"]
    after = rt.classify([("good", t) for t in SAMPLE_TEXTS[:3]])
    assert [p.logits for p in after] == [p.logits for p in before]
