"""What differs between encoder families: where the backbone sits inside a *ForSequenceClassification
model, which tensors make up its classification head, and how the head turns hidden states into logits.

The head functions mirror transformers' BertForSequenceClassification, DistilBertForSequenceClassification
and RobertaClassificationHead in eval mode (dropout is the identity), so a PEFT adapter's saved head gives
the same logits here as in PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from adapterserve.runtime.errors import BaseMismatchError

HeadFn = Callable[[dict, torch.Tensor], torch.Tensor]


def _bert_head(head: dict, pooled: torch.Tensor) -> torch.Tensor:
    return F.linear(pooled, head["classifier.weight"], head["classifier.bias"])


def _distilbert_head(head: dict, cls_hidden: torch.Tensor) -> torch.Tensor:
    x = F.relu(F.linear(cls_hidden, head["pre_classifier.weight"], head["pre_classifier.bias"]))
    return F.linear(x, head["classifier.weight"], head["classifier.bias"])


def _roberta_head(head: dict, cls_hidden: torch.Tensor) -> torch.Tensor:
    x = torch.tanh(F.linear(cls_hidden, head["classifier.dense.weight"], head["classifier.dense.bias"]))
    return F.linear(x, head["classifier.out_proj.weight"], head["classifier.out_proj.bias"])


@dataclass(frozen=True)
class Family:
    name: str
    # Attribute name of the backbone inside *ForSequenceClassification (PEFT keys carry it).
    backbone_prefix: str
    # BERT classifies from the pooler output (dense+tanh over [CLS]); the others from raw [CLS].
    uses_pooler: bool
    # Head tensors an adapter must carry, as (name, shape) with H = hidden size and N = labels.
    head_tensors: tuple[tuple[str, tuple[str, ...]], ...]
    # Name of the tensor whose first dimension is the label count.
    label_tensor: str
    apply_head: HeadFn
    # Linear layer suffixes a training run targets by default (attention + feed-forward).
    default_targets: tuple[str, ...]
    # (weight, bias) names where the whole head is one linear layer (logits = W x + b); None otherwise.
    # Such heads of a mixed GPU batch run as one batched matmul (heads._stacked_logits).
    linear_head: Optional[tuple[str, str]] = None


BERT = Family(
    name="bert",
    backbone_prefix="bert",
    uses_pooler=True,
    head_tensors=(("classifier.weight", ("N", "H")), ("classifier.bias", ("N",))),
    label_tensor="classifier.weight",
    apply_head=_bert_head,
    default_targets=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    linear_head=("classifier.weight", "classifier.bias"),
)

DISTILBERT = Family(
    name="distilbert",
    backbone_prefix="distilbert",
    uses_pooler=False,
    head_tensors=(
        ("pre_classifier.weight", ("H", "H")),
        ("pre_classifier.bias", ("H",)),
        ("classifier.weight", ("N", "H")),
        ("classifier.bias", ("N",)),
    ),
    label_tensor="classifier.weight",
    apply_head=_distilbert_head,
    default_targets=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
)

ROBERTA = Family(
    name="roberta",
    backbone_prefix="roberta",
    uses_pooler=False,
    head_tensors=(
        ("classifier.dense.weight", ("H", "H")),
        ("classifier.dense.bias", ("H",)),
        ("classifier.out_proj.weight", ("N", "H")),
        ("classifier.out_proj.bias", ("N",)),
    ),
    label_tensor="classifier.out_proj.weight",
    apply_head=_roberta_head,
    default_targets=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
)

_BY_MODEL_TYPE = {
    "bert": BERT,
    "distilbert": DISTILBERT,
    "roberta": ROBERTA,
    "xlm-roberta": ROBERTA,
    "camembert": ROBERTA,
}


def family_for(model_type: str) -> Family:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise BaseMismatchError(
            f"base model type {model_type!r} is not supported; supported: {', '.join(sorted(_BY_MODEL_TYPE))}"
        ) from None
