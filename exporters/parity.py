"""Parity of an exported model against torch on real texts: max |dlogit| and argmax agreement."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np


# The parity check's texts where none are given: short and long, several domains, a pair of
# near-duplicates, non-ASCII, so padding, truncation-free lengths and tokenization all get exercised.
SAMPLE_TEXTS = [
    "a charming and often affecting journey", "unflinchingly bleak and desperate", "it's a lovely film with lovely performances",
    "the plot is nothing but boilerplate cliches from start to finish", "an utterly incompetent conclusion",
    "Stocks fell sharply on Wall Street as oil prices climbed to a record high.",
    "The home team scored twice in extra time to win the championship final.",
    "Researchers unveiled a chip that trains neural networks at a fraction of the power.",
    "Leaders met in Geneva to discuss the ceasefire and humanitarian corridors.",
    "ok", "not bad at all", "not good at all", "Crème brûlée, naïve café — déjà vu!",
    "A " + "very " * 40 + "long sentence that keeps going to test longer sequences in the batch.",
]

def task_model_parity(export_dir: str, adapter_dir: str, texts: list[str], base_model: Optional[str] = None,
                      batch_size: int = 32) -> dict:
    from adapterserve.runtime.config import RuntimeConfig
    from adapterserve.runtime.engine.onnx.engine import open_session
    from adapterserve.runtime.runtime import Runtime

    rt = Runtime(RuntimeConfig(base_model=base_model, slots=2, r_max=512))
    rt.add_adapter("t", adapter_dir)
    torch_logits = np.array([p.logits for p in rt.classify([("t", t) for t in texts])])
    session = open_session(os.path.join(export_dir, "model.onnx"))
    wanted = {i.name for i in session.get_inputs()}
    out = []
    for i in range(0, len(texts), batch_size):
        enc = rt.base.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=rt.base.max_length,
                                return_tensors="np")
        out.append(session.run(None, {k: v.astype(np.int64) for k, v in enc.items() if k in wanted})[0])
    onnx_logits = np.concatenate(out).astype(np.float32)
    return _report(torch_logits, onnx_logits)


def _report(reference: np.ndarray, candidate: np.ndarray) -> dict:
    return {
        "texts": int(reference.shape[0]),
        "max_abs_dlogit": float(np.abs(reference - candidate).max()),
        "argmax_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean()),
    }


def print_report(name: str, report: dict) -> None:
    print(f"{name}: {json.dumps(report)}")
