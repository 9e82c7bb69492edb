"""bitsandbytes int8 / NF4 bases on the packaged MiniLM (CPU backend of bitsandbytes 0.50):
the slot engine equals PEFT on the same quantized base, and merging is refused."""
import pytest
import torch

from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import NotSupportedError
from adapterserve.runtime.native import lora_kernel
from adapterserve.runtime.runtime import Runtime
from tiny_models import SAMPLE_TEXTS

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

T = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def peft_quantized_logits(base_dir, adapter_dir, precision, num_labels):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    skip = ["pooler", "classifier"]
    q = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip) if precision == "int8" else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                            llm_int8_skip_modules=skip))
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels, quantization_config=q,
                                                               device_map="cpu", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt")).logits[0].float() for t in SAMPLE_TEXTS])


@pytest.fixture(scope="module")
def adapter(minilm_dir, tmp_path_factory):
    from tiny_models import make_peft_adapter

    return make_peft_adapter(minilm_dir, str(tmp_path_factory.mktemp("q") / "a"), num_labels=4, r=8, targets=T,
                             seed=3, scale=0.05)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_base_matches_peft_and_refuses_merge(minilm_dir, adapter, precision):
    rt = Runtime(RuntimeConfig(precision=precision, slots=4, r_max=8))
    linear = rt.engine.layers["encoder.layer.0.attention.self.query"].base
    assert type(linear).__name__ == {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[precision]
    assert type(rt.engine.layers["pooler.dense"].base).__name__ == "Linear"  # kept out of quantization
    rt.add_adapter("t", adapter)
    # One text per forward, like the PEFT oracle: LLM.int8's outlier columns are chosen per batch, so
    # int8 logits depend slightly on what else is in the batch (checked below against fp32 instead).
    got = torch.tensor([rt.classify([("t", t)])[0].logits for t in SAMPLE_TEXTS])
    want = peft_quantized_logits(minilm_dir, adapter, precision, 4)
    assert (got - want).abs().max().item() <= 1e-3
    batched = torch.tensor([p.logits for p in rt.classify([("t", t) for t in SAMPLE_TEXTS])])
    assert (batched - want).abs().max().item() <= 2e-2
    with pytest.raises(NotSupportedError, match=f"cannot merge into a {precision} base"):
        rt.merge("t")


def test_fp16_on_cpu_is_refused_clearly():
    from adapterserve.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Runtime(RuntimeConfig(precision="fp16", device="cpu"))


def test_bf16_on_cpu_matches_peft_on_the_same_bf16_base(minilm_dir, adapter):
    """bf16 on the CPU: bf16 weights, fp32 activations, so the fused kernel and the token-packed
    forward serve it. Oracle: PEFT over the same HF model with the same bf16 linears."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapterserve.runtime.engine.base_model import Bf16Linear, bf16_weights_fp32_activations

    rt = Runtime(RuntimeConfig(precision="bf16", slots=4, r_max=8))
    query = rt.engine.layers["encoder.layer.0.attention.self.query"].base
    assert type(query) is Bf16Linear and query.weight.dtype == torch.bfloat16
    assert rt.base.backbone.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    native = lora_kernel.load() is not None  # where native code is off, the torch path serves it padded
    assert (rt.engine.kernel_name, rt.engine.packed) == (("fused", True) if native else ("torch", False))
    rt.add_adapter("t", adapter)
    got = torch.tensor([p.logits for p in rt.classify([("t", t) for t in SAMPLE_TEXTS])])
    single = torch.tensor([rt.classify([("t", t)])[0].logits for t in SAMPLE_TEXTS])

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=4, dtype=torch.float32)
    bf16_weights_fp32_activations(model.bert)
    model = PeftModel.from_pretrained(model, adapter).eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    with torch.no_grad():
        want = torch.stack([model(**tok(t, return_tensors="pt")).logits[0] for t in SAMPLE_TEXTS])
    # Both round every matmul input to bf16; the fp32 work between them is ordered differently (our
    # varlen attention and LoRA kernel, oneDNN blocking per batch), and a 1e-7 change that crosses a
    # bf16 rounding step moves the next matmul by up to 2^-8 relative. Observed: 8-9e-4 against
    # logits up to 0.16, the same size as bf16 against fp32.
    for ours in (got, single):
        assert ours.dtype == torch.float32 and (ours - want).abs().max().item() <= 2e-3
        assert (ours.argmax(1) == want.argmax(1)).all()

    fp = Runtime(RuntimeConfig(slots=4, r_max=8))
    fp.add_adapter("t", adapter)
    full = torch.tensor([p.logits for p in fp.classify([("t", t) for t in SAMPLE_TEXTS])])
    # The bf16 matmuls are really in effect (fp32 weights would match to ~1e-6), and close to fp32.
    assert 1e-5 < (got - full).abs().max().item() <= 2e-3


# Each kind on a quantized base against PEFT on the same quantized base (PEFT serves LoHa on plain
# linears only, so LoHa's conversion is checked on fp32 bases: tests/component/test_adapter_kinds.py).
# Updates stay small, as for LoRA above: LLM.int8 picks outlier columns by activation value, so a large
# update computed in another order (VeRA folded into A, B) can flip a column near the threshold.
QUANTIZED_KINDS = {"ia3": dict(num_labels=3, targets=["key", "value", "output.dense"], scale=0.3),
                   "vera": dict(num_labels=2, r=8, targets=T[:4], scale=0.05),
                   "lora_bias": dict(num_labels=4, r=4, targets=T[:3], scale=0.05),
                   "prompt": dict(num_labels=2, r=6, scale=0.5),
                   "prefix": dict(num_labels=3, r=5, scale=0.5),
                   "beft": dict(num_labels=2, targets=T, scale=0.05),
                   # PEFT's default LoKr (r 8: rank 128, above r_max, so applied from its Kronecker factors)
                   "lokr": dict(num_labels=3, r=8, alpha=8, targets=T, scale=0.05)}


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_adapter_kinds_on_quantized_bases_match_peft(minilm_dir, tmp_path, precision):
    from adapterserve.runtime.errors import UnsupportedAdapterTypeError
    from tiny_models import make_peft_kind_adapter

    rt = Runtime(RuntimeConfig(precision=precision, slots=8, r_max=8))
    for i, (kind, kw) in enumerate(QUANTIZED_KINDS.items()):
        path = make_peft_kind_adapter(minilm_dir, str(tmp_path / kind), kind, seed=40 + i, **kw)
        rt.add_adapter(kind, path)
        got = torch.tensor([rt.classify([(kind, t)])[0].logits for t in SAMPLE_TEXTS])
        if kind == "lokr" and precision == "nf4":
            # PEFT's LoKr reshapes its update to the base weight's shape, which a packed 4-bit weight is not
            # (it raises): the factors are checked against the same adapter as rank-128 LoRA in a slot,
            # the path the LoRA test above checks against PEFT on this base.
            as_lora = Runtime(RuntimeConfig(precision=precision, slots=2, r_max=128))
            as_lora.add_adapter(kind, path)
            assert as_lora.registry.get(kind).spec.modules and not rt.registry.get(kind).spec.modules
            want = torch.tensor([as_lora.classify([(kind, t)])[0].logits for t in SAMPLE_TEXTS])
        else:
            want = peft_quantized_logits(minilm_dir, path, precision, kw["num_labels"])
        assert (got - want).abs().max().item() <= 1e-3, kind
    dora = make_peft_kind_adapter(minilm_dir, str(tmp_path / "dora"), "dora", num_labels=2, r=4, targets=T[:2], seed=50)
    with pytest.raises(UnsupportedAdapterTypeError, match="quantized base"):
        rt.add_adapter("dora", dora)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_adapterhub_bottleneck_on_quantized_bases_matches_the_adapters_library(minilm_dir, tmp_path, precision):
    """AdapterHub's own model on the same bitsandbytes base (its sublayers' dense layers quantized)."""
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from tiny_models import adapterhub_library, make_adapterhub_bottleneck

    path = make_adapterhub_bottleneck(minilm_dir, str(tmp_path / "hub"), "double_seq_bn", num_labels=3, seed=5,
                                      scale=0.05)
    skip = ["pooler", "classifier", "heads"]
    q = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip) if precision == "int8" else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                            llm_int8_skip_modules=skip))
    model = adapterhub_library().AutoAdapterModel.from_pretrained(minilm_dir, quantization_config=q, device_map="cpu",
                                                                  dtype=torch.float32)
    model.set_active_adapters(model.load_adapter(path, with_head=True, use_safetensors=True))
    model.eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    with torch.no_grad():
        want = torch.stack([model(**tok(t, return_tensors="pt")).logits[0].float() for t in SAMPLE_TEXTS])
    rt = Runtime(RuntimeConfig(precision=precision, slots=4, r_max=8))
    rt.add_adapter("hub", path)
    got = torch.tensor([rt.classify([("hub", t)])[0].logits for t in SAMPLE_TEXTS])
    assert (got - want).abs().max().item() <= 1e-3
    fp32 = Runtime(RuntimeConfig(slots=4, r_max=8))
    fp32.add_adapter("hub", path)
    full = torch.tensor([fp32.classify([("hub", t)])[0].logits for t in SAMPLE_TEXTS])
    assert (got - full).abs().max().item() > 1e-5  # the quantized base is really in effect
