"""Tiny random encoders and PEFT LoRA adapters built from configs, for component tests (no download).

Adapters get random (non-zero) LoRA A *and* B and a random head, so a test that compares logits
fails if any module, scaling or head is applied wrongly.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertModel,
    DistilBertTokenizerFast,
    RobertaConfig,
    RobertaModel,
    RobertaTokenizerFast,
)

from adapterserve.runtime.config import packaged_base_model_dir

SAMPLE_TEXTS = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's austere locales .",
    "Stocks fell sharply on Wall Street as oil prices climbed to a record high.",
    "The team won the championship after a dramatic overtime goal.",
    "a",
    "NASA launches a new probe to study the outer planets and their moons in unprecedented detail",
    "it 's slow -- very , very slow .",
    "Microsoft releases a security update for Windows",
    "this is a film well worth seeing , talking and singing heads and all .",
]

# IA3's feed-forward modules (PEFT's defaults): their vector scales the input, not the output.
FEEDFORWARD = {"bert": ["output.dense"], "distilbert": ["lin2"], "roberta": ["output.dense"],
               "xlm-roberta": ["output.dense"], "electra": ["output.dense"], "mpnet": ["output.dense"],
               "deberta-v2": ["output.dense"], "modernbert": ["mlp.Wo"]}

_BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
FAMILY_TARGETS = {
    "bert": _BERT_TARGETS + ["pooler.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "roberta": _BERT_TARGETS,
    "xlm-roberta": _BERT_TARGETS,
    "electra": _BERT_TARGETS,
    "mpnet": ["attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense"],
    "modernbert": ["Wqkv", "attn.Wo", "Wi", "mlp.Wo"],
}

# The tiny bases: the three first families, and the encoders added after them (tests/component/test_families.py).
FAMILIES = ("bert", "distilbert", "roberta")
NEW_FAMILIES = ("xlm-roberta", "electra", "mpnet", "deberta-v2", "modernbert", "modernbert-mean")


def model_type(base_dir: str) -> str:
    with open(os.path.join(base_dir, "config.json")) as fh:
        return json.load(fh)["model_type"]


def modules_to_save(base_dir: str) -> list[str]:
    """The head modules an adapter of this base saves (DeBERTa's pooler, ModernBERT's head besides the
    classifier): adapterserve.runtime.families' table, which the train command uses too."""
    from adapterserve.runtime.families import family_for

    return list(family_for(model_type(base_dir)).modules_to_save)


def _bpe_tokenizer(out_dir: str) -> RobertaTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.train_from_iterator(SAMPLE_TEXTS * 3, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    fast = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                model_max_length=128)
    return fast


def _unigram_tokenizer() -> "XLMRobertaTokenizerFast":
    """An XLM-R style SentencePiece unigram tokenizer (<s>=0, <pad>=1, </s>=2, <unk>=3), as XLM-R's own."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import XLMRobertaTokenizerFast

    tok = SentencePieceUnigramTokenizer()
    tok.train_from_iterator(SAMPLE_TEXTS * 3, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            unk_token="<unk>")
    inner = tok._tokenizer
    inner.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", inner.token_to_id("<s>")), ("</s>", inner.token_to_id("</s>"))])
    return XLMRobertaTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=128)


def _mpnet_vocab(out_dir: str, vocab: str) -> str:
    """MiniLM's WordPiece vocabulary with MPNet's special tokens in the first unused entries; <pad> at id 1,
    MPNet's padding index (its position ids count from it)."""
    with open(vocab) as fh:
        lines = fh.read().splitlines()
    lines[1:5] = ["<pad>", "<s>", "</s>", "<mask>"]
    path = os.path.join(out_dir, "mpnet_vocab.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _randomize_norms(model: torch.nn.Module) -> None:
    """LayerNorm weights start at 1: randomize them, so a head norm read from the wrong place shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))


def make_tiny_base(family: str, out_dir: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    vocab = os.path.join(packaged_base_model_dir(), "vocab.txt")
    if family in NEW_FAMILIES:
        return _make_new_family_base(family, out_dir, vocab)
    if family == "bert":
        tokenizer = BertTokenizerFast(vocab_file=vocab, do_lower_case=True, model_max_length=128)
        model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128))
    elif family == "distilbert":
        tokenizer = DistilBertTokenizerFast(vocab_file=vocab, do_lower_case=True, model_max_length=128)
        model = DistilBertModel(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4,
                                                 hidden_dim=64, max_position_embeddings=128))
    elif family == "roberta":
        tokenizer = _bpe_tokenizer(out_dir)
        model = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=130,
                                           pad_token_id=1, bos_token_id=0, eos_token_id=2), add_pooling_layer=False)
    else:
        raise ValueError(family)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _make_new_family_base(family: str, out_dir: str, vocab: str) -> str:
    from transformers import (DebertaV2Config, DebertaV2Model, ElectraConfig, ElectraModel, ElectraTokenizerFast,
                              ModernBertConfig, ModernBertForMaskedLM, MPNetConfig, MPNetModel, MPNetTokenizerFast,
                              PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel)

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if family == "xlm-roberta":
        tokenizer = _unigram_tokenizer()
        model = XLMRobertaModel(XLMRobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=130, pad_token_id=1,
                                                 bos_token_id=0, eos_token_id=2, **sizes), add_pooling_layer=False)
    elif family == "electra":
        tokenizer = ElectraTokenizerFast(vocab_file=vocab, do_lower_case=True, model_max_length=128)
        # ELECTRA-small's shape: embeddings narrower than the hidden size, projected up.
        model = ElectraModel(ElectraConfig(vocab_size=tokenizer.vocab_size, embedding_size=16, max_position_embeddings=128,
                                           **sizes))
    elif family == "mpnet":
        tokenizer = MPNetTokenizerFast(vocab_file=_mpnet_vocab(out_dir, vocab), do_lower_case=True, unk_token="[UNK]",
                                       model_max_length=128)
        model = MPNetModel(MPNetConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=130, pad_token_id=1,
                                       **sizes), add_pooling_layer=False)
    elif family == "deberta-v2":
        # DeBERTa-v3's settings: relative positions only, disentangled c2p/p2c attention, no token types; a
        # masked-LM checkpoint (no pooler): adapters carry their pooler (modules_to_save).
        tokenizer = BertTokenizerFast(vocab_file=vocab, do_lower_case=True, model_max_length=128)
        model = DebertaV2Model(DebertaV2Config(
            vocab_size=tokenizer.vocab_size, max_position_embeddings=128, relative_attention=True, position_buckets=16,
            max_relative_positions=-1, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
            position_biased_input=False, type_vocab_size=0, **sizes))
    else:  # modernbert, modernbert-mean: a masked-LM checkpoint, so the base holds the prediction head
        tokenizer = BertTokenizerFast(vocab_file=vocab, do_lower_case=True, model_max_length=256,
                                      model_input_names=["input_ids", "attention_mask"])
        mean = family == "modernbert-mean"
        # A local window of 8 tokens on every other layer: the sample texts are longer, so it matters.
        model = ModernBertForMaskedLM(ModernBertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=256, local_attention=8, global_attn_every_n_layers=2,
            pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102,
            classifier_pooling="mean" if mean else "cls", classifier_bias=mean, norm_bias=mean,
            classifier_activation="silu" if mean else "gelu"))
        _randomize_norms(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_peft_adapter(base_dir: str, out_dir: str, *, num_labels: int, r: int = 4, alpha: float = 8,
                      targets: Optional[list[str]] = None, seed: int = 0, use_rslora: bool = False,
                      rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                      labels: Optional[list[str]] = None, scale: float = 0.2,
                      head_modules: Optional[list[str]] = None) -> str:
    """Save a PEFT LoRA SEQ_CLS adapter with random weights via PEFT's own save_pretrained. head_modules:
    its modules_to_save (default: the family's whole head, modules_to_save())."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    family = model.config.model_type
    saved = modules_to_save(base_dir) if head_modules is None else head_modules
    config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=targets or FAMILY_TARGETS[family][:2],
                        use_rslora=use_rslora, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                        modules_to_save=saved)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(out_dir)
    if labels is not None:
        with open(os.path.join(out_dir, "labels.json"), "w") as fh:
            json.dump(labels, fh)
    return out_dir


_ORACLE_ANSWERS: dict = {}


def peft_logits(base_dir: str, adapter_dir: str, texts: list[str], pairs: Optional[list[str]] = None) -> torch.Tensor:
    """The oracle: PEFT's own model on the adapter directory, one text at a time (no padding effects);
    for an AdapterHub directory, the `adapters` library's model (adapterhub_logits). Answers are kept
    per base, adapter files as they are now (names, sizes, mtimes) and texts: a test comparing several
    engine paths against the same adapters asks the library once."""
    stamp = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(adapter_dir)))
    key = (base_dir, adapter_dir, stamp, tuple(texts), tuple(pairs) if pairs else None)
    if key not in _ORACLE_ANSWERS:
        _ORACLE_ANSWERS[key] = _library_logits(base_dir, adapter_dir, texts, pairs)
    return _ORACLE_ANSWERS[key].clone()


def _library_logits(base_dir: str, adapter_dir: str, texts: list[str], pairs: Optional[list[str]]) -> torch.Tensor:
    from peft import PeftModel

    if os.path.isfile(os.path.join(adapter_dir, "adapter.safetensors")):
        assert pairs is None
        return adapterhub_logits(base_dir, adapter_dir, texts)
    from transformers import AutoTokenizer

    from safetensors.torch import load_file

    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    out_key = next(k for k in weights if k.endswith("classifier.weight") or k.endswith("out_proj.weight"))
    num_labels = weights[out_key].shape[0]
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = []
    with torch.no_grad():
        for i, t in enumerate(texts):
            enc = tok(t, pairs[i] if pairs else None, return_tensors="pt", truncation=True)
            if model.peft_type == "PREFIX_TUNING" and model.config.model_type != "bert":
                rows.append(_prefix_backbone_logits(model, enc)[0])
            else:
                rows.append(model(**enc).logits[0])
    return torch.stack(rows)


def _prefix_backbone_logits(model, enc) -> torch.Tensor:
    """PEFT's prefix forward where PeftModel's own stops short: PEFT 0.21 hands RoBERTa's, XLM-R's and
    ELECTRA's heads the cache in place of the features. The same steps as its _prefix_tuning_forward
    (get_prompt's past_key_values, an all-ones prefix mask before the row's) through the backbone, then
    the task's head on the backbone's output, as the transformers model's own forward does."""
    n = model.active_peft_config.num_virtual_tokens
    inner = model.base_model
    backbone = getattr(inner, inner.base_model_prefix)
    mask = torch.cat([torch.ones(1, n, dtype=enc["attention_mask"].dtype), enc["attention_mask"]], dim=1)
    out = backbone(**{**enc, "attention_mask": mask}, past_key_values=model.get_prompt(1))
    return inner.classifier(out.last_hidden_state)


def make_peft_kind_adapter(base_dir: str, out_dir: str, kind: str, *, num_labels: int, r: int = 4,
                           alpha: float = 8, targets: Optional[list[str]] = None, seed: int = 0,
                           rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                           scale: float = 0.2, feedforward: Optional[list[str]] = None) -> str:
    """Save a PEFT SEQ_CLS adapter of another kind ("loha", "lokr", "vera", "ia3", "dora", "lora_bias", "adalora", "prompt",
    "p_tuning", "prefix", "beft"; r is the virtual token count of prompt, p_tuning and prefix; feedforward: IA3's
    input-scaled modules, PEFT's defaults for the family unless given) with random
    weights via PEFT's own save_pretrained: every trainable tensor (and VeRA's shared projections)
    randomized, so a wrong conversion, scaling or slice shows in the logits. IA3 vectors and DoRA
    magnitudes are randomized around their neutral values (1, the weight norm)."""
    from peft import (AdaLoraConfig, BeftConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig,
                      PromptEncoderConfig, PromptTuningConfig, VeraConfig, get_peft_model)

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    family = model.config.model_type
    saved = dict(modules_to_save=modules_to_save(base_dir))
    targets = targets or FAMILY_TARGETS[family][:2]
    if kind == "loha":
        config = LoHaConfig(task_type="SEQ_CLS", r=r, alpha=alpha, target_modules=targets,
                            rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, **saved)
    elif kind == "lokr":
        config = LoKrConfig(task_type="SEQ_CLS", r=r, alpha=alpha, target_modules=targets,
                            rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, **saved)
    elif kind == "vera":
        config = VeraConfig(task_type="SEQ_CLS", r=r, target_modules=targets, projection_prng_key=seed, **saved)
    elif kind == "ia3":
        if feedforward is None:
            feedforward = [t for t in targets if t in FEEDFORWARD[family]]
        config = IA3Config(task_type="SEQ_CLS", target_modules=targets, feedforward_modules=feedforward, **saved)
    elif kind == "adalora":
        config = AdaLoraConfig(task_type="SEQ_CLS", init_r=r, target_r=max(1, r // 2), lora_alpha=alpha,
                               target_modules=targets, total_step=10, **saved)
    elif kind in ("prompt", "p_tuning"):
        # DistilBERT's config names its sizes differently: PEFT needs them spelled out.
        dims = {} if family != "distilbert" else dict(token_dim=model.config.dim, num_transformer_submodules=1,
                                                       num_attention_heads=model.config.n_heads,
                                                       num_layers=model.config.n_layers)
        if family == "electra":  # virtual tokens enter below ELECTRA's embedding projection
            dims = dict(token_dim=model.config.embedding_size)
        config = (PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=r, **dims, **saved) if kind == "prompt" else
                  PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=r, encoder_hidden_size=16, **dims, **saved))
    elif kind == "beft":
        config = BeftConfig(task_type="SEQ_CLS", target_modules=targets, **saved)
    elif kind == "prefix":
        dims = {} if family != "distilbert" else dict(token_dim=model.config.dim, num_attention_heads=model.config.n_heads,
                                                       num_layers=model.config.n_layers)
        config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=r, **dims, **saved)
    elif kind in ("dora", "lora_bias"):
        config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=targets,
                            use_dora=kind == "dora", bias="lora_only" if kind == "lora_bias" else "none", **saved)
    else:
        raise ValueError(kind)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "ia3_l" in name:
                p.mul_(1 + torch.randn_like(p) * scale)
            elif any(k in name for k in ("hada_", "lokr_", "vera_lambda", "modules_to_save", "lora_A", "lora_B", "lora_E",
                                         "base_layer.bias", "prompt_encoder", "beft_bias")):
                p.copy_(torch.randn_like(p) * scale)
        for name, buf in peft_model.named_buffers():  # VeRA's shared projections are buffers
            if "vera_A" in name or "vera_B" in name:
                buf.copy_(torch.randn_like(buf) * 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_adapterhub_bottleneck(base_dir: str, out_dir: str, config: str = "seq_bn", *, num_labels: int = 3,
                               seed: int = 0, scale: float = 0.3, head_layers: int = 2, use_pooler: bool = False,
                               **options) -> str:
    """Save an AdapterHub (`adapters` library) bottleneck adapter with its classification head, every
    weight random (the library starts adapter_up at zero, which would hide a wrong up-projection), as
    save_adapter(..., with_head=True, use_safetensors=True) writes it. config: "seq_bn" (Pfeiffer),
    "double_seq_bn" (Houlsby) or "par_bn"; options: BnConfig fields (reduction_factor, ln_before, ...)."""
    adapters = adapterhub_library()
    AutoAdapterModel = adapters.AutoAdapterModel
    DoubleSeqBnConfig, ParBnConfig, SeqBnConfig = adapters.DoubleSeqBnConfig, adapters.ParBnConfig, adapters.SeqBnConfig

    torch.manual_seed(seed)
    model = AutoAdapterModel.from_pretrained(base_dir)
    bn = {"seq_bn": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig, "par_bn": ParBnConfig}[config](**options)
    model.add_adapter("task", config=bn)
    model.add_classification_head("task", num_labels=num_labels, layers=head_layers, use_pooler=use_pooler)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters.task." in name or name.startswith("heads.task."):
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1 + torch.randn_like(p) * scale)
                else:
                    p.copy_(torch.randn_like(p) * scale)
    os.makedirs(out_dir, exist_ok=True)  # save_adapter makes the last directory only
    model.save_adapter(out_dir, "task", with_head=True, use_safetensors=True)
    return out_dir


def adapterhub_library():
    from adapterserve.adapters.bottleneck import adapterhub_library as library

    return library()


def adapterhub_logits(base_dir: str, adapter_dir: str, texts: list[str]) -> torch.Tensor:
    """The oracle for bottleneck adapters: the `adapters` library's own model with the saved adapter and
    head loaded and active, one text at a time."""
    from transformers import AutoTokenizer

    model = adapterhub_library().AutoAdapterModel.from_pretrained(base_dir)
    name = model.load_adapter(adapter_dir, with_head=True, use_safetensors=True)
    model.set_active_adapters(name)
    model.eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt", truncation=True)).logits[0] for t in texts])
