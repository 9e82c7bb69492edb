"""Evaluate a task adapter through the same runtime code path the server uses.

    adapterserve evaluate --adapter adapters/examples/sst2 --data data/sst2/dev.tsv \
        --text-col sentence --label-col label

Prints (and with --out writes) JSON: accuracy, macro-F1, ROC-AUC and PR-AUC (binary tasks), the
confusion matrix, and throughput.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from adapterserve.adapters.tabular import DataError, label_kind, read_examples
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.errors import AdapterServeError
from adapterserve.runtime.runtime import ClassifyItem, Runtime


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="adapterserve evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="PEFT LoRA directory")
    p.add_argument("--data", required=True)
    p.add_argument("--text-col", required=True, help="text column; join several with '+'")
    p.add_argument("--text-pair-col", default=None)
    p.add_argument("--label-col", required=True)
    p.add_argument("--label-base", type=int, default=0, help="index of the first label in integer label files (AG News test: 1)")
    p.add_argument("--base-model", default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p.parse_args(argv)


def gold_indices(examples, labels: list[str], label_base: int) -> list[int]:
    values = [e.label for e in examples]
    if label_kind(values) == "int":
        gold = [int(v) - label_base for v in values]
        bad = [g for g in gold if not 0 <= g < len(labels)]
        if bad:
            raise DataError(f"integer label {bad[0] + label_base} is outside the adapter's {len(labels)} labels "
                            f"(with --label-base {label_base})")
        return gold
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the adapter's labels {labels}")
    return [index[v] for v in values]


def metrics(gold: list[int], probs: np.ndarray, labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, f1_score, roc_auc_score

    pred = probs.argmax(axis=1)
    out = {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro")),
        "labels": labels,
        "confusion_matrix": confusion_matrix(gold, pred, labels=list(range(len(labels)))).tolist(),
    }
    if len(labels) == 2:
        out["roc_auc"] = float(roc_auc_score(gold, probs[:, 1]))
        out["pr_auc"] = float(average_precision_score(gold, probs[:, 1]))
    return out


def evaluate(args) -> dict:
    examples = read_examples(args.data, args.text_col, args.label_col, args.text_pair_col, args.limit)
    rt = Runtime(RuntimeConfig(base_model=args.base_model, precision=args.precision, max_batch_size=args.batch_size))
    info = rt.add_adapter("eval", args.adapter)
    gold = gold_indices(examples, info.labels, args.label_base)
    start = time.perf_counter()
    preds = rt.classify([ClassifyItem("eval", e.text, e.pair) for e in examples])
    elapsed = time.perf_counter() - start
    probs = np.zeros((len(preds), len(info.labels)))
    for i, p in enumerate(preds):
        for s in p.scores:
            probs[i, s.index] = s.score
    report = metrics(gold, probs, info.labels)
    report.update(adapter=args.adapter, data=args.data, adapter_version=info.version, precision=args.precision,
                  seconds=round(elapsed, 2), texts_per_second=round(len(examples) / elapsed, 1))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except (DataError, AdapterServeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
