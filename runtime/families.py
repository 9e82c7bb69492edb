"""What differs between encoder families, as table entries: where the backbone sits inside a
*ForSequenceClassification model, which tensors make up its classification head, how the backbone's
output is pooled into the head's features, and how the head turns them into logits.

The head functions mirror transformers' *ForSequenceClassification heads in eval mode (dropout is the
identity), so a PEFT adapter's saved head gives the same logits here as in PEFT. Heads whose form
depends on the base's config (ModernBERT's activation, biases and pooling; DeBERTa's pooler
activation) are bound to it by `family_for(config)`.

Some head tensors belong to the base checkpoint rather than to each task (`base_head`): ModernBERT's
`head` (dense + norm) comes with its masked-LM checkpoint and PEFT's SEQ_CLS adapters save only the
classifier; an adapter that lacks them gets the base's, as PEFT does when it loads the base.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from adapterserve.runtime.errors import BaseMismatchError

HeadFn = Callable[[dict, torch.Tensor], torch.Tensor]


def _bert_head(head: dict, pooled: torch.Tensor) -> torch.Tensor:
    return F.linear(pooled, head["classifier.weight"], head["classifier.bias"])


def _distilbert_head(head: dict, cls_hidden: torch.Tensor) -> torch.Tensor:
    x = F.relu(F.linear(cls_hidden, head["pre_classifier.weight"], head["pre_classifier.bias"]))
    return F.linear(x, head["classifier.weight"], head["classifier.bias"])


def _dense_out_proj_head(activation: Callable) -> HeadFn:
    """RobertaClassificationHead, MPNetClassificationHead (tanh) and ElectraClassificationHead (gelu)."""
    def head_fn(head: dict, cls_hidden: torch.Tensor) -> torch.Tensor:
        x = activation(F.linear(cls_hidden, head["classifier.dense.weight"], head["classifier.dense.bias"]))
        return F.linear(x, head["classifier.out_proj.weight"], head["classifier.out_proj.bias"])
    return head_fn


def _deberta_head(activation: Callable) -> HeadFn:
    """DeBERTa's ContextPooler (dense + pooler_hidden_act over the first token), then its classifier."""
    def head_fn(head: dict, cls_hidden: torch.Tensor) -> torch.Tensor:
        x = activation(F.linear(cls_hidden, head["pooler.dense.weight"], head["pooler.dense.bias"]))
        return F.linear(x, head["classifier.weight"], head["classifier.bias"])
    return head_fn


def _modernbert_head(activation: Callable, eps: float) -> HeadFn:
    """ModernBertPredictionHead (dense, activation, LayerNorm; biases as the config says), then the classifier."""
    def head_fn(head: dict, pooled: torch.Tensor) -> torch.Tensor:
        x = activation(F.linear(pooled, head["head.dense.weight"], head.get("head.dense.bias")))
        x = F.layer_norm(x, (x.shape[-1],), head["head.norm.weight"], head.get("head.norm.bias"), eps)
        return F.linear(x, head["classifier.weight"], head["classifier.bias"])
    return head_fn


_DENSE_OUT_PROJ = (
    ("classifier.dense.weight", ("H", "H")),
    ("classifier.dense.bias", ("H",)),
    ("classifier.out_proj.weight", ("N", "H")),
    ("classifier.out_proj.bias", ("N",)),
)
_CLASSIFIER = (("classifier.weight", ("N", "H")), ("classifier.bias", ("N",)))
_BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


@dataclass(frozen=True)
class Family:
    name: str
    # Attribute name of the backbone inside *ForSequenceClassification (PEFT keys carry it).
    backbone_prefix: str
    # How the backbone's output becomes the head's features: "pooler" (BERT's dense + tanh over [CLS],
    # part of the backbone), "cls" (the first token's hidden state) or "mean" (over the row's tokens).
    pooling: str
    # Head tensors an adapter must carry, as (name, shape) with H = hidden size and N = labels.
    head_tensors: tuple[tuple[str, tuple[str, ...]], ...]
    # Name of the tensor whose first dimension is the label count.
    label_tensor: str
    apply_head: HeadFn
    # Linear layer suffixes a training run targets by default (attention + feed-forward).
    default_targets: tuple[str, ...]
    # Of those, the feed-forward output layers: IA3 scales their input rather than their output.
    feedforward_targets: tuple[str, ...]
    # (weight, bias) names where the whole head is one linear layer (logits = W x + b); None otherwise.
    # Such heads of a mixed GPU batch run as one batched matmul (heads._stacked_logits).
    linear_head: Optional[tuple[str, str]] = None
    # Head tensors the base checkpoint supplies to adapters that do not carry them (module docstring).
    base_head: tuple[str, ...] = ()
    # Head modules PEFT must save beside the classifier (modules_to_save) for an adapter to be complete.
    modules_to_save: tuple[str, ...] = ("classifier",)
    # Position ids start after the padding index (RoBERTa, MPNet): two positions fewer for text.
    positions_after_padding: bool = False
    # The model types served by this entry (a family's siblings share everything above).
    model_types: tuple[str, ...] = ()
    # Which token-packed forward serves it where packing applies: "bert" (BERT-shaped encoder layers,
    # torch_engine._encode_packed) or "modernbert" (runtime/engine/modernbert.py).
    packed_forward: str = "bert"
    # Why the shared-base ONNX graph (runtime/engine/onnx) cannot serve this family; None: it can.
    no_shared_onnx: Optional[str] = None

    @property
    def uses_pooler(self) -> bool:
        return self.pooling == "pooler"


BERT = Family(
    name="bert",
    backbone_prefix="bert",
    pooling="pooler",
    head_tensors=_CLASSIFIER,
    label_tensor="classifier.weight",
    apply_head=_bert_head,
    default_targets=_BERT_TARGETS,
    feedforward_targets=("output.dense",),
    linear_head=("classifier.weight", "classifier.bias"),
    model_types=("bert",),
)

DISTILBERT = Family(
    name="distilbert",
    backbone_prefix="distilbert",
    pooling="cls",
    head_tensors=(
        ("pre_classifier.weight", ("H", "H")),
        ("pre_classifier.bias", ("H",)),
        *_CLASSIFIER,
    ),
    label_tensor="classifier.weight",
    apply_head=_distilbert_head,
    default_targets=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    feedforward_targets=("lin2",),
    modules_to_save=("pre_classifier", "classifier"),
    model_types=("distilbert",),
)

ROBERTA = Family(
    name="roberta",
    backbone_prefix="roberta",
    pooling="cls",
    head_tensors=_DENSE_OUT_PROJ,
    label_tensor="classifier.out_proj.weight",
    apply_head=_dense_out_proj_head(torch.tanh),
    default_targets=_BERT_TARGETS,
    feedforward_targets=("output.dense",),
    positions_after_padding=True,
    model_types=("roberta", "xlm-roberta", "camembert"),
)

ELECTRA = Family(
    name="electra",
    backbone_prefix="electra",
    pooling="cls",
    head_tensors=_DENSE_OUT_PROJ,
    label_tensor="classifier.out_proj.weight",
    apply_head=_dense_out_proj_head(ACT2FN["gelu"]),
    default_targets=_BERT_TARGETS,
    feedforward_targets=("output.dense",),
    model_types=("electra",),
    no_shared_onnx="its embedding projection (embedding_size -> hidden_size) is not in the shared graph's export, "
                   "and the export is tested against PEFT for BERT, DistilBERT and RoBERTa/XLM-R only",
)

MPNET = Family(
    name="mpnet",
    backbone_prefix="mpnet",
    pooling="cls",
    head_tensors=_DENSE_OUT_PROJ,
    label_tensor="classifier.out_proj.weight",
    apply_head=_dense_out_proj_head(torch.tanh),
    default_targets=("attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"),
    feedforward_targets=("output.dense",),
    positions_after_padding=True,
    model_types=("mpnet",),
    no_shared_onnx="its relative position bias is not in the shared graph's attention (ours or ORT's fused one)",
)

DEBERTA_V2 = Family(
    name="deberta-v2",
    backbone_prefix="deberta",
    pooling="cls",
    head_tensors=(("pooler.dense.weight", ("H", "H")), ("pooler.dense.bias", ("H",)), *_CLASSIFIER),
    label_tensor="classifier.weight",
    apply_head=_deberta_head(ACT2FN["gelu"]),  # bound to the config's pooler_hidden_act by family_for
    default_targets=("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                     "output.dense"),
    feedforward_targets=("output.dense",),
    base_head=("pooler.dense.weight", "pooler.dense.bias"),
    modules_to_save=("pooler", "classifier"),
    model_types=("deberta-v2",),
    no_shared_onnx="its disentangled attention projects the shared relative positions through each row's adapter "
                   "(runtime/engine/deberta.py), which the shared graph has no per-row input for",
)

MODERNBERT = Family(
    name="modernbert",
    backbone_prefix="model",
    pooling="cls",  # or "mean": the config's classifier_pooling, bound by family_for
    head_tensors=(("head.dense.weight", ("H", "H")), ("head.norm.weight", ("H",)), *_CLASSIFIER),
    label_tensor="classifier.weight",
    apply_head=_modernbert_head(ACT2FN["gelu"], 1e-5),
    default_targets=("Wqkv", "attn.Wo", "Wi", "mlp.Wo"),
    feedforward_targets=("mlp.Wo",),
    base_head=("head.dense.weight", "head.dense.bias", "head.norm.weight", "head.norm.bias"),
    modules_to_save=("head", "classifier"),
    model_types=("modernbert",),
    packed_forward="modernbert",
    no_shared_onnx="its rotary positions, alternating local/global attention and gated MLP are not in the shared "
                   "graph's export (our attention op is global and absolute-position only)",
)

FAMILIES = (BERT, DISTILBERT, ROBERTA, ELECTRA, MPNET, DEBERTA_V2, MODERNBERT)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def _bind_to_config(family: Family, config: Any) -> Family:
    """The entry with what the base's own config decides filled in."""
    if family is DEBERTA_V2:
        return replace(family, apply_head=_deberta_head(ACT2FN[getattr(config, "pooler_hidden_act", "gelu")]))
    if family is MODERNBERT:
        pooling = getattr(config, "classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise BaseMismatchError(f"ModernBERT classifier_pooling {pooling!r} is not served; cls and mean are")
        tensors = [("head.dense.weight", ("H", "H"))]
        if getattr(config, "classifier_bias", False):
            tensors.append(("head.dense.bias", ("H",)))
        tensors.append(("head.norm.weight", ("H",)))
        if getattr(config, "norm_bias", False):
            tensors.append(("head.norm.bias", ("H",)))
        head = _modernbert_head(ACT2FN[getattr(config, "classifier_activation", "gelu")],
                                float(getattr(config, "norm_eps", 1e-5)))
        return replace(family, pooling=pooling, head_tensors=(*tensors, *_CLASSIFIER), apply_head=head,
                       base_head=tuple(n for n, _ in tensors))
    return family


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(config: Any) -> Family:
    """The family of a base, from its Hugging Face config (or its model_type string, for the parts
    that do not depend on the config)."""
    model_type = config if isinstance(config, str) else config.model_type
    try:
        family = _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise BaseMismatchError(
            f"base model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None
    return family if isinstance(config, str) else _bind_to_config(family, config)
