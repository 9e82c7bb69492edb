"""The training CLI on a tiny random model: PEFT and our runtime load what it writes and agree; the
same seed gives the same bytes; bad input exits non-zero with a message."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adapterserve.adapters.evaluate import main as evaluate_main
from adapterserve.adapters.train import main as train_main
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime
from tiny_models import SAMPLE_TEXTS, peft_logits


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    rows = [(SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] + f" {i}", ["neg", "pos", "mid"][i % 3]) for i in range(80)]
    return write_csv(d / "train.csv", rows), d


def train(base, data_path, out, *extra):
    return train_main(["--base-model", base, "--data", data_path, "--text-col", "text", "--label-col", "label",
                       "--limit", "64", "--max-steps", "4", "--batch-size", "16", "--rank", "4", "--seed", "3",
                       "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "electra", "mpnet", "deberta-v2", "modernbert",
                                    "xlm-roberta"])
def test_trained_adapter_loads_in_peft_and_runtime_identically(tiny_bases, new_family_bases, data, family):
    data_path, d = data
    base = {**tiny_bases, **new_family_bases}[family]
    out = d / f"out_{family}"
    assert train(base, data_path, out) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json"} <= set(os.listdir(out))
    assert not any(n.endswith(".bin") for n in os.listdir(out))
    assert json.load(open(out / "labels.json")) == ["mid", "neg", "pos"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    info = rt.add_adapter("t", str(out))
    assert info.labels == ["mid", "neg", "pos"] and info.rank == 4
    saved = load_file(str(out / "adapter_model.safetensors"))
    # The family's whole head is trained and saved (DeBERTa's pooler, ModernBERT's head).
    for module in rt.base.family.modules_to_save:
        assert any(k.startswith(f"base_model.model.{module}.") for k in saved), module
    got = torch.tensor([p.logits for p in rt.classify([("t", t) for t in SAMPLE_TEXTS])])
    want = peft_logits(base, str(out), SAMPLE_TEXTS)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ["dora", "lora_bias", "bitfit", "loha", "lokr", "vera", "adalora", "ia3", "prompt",
                                    "p_tuning", "prefix", "bottleneck"])
def test_every_served_method_trains_and_serves_as_peft_does(tiny_bases, data, method):
    data_path, d = data
    base = tiny_bases["bert"]
    out = d / f"out_{method}"
    assert train(base, data_path, out, "--method", method, "--rank", "2", "--lr", "5e-2", "--virtual-tokens", "4") == 0
    config = json.load(open(out / "adapter_config.json"))
    if method == "bottleneck":  # AdapterHub's directory: its config nests the BnConfig, no peft_type
        config = {"peft_type": "BOTTLENECK" if config["config"]["reduction_factor"] == 16 else None}
    assert config["peft_type"] == {"loha": "LOHA", "lokr": "LOKR", "vera": "VERA", "ia3": "IA3", "adalora": "ADALORA",
                                   "prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix": "PREFIX_TUNING",
                                   "bitfit": "BEFT", "bottleneck": "BOTTLENECK"}.get(method, "LORA")
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("t", str(out))
    got = torch.tensor([p.logits for p in rt.classify([("t", t) for t in SAMPLE_TEXTS])])
    want = peft_logits(base, str(out), SAMPLE_TEXTS)
    assert (got - want).abs().max().item() <= 1e-4


def test_same_seed_same_bytes(tiny_bases, data):
    data_path, d = data
    base = tiny_bases["bert"]
    assert train(base, data_path, d / "s1") == 0
    assert train(base, data_path, d / "s2") == 0
    a = open(d / "s1" / "adapter_model.safetensors", "rb").read()
    b = open(d / "s2" / "adapter_model.safetensors", "rb").read()
    assert a == b


def test_evaluate_cli_reports_metrics(tiny_bases, data, tmp_path, capsys):
    data_path, d = data
    base = tiny_bases["bert"]
    assert train(base, data_path, d / "ev") == 0
    out = tmp_path / "report.json"
    assert evaluate_main(["--adapter", str(d / "ev"), "--base-model", base, "--data", data_path, "--text-col", "text",
                          "--label-col", "label", "--out", str(out)]) == 0
    report = json.load(open(out))
    assert report["n"] == 80 and 0 <= report["accuracy"] <= 1 and 0 <= report["macro_f1"] <= 1
    assert sum(map(sum, report["confusion_matrix"])) == 80
    assert "roc_auc" not in report  # three classes


@pytest.mark.parametrize("rows,args,words", [
    ([("a", "x"), ("b", "y")], ["--label-col", "nope"], "column(s) nope not found"),
    ([("a", "x"), ("b", "x")], [], "only one class"),
    ([("a", "0.5"), ("b", "1.5")], [], "integers or strings"),
    (None, [], "empty"),
])
def test_bad_training_input(tiny_bases, tmp_path, rows, args, words):
    path = tmp_path / "d.csv"
    if rows is None:
        path.write_text("")
    else:
        write_csv(path, rows)
    cmd = [sys.executable, "-m", "adapterserve.adapters.train", "--base-model", tiny_bases["bert"], "--data", str(path),
           "--text-col", "text", "--label-col", "label", "--out", str(tmp_path / "o"), "--quiet"]
    if args:
        cmd[cmd.index("--label-col"):cmd.index("--label-col") + 2] = args
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode != 0
    assert words in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o")
