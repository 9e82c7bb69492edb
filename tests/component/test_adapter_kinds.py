"""Adapter kinds beside LoRA (adapters/kinds.py): LoHa and VeRA (converted exactly to slot LoRA), IA3,
DoRA and LoRA with trained biases (per-feature slot vectors), prompt and P-tuning (virtual tokens), mixed in one batch with LoRA tasks and
with each other, equal PEFT's own model on each adapter alone (max |Δlogit| <= 1e-4 in fp32) on tiny
BERT, DistilBERT and RoBERTa and on the packaged MiniLM, on both CPU LoRA paths, token-packed and
padded; bad files are refused with their message while serving goes on; an engine that cannot serve a
kind refuses it at registration."""
import dataclasses
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.engine.reference import reference_logits
from adapterserve.runtime.errors import (BaseMismatchError, InvalidAdapterError, InvalidInputError,
                                         NotSupportedError, UnsupportedAdapterTypeError)
from adapterserve.runtime.runtime import Runtime
from adapterserve.runtime.types import ClassifyItem
from tiny_models import (FAMILIES, FAMILY_TARGETS, FEEDFORWARD, NEW_FAMILIES, SAMPLE_TEXTS, make_adapterhub_bottleneck,
                         make_peft_adapter, make_peft_kind_adapter, model_type, peft_logits)

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

TOL = 1e-4
# A change that moves logits by less than this would not show a wrong conversion.
MIN_EFFECT = 1e-2


def kind_matrix(family, loha_scale=0.5, vera_scale=0.6, vector_scale=1.0):
    """loha_scale, vera_scale: LoHa's update is a product of four random factors, VeRA's of two vectors
    and two projections; it must stay visible on a tiny
    base (hidden 32) without blowing activations up on MiniLM (hidden 384), which would turn float
    rounding into logit differences above the tolerance."""
    t = FAMILY_TARGETS[family]
    return {
        "lora": ("lora", dict(num_labels=2, r=4, alpha=8, targets=t[:3])),
        "loha": ("loha", dict(num_labels=3, r=4, alpha=6, targets=t, scale=loha_scale)),  # rank 16 once converted
        "loha_patterns": ("loha", dict(num_labels=50, r=2, alpha=4, targets=t[1:4], rank_pattern={t[1]: 3},
                                       alpha_pattern={t[2]: 1}, scale=loha_scale * 1.2)),
        "vera": ("vera", dict(num_labels=4, r=8, targets=t[:4], scale=vera_scale)),
        "vera_ffn": ("vera", dict(num_labels=2, r=6, targets=t[-2:], scale=vera_scale)),
        # k/v scale their outputs, the feed-forward output linear its input
        "ia3": ("ia3", dict(num_labels=3, targets=[t[1], t[2]] + FEEDFORWARD[family], scale=vector_scale)),
        "dora": ("dora", dict(num_labels=2, r=4, alpha=8, targets=t[:4], scale=vector_scale / 2)),
        "lora_bias": ("lora_bias", dict(num_labels=5, r=2, alpha=4, targets=t[2:5], scale=vector_scale / 2)),
        "adalora": ("adalora", dict(num_labels=4, r=6, alpha=8, targets=t[:4], scale=0.3)),
        # r = virtual tokens; each row of a batch then has its own length
        "prompt": ("prompt", dict(num_labels=3, r=5, scale=1.0)),
        "p_tuning": ("p_tuning", dict(num_labels=2, r=3)),
        # last, so the seeds of the kinds above stay as they were
        "lokr": ("lokr", dict(num_labels=6, r=2, alpha=4, targets=t[:3], scale=loha_scale)),  # W2 low rank
        "prefix": ("prefix", dict(num_labels=3, r=4, scale=1.0)),  # r = prefix positions
        # AdapterHub's Houlsby adapter (both sublayers) with its 2-layer head, against the adapters library
        "bottleneck": ("bottleneck", dict(num_labels=4, scale=0.3)),
        "beft": ("beft", dict(num_labels=2, targets=t, scale=vector_scale / 2)),  # PEFT's BitFit
    }


# Families whose attention takes key/value prefixes in transformers (and so in PEFT's prefix tuning), and
# whose BERT-shaped sublayer outputs take AdapterHub bottleneck adapters.
PREFIX_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra")


def build(base, root, family, bert_base=None, **matrix):
    """bert_base: where a family takes no bottleneck adapter, one made on this BERT base (to be refused)."""
    adapters = {}
    for i, (task, (kind, kw)) in enumerate(kind_matrix(family, **matrix).items()):
        out = str(root / task)
        if kind == "bottleneck":
            served = family in PREFIX_FAMILIES
            adapters[task] = make_adapterhub_bottleneck(base if served else bert_base, out, "double_seq_bn",
                                                        seed=200 + i, **kw)
        elif kind == "lora":
            adapters[task] = make_peft_adapter(base, out, seed=200 + i, **kw)
        else:
            adapters[task] = make_peft_kind_adapter(base, out, kind, seed=200 + i, **kw)
    return adapters


@pytest.fixture(scope="module", params=[*FAMILIES, *NEW_FAMILIES])
def family_adapters(request, tiny_bases, new_family_bases, tmp_path_factory):
    name = request.param
    base = tiny_bases[name] if name in tiny_bases else new_family_bases[name]
    # ModernBERT's final norm and head norm damp a change of scale: DoRA needs larger magnitudes to show.
    matrix = dict(vector_scale=3.0) if name.startswith("modernbert") else {}
    return name, base, build(base, tmp_path_factory.mktemp(f"kinds_{name}"), model_type(base),
                             bert_base=tiny_bases["bert"], **matrix)


def check_mixed_batch(rt, base, adapters, label):
    rng = random.Random(0)
    # Five texts per task, shuffled into one batch: every task's effect is seen on several rows.
    items = [(task, text) for task in sorted(adapters) for text in rng.sample(SAMPLE_TEXTS, 5)]
    rng.shuffle(items)
    preds = rt.classify(items)
    worst = 0.0
    for task, path in adapters.items():
        idx = [i for i, (t, _) in enumerate(items) if t == task]
        texts = [items[i][1] for i in idx]
        got = torch.tensor([preds[i].logits for i in idx])
        want = peft_logits(base, path, texts)
        worst = max(worst, (got - want).abs().max().item())
        spec = rt.load_spec(path)
        # The adapter's modules (or prefix) matter: without them the same head answers differently.
        if spec.prompt is None and spec.head_layout is None:  # a prompt has no base-weight change to take away
            bare = reference_logits(base, dataclasses.replace(spec, modules={}, vectors={}, prefix=None, kron={}),
                                    texts)
            assert (want - bare).abs().max().item() > MIN_EFFECT, f"{label} {task}: the adapter barely changes logits"
    assert worst <= TOL, f"{label}: max |dlogit| vs PEFT {worst}"


@pytest.mark.parametrize("lora_kernel,token_packing", [("auto", "auto"), ("torch", "auto"), ("auto", "off")])
def test_kinds_mixed_in_one_batch_match_peft(family_adapters, lora_kernel, token_packing):
    family, base, adapters = family_adapters
    rt = Runtime(RuntimeConfig(base_model=base, slots=16, r_max=16, lora_kernel=lora_kernel, token_packing=token_packing))
    if token_packing == "off" and not rt.engine._packing_applies():
        pytest.skip(f"{family} has no token-packed path: the default run is its padded one")
    adapters = dict(adapters)
    if family not in PREFIX_FAMILIES:  # refused at registration, naming the family
        with pytest.raises(UnsupportedAdapterTypeError, match=f"prefix tuning .* not {model_type(base)}'s"):
            rt.add_adapter("prefix", adapters.pop("prefix"))
        with pytest.raises(UnsupportedAdapterTypeError, match=f"bottleneck adapters are served .* not on {model_type(base)}"):
            rt.add_adapter("bottleneck", adapters.pop("bottleneck"))
    for task, path in adapters.items():
        rt.add_adapter(task, path)
    expected = {"lora": "LORA", "loha": "LOHA", "loha_patterns": "LOHA", "lokr": "LOKR", "vera": "VERA",
                "vera_ffn": "VERA", "ia3": "IA3", "dora": "LORA", "lora_bias": "LORA", "prompt": "PROMPT_TUNING",
                "p_tuning": "P_TUNING", "adalora": "ADALORA", "prefix": "PREFIX_TUNING", "bottleneck": "BOTTLENECK", "beft": "BEFT"}
    assert {a.task: a.peft_type for a in rt.list_adapters()} == {t: expected[t] for t in adapters}
    assert rt.get_adapter("loha").rank == 16 and rt.get_adapter("ia3").rank == 0
    check_mixed_batch(rt, base, adapters, f"{family}/{rt.engine.kernel_name}/packed={rt.engine.packed}")


@pytest.mark.parametrize("family,token_packing", [("bert", "auto"), ("bert", "off"), ("distilbert", "auto"),
                                                   ("roberta", "auto")])
def test_input_scales_on_inputs_other_layers_read(tiny_bases, tmp_path, family, token_packing):
    """IA3 vectors that scale the input of the first attention projection (whose input the other
    projections and the residual read) and of the feed-forward's first linear (whose input the residual
    reads): a row's input is scaled for that layer only, so the other layers, the residual and the other
    rows see it as it was. Mixed with LoRA and PEFT-default IA3 rows, each equal to PEFT alone."""
    base = tiny_bases[family]
    t = FAMILY_TARGETS[family]
    shared_inputs = [t[0], t[4]]  # q (query, q_lin) and the feed-forward's first linear
    adapters = {
        "lora": make_peft_adapter(base, str(tmp_path / "lora"), num_labels=2, r=4, targets=t[:3], seed=1, scale=0.5),
        "ia3": make_peft_kind_adapter(base, str(tmp_path / "ia3"), "ia3", num_labels=3,
                                      targets=[t[1], t[2]] + FEEDFORWARD[family], seed=2, scale=1.0),
        "ia3_shared": make_peft_kind_adapter(base, str(tmp_path / "ia3_shared"), "ia3", num_labels=2,
                                             targets=shared_inputs + [t[2]], feedforward=shared_inputs, seed=3,
                                             scale=1.0),
    }
    rt = Runtime(RuntimeConfig(base_model=base, slots=8, r_max=8, token_packing=token_packing))
    for task, path in adapters.items():
        rt.add_adapter(task, path)
    check_mixed_batch(rt, base, adapters, f"{family}/packed={rt.engine.packed}")


def test_kinds_on_the_packaged_minilm(minilm_dir, tmp_path):
    adapters = build(minilm_dir, tmp_path, "bert", loha_scale=0.25, vera_scale=0.3, vector_scale=0.5)
    rt = Runtime(RuntimeConfig(slots=16, r_max=16))
    for task, path in adapters.items():
        rt.add_adapter(task, path)
    check_mixed_batch(rt, minilm_dir, adapters, "minilm")


def test_replacing_lora_by_loha_serves_the_new_kind(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    lora = make_peft_adapter(base, str(tmp_path / "lora"), num_labels=3, r=4, seed=1)
    loha = make_peft_kind_adapter(base, str(tmp_path / "loha"), "loha", num_labels=3, r=2, seed=2)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=16))
    rt.add_adapter("t", lora)
    rt.classify([("t", SAMPLE_TEXTS[0])])
    rt.add_adapter("t", loha, replace=True)
    got = torch.tensor([p.logits for p in rt.classify([("t", s) for s in SAMPLE_TEXTS[:4]])])
    assert (got - peft_logits(base, loha, SAMPLE_TEXTS[:4])).abs().max().item() <= TOL
    assert rt.get_adapter("t").peft_type == "LOHA"


# ---- bad LoHa / VeRA files ------------------------------------------------------------------------------

Q = "base_model.model.bert.encoder.layer.0.attention.self.query"
K = "base_model.model.bert.encoder.layer.0.attention.self.key"


@pytest.fixture(scope="module")
def bad_setup(tiny_bases, tmp_path_factory):
    base = tiny_bases["bert"]
    root = tmp_path_factory.mktemp("bad_kinds")
    loha = make_peft_kind_adapter(base, str(root / "loha"), "loha", num_labels=3, r=2, seed=3)
    vera = make_peft_kind_adapter(base, str(root / "vera"), "vera", num_labels=3, r=4, seed=4)
    ia3 = make_peft_kind_adapter(base, str(root / "ia3"), "ia3", num_labels=3, targets=["key", "output.dense"], seed=5)
    dora = make_peft_kind_adapter(base, str(root / "dora"), "dora", num_labels=3, r=2, targets=["query"], seed=6)
    lora_bias = make_peft_kind_adapter(base, str(root / "lora_bias"), "lora_bias", num_labels=3, r=2,
                                       targets=["query"], seed=7)
    prompt = make_peft_kind_adapter(base, str(root / "prompt"), "prompt", num_labels=3, r=4, seed=8)
    adalora = make_peft_kind_adapter(base, str(root / "adalora"), "adalora", num_labels=3, r=4, targets=["query"],
                                     seed=9)
    lokr = make_peft_kind_adapter(base, str(root / "lokr"), "lokr", num_labels=3, r=2, targets=["query"], seed=10)
    prefix = make_peft_kind_adapter(base, str(root / "prefix"), "prefix", num_labels=3, r=4, seed=11)
    beft = make_peft_kind_adapter(base, str(root / "beft"), "beft", num_labels=3, targets=["query"], seed=13)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, wide_slots=0))  # no wide slots: rank above r_max is refused
    rt.add_adapter("loha", loha)
    before = rt.classify([("loha", t) for t in SAMPLE_TEXTS[:3]])
    return rt, {"loha": loha, "vera": vera, "ia3": ia3, "dora": dora, "lora_bias": lora_bias, "prompt": prompt,
                "adalora": adalora, "lokr": lokr, "prefix": prefix, "beft": beft}, root, before


def _edit(weights=None, config=None):
    def apply(d):
        if weights:
            w = load_file(str(d / "adapter_model.safetensors"))
            weights(w)
            save_file(w, str(d / "adapter_model.safetensors"))
        if config:
            c = json.loads((d / "adapter_config.json").read_text())
            config(c)
            (d / "adapter_config.json").write_text(json.dumps(c))
    return apply


BAD = [
    ("loha_factor_shape", "loha", _edit(weights=lambda w: w.__setitem__(f"{Q}.hada_w1_b", torch.randn(2, 31))),
     BaseMismatchError, ["LoHa factors", "32"]),
    ("loha_rank_disagrees", "loha", _edit(weights=lambda w: w.__setitem__(f"{Q}.hada_w2_a", torch.randn(32, 3))),
     InvalidAdapterError, ["hada_w2_a", "(32, 2)"]),
    ("loha_missing_factor", "loha", _edit(weights=lambda w: w.pop(f"{Q}.hada_w2_b")), InvalidAdapterError,
     ["lacks hada_w2_b"]),
    ("loha_above_r_max", "loha", _edit(config=lambda c: c.update(r=3),
                                       weights=lambda w: [w.__setitem__(k, torch.randn(*(3 if s == 2 else s for s in v.shape)))
                                                          for k, v in list(w.items()) if "hada" in k]),
     InvalidAdapterError, ["rank 9", "r_max 8", "r²"]),
    ("lokr_missing_factor", "lokr", _edit(weights=lambda w: w.pop(f"{Q}.lokr_w2_b")), InvalidAdapterError,
     ["lacks lokr_w2", "both Kronecker factors"]),
    ("lokr_wrong_base", "lokr", _edit(weights=lambda w: w.__setitem__(f"{Q}.lokr_w1", torch.randn(8, 4))),
     BaseMismatchError, ["64 x 32 update", "32 -> 32", "other dimensions"]),
    ("lokr_nan", "lokr", _edit(weights=lambda w: w.__setitem__(f"{Q}.lokr_w1", torch.full((4, 4), float("nan")))),
     InvalidAdapterError, ["NaN"]),
    ("loha_nan", "loha", _edit(weights=lambda w: w.__setitem__(f"{Q}.hada_w1_a", torch.full((32, 2), float("nan")))),
     InvalidAdapterError, ["NaN"]),
    ("loha_alpha_zero", "loha", _edit(config=lambda c: c.update(alpha=0)), InvalidAdapterError, ["alpha", "positive"]),
    ("vera_no_projection", "vera", _edit(weights=lambda w: w.pop("base_model.vera_A")), InvalidAdapterError,
     ["shared projections", "save_projection"]),
    ("vera_saved_without_projection", "vera", _edit(config=lambda c: c.update(save_projection=False)),
     UnsupportedAdapterTypeError, ["save_projection"]),
    ("vera_lambda_length", "vera", _edit(weights=lambda w: w.__setitem__(f"{Q}.vera_lambda_d", torch.randn(5))),
     InvalidAdapterError, ["vera_lambda_d", "(4,)"]),
    ("vera_projection_too_small", "vera", _edit(weights=lambda w: w.__setitem__("base_model.vera_B", torch.randn(16, 4))),
     BaseMismatchError, ["projections", "smaller"]),
    ("boft", "loha", _edit(config=lambda c: c.update(peft_type="BOFT")), UnsupportedAdapterTypeError,
     ["BOFT", "served: LORA"]),
    ("ia3_vector_length", "ia3", _edit(weights=lambda w: w.__setitem__(f"{K}.ia3_l", torch.rand(31, 1))),
     BaseMismatchError, ["ia3_l", "(31, 1)", "[32, 1]"]),
    ("ia3_inf", "ia3", _edit(weights=lambda w: w.__setitem__(f"{K}.ia3_l", torch.full((32, 1), float("inf")))),
     InvalidAdapterError, ["Inf"]),
    ("dora_magnitude_length", "dora", _edit(weights=lambda w: w.__setitem__(f"{Q}.lora_magnitude_vector", torch.rand(30))),
     InvalidAdapterError, ["lora_magnitude_vector", "(32,)"]),
    ("dora_flag_without_magnitude", "dora", _edit(weights=lambda w: w.pop(f"{Q}.lora_magnitude_vector")),
     InvalidAdapterError, ["use_dora", "lora_magnitude_vector is missing"]),
    ("magnitude_without_dora", "dora", _edit(config=lambda c: c.update(use_dora=False)), InvalidAdapterError,
     ["use_dora is not set"]),
    ("bias_length", "lora_bias", _edit(weights=lambda w: w.__setitem__(f"{Q}.base_layer.bias", torch.rand(33))),
     InvalidAdapterError, ["base_layer.bias", "(32,)"]),
    ("prompt_hidden_size", "prompt", _edit(weights=lambda w: w.__setitem__("prompt_embeddings", torch.randn(4, 31))),
     BaseMismatchError, ["prompt_embeddings", "[n, 32]"]),
    ("prompt_count", "prompt", _edit(config=lambda c: c.update(num_virtual_tokens=6)), InvalidAdapterError,
     ["holds 4 virtual tokens", "says 6"]),
    ("prompt_too_long", "prompt", _edit(config=lambda c: c.update(num_virtual_tokens=127),
                                        weights=lambda w: w.__setitem__("prompt_embeddings", torch.randn(127, 32))),
     InvalidAdapterError, ["127 virtual tokens", "128 positions"]),
    ("prompt_missing", "prompt", _edit(weights=lambda w: w.pop("prompt_embeddings")), InvalidAdapterError,
     ["no prompt_embeddings"]),
    ("multitask_prompt_kind", "prompt", _edit(config=lambda c: c.update(peft_type="MULTITASK_PROMPT_TUNING")),
     UnsupportedAdapterTypeError, ["MULTITASK_PROMPT_TUNING", "not served yet"]),
    ("prefix_missing_layers", "prefix",
     _edit(weights=lambda w: w.__setitem__("prompt_embeddings", w["prompt_embeddings"][:, :64].contiguous())),
     BaseMismatchError, ["[n, 64]", "2 layers", "[n, 128]", "missing layers"]),
    ("prefix_config_layers", "prefix", _edit(config=lambda c: c.update(num_layers=3)), BaseMismatchError,
     ["prefixes for 3 layers", "this base has 2 layers"]),
    ("prefix_count", "prefix", _edit(config=lambda c: c.update(num_virtual_tokens=6)), InvalidAdapterError,
     ["holds 4 prefix positions", "says 6"]),
    ("prefix_too_long", "prefix", _edit(config=lambda c: c.update(num_virtual_tokens=127),
                                        weights=lambda w: w.__setitem__("prompt_embeddings", torch.randn(127, 128))),
     InvalidAdapterError, ["127 prefix positions", "128 positions"]),
    ("prefix_missing", "prefix", _edit(weights=lambda w: w.pop("prompt_embeddings")), InvalidAdapterError,
     ["no prompt_embeddings", "prefix tuning"]),
    ("adalora_e_length", "adalora", _edit(weights=lambda w: w.__setitem__(f"{Q}.lora_E", torch.randn(3, 1))),
     InvalidAdapterError, ["lora_E (3, 1)", "rank-r triple"]),
    ("beft_length", "beft", _edit(weights=lambda w: w.__setitem__(f"{Q}.beft_bias", torch.randn(1, 30))),
     BaseMismatchError, ["beft_bias", "(1, 30)", "[1, 32]"]),
    ("bias_all", "lora_bias", _edit(config=lambda c: c.update(bias="all")), UnsupportedAdapterTypeError,
     ["LayerNorms", "lora_only"]),
]


@pytest.mark.parametrize("case,source,edit,error,words", BAD, ids=[b[0] for b in BAD])
def test_bad_kind_is_refused_and_nothing_is_lost(bad_setup, case, source, edit, error, words):
    rt, good, root, before = bad_setup
    d = root / case
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(good[source], d)
    edit(d)
    with pytest.raises(error) as info:
        rt.add_adapter(f"bad_{case}", str(d))
    for w in words:
        assert w in str(info.value), f"message {info.value!s} lacks {w!r}"
    assert [a.task for a in rt.list_adapters()] == ["loha"]
    after = rt.classify([("loha", t) for t in SAMPLE_TEXTS[:3]])
    assert [p.logits for p in after] == [p.logits for p in before]


@pytest.mark.parametrize("family,lora_kernel", [("bert", "auto"), ("bert", "torch"), ("distilbert", "auto"),
                                                 ("roberta", "auto")])
def test_kinds_on_the_shared_onnx_graph(tiny_bases, tmp_path, family, lora_kernel):
    """Converted kinds are slot LoRA, and per-feature vectors (IA3, DoRA, trained biases, BitFit) are slot
    inputs of the shared ONNX graph (its custom op or stock ops; token-packed on BERT and RoBERTa, padded on
    DistilBERT): all served in one mixed batch, each equal to PEFT alone. Kinds that change the sequence
    or add networks are refused, naming the engine and the kind."""
    base = tiny_bases[family]
    adapters = build(base, tmp_path, family, bert_base=tiny_bases["bert"])
    rt = Runtime(RuntimeConfig(base_model=base, slots=16, r_max=16, engine="onnx", onnx_dir=str(tmp_path / "onnx"),
                               lora_kernel=lora_kernel))
    assert rt.engine.name == "onnx"
    refused = {"prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix": "PREFIX_TUNING", "bottleneck": "bottleneck"}
    for task, path in adapters.items():
        if task in refused:
            with pytest.raises((NotSupportedError, UnsupportedAdapterTypeError)) as info:
                rt.add_adapter(task, path)
            if family not in PREFIX_FAMILIES and task in ("prefix", "bottleneck"):
                assert family in str(info.value)  # refused for the family on every engine
                continue
            assert ("onnx engine" in str(info.value) or "ONNX engine" in str(info.value))
            assert refused[task] in str(info.value) and "--engine torch" in str(info.value)
        else:
            rt.add_adapter(task, path)
    served = {t: p for t, p in adapters.items() if t not in refused}
    assert {"ia3", "dora", "lora_bias", "beft"} <= set(served)
    check_mixed_batch(rt, base, served, f"onnx/{rt.engine.kernel_name}")


def test_virtual_tokens_count_against_the_model_maximum(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    prompt = make_peft_kind_adapter(base, str(tmp_path / "prompt"), "prompt", num_labels=2, r=20, seed=8)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("p", prompt)
    long_text = "word " * 120  # fits the tiny base's 128 positions alone, not after 20 virtual tokens
    with pytest.raises(InvalidInputError, match="20 virtual tokens first"):
        rt.classify([("p", long_text)], truncate=False)
    (pred,) = rt.classify([("p", long_text)], truncate=True)
    assert pred.truncated and pred.input_tokens == 128
    # Text pairs: the virtual tokens take token type 0, as PEFT prepends them.
    pairs = [SAMPLE_TEXTS[i + 1] for i in range(4)]
    got = torch.tensor([p.logits for p in rt.classify(
        [ClassifyItem("p", t, q) for t, q in zip(SAMPLE_TEXTS[:4], pairs)])])
    assert (got - peft_logits(base, prompt, SAMPLE_TEXTS[:4], pairs)).abs().max().item() <= TOL


def test_vector_kinds_are_not_merged(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    ia3 = make_peft_kind_adapter(base, str(tmp_path / "ia3"), "ia3", num_labels=2,
                                 targets=["key", "value", "output.dense"], seed=5)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("ia3", ia3)
    with pytest.raises(NotSupportedError, match="served through slots"):
        rt.merge("ia3")
    got = torch.tensor([p.logits for p in rt.classify([("ia3", s) for s in SAMPLE_TEXTS[:3]])])
    assert (got - peft_logits(base, ia3, SAMPLE_TEXTS[:3])).abs().max().item() <= TOL


def test_a_prefix_counts_against_the_model_maximum(tiny_bases, tmp_path):
    """A prefix row's positions start after its prefix (as transformers' past_key_values_length shifts
    them), so its text may take max_length - n positions; a long row still matches PEFT."""
    base = tiny_bases["bert"]
    prefix = make_peft_kind_adapter(base, str(tmp_path / "prefix"), "prefix", num_labels=2, r=20, seed=12, scale=1.0)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("p", prefix)
    assert rt.get_adapter("p").peft_type == "PREFIX_TUNING"
    long_text = "word " * 120
    with pytest.raises(InvalidInputError, match="prefix of 20 positions"):
        rt.classify([("p", long_text)], truncate=False)
    (pred,) = rt.classify([("p", long_text)], truncate=True)
    assert pred.truncated and pred.input_tokens == 108
    cut = rt.base.tokenizer.decode(rt.base.tokenizer(long_text, truncation=True, max_length=108)["input_ids"][1:-1])
    got = torch.tensor([pred.logits])
    assert (got - peft_logits(base, prefix, [cut])).abs().max().item() <= TOL


@pytest.mark.parametrize("token_packing", ["auto", "off"])
def test_prefixes_of_different_lengths_in_one_batch(tiny_bases, tmp_path, token_packing):
    """Rows of two prefix tasks (4 and 7 positions) and a LoRA task in one forward: each row attends to its
    own prefix only (the packed path pads them into one attention call, masking the shorter prefix)."""
    base = tiny_bases["bert"]
    paths = {"p4": make_peft_kind_adapter(base, str(tmp_path / "p4"), "prefix", num_labels=3, r=4, seed=3, scale=1.0),
             "p7": make_peft_kind_adapter(base, str(tmp_path / "p7"), "prefix", num_labels=2, r=7, seed=4, scale=1.0),
             "lora": make_peft_adapter(base, str(tmp_path / "lora"), num_labels=2, r=4, seed=5)}
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, token_packing=token_packing))
    for task, path in paths.items():
        rt.add_adapter(task, path)
    items = [(task, text) for text in SAMPLE_TEXTS for task in paths]
    preds = rt.classify(items)
    for task, path in paths.items():
        got = torch.tensor([p.logits for p, (t, _) in zip(preds, items) if t == task])
        assert (got - peft_logits(base, path, SAMPLE_TEXTS)).abs().max().item() <= TOL, task


def test_vector_kinds_on_the_int8_onnx_graph(tiny_bases, tmp_path):
    """The int8 graph takes the same vector inputs (its LoRA ops are the fp32 graph's, with bf16 slots
    where AMX runs). A random tiny model says nothing about int8 accuracy, so per task and text the int8
    answer must be nearer PEFT's fp32 answer with the adapter's vectors than without them: each row got
    its own slot's vectors. DoRA's norm is taken from the fp32 weights the graph was quantized from."""
    base = tiny_bases["bert"]
    t = FAMILY_TARGETS["bert"]
    adapters = {
        "lora": make_peft_adapter(base, str(tmp_path / "lora"), num_labels=2, r=4, alpha=8, targets=t[:3], seed=1),
        "ia3": make_peft_kind_adapter(base, str(tmp_path / "ia3"), "ia3", num_labels=3, targets=[t[1], t[2]] + FEEDFORWARD["bert"],
                                      scale=3.0, seed=2),
        "dora": make_peft_kind_adapter(base, str(tmp_path / "dora"), "dora", num_labels=2, r=4, alpha=8, targets=t[:4],
                                       scale=1.5, seed=3),
        "beft": make_peft_kind_adapter(base, str(tmp_path / "beft"), "beft", num_labels=2, targets=t, scale=1.5, seed=4),
    }
    rt = Runtime(RuntimeConfig(base_model=base, slots=8, r_max=8, engine="onnx", precision="int8",
                               onnx_dir=str(tmp_path / "onnx8")))
    for task, path in adapters.items():
        rt.add_adapter(task, path)
    items = [(task, text) for text in SAMPLE_TEXTS[:6] for task in adapters]
    got = torch.tensor([p.logits[:2] for p in rt.classify(items)])
    for task in ("ia3", "dora", "beft"):
        rows = [i for i, (k, _) in enumerate(items) if k == task]
        texts = [items[i][1] for i in rows]
        spec = rt.load_spec(adapters[task])
        want = peft_logits(base, adapters[task], texts)[:, :2]
        without = reference_logits(base, dataclasses.replace(spec, vectors={}), texts)[:, :2]
        near, far = (got[rows] - want).abs().amax(1), (got[rows] - without).abs().amax(1)
        assert bool((near < far).all()), f"{task}: int8 {got[rows]} vs with vectors {want}, without {without}"
