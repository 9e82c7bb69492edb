"""Encoder families beyond BERT, DistilBERT and RoBERTa (runtime/families.py): ELECTRA (ELECTRA-small's
embedding projection), MPNet, DeBERTa-v3 (disentangled attention), ModernBERT (rotary, local/global
attention, fused Wqkv, gated MLP; cls and mean pooling) and XLM-R with its own unigram tokenizer, as
tiny random models built from configs. One mixed batch over four tasks with different label counts
and ranks equals PEFT on each adapter alone (max |Δlogit| <= 1e-4 in fp32) on the padded path and,
where the family packs tokens, the packed one. (Every other adapter kind on every family:
test_adapter_kinds.py.) Adapters of another family, incomplete heads and engines that cannot serve a
family are refused with messages that say so."""
import random

import pytest
import torch
from safetensors.torch import load_file

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import BaseMismatchError, ConfigError, InvalidAdapterError
from adapterserve.runtime.runtime import Runtime
from tiny_models import (FAMILY_TARGETS, NEW_FAMILIES, SAMPLE_TEXTS, make_peft_adapter, model_type, peft_logits)

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

TOL = 1e-4
TASKS = {"two": (2, 4), "three": (3, 8), "fifty": (50, 2), "four": (4, 6)}  # labels, rank
# Token-packed forwards (with the fused kernel): BERT-shaped attention, and ModernBERT's own.
PACKS = {"xlm-roberta", "electra", "modernbert", "modernbert-mean"}


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family_tasks(request, new_family_bases, tmp_path_factory):
    name = request.param
    base = new_family_bases[name]
    root = tmp_path_factory.mktemp(f"family_{name}")
    targets = FAMILY_TARGETS[model_type(base)]
    adapters = {}
    for i, (task, (labels, r)) in enumerate(TASKS.items()):
        # ModernBERT: half the tasks keep PEFT's default (classifier only: the base's own head serves them).
        head = ["classifier"] if name.startswith("modernbert") and i % 2 else None
        adapters[task] = make_peft_adapter(base, str(root / task), num_labels=labels, r=r, alpha=2 * r, seed=300 + i,
                                           targets=targets[i % 2:i % 2 + 3], head_modules=head)
    return name, base, adapters


@pytest.mark.parametrize("token_packing", ["auto", "off"])
def test_mixed_tasks_match_peft(family_tasks, token_packing):
    name, base, adapters = family_tasks
    rt = Runtime(RuntimeConfig(base_model=base, slots=8, r_max=8, token_packing=token_packing))
    assert rt.engine.packed == (token_packing == "auto" and name in PACKS and rt.engine.kernel_name == "fused")
    if token_packing == "off" and (name not in PACKS or rt.engine.kernel_name != "fused"):
        pytest.skip(f"{name} has no token-packed path: the auto run is its padded one")
    for task, path in adapters.items():
        rt.add_adapter(task, path)
    rng = random.Random(1)
    items = [(task, text) for task in adapters for text in rng.sample(SAMPLE_TEXTS, 6)]
    rng.shuffle(items)
    preds = rt.classify(items)
    for task, path in adapters.items():
        idx = [i for i, (t, _) in enumerate(items) if t == task]
        got = torch.tensor([preds[i].logits for i in idx])
        want = peft_logits(base, path, [items[i][1] for i in idx])
        assert got.shape[1] == TASKS[task][0]
        assert (got - want).abs().max().item() <= TOL, f"{name}/{task}/packed={rt.engine.packed}"
    assert rt.serving_paths()["family"] == rt.base.family.name


def test_modernbert_head_comes_from_the_base_when_the_adapter_has_none(new_family_bases, tmp_path):
    base = new_family_bases["modernbert-mean"]
    bare = make_peft_adapter(base, str(tmp_path / "bare"), num_labels=3, targets=["Wqkv"], head_modules=["classifier"])
    own = make_peft_adapter(base, str(tmp_path / "own"), num_labels=3, targets=["Wqkv"], seed=1)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    checkpoint = load_file(f"{base}/model.safetensors")
    for key in ("head.dense.weight", "head.dense.bias", "head.norm.weight", "head.norm.bias"):
        assert torch.equal(rt.load_spec(bare).head[key], checkpoint[key])
        assert not torch.equal(rt.load_spec(own).head[key], checkpoint[key])
    assert rt.base.family.pooling == "mean"


def test_deberta_adapter_without_its_pooler_is_refused(new_family_bases, tmp_path):
    base = new_family_bases["deberta-v2"]
    path = make_peft_adapter(base, str(tmp_path / "a"), num_labels=2, targets=["query_proj"], head_modules=["classifier"])
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    with pytest.raises(InvalidAdapterError, match=r"missing pooler.dense.bias, pooler.dense.weight.*"
                                                   r"modules_to_save=\['pooler', 'classifier'\]"):
        rt.add_adapter("a", path)


@pytest.mark.parametrize("adapter_family,base_family", [("bert", "electra"), ("electra", "modernbert"),
                                                        ("roberta", "deberta-v2"), ("modernbert", "mpnet")])
def test_adapter_of_another_family_is_refused_naming_both(tiny_bases, new_family_bases, tmp_path, adapter_family,
                                                          base_family):
    bases = {**tiny_bases, **new_family_bases}
    theirs = bases[adapter_family]
    path = make_peft_adapter(theirs, str(tmp_path / "a"), num_labels=2, targets=FAMILY_TARGETS[model_type(theirs)][:2])
    rt = Runtime(RuntimeConfig(base_model=bases[base_family], slots=4, r_max=8))
    with pytest.raises(BaseMismatchError) as refused:
        rt.add_adapter("a", path)
    message = str(refused.value)
    assert f"trained on a {adapter_family} base" in message and f"this server's base is {base_family}" in message
    assert rt.list_adapters() == []


@pytest.mark.parametrize("name", ["modernbert", "deberta-v2", "mpnet", "electra"])
def test_shared_onnx_engine_refuses_the_family_with_the_reason(new_family_bases, tmp_path, name):
    with pytest.raises(ConfigError, match=rf"cannot serve a {name} base: .+; serve it with --engine torch"):
        Runtime(RuntimeConfig(base_model=new_family_bases[name], slots=4, r_max=8, engine="onnx",
                              onnx_dir=str(tmp_path / "onnx")))


def test_xlm_roberta_uses_its_own_tokenizer(new_family_bases, tmp_path):
    from transformers import AutoTokenizer

    base = new_family_bases["xlm-roberta"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    assert type(rt.base.tokenizer).__name__ == "XLMRobertaTokenizerFast" and rt.base.family.name == "roberta"
    own = AutoTokenizer.from_pretrained(base)
    encoded = rt.encoder.encode(SAMPLE_TEXTS[:3])
    assert [e.input_ids for e in encoded] == [own(t)["input_ids"] for t in SAMPLE_TEXTS[:3]]
    assert rt.base.max_length == 128  # 130 positions, two before the first (after the padding index)


def test_modernbert_serves_its_full_context(new_family_bases):
    rt = Runtime(RuntimeConfig(base_model=new_family_bases["modernbert"], slots=4, r_max=8))
    assert rt.base.max_length == 256  # max_position_embeddings, no padding offset


@pytest.mark.parametrize("name", ["deberta-v2", "modernbert-mean"])
def test_per_task_onnx_export_of_the_family_matches_peft_merged(new_family_bases, tmp_path, name):
    """The per-task exporter (one merged model per task, optimum) serves these families; the shared-base
    graph refuses them (above)."""
    from adapterserve.exporters.parity import task_model_parity
    from adapterserve.exporters.per_task import export_task

    base = new_family_bases[name]
    adapter = make_peft_adapter(base, str(tmp_path / "a"), num_labels=3, r=4,
                                targets=FAMILY_TARGETS[model_type(base)][:3], seed=2)
    export_task(adapter, str(tmp_path / "x"), base_model=base)
    report = task_model_parity(str(tmp_path / "x"), adapter, SAMPLE_TEXTS, base_model=base)
    assert report["max_abs_dlogit"] <= TOL and report["argmax_agreement"] == 1.0
